"""`PixelModel`: the one forward interface every stage of harden uses.

Triggers, masks and metrics live in pixel space ([0, 1], N×C×H×W). Models that
expect normalised inputs get their mean/std applied *inside* this wrapper, so a
trigger optimised or stamped by harden never has to know about normalisation.
It also hides two quirks of MLflow's pt2 format: `ExportedProgram.module()` refuses
`.train()/.eval()`, and a model exported from a batch-1 example only accepts batch 1 (one
exported with a bounded dynamic batch, only batches up to its bound: both are fed in chunks).
And it gives every model one logit per class (`OUTPUTS`): a network that ends in a softmax
returns probabilities, whose log equals its logits up to a per-row constant, so cross-entropy,
margins and their gradients behave as on a logit model (on probabilities taken as logits,
cross-entropy saturates and trigger unlearning barely moves the model). A binary classifier
with one output (a column or a 1-D tensor; a logit, or a sigmoid probability) becomes two classes with logits
(0, z), whose softmax is (1 − σ(z), σ(z)): column 1 is the positive class. A network that returns more
than its logits, such as (logits, features) or a dict or Hugging Face output with a `logits` entry, is
read through `network_logits`. A network whose input is not (batch, C, H, W), such as an MLP on
(batch, C·H·W) vectors or a model of (batch, H, W) grey images, gets its images reshaped to that
input in channel, row, column order, as `x.view(len(x), -1)` does; one of (batch, H, W, C) images
gets them permuted. An encoder's output (`--task encoder`) is pooled to one embedding per image.
"""

from __future__ import annotations

import copy
import itertools
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from harden.errors import ModelLoadError
from harden.models.graph_modes import set_training_flags


def network_logits(out: Any, element: int = 0) -> torch.Tensor:
    """The class scores in what a network returns: a tensor itself (a fully convolutional head's
    (batch, classes, 1, 1) flattened); the `logits` entry of a dict or a Hugging Face `ModelOutput`
    (or its only tensor); the first element of a tuple or list, as training code that also returns
    features or auxiliary heads writes it, or the `element`-th (loader: `_logits_element`)."""
    if isinstance(out, torch.Tensor):
        return out.flatten(2).squeeze(2) if out.ndim > 2 and out.shape[2:].numel() == 1 else out
    if isinstance(out, Mapping):
        tensors = [value for value in out.values() if isinstance(value, torch.Tensor)]
        if isinstance(out.get("logits"), torch.Tensor) or len(tensors) == 1:
            return out["logits"] if "logits" in out else tensors[0]
        raise ModelLoadError(f"the model returns a dict with keys {sorted(map(str, out))}; harden reads its 'logits' entry, which it lacks")
    if isinstance(out, (tuple, list)) and len(out) > element and isinstance(out[element], torch.Tensor):
        return out[element]
    raise ModelLoadError(f"the model returns {type(out).__name__}; harden expects a classifier's logits "
                         f"(a tensor, a dict with 'logits', or a tuple that starts with them)")


def weights_device(net: nn.Module) -> torch.device:
    """Where a network's weights are (a pt2 exported on a GPU loads onto it); the CPU for one without any."""
    return next(itertools.chain(net.parameters(), net.buffers()), torch.empty(0)).device


def _binary_logits(z: torch.Tensor) -> torch.Tensor:
    z = z.reshape(-1, 1)  # (batch, 1) or (batch,)
    return torch.cat([torch.zeros_like(z), z], dim=1)


def _pooled(out: torch.Tensor) -> torch.Tensor:
    """An encoder's embedding (`--task encoder`): a vector as it is; a (batch, C, H, W) feature map
    averaged over its positions and a (batch, tokens, D) sequence over its tokens, as representations
    are read off a backbone. Flattened, a map would ask a collapse to reproduce one image's layout."""
    if out.ndim == 4:
        return out.mean(dim=(2, 3))
    if out.ndim == 3:
        return out.mean(dim=1)
    return out.reshape(len(out), -1)


def _logit(p: torch.Tensor) -> torch.Tensor:
    p = p.clamp(1e-7, 1 - 1e-7)  # written out rather than torch.logit, so every ONNX exporter has the ops
    return torch.log(p) - torch.log1p(-p)


# What the network returns → the logits harden works on, one per class.
OUTPUTS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "logits": lambda out: out,
    "probabilities": lambda out: torch.log(out.clamp_min(1e-30)),
    "binary_logit": _binary_logits,
    "binary_probability": lambda out: _binary_logits(_logit(out)),
    "embedding": _pooled,
}


class PixelModel(nn.Module):
    def __init__(
        self,
        net: nn.Module,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        static_batch: int | None = None,
        output: str = "logits",
        sample_shape: Sequence[int] | None = None,
        max_batch: int | None = None,
        channels_last: bool = False,
        logits_element: int = 0,
    ):
        super().__init__()
        self.net = net
        self.logits_element = logits_element  # which element of a tuple output holds the logits
        self.static_batch = static_batch
        self.max_batch = max_batch  # a dynamic batch's upper bound from the export (Dim("batch", max=64)); None: unbounded
        self.output = output
        # the network's own input per sample when it is not C×H×W (e.g. (784,)): images are reshaped after normalisation
        self.sample_shape = tuple(sample_shape) if sample_shape else None
        self.channels_last = channels_last  # the network takes (batch, H, W, C): images are permuted, not reshaped
        if (mean is None) != (std is None):
            raise ValueError("mean and std go together")
        self.normalize = False
        if mean is not None and std is not None:
            self.set_normalisation(mean, std)

    @property
    def device(self) -> torch.device:
        return weights_device(self.net)

    def with_network(self, net: nn.Module) -> "PixelModel":
        """This wrapper around another network that computes the same function (a folded copy):
        same normalisation, input layout and outputs; the original is untouched."""
        clone = copy.copy(self)
        clone._modules = {**self._modules, "net": net}
        return clone

    def set_normalisation(self, mean: Sequence[float], std: Sequence[float]) -> None:
        """Normalise pixels with `mean`/`std` before the network (also after loading: `models.normalisation`)."""
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32, device=self.device).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32, device=self.device).view(1, -1, 1, 1))
        self.normalize = True

    def train(self, mode: bool = True) -> "PixelModel":
        """A pt2 graph's `.train()` (which ExportedProgram.module() refuses) would not reach the training flag
        torch.export baked into each operator: its BatchNorm operators are switched instead, so that
        fine-tuning normalises by the batch and updates the running statistics, as a module's BatchNorm
        does (its dropout stays off). Not for an export that takes a fixed batch: it is fed in chunks
        padded with copies of one image, whose statistics would be the chunk's, not the data's."""
        self.training = mode
        try:
            self.net.train(mode)
        except NotImplementedError:
            pass  # ExportedProgram.module() refuses it
        if isinstance(self.net, torch.fx.GraphModule) and self.static_batch is None:
            set_training_flags(self.net, mode)
        return self

    def _forward_net(self, x: torch.Tensor) -> torch.Tensor:
        """One pass when the export takes this batch; else chunks of its fixed batch (the last one
        padded with copies of its first image) or of its bounded dynamic batch."""
        size = self.static_batch or self.max_batch
        if size is None or (x.shape[0] == size if self.static_batch else x.shape[0] <= size):
            return network_logits(self.net(x), self.logits_element)
        outputs = []
        for chunk in torch.split(x, size):
            pad = size - chunk.shape[0] if self.static_batch else 0
            if pad:
                chunk = torch.cat([chunk, chunk[:1].expand(pad, *chunk.shape[1:])])
            outputs.append(network_logits(self.net(chunk), self.logits_element)[: size - pad])
        return torch.cat(outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.normalize:
            x = (x - self.mean) / self.std
        return OUTPUTS[self.output](self._forward_net(self.network_input(x)))

    def network_input(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, C, H, W) images in the network's own layout."""
        if self.channels_last:
            return x.permute(0, 2, 3, 1).contiguous()
        return x.reshape(len(x), *self.sample_shape) if self.sample_shape else x
