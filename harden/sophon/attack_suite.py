"""The fine-tuning attack suite: how far an attacker gets by fine-tuning a model on a task.

Every (strategy × optimiser × learning rate) of a budget fine-tunes a copy of the
model on the attacker's training data with harden's one training loop and records
test accuracy after every epoch. The same grid runs on the unprotected baseline
(when given) and, with the full strategy, on the same architecture re-initialised
(training from scratch), so that "no better than scratch" is measured in one run.
The attacker's best (over the grid and over epochs) is reported: an upper bound on
what the attacker achieves, which is the conservative figure for the defender.
"""

from __future__ import annotations

import copy
import io
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np
import torch
from torch import nn

from harden.data.pipeline import LabelledDataset
from harden.errors import HardenError
from harden.evaluation import evaluate
from harden.runtime import seed_everything
from harden.sophon.heads import reinitialise
from harden.sophon.strategies import STRATEGIES, Strategy, get_strategies
from harden.training import TrainConfig, fit

Probe = Callable[[nn.Module], dict]  # measurements of each fine-tuned model (e.g. watermark verification)


@dataclass(frozen=True)
class Recipe:
    optimizer: str
    lr: float
    weight_decay: float = 0.0


@dataclass(frozen=True)
class Budget:
    name: str
    recipes: tuple[Recipe, ...]
    epochs: int
    batch_size: int = 32
    strategies: tuple[str, ...] = tuple(STRATEGIES)


_SGD, _ADAM, _ADAMW = (lambda lr: Recipe("sgd", lr, 1e-4)), (lambda lr: Recipe("adam", lr)), (lambda lr: Recipe("adamw", lr, 1e-2))
BUDGETS: dict[str, Budget] = {b.name: b for b in (
    Budget("quick", (_ADAM(1e-3),), epochs=5),
    Budget("standard", (_SGD(1e-2), _ADAM(1e-3), _ADAMW(1e-3)), epochs=20),
    Budget("thorough", tuple(make(lr) for make in (_SGD, _ADAM, _ADAMW) for lr in (1e-4, 1e-3, 1e-2)) + (_SGD(1e-1),), epochs=40),
)}


def get_budget(name: str) -> Budget:
    if name not in BUDGETS:
        raise HardenError(f"unknown budget {name!r}; known: {', '.join(BUDGETS)}")
    return BUDGETS[name]


@dataclass
class AttackRun:
    subject: str  # model | baseline | scratch
    strategy: str
    optimizer: str
    lr: float
    accuracy: list[float]  # restricted-domain test accuracy after each epoch
    probe: dict | None = None  # the probe's measurements of the fine-tuned model

    @property
    def best(self) -> float:
        return max(self.accuracy)

    @property
    def best_epoch(self) -> int:
        return int(np.argmax(self.accuracy)) + 1


@dataclass
class FineTuneTestResult:
    budget: str
    runs: list[AttackRun] = field(default_factory=list)

    def best_run(self, subject: str, strategy: str | None = None) -> AttackRun | None:
        runs = [r for r in self.runs if r.subject == subject and strategy in (None, r.strategy)]
        return max(runs, key=lambda r: r.best) if runs else None

    def best_accuracy(self, subject: str, strategy: str | None = None) -> float | None:
        run = self.best_run(subject, strategy)
        return run.best if run else None

    @property
    def best_attack_accuracy(self) -> float | None:
        return self.best_accuracy("model")

    @property
    def scratch_accuracy(self) -> float | None:
        return self.best_accuracy("scratch")

    @property
    def baseline_accuracy(self) -> float | None:
        return self.best_accuracy("baseline")

    def to_dict(self) -> dict:
        best = self.best_run("model")
        return {
            "budget": self.budget,
            "best_attack_accuracy": self.best_attack_accuracy,
            "best_attack": None if best is None else {"strategy": best.strategy, "optimizer": best.optimizer, "lr": best.lr, "epoch": best.best_epoch},
            "scratch_accuracy": self.scratch_accuracy,
            "baseline_accuracy": self.baseline_accuracy,
            "runs": [asdict(r) for r in self.runs],
        }


def finetune(net: nn.Module, strategy: Strategy, recipe: Recipe, epochs: int, batch_size: int, train: LabelledDataset,
             test: LabelledDataset, *, device: str | torch.device = "cpu", seed: int = 0) -> list[float]:
    """Fine-tune `net` in place with one strategy and recipe; test accuracy after each epoch."""
    seed_everything(seed)
    params = strategy.prepare(net)
    accuracy: list[float] = []
    config = TrainConfig(epochs=epochs, lr=recipe.lr, batch_size=batch_size, optimizer=recipe.optimizer,
                         weight_decay=recipe.weight_decay, seed=seed)
    fit(net, train, config, device=device, parameters=params, description=f"fine-tuning ({strategy.name}, {recipe.optimizer} {recipe.lr:g})",
        on_epoch_end=lambda epoch, loss: accuracy.append(evaluate(net, test, device=device).accuracy))
    return accuracy


def finetune_test(
    model: nn.Module,
    train: LabelledDataset,
    test: LabelledDataset,
    *,
    budget: str | Budget = "standard",
    baseline: nn.Module | None = None,
    scratch: bool = True,
    strategies: tuple[str, ...] | None = None,
    probe: Probe | None = None,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> FineTuneTestResult:
    """Run the budget's attack grid on `model`, `baseline` and a scratch copy (never changed in place)."""
    plan = get_budget(budget) if isinstance(budget, str) else budget
    chosen = get_strategies(strategies or plan.strategies)
    subjects: list[tuple[str, nn.Module, list[Strategy]]] = [("model", model, chosen)]
    if baseline is not None:
        subjects.append(("baseline", baseline, chosen))
    if scratch:
        seed_everything(seed)
        subjects.append(("scratch", reinitialise(copy.deepcopy(model)), [STRATEGIES["full"]]))
    result = FineTuneTestResult(plan.name)
    for subject, net, subject_strategies in subjects:
        for strategy in subject_strategies:
            for recipe in plan.recipes:
                attacked = copy.deepcopy(net)
                curve = finetune(attacked, strategy, recipe, plan.epochs, plan.batch_size, train, test, device=device, seed=seed)
                result.runs.append(AttackRun(subject, strategy.name, recipe.optimizer, recipe.lr, curve,
                                             probe(attacked) if probe is not None else None))
    return result


def curves_png(result: FineTuneTestResult) -> bytes:
    """Restricted accuracy per epoch: the attacker's best recipe per subject and strategy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles = {"model": "-", "baseline": "--", "scratch": ":"}
    fig, axis = plt.subplots(figsize=(7, 4), dpi=90)
    for subject in styles:
        for strategy in dict.fromkeys(r.strategy for r in result.runs if r.subject == subject):
            run = result.best_run(subject, strategy)
            axis.plot(range(1, len(run.accuracy) + 1), run.accuracy, styles[subject],
                      label=f"{subject} / {strategy} ({run.optimizer} {run.lr:g})")
    axis.set_xlabel("fine-tuning epoch")
    axis.set_ylabel("restricted-domain accuracy")
    axis.set_ylim(0, 1)
    axis.legend(fontsize=7)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()
