"""Device choice, seeding and resource measurement shared by every command."""

from __future__ import annotations

import random
import resource
import sys
import time
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import torch

from harden.errors import HardenError


def resolve_device(spec: str = "auto") -> torch.device:
    """`auto` picks CUDA when present; `cuda[:N]` fails clearly when it is not."""
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            raise HardenError(f"--device {spec}: CUDA is not available on this machine (use --device cpu)")
        device = torch.device(spec)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise HardenError(f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s) present")
        return device
    raise HardenError(f"--device {spec!r}: expected auto, cpu or cuda[:N]")


def device_label(device: torch.device) -> str:
    """What a benchmark table's title says it ran on: the GPU's name, or the CPU threads used."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    return f"CPU, {torch.get_num_threads()} threads, torch {torch.__version__}"


_LAYOUTS: "weakref.WeakKeyDictionary[torch.nn.Module, torch.memory_format]" = weakref.WeakKeyDictionary()  # model -> layout it accepts


def training_layout(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """`images` in the memory layout that runs `model`'s gradient steps fastest here.

    On CPU, oneDNN's convolutions run forward+backward faster on channels-last batches
    (`benchmarks/layout.py`), so 4-D CPU batches go channels-last, unless the model cannot
    take them: user code such as `x.view(n, -1)` after a convolution fails on
    channels-last activations. That is tried once per model, on two images in eval mode
    (no BatchNorm statistics move), and remembered. Only the batch changes layout; the
    weights stay contiguous, so state dicts and exports are unaffected.
    """
    if images.ndim != 4 or images.device.type != "cpu":
        return images
    layout = _LAYOUTS.get(model)
    if layout is None:
        layout = _LAYOUTS[model] = _layout_model_accepts(model, images)
    return images.contiguous(memory_format=layout)


def _layout_model_accepts(model: torch.nn.Module, images: torch.Tensor) -> torch.memory_format:
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            model(images[:2].contiguous(memory_format=torch.channels_last))
        return torch.channels_last
    except RuntimeError:
        return torch.contiguous_format
    finally:
        for module, training in modes.items():
            module.training = training


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch so that splits, poisoning and training repeat."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def reproducible(device: torch.device) -> None:
    """Make CUDA runs repeat: the same seed and inputs give the same scan, not one that moves.

    cuDNN and some CUDA kernels sum in a varying order, and the trigger inversion's hundreds of
    steps amplify that: one backdoored model scanned three times on an H100 gave p 0.733, 0.702
    and 0.745 (`benchmarks/devices.py --nondeterministic`); with deterministic algorithms, the
    same p every time, in about the same time. The few ops without a deterministic CUDA kernel
    (grid-sample and bicubic-upsample backward) only warn. Global for the process, so library
    callers opt in; every harden command calls it. CPU kernels already repeat."""
    if device.type == "cuda":
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
        torch.use_deterministic_algorithms(True, warn_only=True)


def _rss_peak_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


@dataclass
class Measurement:
    """Wall time and peak memory of a block: process RSS on CPU, allocator peak on CUDA."""

    duration_s: float = 0.0
    peak_memory_mb: float = 0.0
    _start: float = field(default=0.0, repr=False)


@contextmanager
def measure(device: torch.device | None = None) -> Iterator[Measurement]:
    result = Measurement(_start=time.perf_counter())
    on_cuda = device is not None and device.type == "cuda"
    if on_cuda:
        torch.cuda.reset_peak_memory_stats(device)
    try:
        yield result
    finally:
        if on_cuda:
            torch.cuda.synchronize(device)  # queued kernels belong to the block's time
        result.duration_s = round(time.perf_counter() - result._start, 3)
        if on_cuda:
            result.peak_memory_mb = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
        else:
            result.peak_memory_mb = round(_rss_peak_mb(), 1)
