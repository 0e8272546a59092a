"""The documentation names only things that exist: README.md and docs/*.md are checked for broken relative links
and anchors, config paths that are not shipped, `hllm-pipeline` commands and options the CLI does not have,
`key=value` settings the stage configs do not have (a renamed setting's old name included), and `make` targets the
Makefile does not have. Nothing is trained or run: the checks read the Markdown, the click command tree and the
config dataclasses."""

from __future__ import annotations

import functools
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import click
import pytest

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "stages" / "configs"


def doc_files() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


# --------------------------------------------------------------------------------------------------------------
# Markdown


@dataclass
class Doc:
    path: Path
    prose: str
    """The text outside fenced code blocks (code blocks replaced by blank lines, so line numbers hold)."""
    blocks: list[list[str]]
    """The lines of each fenced code block."""


def parse(path: Path, text: str | None = None) -> Doc:
    text = path.read_text(encoding="utf-8") if text is None else text
    prose, blocks, block = [], [], None
    for line in text.split("\n"):
        if line.lstrip().startswith(("```", "~~~")):
            if block is None:
                block = []
            else:
                blocks.append(block)
                block = None
            prose.append("")
        elif block is not None:
            block.append(line)
            prose.append("")
        else:
            prose.append(line)
    return Doc(path, "\n".join(prose), blocks)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: the rendered text lowercased, punctuation but '-' and '_' removed, spaces
    turned into '-'."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip())  # a link: its text
    text = text.lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(doc: Doc) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for line in doc.prose.split("\n"):
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        base = slug(m.group(1))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def broken_links(doc: Doc) -> list[str]:
    """Relative link targets that do not exist, and #anchors that match no heading of their target file."""
    bad = []
    for target in LINK.findall(doc.prose):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        if not file_part:  # an anchor in this page
            if anchor not in anchors(doc):
                bad.append(f"{doc.path.name}: {target} (no heading with that anchor in {doc.path.name})")
            continue
        dest = (doc.path.parent / file_part).resolve()
        if not dest.exists():
            bad.append(f"{doc.path.name}: {target} (no such file)")
            continue
        if anchor:
            if dest.suffix != ".md" or not dest.is_file():
                bad.append(f"{doc.path.name}: {target} (an anchor into a file that is not Markdown)")
            elif anchor not in anchors(parse(dest)):
                bad.append(f"{doc.path.name}: {target} (no heading with that anchor in {dest.name})")
    return bad


def code_spans(doc: Doc) -> list[str]:
    """The inline code spans of the prose, whitespace normalised, table escapes (`\\|`) undone."""
    spans = []
    for paragraph in re.split(r"\n\s*\n", doc.prose):
        for span in re.findall(r"(?<!`)`([^`]+)`(?!`)", paragraph):
            spans.append(" ".join(span.replace("\\|", "|").split()))
    return spans


def block_commands(doc: Doc) -> list[str]:
    """The command lines of the code blocks: continuation lines joined, prompts and comments removed."""
    lines = []
    for block in doc.blocks:
        joined, current = [], ""
        for line in block:
            if line.rstrip().endswith("\\"):
                current += line.rstrip()[:-1] + " "
                continue
            joined.append(current + line)
            current = ""
        if current:
            joined.append(current)
        for line in joined:
            line = re.sub(r"^\s*\$\s+", "", line)
            line = re.sub(r"(^|\s)#.*$", "", line)
            if line.strip():
                lines.append(" ".join(line.split()))
    return lines


def shell_snippets(doc: Doc) -> list[str]:
    return code_spans(doc) + block_commands(doc)


def segments(snippet: str) -> list[list[str]]:
    """A snippet's simple commands as token lists: split at &&, ||, ; and pipes (` | `; a `|` inside a word lists
    alternatives, as in `embed|train`), cut at the first redirection, brackets of optional parts removed."""
    out = []
    for part in re.split(r"\s*(?:&&|\|\||;|\s\|\s)\s*", snippet):
        try:
            tokens = shlex.split(part)
        except ValueError:
            tokens = part.split()
        cut = next((i for i, t in enumerate(tokens) if re.match(r"^\d?>", t)), len(tokens))
        tokens = [t.strip("[]") for t in tokens[:cut]]
        if tokens:
            out.append([t for t in tokens if t])
    return out


# --------------------------------------------------------------------------------------------------------------
# What exists: the command tree, the settings of each stage command, the Makefile targets


@functools.cache
def command_tree() -> click.Group:
    from pipeline.cli import command_line
    return command_line()


@functools.cache
def stage_settings() -> dict[tuple[str, ...], frozenset[str]]:
    """For each generated stage command (by its path, e.g. ('data', 'prepare')), its settings as `key` or
    `section.key`, as `--show-settings` lists them."""
    from pipeline import config as cfg
    from pipeline.cli import STAGES

    paths = {"prepare": ("data", "prepare"), "items": ("refresh", "items"), "users": ("refresh", "users")}
    out = {}
    for name, spec in STAGES.items():
        keys = [m.group(1) for line in cfg.describe(spec.config).split("\n")
                if (m := re.match(r"^([\w.]+) \(", line))]
        assert keys, f"no settings found for {name}"
        out[paths.get(name, (name,))] = frozenset(keys)
    return out


@functools.cache
def make_targets() -> frozenset[str]:
    text = (REPO / "Makefile").read_text(encoding="utf-8")
    return frozenset(re.findall(r"^([A-Za-z][\w-]*)\s*:(?!=)", text, flags=re.M))


def command_start(tokens: list[str]) -> int | None:
    """Index of the first argument after `hllm-pipeline` (or `-m pipeline.cli`) where the command is run, else
    None (the name only mentioned, as in "the hllm-pipeline command")."""
    i = 0
    while i < len(tokens) and re.match(r"^[A-Z_][A-Z0-9_]*=", tokens[i]):  # VAR=value before a command
        i += 1
    if i < len(tokens) and (tokens[i] == "hllm-pipeline" or tokens[i].endswith("/hllm-pipeline")):
        return i + 1
    if "pipeline.cli" in tokens:
        j = tokens.index("pipeline.cli")
        if j > 0 and tokens[j - 1] == "-m":
            return j + 1
    return None


def check_command(tokens: list[str], where: str) -> list[str]:
    """Offenders in one `hllm-pipeline ...` command: an unknown command or subcommand, an option the command does
    not have, a `key=value` setting its stage config does not have."""
    start = command_start(tokens)
    if start is None:
        return []
    bad: list[str] = []

    def walk(command: click.Command, path: tuple[str, ...], rest: list[str]) -> None:
        if hasattr(command, "commands"):  # a group (typer may carry its own copy of click)
            if not rest or rest[0].startswith("-") or "..." in rest[0]:
                return  # the group itself named ("hllm-pipeline bench")
            for alternative in rest[0].split("|"):
                sub = command.commands.get(alternative)
                if sub is None:
                    bad.append(f"{where}: hllm-pipeline {' '.join(path + (alternative,))} (no such command)")
                else:
                    walk(sub, path + (alternative,), rest[1:])
            return
        options = {"--help"} | {o for p in command.params for o in (*p.opts, *p.secondary_opts) if o.startswith("-")}
        settings = stage_settings().get(path)
        for token in rest:
            if "..." in token:
                continue
            if token.startswith("--"):
                flag = token.split("=", 1)[0]
                if flag not in options:
                    bad.append(f"{where}: hllm-pipeline {' '.join(path)} {flag} (no such option)")
            elif settings is not None and re.match(r"^[A-Za-z_][\w.]*=", token):
                key = token.split("=", 1)[0]
                if key not in settings:
                    bad.append(f"{where}: hllm-pipeline {' '.join(path)} {key}=... (no such setting)")

    walk(command_tree(), (), tokens[start:])
    return bad


def check_make(tokens: list[str], where: str) -> list[str]:
    if not tokens or tokens[0] != "make":
        return []
    return [f"{where}: make {t} (no such target)" for t in tokens[1:]
            if not t.startswith("-") and "=" not in t and "..." not in t and t not in make_targets()]


def config_paths(doc: Doc) -> list[str]:
    """Config files named: `stages/configs/...yaml` paths, and bare names like `embed-ml-1m-cpu.yaml`."""
    text = doc.prose + "\n" + "\n".join("\n".join(block) for block in doc.blocks)
    bad = []
    for path in sorted(set(re.findall(r"stages/configs/[\w./-]*\.yaml", text))):
        if not (REPO / path).is_file():
            bad.append(f"{doc.path.name}: {path}")
    shipped = {p.name for p in CONFIGS.rglob("*.yaml")}
    for name in sorted(set(re.findall(r"(?<![\w/.$<-])([A-Za-z0-9_]+-[\w-]*\.yaml)\b", text))):
        if name not in shipped:
            bad.append(f"{doc.path.name}: {name} (not under stages/configs/)")
    return bad


def loose_settings(snippet: str, where: str) -> list[str]:
    """`section.key=value` written without its command (`user.dropout=0.5` in a sentence): the key must be a setting
    of some stage command."""
    known = frozenset().union(*stage_settings().values())
    return [f"{where}: {key}=... (no stage command has this setting)"
            for key in re.findall(r"(?<![\w.-])([a-z_]\w*(?:\.\w+)+)=(?!=)", snippet) if key not in known]


def command_offenders(doc: Doc) -> list[str]:
    bad = []
    for snippet in shell_snippets(doc):
        for tokens in segments(snippet):
            bad += check_command(tokens, doc.path.name)
            bad += check_make(tokens, doc.path.name)
        if not any(command_start(tokens) is not None for tokens in segments(snippet)):
            bad += loose_settings(snippet, doc.path.name)
    return bad


# --------------------------------------------------------------------------------------------------------------
# The checks, on every page


DOCS = doc_files()
IDS = [str(p.relative_to(REPO)) for p in DOCS]


def test_the_docs_are_there():
    names = {p.name for p in DOCS}
    assert "README.md" in names and len(DOCS) > 5, names
    assert len((REPO / "README.md").read_text(encoding="utf-8").split("\n")) <= 220, "README.md is too long"


@pytest.mark.parametrize("path", DOCS, ids=IDS)
def test_links_and_anchors_resolve(path):
    bad = broken_links(parse(path))
    assert not bad, "broken links:\n" + "\n".join(bad)


@pytest.mark.parametrize("path", DOCS, ids=IDS)
def test_config_paths_exist(path):
    bad = config_paths(parse(path))
    assert not bad, "config files that are not shipped:\n" + "\n".join(bad)


@pytest.mark.parametrize("path", DOCS, ids=IDS)
def test_commands_options_and_settings_exist(path):
    bad = command_offenders(parse(path))
    assert not bad, "commands, options, settings or make targets that do not exist:\n" + "\n".join(bad)


def test_every_page_is_linked_from_the_readme():
    readme = parse(REPO / "README.md")
    linked = {(REPO / t.partition("#")[0]).resolve() for t in LINK.findall(readme.prose) if t.startswith("docs/")}
    missing = [p.name for p in DOCS[1:] if p.resolve() not in linked]
    assert not missing, f"docs pages the README does not link: {missing}"


# --------------------------------------------------------------------------------------------------------------
# The checks can fail


def test_the_checks_catch_what_is_wrong(tmp_path):
    (tmp_path / "other.md").write_text("# Other page\n\n## A section\n")
    text = "\n".join([
        "# Page", "",
        "[ok](other.md#a-section) [ok](#page) [gone](missing.md) [bad anchor](other.md#no-section)",
        "[bad own anchor](#nowhere)", "",
        "Run `hllm-pipeline train-user --config stages/configs/no-such.yaml user.nme=sasrec` or "
        "`hllm-pipeline bench embed|nope` or `hllm-pipeline evaluate` or `hllm-pipeline eval --no-such-flag`.", "",
        "```bash",
        "hllm-pipeline embed-items --config stages/configs/embed-ml-100k-cpu.yaml \\",
        "    model.user_model=x train.epochs=2 ...   # a renamed key and a real one",
        "hllm-pipeline eval --run artifacts/x --k 10 50 200 candidates=interacted",
        "make embed-items && make no-such-target DATASET=ml-1m",
        "```",
        "and `missing-config.yaml`, with `user.dropout=0.5 user.dropuot=0.2`.",
    ])
    doc = parse(tmp_path / "page.md", text)
    links = broken_links(doc)
    assert [b.split(": ", 1)[1] for b in links] == [
        "missing.md (no such file)", "other.md#no-section (no heading with that anchor in other.md)",
        "#nowhere (no heading with that anchor in page.md)"], links
    configs = config_paths(doc)
    assert configs == ["page.md: stages/configs/no-such.yaml", "page.md: missing-config.yaml (not under "
                       "stages/configs/)"], configs
    commands = [b.split(": ", 1)[1] for b in command_offenders(doc)]
    assert commands == [
        "hllm-pipeline train-user user.nme=... (no such setting)",
        "hllm-pipeline bench nope (no such command)",
        "hllm-pipeline evaluate (no such command)",
        "hllm-pipeline eval --no-such-flag (no such option)",
        "user.dropuot=... (no stage command has this setting)",
        "hllm-pipeline embed-items model.user_model=... (no such setting)",
        "make no-such-target (no such target)",
    ], commands


def test_anchor_rules():
    assert slug("Stage one: the Item LLM and the embedding shards") == "stage-one-the-item-llm-and-the-embedding-shards"
    assert slug("Comparing runs: `report`") == "comparing-runs-report"
    assert slug("Benchmark: a 1% refresh") == "benchmark-a-1-refresh"
    assert slug("Set-up: two commands") == "set-up-two-commands"


def test_stages_import_only_from_the_library_never_from_each_other():
    import ast

    for path in sorted((REPO / "stages").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(n == "stages" or n.startswith("stages.") for n in names), f"{path.name} imports {names}"


def test_the_models_folder_follows_its_environment_variable(monkeypatch, tmp_path):
    from pipeline.models import presets

    monkeypatch.setenv("HLLM_MODELS_DIR", str(tmp_path / "models"))
    assert presets.models_dir() == tmp_path / "models"
    monkeypatch.delenv("HLLM_MODELS_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert presets.models_dir() == tmp_path / "cache" / "hllm-pipeline" / "models"
