"""The one training loop every method uses (demo training, fine-tuning, purification).

Methods differ in their loss and in which parameters move, not in the loop: pass a
`loss_fn(model, images, labels) -> loss` and, if needed, the parameters to optimise.
Under `torchrun` (after `harden.distributed.init()`) the same loop runs data-parallel
and gives the single-process result; see harden/distributed.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from harden import distributed
from harden.data.pipeline import make_loader
from harden.models.graph_modes import set_training_flags
from harden.progress import track
from harden.runtime import training_layout

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


def _batches(data: Dataset, config: TrainConfig, epoch: int) -> Iterator[tuple[torch.Tensor | None, torch.Tensor | None, int]]:
    """(images, labels, global batch size): the whole batch in one process, this rank's share under torchrun."""
    seed = config.seed + epoch
    dist = distributed.context()
    if not dist.enabled:
        for images, labels in make_loader(data, config.batch_size, shuffle=True, seed=seed):
            yield images, labels, len(labels)
        return
    for batch in distributed.global_batches(data, config.batch_size, seed):
        share = distributed.local_share(batch, dist)
        images, labels = distributed.collate(data, share) if share else (None, None)
        yield images, labels, len(batch)


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
    into their allowed range).

    Data-parallel when `harden.distributed.init()` joined a torchrun group: `config.batch_size`
    stays the *global* batch, every rank returns the same history and weights, and
    `on_epoch_end` and the progress bar run on rank 0 only (`after_step` on every rank).
    """
    dist = distributed.context()
    model.to(device)
    params = [p for p in (parameters if parameters is not None else model.parameters()) if p.requires_grad]
    optimizer = make_optimizer(config.optimizer, params, config.lr, config.weight_decay)
    steps = len(make_loader(data, config.batch_size))
    scheduler = _scheduler(optimizer, config, steps=config.epochs * steps)
    if dist.enabled:
        distributed.broadcast_parameters(model)
    history: list[float] = []
    for epoch in range(config.epochs):
        _train_mode(model, config.freeze_norm_stats)  # every epoch: hooks may have evaluated the model
        total, count = 0.0, 0
        batches = _batches(data, config, epoch)
        if dist.is_main:
            batches = track(batches, f"{description} {epoch + 1}/{config.epochs}", total=steps)
        for images, labels, global_size in batches:
            optimizer.zero_grad(set_to_none=True)
            if labels is not None:
                images, labels = training_layout(model, images.to(device)), labels.to(device)
                loss = loss_fn(model, images, labels)
                # Each rank's mean loss weighted by its share: the summed gradient is the global mean's.
                (loss * (len(labels) / global_size) if dist.enabled else loss).backward()
                total += float(loss.detach()) * len(labels)
                count += len(labels)
            if dist.enabled:
                distributed.all_reduce_gradients(params)
            optimizer.step()
            if dist.enabled:
                distributed.average_buffers(model)
            if scheduler is not None:
                scheduler.step()
            if after_step is not None:
                after_step()
        if dist.enabled:
            total, count = distributed.sum_across_ranks(total, count)
        history.append(total / max(count, 1))
        if on_epoch_end is not None and dist.is_main:
            on_epoch_end(epoch, history[-1])
    model.eval()
    return history


def _train_mode(model: nn.Module, freeze_norm_stats: bool) -> None:
    model.train()
    if freeze_norm_stats:
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
            elif isinstance(module, torch.fx.GraphModule):
                set_training_flags(module, False)  # a pt2 graph's BatchNorm operators (PixelModel.train)


def _scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig, steps: int):
    if config.schedule == "constant":
        return None
    if config.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(steps, 1), eta_min=config.lr * config.final_lr_fraction)
    raise ValueError(f"unknown schedule {config.schedule!r}; known: constant, cosine")
