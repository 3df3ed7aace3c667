"""From scan statistics to a calibrated probability that the model is backdoored.

A logistic model over a few standardised statistics of the trigger inversion
(harden/scan/inversion.py:statistics). Its coefficients are fitted on a zoo of clean
and backdoored models by `benchmarks/scan.py --fit` and shipped in calibration.json;
the same benchmark reports calibration (TrojAI cross-entropy, AUC) on models not used
for fitting, by leave-one-out (each model scored by a calibration fitted without it, its
regularisation chosen without it too) and on a fresh zoo of new seeds (`--fresh`).
Statistics are clipped to fixed ranges so that an unusual model cannot push the
probability to an extreme by extrapolation alone.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

CALIBRATION_FILE = Path(__file__).with_name("calibration.json")
# Chosen by leave-one-out cross-entropy on the zoo (benchmarks/scan.py): the smallest trigger's
# size and the margin anomaly of that same class (against model-wide statistics, the gap to the
# second-smallest trigger or the largest margin anomaly of any class, it flags fewer clean
# models), plus one statistic per trigger family a mask cannot express (harden/scan/structured.py):
# the best sub-pixel warp's success toward any class (warps), the best stripe pattern's success
# toward any class (SIG), and a separable full-image pattern's success toward the smallest-trigger
# class (blends). The reversed-trigger ASR is reported per class but did not help the fit.
# The stripe statistic replaced the separable one as the SIG evidence: a clean small CNN's easiest
# class is as reachable by a separable pattern (≥ 0.93 on 12 of 30) as a SIG target; by stripes
# far less often (≥ 0.9 on 4 of 30), and the SIG target is the class the stripes reach best on 19
# of 20 SIG models (the zoos the stripes were chosen on, 137 models; benchmarks/scan.py).
#
# The structured statistics enter only by how far they exceed one half ("most images reach the
# class"): they are evidence for their own trigger family, and a low value says nothing about a
# patch backdoor. Entered raw, a patch backdoor's low separable success pulled its p_backdoor
# down (a fresh-zoo BadNets model with a 4.7-pixel reversed trigger scored 0.014).
REACHED = 0.5  # attack success from which a structured trigger counts: half of the probe images reach the class
FEATURES = ("log_min_norm_fraction", "target_margin_anomaly", "warp_asr_above_half", "stripe_asr_above_half",
            "separable_asr_above_half")
CLIP = {"log_min_norm_fraction": (-10.0, 0.0), "target_margin_anomaly": (-3.0, 20.0), "warp_asr_above_half": (0.0, 0.5),
        "stripe_asr_above_half": (0.0, 0.5), "separable_asr_above_half": (0.0, 0.5)}
THRESHOLD = 0.5


def features(statistics: dict[str, float], names: tuple[str, ...] | list[str] | None = None) -> np.ndarray:
    """The calibration's inputs, in the order of `names` (default FEATURES), clipped to CLIP."""
    names = names or FEATURES
    raw = dict(statistics)
    raw["log_min_norm_fraction"] = math.log(max(raw.get("min_norm_fraction", 1.0), 1e-6))
    raw["warp_asr_above_half"] = max(0.0, raw.get("warp_asr", 0.0) - REACHED)
    raw["stripe_asr_above_half"] = max(0.0, raw.get("stripe_asr", 0.0) - REACHED)
    raw["separable_asr_above_half"] = max(0.0, raw.get("target_separable_asr", 0.0) - REACHED)
    return np.array([min(max(float(raw[name]), CLIP[name][0]), CLIP[name][1]) for name in names])


@dataclass
class Calibration:
    mean: list[float]
    scale: list[float]
    coef: list[float]
    intercept: float
    features: list[str] = field(default_factory=lambda: list(FEATURES))
    fitted_on: str = ""
    holdout: dict = field(default_factory=dict)

    def probability(self, statistics: dict[str, float]) -> float:
        z = (features(statistics, self.features) - np.array(self.mean)) / np.array(self.scale)
        logit = float(np.dot(z, self.coef) + self.intercept)
        return 1.0 / (1.0 + math.exp(-max(min(logit, 50.0), -50.0)))

    def save(self, path: Path = CALIBRATION_FILE) -> None:
        from harden.report import write_atomic

        write_atomic(path, json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path = CALIBRATION_FILE) -> "Calibration":
        return cls(**json.loads(Path(path).read_text()))


REGULARISATION_GRID = (0.3, 1.0, 3.0, 10.0)  # logistic regression's C, chosen per fit by inner leave-one-out


def fit(rows: list[dict[str, float]], labels: list[int], description: str, c: float | None = None,
        names: tuple[str, ...] = FEATURES) -> Calibration:
    """Regularised logistic regression on the standardised features `names` (sklearn). With `c`
    None, the regularisation is the one of REGULARISATION_GRID with the lowest leave-one-out
    cross-entropy on these rows alone, so held-out scores of `leave_one_out` stay honest."""
    from sklearn.linear_model import LogisticRegression

    if c is None:
        c = min(REGULARISATION_GRID, key=lambda grid_c: cross_entropy(leave_one_out(rows, labels, grid_c, names), labels))
    x = np.stack([features(r, names) for r in rows])
    mean, scale = x.mean(0), x.std(0) + 1e-6
    model = LogisticRegression(C=c, max_iter=1000).fit((x - mean) / scale, labels)
    return Calibration(mean.tolist(), scale.tolist(), model.coef_[0].tolist(), float(model.intercept_[0]), list(names),
                       fitted_on=f"{description} (C={c:g})" if description else "")


def leave_one_out(rows: list[dict[str, float]], labels: list[int], c: float | None = None,
                  names: tuple[str, ...] = FEATURES) -> list[float]:
    """Each model's probability from a calibration fitted without it (honest held-out estimates;
    with `c` None the regularisation is chosen inside each fold, without the held-out model)."""
    return [fit(rows[:i] + rows[i + 1:], labels[:i] + labels[i + 1:], "", c, names).probability(rows[i]) for i in range(len(rows))]


def cross_entropy(probabilities: list[float], labels: list[int]) -> float:
    """TrojAI's metric: mean binary cross-entropy, predictions clipped to [1e-12, 1 − 1e-12]."""
    p = np.clip(np.asarray(probabilities, dtype=float), 1e-12, 1 - 1e-12)
    y = np.asarray(labels, dtype=float)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def auc(probabilities: list[float], labels: list[int]) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(labels, probabilities)) if len(set(labels)) == 2 else float("nan")
