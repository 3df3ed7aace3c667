"""Sensitivity test: separate a suspect training set into clean / poisoned / uncertain samples.

The D-BR "SD" module adapted to harden's inputs (algorithms.md §4, option A): each
training sample is scored on the *given* model by its feature consistency under a
transformation (FCT): Δ(x) = mean_j (f_j(x) − f_j(τ(x)))², τ = random rotation then
random translation (nearest, zero fill), averaged over `draws` τ draws. A backdoor
trigger is a small, position-bound pattern; moving it (partly out of the image) breaks
the shortcut, so poisoned samples change far more than clean ones.

Choices (measured on digits 3×32×32, BadNets 10 %, SmallCNN, AUC of Δ for poison):
- Features f: the softmax output by default. It is the same for every format (a pt2
  GraphModule has no submodules to hook) and separated best: AUC 0.98 vs 0.83 for the
  input of the final linear layer (`feature="penultimate"`, plain modules only).
- τ: rotation ±15°, translation ±0.2 of the size. D-BR's ±180° rotation destroys clean
  digits as much as triggers (AUC 0.72 softmax, 0.46 penultimate); exposed as options.
- τ parameters are drawn once per sample id from the seed, so scores do not depend on
  batch size or order (D-BR re-drew τ at separation and lost sample ids).

Thresholds (Δ ascending): by default D-BR's budgets, γ_c = s[⌊α_c N⌋], γ_p = s[N − ⌊α_p N⌋]
(α_c 0.20, α_p 0.05; budgets, not poison-rate estimates). When the defender's clean data
(`--data`) is given, thresholds are calibrated on its Δ distribution instead: poisoned ⇔
Δ ≥ its `clean_quantile` (0.99) quantile, clean ⇔ Δ ≤ its median; the flagged set then
follows the actual poison rate (≈1 % false positives) instead of a fixed budget.

Options: `ctx.options["sensitivity"]`, a dict of `SensitivityConfig` fields.

Output, written atomically to `ctx.workdir / "separation.json"` and consumed by
`harden purify --method unlearn-relearn` (schema `harden.separation/1`)::

    {"schema": "harden.separation/1", "model_uri": str, "num_samples": N,
     "feature": "softmax" | "penultimate", "calibration": "clean-data" | "budget",
     "config": {SensitivityConfig fields}, "seed": int,
     "thresholds": {"clean": γ_c, "poisoned": γ_p},        # the ones applied
     "budget_thresholds": {"clean": ..., "poisoned": ...},
     "clean_reference": {"samples": n, "median": ..., "quantile": q, "value": ...} | null,
     "scores": [Δ per sample id], "labels": [given label per sample id],
     "clean": [ids], "poisoned": [ids], "uncertain": [ids],
     "poisoned_label_histogram": {"label": count, ...}}

Sample ids are positions in `--train-data` as harden loads it (`load_data` order).
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from harden.data.pipeline import LabelledDataset, make_loader
from harden.models.wrappers import PixelModel
from harden.report import Finding, register_rule, write_atomic
from harden.scan.base import PASSED, Check, CheckResult, ScanContext, register_check

SCHEMA = "harden.separation/1"
RULE = "harden.data.poisoned-samples"
FeatureFn = Callable[[torch.Tensor], torch.Tensor]

register_rule(
    RULE, "Training set holds a concentrated group of trigger-sensitive samples",
    "Many training samples are unusually sensitive to small rotations and translations (D-BR feature consistency "
    "test) and most of them carry the same label: the signature of a poisoned training set and its target class.",
    "Inspect the flagged samples listed in separation.json; remove them or run harden purify --method unlearn-relearn.",
)


@dataclass(frozen=True)
class SensitivityConfig:
    rotation: float = 15.0  # degrees, uniform in ±rotation
    translate: float = 0.2  # fraction of width/height, uniform in ±translate
    draws: int = 3
    batch_size: int = 256
    feature: str = "softmax"  # softmax | penultimate
    alpha_clean: float = 0.20
    alpha_poison: float = 0.05
    clean_quantile: float = 0.99
    concentration: float = 0.5  # share of flagged samples on one label that makes a finding
    min_flagged: int = 10

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> "SensitivityConfig":
        known = {f.name for f in fields(cls)}
        given = options.get("sensitivity") or {}
        unknown = set(given) - known
        if unknown:
            raise ValueError(f"unknown sensitivity options: {', '.join(sorted(unknown))}")
        return cls(**given)


def rotate_translate(images: torch.Tensor, angles: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
    """Rotate each image by `angles` (radians) about its centre, then shift by `shifts` (fractions of W, H)."""
    _, _, height, width = images.shape
    cos, sin = torch.cos(angles), torch.sin(angles)
    # affine_grid maps output to input in normalised coordinates; scale keeps rotations rigid on non-square images
    aspect = width / height
    inverse = torch.stack([torch.stack([cos, sin / aspect], 1), torch.stack([-sin * aspect, cos], 1)], 1)
    offset = -(inverse @ (2 * shifts).unsqueeze(-1))
    grid = F.affine_grid(torch.cat([inverse, offset], 2), list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="nearest", padding_mode="zeros", align_corners=False)


@contextmanager
def model_features(module: PixelModel, kind: str) -> Iterator[tuple[str, FeatureFn]]:
    """The features FCT compares; `penultimate` falls back to softmax when there is no final nn.Linear to hook."""
    linears = [m for m in module.net.modules() if isinstance(m, nn.Linear)]
    if kind != "penultimate" or not linears:
        yield "softmax", lambda x: module(x).softmax(1)
        return
    captured: dict[str, torch.Tensor] = {}
    handle = linears[-1].register_forward_hook(lambda _m, inputs, _o: captured.__setitem__("x", inputs[0]))

    def penultimate(x: torch.Tensor) -> torch.Tensor:
        module(x)
        return captured["x"].flatten(1)

    try:
        yield "penultimate", penultimate
    finally:
        handle.remove()


def fct_scores(features: FeatureFn, dataset: LabelledDataset, config: SensitivityConfig, seed: int, device: torch.device) -> np.ndarray:
    """Δ per sample, averaged over τ draws fixed per sample id (batched, order-independent)."""
    generator = torch.Generator().manual_seed(seed)
    count = len(dataset)
    angles = (torch.rand(config.draws, count, generator=generator) * 2 - 1) * math.radians(config.rotation)
    shifts = (torch.rand(config.draws, count, 2, generator=generator) * 2 - 1) * config.translate
    scores, start = [], 0
    with torch.no_grad():
        for images, _ in make_loader(dataset, config.batch_size):
            images, ids = images.to(device), slice(start, start + len(images))
            base = features(images)
            total = torch.zeros(len(images), device=device)
            for draw in range(config.draws):
                moved = rotate_translate(images, angles[draw, ids].to(device), shifts[draw, ids].to(device))
                total += (features(moved) - base).pow(2).mean(1)
            scores.append((total / config.draws).cpu())
            start += len(images)
    return torch.cat(scores).double().numpy()


def budget_thresholds(scores: np.ndarray, alpha_clean: float, alpha_poison: float) -> tuple[float, float]:
    """D-BR budgets: the α_c lowest scores are clean, the α_p highest poisoned."""
    ordered = np.sort(scores)
    count = len(ordered)
    clean = float(ordered[min(int(alpha_clean * count), count - 1)])
    flagged = int(alpha_poison * count)
    # no budget: a finite threshold just above every score, so nothing is flagged and the JSON stays valid
    poisoned = float(ordered[count - flagged]) if flagged else math.nextafter(float(ordered[-1]), math.inf)
    return clean, poisoned


@dataclass
class Separation:
    feature: str
    calibration: str
    thresholds: tuple[float, float]
    budget: tuple[float, float]
    reference: dict[str, float] | None
    scores: np.ndarray
    labels: np.ndarray

    @property
    def poisoned(self) -> np.ndarray:
        return np.flatnonzero(self.scores >= self.thresholds[1])

    @property
    def clean(self) -> np.ndarray:
        return np.flatnonzero((self.scores <= self.thresholds[0]) & (self.scores < self.thresholds[1]))

    @property
    def uncertain(self) -> np.ndarray:
        return np.setdiff1d(np.arange(len(self.scores)), np.union1d(self.poisoned, self.clean))

    def histogram(self) -> dict[str, int]:
        counts = Counter(int(label) for label in self.labels[self.poisoned])
        return {str(label): n for label, n in sorted(counts.items())}

    def to_json(self, model_uri: str, config: SensitivityConfig, seed: int) -> dict[str, Any]:
        return {
            "schema": SCHEMA, "model_uri": model_uri, "num_samples": len(self.scores), "feature": self.feature,
            "calibration": self.calibration, "config": asdict(config), "seed": seed,
            "thresholds": {"clean": self.thresholds[0], "poisoned": self.thresholds[1]},
            "budget_thresholds": {"clean": self.budget[0], "poisoned": self.budget[1]},
            "clean_reference": self.reference,
            "scores": [float(s) for s in self.scores], "labels": [int(y) for y in self.labels],
            "clean": self.clean.tolist(), "poisoned": self.poisoned.tolist(), "uncertain": self.uncertain.tolist(),
            "poisoned_label_histogram": self.histogram(),
        }


def separate(module: PixelModel, train: LabelledDataset, clean: LabelledDataset | None, config: SensitivityConfig,
             seed: int = 0, device: torch.device = torch.device("cpu")) -> Separation:
    """Score `train` and split it; thresholds from `clean`'s scores when given, else from budgets."""
    with model_features(module, config.feature) as (feature, features):
        scores = fct_scores(features, train, config, seed, device)
        reference = fct_scores(features, clean, config, seed + 1, device) if clean is not None and len(clean) else None
    budget = budget_thresholds(scores, config.alpha_clean, config.alpha_poison)
    if reference is None:
        return Separation(feature, "budget", budget, budget, None, scores, np.asarray(train.labels))
    median, upper = float(np.median(reference)), float(np.quantile(reference, config.clean_quantile))
    summary = {"samples": len(reference), "median": median, "quantile": config.clean_quantile, "value": upper}
    return Separation(feature, "clean-data", (median, upper), budget, summary, scores, np.asarray(train.labels))


@register_check
class SensitivityCheck(Check):
    name = "sensitivity"
    description = "D-BR feature-consistency separation of the suspect training set (clean / poisoned / uncertain)"
    tasks = ("classifier",)
    needs_data = False  # clean data only calibrates the thresholds
    needs_train_data = True

    def run(self, ctx: ScanContext) -> CheckResult:
        start = time.perf_counter()
        config = SensitivityConfig.from_options(ctx.options)
        split = separate(ctx.model.module, ctx.train_data, ctx.data, config, ctx.seed, ctx.device)
        record = split.to_json(ctx.model.uri, config, ctx.seed)
        poisoned, histogram = split.poisoned, record["poisoned_label_histogram"]
        top_label, top_count = max(((int(k), v) for k, v in histogram.items()), key=lambda kv: kv[1], default=(None, 0))
        share = top_count / len(poisoned) if len(poisoned) else 0.0
        details: dict[str, Any] = {
            "feature": split.feature, "calibration": split.calibration,
            "thresholds": record["thresholds"], "budget_thresholds": record["budget_thresholds"],
            "clean_reference": split.reference,
            "counts": {"clean": len(split.clean), "poisoned": len(poisoned), "uncertain": len(split.uncertain)},
            "poisoned_label_histogram": histogram, "top_label": top_label, "top_label_share": share,
        }
        if ctx.workdir is not None:
            path = ctx.workdir / "separation.json"
            write_atomic(path, json.dumps(record))
            details["separation_path"] = str(path)
        else:
            details["separation"] = record
        findings = []
        if len(poisoned) >= config.min_flagged and share >= config.concentration:
            findings.append(Finding(
                RULE, "warning",
                f"{len(poisoned)} training samples are trigger-sensitive, {share:.0%} of them labelled {top_label} (likely target)",
                7.0, {"label": top_label, "share": share, "flagged": len(poisoned)},
            ))
        message = (f"{len(poisoned)} poisoned / {len(split.clean)} clean / {len(split.uncertain)} uncertain of "
                   f"{len(split.scores)} samples ({split.calibration} thresholds)")
        if findings:
            message += f"; flagged samples concentrate on label {top_label}"
        return CheckResult(self.name, PASSED, message, time.perf_counter() - start, findings, details)
