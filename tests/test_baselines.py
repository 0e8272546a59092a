"""Baselines and recipes in the same harness: item-ID models (SASRec), the loss options, the projection of stage
two, and the candidate set of eval. Planted data: users walk the item cycle, next item = current + 1."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import run_cli, stage_two_settings

from pipeline import config as cfg
from pipeline.embeddings.store import load_embeddings
from pipeline.errors import ConfigError, UserError
from pipeline.models import build
from pipeline.models.hstu import HSTUConfig, HSTUModel, lookup
from pipeline.models.item_sources import IdItems
from pipeline.models.llm import UserLLM
from pipeline.models.loss import nce_loss, projected_softmax_loss, softmax_loss
from pipeline.search import Masked, TorchSearch, masked_topk
from stages import train_user as stage_two

pytestmark = pytest.mark.slow  # trains models: the full tier (make test), not make test-fast

RANDOM_RECALL_AT_5 = 5 / 30  # 40 items, 10 of them the masked history: a random ranking's recall@5



def settings(cached, run: Path, *extra: str) -> stage_two.TrainUserConfig:
    return stage_two_settings(cached, run, "train.epochs=12", "train.patience=30", "train.eval_users=120",
                              "train.log_every=50", *extra)


def evaluate(cached, run: Path, *extra: str) -> dict:
    done = run_cli("eval", "--k", "1", "5", "10", "--run", str(run), f"data={cached['data']}", *extra)
    assert done.returncode == 0, done.stderr
    return json.loads(Path(done.stdout.splitlines()[-1].split()[1]).read_text())


def assert_learned(report: dict) -> None:
    m, floor = report["metrics"], report["popularity"]
    assert m["recall@5"] >= floor["recall@5"] + 0.3, report
    assert m["recall@5"] >= RANDOM_RECALL_AT_5 + 0.3, report


@pytest.mark.parametrize(("model", "loss"), [("sasrec", "nce"), ("sasrec", "softmax"), ("hstu", "nce")])
def test_id_baselines_learn_the_pattern_and_eval_reads_them(cached, tmp_path, model, loss):
    """SASRec and HSTU need no text and no stage one: item-ID embeddings through the same loop, saved as a User
    LLM that eval loads without any cached embeddings."""
    run = tmp_path / model
    run.mkdir()
    conf = settings(cached, run, "items=id", f"user.name={model}", "user.dropout=0.1", "user.scale_inputs=true",
                    f"train.loss={loss}")
    stage_two.run(conf, log=lambda _: None)
    meta = json.loads((run / "user_llm" / "user_llm.json").read_text())
    assert meta["items"] == "id" and meta["model"] == model and meta["num_items"] == 40 and meta["scale_inputs"]
    report = evaluate(cached, run)
    assert report["protocol"]["model"]["items"] == "id" and report["protocol"]["model"]["embeddings_version"] is None
    assert report["protocol"]["model"]["name"] == f"{model} (stage two)"
    assert report["protocol"]["candidates"] == "all" and report["protocol"]["candidate_items"] == 40
    assert_learned(report)


def test_projection_lets_a_narrow_user_llm_read_wide_embeddings(cached, tmp_path):
    run = tmp_path / "proj"
    with pytest.raises(UserError, match="set user.projection=true"):
        stage_two.run(settings(cached, run, "user.name=llama-tiny", "user.hidden_size=32"), log=lambda _: None)
    conf = settings(cached, run, "user.name=llama-tiny", "user.hidden_size=32", "user.projection=true")
    stage_two.run(conf, log=lambda _: None)
    meta = json.loads((run / "user_llm" / "user_llm.json").read_text())
    assert meta["projection"] is True and json.loads((run / "user_llm" / "config.json").read_text())[
        "hidden_size"] == 32
    assert_learned(evaluate(cached, run))


def test_text_plus_ids_is_a_recipe_of_stage_two(cached, tmp_path):
    """Text + ID with a narrow ID table (8 numbers per item, mapped up to the embeddings' 64); the full-width
    table is the default and is trained in test_loop."""
    run = tmp_path / "sum"
    stage_two.run(settings(cached, run, "items=cached+id", "id_width=8", "user.name=llama-tiny"), log=lambda _: None)
    # the ID table starts at the cached vectors' spread (std 1 here): scaled by 1 / 0.02, and loaded back so
    table = load_embeddings(run / "embeddings" / "v-test").embeddings
    meta = json.loads((run / "user_llm" / "user_llm.json").read_text())
    assert meta["id_scale"] == pytest.approx(float(table[1:].std()) / 0.02) and meta["id_width"] == 8
    loaded, _ = build.load_user_model(run / "user_llm", table)
    ids = loaded.items.sources[1]
    assert ids.scale == meta["id_scale"] and ids.embedding.weight.shape == (41, 8) and ids.widen.weight.shape == (
        64, 8)
    assert ids.embedding.weight.abs().sum() > 0 and not ids.embedding.weight[0].any()
    report = evaluate(cached, run)
    assert report["protocol"]["model"]["items"] == "cached+id" and report["protocol"]["model"]["embeddings_version"]
    assert_learned(report)


def test_settings_that_cannot_work_together_are_refused(cached, tmp_path):
    with pytest.raises(ConfigError, match="in_batch_negatives=true adds nothing to train.loss=softmax"):
        cfg.load(stage_two.TrainUserConfig, None, ["data=d", "run=r", "train.loss=softmax",
                                                    "train.in_batch_negatives=true"])
    with pytest.raises(ConfigError, match="train.max_len=300: the User LLM has 256 positions"):
        stage_two.run(settings(cached, tmp_path / "long", "items=id", "user.name=hstu", "train.max_len=300"),
                      log=lambda _: None)
    with pytest.raises(ConfigError, match="HSTUModel does not support it"):
        stage_two.run(settings(cached, tmp_path / "gc", "items=id", "user.name=hstu",
                               "user.gradient_checkpointing=true"), log=lambda _: None)


def test_a_fixed_temperature_is_not_replaced_by_a_saved_logit_scale(tmp_path):
    from pipeline.models.item_sources import IdItems
    from pipeline.models.sequence_model import SequenceModel

    user = build.build_user_llm("hstu", "scratch", log=lambda _: None)
    learned = SequenceModel(IdItems(5, user.dim), user)
    with torch.no_grad():
        learned.logit_scale.fill_(1.0)
    build.save_user_llm(learned, tmp_path / "saved", {})
    fixed = SequenceModel(IdItems(5, user.dim), user, temperature=0.05)
    build.load_user_head(fixed, tmp_path / "saved")
    assert fixed.logit_scale.exp().item() == pytest.approx(20.0) and not fixed.logit_scale.requires_grad
    build.load_user_head(learned_again := SequenceModel(IdItems(5, user.dim), user), tmp_path / "saved")
    assert learned_again.logit_scale.item() == pytest.approx(1.0)


def test_user_model_shape_settings_are_checked():
    with pytest.raises(ConfigError, match="id_width=8: a positive width for items=cached\\+id"):
        cfg.load(stage_two.TrainUserConfig, None, ["data=d", "run=r", "items=id", "id_width=8"])
    with pytest.raises(ConfigError, match="user.dropout=1.5"):
        cfg.load(stage_two.TrainUserConfig, None, ["data=d", "run=r", "user.init=scratch", "user.dropout=1.5"])
    with pytest.raises(ConfigError, match="with user.init=stage-one the weights fix them"):
        cfg.load(stage_two.TrainUserConfig, None, ["data=d", "run=r", "user.hidden_size=32"])


def reference_loss(user_out, targets, target_ids, negatives, negative_ids, scale) -> torch.Tensor:
    """Per position, written out one at a time: -log softmax of the positive among itself and the negatives
    that are not the target item."""
    out = []
    for p in range(len(user_out)):
        u = user_out[p] / user_out[p].norm()
        logits = [float(u @ targets[p] / targets[p].norm()) * scale]
        logits += [float(u @ n / n.norm()) * scale for n, i in zip(negatives, negative_ids, strict=True)
                   if i != target_ids[p]]
        logits = torch.tensor(logits, dtype=torch.float64)
        out.append(-(logits[0] - torch.logsumexp(logits, 0)))
    return torch.stack(out)


def test_sampled_and_full_softmax_losses_agree_with_a_reference():
    g = torch.Generator().manual_seed(0)
    table = torch.randn(8, 5, generator=g)  # rows 1..7 are items
    user_out = torch.randn(4, 5, generator=g)
    target_ids = torch.tensor([1, 3, 3, 7])
    scale = 7.0
    # sampled: shared negatives with a collision (3) and a repeat (5)
    sampled = torch.tensor([3, 5, 5, 2])
    got = nce_loss(user_out, table[target_ids], target_ids, table[sampled], sampled,
                   torch.tensor(scale).log()).loss_per_position
    want = reference_loss(user_out, table[target_ids], target_ids, table[sampled], sampled, scale)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    # full softmax: every item a negative is exactly cross-entropy over the catalogue
    every = torch.arange(1, 8)
    got = nce_loss(user_out, table[target_ids], target_ids, table[every], every,
                   torch.tensor(scale).log()).loss_per_position
    logits = F.normalize(user_out, dim=-1) @ F.normalize(table[1:], dim=-1).T * scale  # (4, 7)
    torch.testing.assert_close(got, F.cross_entropy(logits, target_ids - 1, reduction="none"))
    # the fast path of loss=softmax: the same numbers without the concatenation and the mask
    fast = softmax_loss(user_out, target_ids, table[1:], torch.tensor(scale).log())
    torch.testing.assert_close(fast.loss_per_position, got)
    slow = nce_loss(user_out, table[target_ids], target_ids, table[every], every, torch.tensor(scale).log())
    assert torch.equal(fast.top1_correct, slow.top1_correct)
    assert torch.equal(fast.surviving_negatives, slow.surviving_negatives)


def test_projected_softmax_scores_in_the_narrow_width_with_the_same_loss_and_gradients():
    g = torch.Generator().manual_seed(3)
    catalogue = torch.randn(9, 12, generator=g)  # 9 items of size 12, scored from a width-4 User LLM
    projection = torch.nn.Linear(4, 12)
    target_ids = torch.tensor([1, 4, 9, 4, 2])
    scale = torch.tensor(20.0).log()

    def loss_and_grads(fast: bool):
        hidden = torch.randn(5, 4, generator=torch.Generator().manual_seed(4), requires_grad=True)
        projection.zero_grad()
        out = projected_softmax_loss(hidden, projection, target_ids, catalogue, scale) if fast else \
            softmax_loss(projection(hidden), target_ids, catalogue, scale)
        out.loss_per_position.sum().backward()
        return out, hidden.grad, projection.weight.grad.clone(), projection.bias.grad.clone()

    fast, slow = loss_and_grads(True), loss_and_grads(False)
    torch.testing.assert_close(fast[0].loss_per_position, slow[0].loss_per_position)
    assert torch.equal(fast[0].top1_correct, slow[0].top1_correct)
    for got, want in zip(fast[1:], slow[1:], strict=True):
        torch.testing.assert_close(got, want)


def test_projecting_rows_before_the_gather_gives_the_same_inputs():
    user = build.UserModelConfig(name="llama-tiny", init="scratch", projection=True, scale_inputs=True)
    torch.manual_seed(0)
    model = build.sequence_model(IdItems(6, 12), build.user_llm_from(user, log=lambda _: None), user)
    rows = torch.randn(7, 12)
    few = torch.tensor([[0, 2, 5, 5], [1, 6, 3, 2]])  # 8 positions > 7 rows: projects the rows first
    many = torch.tensor([[4, 1]])  # 2 positions: gathers first
    for index in (few, many):
        want = model.project_in(rows[index]) * model.input_scale
        torch.testing.assert_close(model.inputs(rows, index, index, None), want)


def test_items_outside_the_candidate_set_are_never_ranked():
    g = torch.Generator().manual_seed(1)
    items = F.normalize(torch.randn(6, 4, generator=g), dim=-1).numpy()
    queries = items[[2, 4]]  # each user's best match is an excluded item
    masked = Masked.from_histories(np.array([0, 1, 2]), np.array([1, 6]), "full").plus(np.array([3, 5]))
    assert masked.counts.tolist() == [3, 3]
    _, top = masked_topk(TorchSearch(items), queries, masked, 3)
    assert not np.isin(top, [3, 5]).any() and 1 not in top[0] and 6 not in top[1]
    assert set(top[0]) == {2, 4, 6} and set(top[1]) == {1, 2, 4}


def tiny_hstu(relative_bias: bool = True, seed: int = 0) -> HSTUModel:
    torch.manual_seed(seed)
    config = HSTUConfig(hidden_size=8, num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=16,
                        dropout=0.0, relative_bias=relative_bias)
    return HSTUModel(config).eval()


def reference_hstu_block(block, x, stamps) -> torch.Tensor:
    """One HSTU block written out per query position i and key j <= i (one sequence, no padding)."""
    L, D = x.shape
    heads, d = block.heads, D // block.heads
    u, v, q, k = F.silu(F.layer_norm(x, (D,), eps=block.eps) @ block.uvqk.weight.T).chunk(4, dim=-1)
    attended = torch.zeros(L, D)
    for i in range(L):
        for j in range(i + 1):
            bucket = int(math.log(max(abs(int(stamps[i] - stamps[j])), 1)) / 0.301)
            bias = block.bias.position_bias[i - j] + block.bias.time_bias[min(bucket, len(block.bias.time_bias) - 1)]
            for h in range(heads):
                part = slice(h * d, (h + 1) * d)
                weight = F.silu(q[i, part] @ k[j, part] + bias) / block.n
                attended[i, part] += weight * v[j, part]
    return x + block.out(u * F.layer_norm(attended, (D,), eps=block.eps))


def test_hstu_applies_its_relative_position_and_time_bias():
    model = tiny_hstu()
    with torch.no_grad():
        for block in model.blocks:  # weights large enough that a wrong index would show
            block.bias.position_bias.normal_(0, 1.0)
            block.bias.time_bias.normal_(0, 1.0)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 6, 8, generator=g)
    stamps = torch.tensor([[1_000, 1_030, 5_000, 90_000, 90_001, 3_000_000]])
    mask = torch.ones(1, 6, dtype=torch.long)
    out = model(inputs_embeds=x, attention_mask=mask, timestamps=stamps).last_hidden_state
    # the same computation by hand, block by block
    want = x[0] + model.position_embeddings(torch.arange(6))
    for block in model.blocks:
        want = reference_hstu_block(block, want, stamps[0])
    torch.testing.assert_close(out[0], want, rtol=1e-5, atol=1e-5)
    # the bias changes the output: other time gaps (same order), no time at all, or no bias module
    later = stamps.clone()
    later[0, 3:] += 7 * 86_400
    assert not torch.allclose(out, model(inputs_embeds=x, attention_mask=mask, timestamps=later).last_hidden_state)
    assert not torch.allclose(out, model(inputs_embeds=x, attention_mask=mask).last_hidden_state)
    plain = tiny_hstu(relative_bias=False)
    plain.load_state_dict(model.state_dict(), strict=False)
    assert not torch.allclose(out, plain(inputs_embeds=x, attention_mask=mask, timestamps=stamps).last_hidden_state)


def test_hstu_is_causal_and_ignores_left_padding():
    model = tiny_hstu()
    g = torch.Generator().manual_seed(4)
    x = torch.randn(1, 5, 8, generator=g)
    stamps = torch.tensor([[10, 20, 400, 8_000, 9_000]])
    user_llm = UserLLM(model)
    alone = user_llm(x, torch.ones(1, 5, dtype=torch.long), stamps)
    padded = user_llm(torch.cat([torch.randn(1, 3, 8, generator=g), x], 1),
                      torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1]]), torch.cat([torch.zeros(1, 3, dtype=torch.long),
                                                                            stamps], 1))
    torch.testing.assert_close(padded[:, 3:], alone, rtol=1e-5, atol=1e-6)
    changed = x.clone()
    changed[0, 4] += 5.0
    torch.testing.assert_close(user_llm(changed, torch.ones(1, 5, dtype=torch.long), stamps)[:, :4], alone[:, :4])


def test_hstu_bias_lookup_gradient_matches_plain_indexing():
    g = torch.Generator().manual_seed(5)
    table = torch.randn(7, generator=g, dtype=torch.float64, requires_grad=True)
    index = torch.randint(0, 7, (3, 40, 40), generator=g)
    upstream = torch.randn(3, 40, 40, generator=g, dtype=torch.float64)
    (lookup(table, index) * upstream).sum().backward()
    fast = table.grad.clone()
    table.grad = None
    (table[index] * upstream).sum().backward()
    torch.testing.assert_close(fast, table.grad)


@pytest.mark.parametrize("path", sorted((Path(__file__).parent.parent / "stages" / "configs").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_every_shipped_config_is_valid(path, tmp_path):
    from stages import embed_items, prepare, train_ranker

    kind = {"data": prepare.PrepareConfig, "embed": embed_items.EmbedItemsConfig,
            "ranker": train_ranker.TrainRankerConfig}.get(path.name.split("-")[0], stage_two.TrainUserConfig)
    conf = cfg.load(kind, path, [f"source={tmp_path}"] if kind is prepare.PrepareConfig else [])
    if kind is stage_two.TrainUserConfig and conf.items == "id":  # the ID baselines: checkable without data
        assert conf.user.init == "scratch" and conf.train.early_stopping_metric == "ndcg@10"


def test_a_saved_head_that_does_not_fit_the_model_is_refused_not_left_random(tmp_path):
    from safetensors.torch import load_file, save_file

    from pipeline.models.item_sources import IdItems
    from pipeline.models.sequence_model import SequenceModel

    user = build.build_user_llm("hstu", "scratch", log=lambda _: None)
    saved = SequenceModel(IdItems(5, user.dim), user, time_embedding=True)
    build.save_user_llm(saved, tmp_path / "saved", {})
    file = tmp_path / "saved" / "user_head.safetensors"
    head = load_file(str(file))

    # the catalogue grew by two items since training: learned rows kept, new rows zero
    grown = SequenceModel(IdItems(7, user.dim), user, time_embedding=True)
    build.load_user_head(grown, tmp_path / "saved")
    table = grown.items.embedding.weight
    assert torch.equal(table[:6], saved.items.embedding.weight) and not table[6:].any()

    time_key = next(k for k in head if k.startswith("time.") and head[k].dim() == 2)
    for broken, message in [
        ({k: v for k, v in head.items() if k != time_key}, f"lacks {time_key}"),
        ({**head, time_key: head[time_key][:, :3].contiguous()}, f"{time_key} has shape"),
        ({**head, "stray.weight": torch.zeros(2)}, "holds stray.weight"),
    ]:
        save_file(broken, str(file))
        fresh = SequenceModel(IdItems(5, user.dim), user, time_embedding=True)
        with pytest.raises(UserError, match=message):
            build.load_user_head(fresh, tmp_path / "saved")
    # stage two starting from stage one's model may add pieces stage one did not have (they start fresh)
    save_file({k: v for k, v in head.items() if k != time_key}, str(file))
    fresh = SequenceModel(IdItems(5, user.dim), user, time_embedding=True)
    initial = fresh.state_dict()[time_key].clone()
    build.load_user_head(fresh, tmp_path / "saved", partial=True)
    assert torch.equal(fresh.state_dict()[time_key], initial)
    assert torch.equal(fresh.items.embedding.weight, saved.items.embedding.weight)
