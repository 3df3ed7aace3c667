"""Clean accuracy, attack success, robust accuracy and defence effectiveness.

Definitions (algorithms reference §1): ASR counts triggered images whose true label
is not the target and that are classified as the target; RA counts triggered images
classified as their true label; DER = [max(0, ΔASR) − max(0, ΔACC) + 1] / 2.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from torch.utils.data import Dataset

from harden.attacks import Attack, Trigger
from harden.data.pipeline import make_loader
from harden.progress import track


# Below this clean accuracy, labelled data does not fit the model (labels in another order than
# its classes, missing --mean/--std, another resolution) or the model does not work: scanning
# it measures noise, and purifying it would retrain it to those labels.
MIN_FITTING_ACCURACY = 0.5


def unfitting_data(accuracy: float, num_classes: int, what: str) -> str:
    """The start of the message scan and purify give below `MIN_FITTING_ACCURACY`; `what` names the images."""
    return (f"the model gets {accuracy:.0%} of {what} right (chance {1 / num_classes:.0%}): the data does not fit it "
            f"(label order, --mean/--std, resolution?) or it does not work")


@dataclass
class EvaluationResult:
    accuracy: float
    n: int
    asr: float | None = None
    ra: float | None = None
    n_triggered: int = 0
    per_class_accuracy: dict[int, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def der(asr_before: float, asr_after: float, acc_before: float, acc_after: float) -> float:
    """Defence effectiveness rate in [0, 1]; 0.5 means the defence changed nothing."""
    return (max(0.0, asr_before - asr_after) - max(0.0, acc_before - acc_after) + 1.0) / 2.0


@torch.no_grad()
def batched_logits(module: nn.Module, images: torch.Tensor, device: str | torch.device = "cpu", batch_size: int = 256) -> torch.Tensor:
    """`module`'s logits for in-memory `images` (a probe set), in batches, on the CPU."""
    return torch.cat([module(chunk.to(device)).float().cpu() for chunk in torch.split(images, batch_size)])


def _as_module(model) -> nn.Module:
    return getattr(model, "module", model)


@torch.no_grad()
def evaluate(
    model,
    data: Dataset,
    *,
    trigger: "str | Trigger | None" = None,
    target: int | None = None,
    mode: str = "all2one",
    batch_size: int = 256,
    device: str | torch.device = "cpu",
) -> EvaluationResult:
    """ACC on `data`; with a trigger also ASR and RA, in one streaming pass."""
    net = _as_module(model).to(device).eval()
    num_classes = getattr(model, "num_classes", None)
    attack = None
    if trigger is not None:
        if mode == "all2one" and target is None:
            raise ValueError("an all2one trigger needs a target class")
        # A bare network does not say how many classes it has, and the data may lack the last ones.
        known = num_classes or max(1 + int(max(getattr(data, "labels", [0]))), (target or 0) + 1)
        attack = Attack(trigger, target or 0, mode, known)
    correct = total = hits = robust = triggered = 0
    class_correct: dict[int, int] = {}
    class_total: dict[int, int] = {}
    loader = make_loader(data, batch_size)
    for images, labels in track(loader, "evaluating", total=len(loader)):
        images, labels = images.to(device), labels.to(device)
        predictions = net(images).argmax(1)
        correct += int((predictions == labels).sum())
        total += len(labels)
        for cls in labels.unique().tolist():
            in_class = labels == cls
            class_total[cls] = class_total.get(cls, 0) + int(in_class.sum())
            class_correct[cls] = class_correct.get(cls, 0) + int((predictions[in_class] == cls).sum())
        if attack is not None:
            keep = attack.eligible(labels)
            if keep.any():
                stamped = net(attack.trigger(images[keep])).argmax(1)
                hits += int((stamped == attack.target_labels(labels[keep])).sum())
                robust += int((stamped == labels[keep]).sum())
                triggered += int(keep.sum())
    if total == 0:
        raise ValueError("no samples to evaluate")
    result = EvaluationResult(correct / total, total)
    result.per_class_accuracy = {c: class_correct[c] / class_total[c] for c in sorted(class_total)}
    if attack is not None:
        result.n_triggered = triggered
        result.asr = hits / triggered if triggered else None
        result.ra = robust / triggered if triggered else None
    return result
