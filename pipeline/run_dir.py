"""The layout of a run folder, in one place: every stage finds its inputs and writes its outputs through RunDir.

    data/              the canonical tables (`data prepare`), unless stage one was given others
    stage1/            stage one's training state (checkpoints, metrics.jsonl, best/)
    item_llm/          the Item LLM stage one trained (its config.yaml records the data it used)
    user_llm_stage1/   the User LLM trained beside it
    embeddings/        versions of the item embeddings, CURRENT naming the one in use
    stage2/            stage two's training state
    user_llm/          the User LLM stage two trained
    users/             versions of the user vectors, CURRENT naming the one in use
    reports/           evaluation reports
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Literal

from pipeline.errors import UserError

WhichUserLLM = Literal["auto", "stage-two", "stage-one", "ranker-late"]


@dataclass(frozen=True)
class RunDir:
    root: Path

    @property
    def stage1(self) -> Path:
        return self.root / "stage1"

    @property
    def item_llm(self) -> Path:
        return self.root / "item_llm"

    @property
    def user_llm_stage1(self) -> Path:
        return self.root / "user_llm_stage1"

    @property
    def embeddings(self) -> Path:
        return self.root / "embeddings"

    @property
    def stage2(self) -> Path:
        return self.root / "stage2"

    @property
    def user_llm(self) -> Path:
        return self.root / "user_llm"

    @property
    def users(self) -> Path:
        return self.root / "users"

    @property
    def reports(self) -> Path:
        return self.root / "reports"

    def report_stamp(self, prefix: str) -> str:
        """A timestamp that no reports/<prefix>-<stamp>.json holds yet (the reports folder is created)."""
        self.reports.mkdir(parents=True, exist_ok=True)
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        name, n = stamp, 1
        while (self.reports / f"{prefix}-{name}.json").exists():
            n += 1
            name = f"{stamp}-{n}"
        return name

    def data(self, given: Path | None = None) -> Path:
        """The canonical tables of the run: `given`, else those stage one recorded, else those stage two recorded
        (a run of ID models has no stage one), else run/data."""
        if given is not None:
            return given
        import yaml

        for config in (self.item_llm / "config.yaml", self.stage2 / "config.yaml"):
            try:
                recorded = (yaml.safe_load(config.read_text()) or {}).get("data")
            except (OSError, ValueError, AttributeError):
                recorded = None
            if recorded:
                return Path(recorded)
        return self.root / "data"

    def trained_user_llm(self, which: WhichUserLLM = "auto") -> Path:
        """The run's User LLM folder: stage-two (user_llm/), stage-one (user_llm_stage1/), auto (stage two's
        where it was trained) or ranker-late (the late-fusion ranker, ranker-late/model/)."""
        if which == "ranker-late":
            path = self.root / "ranker-late" / "model"
            if not (path / "user_llm.json").is_file():
                raise UserError(f"{path}: no trained late-fusion ranker; run `hllm-pipeline train-ranker "
                                f"--fusion late --run {self.root}` first")
            return path
        if which == "stage-two" or (which == "auto" and self.user_llm.is_dir()):
            path = self.user_llm
        else:
            path = self.user_llm_stage1
        if not (path / "user_llm.json").is_file():
            raise UserError(f"{path}: no trained User LLM; run `make train-user` (stage two) or `make embed-items` "
                            f"(stage one) first, or evaluate the floor with --model popularity")
        return path
