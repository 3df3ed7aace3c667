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
StepHook = Callable[[], None]

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
    freeze_norm_stats: bool = False  # keep BatchNorm running statistics (norm layers stay in eval mode)
    schedule: str = "constant"  # constant | cosine (over all steps, down to lr * final_lr_fraction)
    final_lr_fraction: float = 0.0


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
    after_step: StepHook | None = None,
    description: str = "training",
) -> list[float]:
    """Train for `config.epochs`; returns the mean loss of each epoch.

    `after_step` runs after every optimiser step (e.g. to project parameters back
    into their allowed range)."""
    model.to(device)
    params = [p for p in (parameters if parameters is not None else model.parameters()) if p.requires_grad]
    optimizer = make_optimizer(config.optimizer, params, config.lr, config.weight_decay)
    scheduler = _scheduler(optimizer, config, steps=config.epochs * len(make_loader(data, config.batch_size)))
    history: list[float] = []
    for epoch in range(config.epochs):
        _train_mode(model, config.freeze_norm_stats)  # every epoch: hooks may have evaluated the model
        loader = make_loader(data, config.batch_size, shuffle=True, seed=config.seed + epoch)
        total, count = 0.0, 0
        for images, labels in track(loader, f"{description} {epoch + 1}/{config.epochs}", total=len(loader)):
            images, labels = images.to(device), labels.to(device)
            loss = loss_fn(model, images, labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            if after_step is not None:
                after_step()
            total += float(loss.detach()) * len(labels)
            count += len(labels)
        history.append(total / max(count, 1))
        if on_epoch_end is not None:
            on_epoch_end(epoch, history[-1])
    model.eval()
    return history


def _train_mode(model: nn.Module, freeze_norm_stats: bool) -> None:
    model.train()
    if freeze_norm_stats:
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()


def _scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig, steps: int):
    if config.schedule == "constant":
        return None
    if config.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(steps, 1), eta_min=config.lr * config.final_lr_fraction)
    raise ValueError(f"unknown schedule {config.schedule!r}; known: constant, cosine")
