"""SOPHON non-fine-tunable learning: keep the original domain, make the restricted one unlearnable.

The query loss of the shared MAML loop (`harden.sophon.maml`) is a suppression loss on
the restricted domain after simulated fine-tuning; the original-domain loss is plain
cross-entropy. See algorithms.md §6 for the method and the reference bugs avoided here
(class count taken from the task, relative guard, cached evaluation subset, endless
batch streams, deliberate head-gradient routing).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from harden.data.pipeline import LabelledDataset
from harden.evaluation import evaluate
from harden.sophon.data import check_labels
from harden.sophon.losses import get_loss
from harden.sophon.maml import LoopHook, OuterConfig, OuterResult, train_outer


@dataclass
class SophonResult:
    model: nn.Module
    loss: str
    acc_before: float  # original-domain accuracy on the full evaluation set
    acc_after: float
    outer: OuterResult
    config: OuterConfig = field(repr=False, default_factory=OuterConfig)

    @property
    def acc_drop(self) -> float:
        return self.acc_before - self.acc_after


def harden_model(
    model: nn.Module,
    original: LabelledDataset,
    original_eval: LabelledDataset,
    restricted: LabelledDataset,
    *,
    loss: str = "kl-uniform",
    config: OuterConfig | None = None,
    device: str | torch.device = "cpu",
    on_check: LoopHook | None = None,
) -> SophonResult:
    """Make `model` (a trainable copy; changed in place) resist fine-tuning on `restricted`."""
    config = config or OuterConfig()
    suppress = get_loss(loss)
    with torch.no_grad():
        check_labels(restricted, int(model.to(device).eval()(restricted[0][0][None].to(device)).shape[1]))
    acc_before = evaluate(model, original_eval, device=device).accuracy
    outer = train_outer(model, original, original_eval, restricted, config,
                        query_loss=lambda net, images, labels: suppress(net(images), labels), device=device, on_check=on_check)
    acc_after = evaluate(model, original_eval, device=device).accuracy
    return SophonResult(model, loss, acc_before, acc_after, outer, config)
