"""The one training loop every method uses (demo training, fine-tuning, purification).

Methods differ in their loss and in which parameters move, not in the loop: pass a
`loss_fn(model, images, labels) -> loss` and, if needed, the parameters to optimise.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from harden.data.pipeline import make_loader
from harden.progress import track

LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]
EpochHook = Callable[[int, float], None]

OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "sgd": lambda params, **kw: torch.optim.SGD(params, momentum=0.9, **kw),
}


def cross_entropy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(images), labels)


@dataclass
class TrainConfig:
    epochs: int = 10
    lr: float = 1e-3
    batch_size: int = 64
    optimizer: str = "adam"
    weight_decay: float = 0.0
    seed: int = 0


def make_optimizer(name: str, params: Iterable[torch.nn.Parameter], lr: float, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; known: {', '.join(OPTIMIZERS)}")
    return OPTIMIZERS[name](params, lr=lr, weight_decay=weight_decay)


def fit(
    model: nn.Module,
    data: Dataset,
    config: TrainConfig,
    *,
    loss_fn: LossFn = cross_entropy,
    device: str | torch.device = "cpu",
    parameters: Iterable[torch.nn.Parameter] | None = None,
    on_epoch_end: EpochHook | None = None,
    description: str = "training",
) -> list[float]:
    """Train for `config.epochs`; returns the mean loss of each epoch."""
    model.to(device)
    params = [p for p in (parameters if parameters is not None else model.parameters()) if p.requires_grad]
    optimizer = make_optimizer(config.optimizer, params, config.lr, config.weight_decay)
    history: list[float] = []
    for epoch in range(config.epochs):
        model.train()  # again each epoch: an on_epoch_end evaluation leaves the model in eval mode
        loader = make_loader(data, config.batch_size, shuffle=True, seed=config.seed + epoch)
        total, count = 0.0, 0
        for images, labels in track(loader, f"{description} {epoch + 1}/{config.epochs}", total=len(loader)):
            images, labels = images.to(device), labels.to(device)
            loss = loss_fn(model, images, labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(labels)
            count += len(labels)
        history.append(total / max(count, 1))
        if on_epoch_end is not None:
            on_epoch_end(epoch, history[-1])
    model.eval()
    return history
