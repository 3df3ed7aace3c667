"""`PixelModel`: the one forward interface every stage of harden uses.

Triggers, masks and metrics live in pixel space ([0, 1], N×C×H×W). Models that
expect normalised inputs get their mean/std applied *inside* this wrapper, so a
trigger optimised or stamped by harden never has to know about normalisation.
It also hides two quirks of MLflow's pt2 format: `ExportedProgram.module()` refuses
`.train()/.eval()`, and a model exported from a batch-1 example only accepts batch 1.
And it gives every model logits: a network that ends in a softmax returns probabilities,
whose log equals its logits up to a per-row constant, so cross-entropy, margins and their
gradients behave as on a logit model (on probabilities taken as logits, cross-entropy
saturates and trigger unlearning barely moves the model).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


class PixelModel(nn.Module):
    def __init__(
        self,
        net: nn.Module,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        static_batch: int | None = None,
        outputs_probabilities: bool = False,
    ):
        super().__init__()
        self.net = net
        self.static_batch = static_batch
        self.outputs_probabilities = outputs_probabilities
        if (mean is None) != (std is None):
            raise ValueError("mean and std go together")
        self.normalize = mean is not None
        if mean is not None and std is not None:
            self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1))
            self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1))

    def train(self, mode: bool = True) -> "PixelModel":
        self.training = mode
        try:
            self.net.train(mode)
        except NotImplementedError:
            pass  # torch.export GraphModules stay in the mode they were exported in (eval)
        return self

    def _forward_net(self, x: torch.Tensor) -> torch.Tensor:
        if self.static_batch is None or x.shape[0] == self.static_batch:
            return self.net(x)
        size = self.static_batch
        outputs = []
        for chunk in torch.split(x, size):
            pad = size - chunk.shape[0]
            if pad:
                chunk = torch.cat([chunk, chunk[:1].expand(pad, *chunk.shape[1:])])
            outputs.append(self.net(chunk)[: size - pad])
        return torch.cat(outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.normalize:
            x = (x - self.mean) / self.std
        out = self._forward_net(x)
        return torch.log(out.clamp_min(1e-30)) if self.outputs_probabilities else out
