"""Run by test_distributed.py under `torchrun --nproc-per-node 2`: one `fit`, each rank saves its weights."""

from __future__ import annotations

import sys

import torch

from harden import distributed
from harden.training import TrainConfig, fit


def plain_net() -> torch.nn.Module:
    """No BatchNorm: the data-parallel update must equal the single-process one up to rounding."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(4),
                               torch.nn.Flatten(), torch.nn.Linear(128, 10))


def toy_data():
    from harden.data.pipeline import TensorDataset

    g = torch.Generator().manual_seed(1)
    x = torch.rand(200, 3, 16, 16, generator=g)
    y = (x[:, 0, :4, :4].mean((1, 2)) * 10).long().clamp(0, 9)  # learnable labels
    return TensorDataset(x, y.numpy())


CONFIG = TrainConfig(epochs=3, lr=1e-2, batch_size=32, seed=3)  # 200 = 6 x 32 + 8: a short last batch


def train() -> tuple[torch.nn.Module, list[float]]:
    model = plain_net()
    return model, fit(model, toy_data(), CONFIG)


def train_keeping_the_best() -> torch.nn.Module:
    """`fit` with purify's checkpoint rule: only rank 0 validates, every rank must end on its choice."""
    from harden.purify.base import BestCheckpoint, PurifyContext

    model, data = plain_net(), toy_data()
    checkpoint = BestCheckpoint(model, PurifyContext(source=None, train=data, validation=data, triggers=[], device=torch.device("cpu"),
                                                     seed=0))
    fit(model, data, CONFIG, on_epoch_end=checkpoint.update)
    checkpoint.restore()
    return model


if __name__ == "__main__":
    with distributed.launched("cpu") as ctx:
        model, history = train()
        torch.save({"state": model.state_dict(), "history": history, "world_size": ctx.world_size, "backend": ctx.backend,
                    "kept": train_keeping_the_best().state_dict()}, f"{sys.argv[1]}.rank{ctx.rank}")
