"""The scanner plug-in interface: each check is a small class registered by name.

Like modelscan's scanners, every check returns the same result type, so the verdict,
the reporters (text, JSON, Markdown, HTML, SARIF, JUnit) and MLflow logging treat
all checks alike. A check declares what it needs; the orchestrator skips it (status
`skipped`) when the inputs are missing, e.g. the sensitivity test without --train-data.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from harden.data.pipeline import LabelledDataset
from harden.models import LoadedModel, ModelArtifact
from harden.report import CheckOutcome, Image

PASSED, FAILED, SKIPPED, ERROR = "passed", "failed", "skipped", "error"


@dataclass
class CheckResult(CheckOutcome):
    """A check's outcome plus check-specific, JSON-serialisable details and images."""

    details: dict[str, Any] = field(default_factory=dict)
    images: list[Image] = field(default_factory=list)


@dataclass
class ScanContext:
    """Everything a check may use; fields are None when the user did not supply them."""

    artifact: ModelArtifact
    model: LoadedModel | None
    data: LabelledDataset | None
    train_data: LabelledDataset | None
    task: str  # classifier | encoder
    device: torch.device
    seed: int = 0
    options: dict[str, Any] = field(default_factory=dict)
    workdir: Path | None = None  # where a check may leave files (e.g. a separation for purify)


class Check:
    """Base class: set `name`, `tasks`, the inputs needed, and implement `run`."""

    name: ClassVar[str]
    description: ClassVar[str] = ""
    tasks: ClassVar[tuple[str, ...]] = ("classifier", "encoder")
    needs_model: ClassVar[bool] = True
    needs_data: ClassVar[bool] = True
    needs_train_data: ClassVar[bool] = False

    def missing_inputs(self, ctx: ScanContext) -> str | None:
        """Why this check cannot run on `ctx`, or None when it can."""
        if ctx.task not in self.tasks:
            return f"not applicable to --task {ctx.task}"
        if self.needs_train_data and ctx.train_data is None:
            return "needs --train-data"
        if self.needs_data and ctx.data is None:
            return "needs --data"
        if self.needs_model and ctx.model is None:
            return "the model was not loaded"
        return None

    def run(self, ctx: ScanContext) -> CheckResult:
        raise NotImplementedError


CHECKS: dict[str, type[Check]] = {}


def register_check(cls: type[Check]) -> type[Check]:
    CHECKS[cls.name] = cls
    return cls


def check_names() -> list[str]:
    return list(CHECKS)


