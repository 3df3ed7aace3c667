"""Backdoor triggers as pure functions on pixel-space batches (N×C×H×W in [0, 1]).

Used to build demo and benchmark zoos and to measure attack success; a defence needs no
trigger, only the warp geometry (`warp_grid`), which the scan's warp inversion shares.
A trigger is named by a spec string `name[:key=value,...]`, e.g. `grid_paste`,
`grid_paste:size=4`, `blend:alpha=0.1,seed=3`, `wanet:k=4,s=0.5`.
Constants follow the conventions in the algorithms reference (§8), regenerated here,
with the reference code's wrap-around quirks left out (values are clipped).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from harden.errors import HardenError

Stamp = Callable[[torch.Tensor], torch.Tensor]
# Builds a stamp for images of shape (C, H, W) from the spec's parameters.
Builder = Callable[..., Stamp]

_GRID = torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 1.0]])
_CORNER_PATTERNS = {
    "br": _GRID,
    "tl": torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]),
    "bl": torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [1.0, 0.0, 1.0]]),
    "tr": torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]),
}
_TROJAN = torch.tensor([
    [[207.4, 175.4, 29.4], [79.4, 137.4, 248.4], [131.4, 6.4, 246.4]],
    [[131.4, 243.4, 232.4], [8.4, 0.0, 113.4], [40.4, 145.4, 250.4]],
    [[181.4, 120.4, 179.4], [126.4, 32.4, 146.4], [4.4, 61.4, 246.4]],
]) / 255.0


@dataclass(frozen=True)
class _Entry:
    builder: Builder
    description: str
    defaults: dict


_TRIGGERS: dict[str, _Entry] = {}
_ALIASES: dict[str, str] = {}


def register_trigger(name: str, description: str, aliases: tuple[str, ...] = (), **defaults) -> Callable[[Builder], Builder]:
    def decorate(builder: Builder) -> Builder:
        _TRIGGERS[name] = _Entry(builder, description, defaults)
        for alias in aliases:
            _ALIASES[alias] = name
        return builder

    return decorate


@dataclass
class Trigger:
    """A named, parameterised trigger; stamps are built per image shape and cached."""

    name: str
    params: dict
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def spec(self) -> str:
        args = ",".join(f"{k}={v}" for k, v in sorted(self.params.items()))
        return f"{self.name}:{args}" if args else self.name

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        single = images.ndim == 3
        batch = images[None] if single else images
        shape = tuple(batch.shape[1:])
        if shape not in self._cache:
            entry = _TRIGGERS[self.name]
            self._cache[shape] = entry.builder(shape, **{**entry.defaults, **self.params})
        out = self._cache[shape](batch).clamp(0.0, 1.0)
        return out[0] if single else out


def list_triggers() -> dict[str, str]:
    return {name: entry.description for name, entry in sorted(_TRIGGERS.items())}


def _coerce(value: str):
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


def make_trigger(spec: "str | Trigger") -> Trigger:
    """Parse `name[:key=value,...]` into a Trigger; unknown names or keys are errors.

    Anything already callable on image batches (a Trigger, a reversed trigger) is kept as is."""
    if isinstance(spec, Trigger) or callable(spec):
        return spec
    name, _, args = str(spec).strip().partition(":")
    name = _ALIASES.get(name, name)
    if name not in _TRIGGERS:
        raise HardenError(f"unknown trigger {spec!r}; known: {', '.join(sorted([*_TRIGGERS, *_ALIASES]))}")
    params = {}
    for item in filter(None, (a.strip() for a in args.split(","))):
        key, sep, value = item.partition("=")
        if not sep or key not in _TRIGGERS[name].defaults:
            allowed = ", ".join(_TRIGGERS[name].defaults) or "none"
            raise HardenError(f"trigger {name}: bad parameter {item!r} (parameters: {allowed})")
        params[key] = _coerce(value)
    return Trigger(name, params)


def _patch(pattern: torch.Tensor, size: int) -> torch.Tensor:
    """Scale a 3×3 pattern to size×size by nearest-neighbour repetition."""
    return F.interpolate(pattern[None, None], size=(size, size), mode="nearest")[0, 0]


def _corner_slices(corner: str, size: int, height: int, width: int, inset: int = 0):
    rows = slice(inset, inset + size) if corner[0] == "t" else slice(height - size - inset, height - inset)
    cols = slice(inset, inset + size) if corner[1] == "l" else slice(width - size - inset, width - inset)
    return rows, cols


@register_trigger("grid_paste", "BadNets 3x3 checker patch pasted in a corner", aliases=("badnets",), size=0, corner="br")
def _grid_paste(shape, size: int, corner: str) -> Stamp:
    _, height, width = shape
    size = size or max(3, round(0.1 * width))
    if corner not in _CORNER_PATTERNS:
        raise HardenError(f"grid_paste: corner must be one of {sorted(_CORNER_PATTERNS)}")
    patch = _patch(_CORNER_PATTERNS["br"], size)
    rows, cols = _corner_slices(corner, size, height, width)

    def stamp(x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        x[:, :, rows, cols] = patch.to(x)
        return x

    return stamp


@register_trigger("blend", "fixed uniform-noise image blended in (Blend, alpha 0.2)", alpha=0.2, seed=0)
def _blend(shape, alpha: float, seed: int) -> Stamp:
    noise = torch.from_numpy(np.random.default_rng(seed).random(shape, dtype=np.float32))

    def stamp(x: torch.Tensor) -> torch.Tensor:
        return (1 - alpha) * x + alpha * noise.to(x)

    return stamp


@register_trigger("sig", "additive horizontal sinusoid (SIG, delta 40/255, 6 periods)", aliases=("sin_add",), delta=40, freq=6)
def _sig(shape, delta: float, freq: float) -> Stamp:
    _, _, width = shape
    columns = torch.arange(width, dtype=torch.float32)
    wave = (delta / 255.0) * torch.sin(2 * math.pi * columns * freq / width)

    def stamp(x: torch.Tensor) -> torch.Tensor:
        return x + wave.to(x)

    return stamp


@register_trigger("stripe", "blended vertical stripes (Blend-Strip, alpha 0.2, period ~7.85 px)", alpha=0.2, omega=0.8)
def _stripe(shape, alpha: float, omega: float) -> Stamp:
    _, _, width = shape
    columns = torch.arange(width, dtype=torch.float32) * (32.0 / width)
    bands = 0.5 + 0.5 * torch.sin(omega * columns)

    def stamp(x: torch.Tensor) -> torch.Tensor:
        return (1 - alpha) * x + alpha * bands.to(x)

    return stamp


@register_trigger("trojan", "Trojan-style 3x3 coloured square added near the bottom-right", size=0)
def _trojan(shape, size: int) -> Stamp:
    channels, height, width = shape
    size = size or max(3, round(0.1 * width))
    values = _TROJAN if channels == 3 else _TROJAN.mean(0, keepdim=True).expand(channels, 3, 3)
    patch = F.interpolate(values[None], size=(size, size), mode="nearest")[0]
    inset = max(1, round(size * 4 / 3)) if height >= 2 * size + 4 else 0
    rows, cols = _corner_slices("br", size, height, width, inset=inset)

    def stamp(x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        x[:, :, rows, cols] = x[:, :, rows, cols] + patch.to(x)
        return x

    return stamp


@register_trigger("four_corner", "four 3x3 checker patches, one per corner (CL)", size=0)
def _four_corner(shape, size: int) -> Stamp:
    _, height, width = shape
    size = size or max(3, round(0.1 * width))
    placements = []
    for corner, pattern in _CORNER_PATTERNS.items():
        inset = 0 if corner == "br" else 1
        placements.append((_corner_slices(corner, size, height, width, inset=inset), _patch(pattern, size)))

    def stamp(x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        for (rows, cols), patch in placements:
            x[:, :, rows, cols] = patch.to(x)
        return x

    return stamp


def warp_grid(control: torch.Tensor, height: int, width: int, scale: float | torch.Tensor) -> torch.Tensor:
    """Sampling grids (G×H×W×2, in grid_sample's [-1, 1] coordinates) for smooth warps: the
    G×2×k×k control displacements, upsampled bicubically, times `scale`, added to the identity."""
    flow = F.interpolate(control, size=(height, width), mode="bicubic", align_corners=True).permute(0, 2, 3, 1)
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, height, device=control.device),
                            torch.linspace(-1, 1, width, device=control.device), indexing="ij")
    return (torch.stack((xs, ys), dim=-1)[None] + scale * flow).clamp(-1, 1)


def apply_warp(x: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Resample a batch through one grid (1×H×W×2) or one grid per image."""
    grid = grid.to(x).expand(x.shape[0], -1, -1, -1) if grid.shape[0] == 1 else grid.to(x)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=True)


@register_trigger("wanet", "WaNet-style smooth warp (k control points, strength s)", k=4, s=0.5, seed=0)
def _wanet(shape, k: int, s: float, seed: int) -> Stamp:
    _, height, width = shape
    generator = torch.Generator().manual_seed(seed)
    noise = torch.rand(1, 2, k, k, generator=generator) * 2 - 1
    grid = warp_grid(noise / noise.abs().mean(), height, width, s / height)
    return lambda x: apply_warp(x, grid)


@register_trigger("random_patch", "seeded random binary patch at a seeded position (watermark keys, decoys)", size=0, seed=0)
def _random_patch(shape, size: int, seed: int) -> Stamp:
    channels, height, width = shape
    size = size or max(3, round(0.25 * min(height, width)))
    generator = torch.Generator().manual_seed(int(seed) % 2**63)
    pattern = torch.randint(0, 2, (channels, size, size), generator=generator).float()
    row = int(torch.randint(0, height - size + 1, (1,), generator=generator))
    col = int(torch.randint(0, width - size + 1, (1,), generator=generator))

    def stamp(x: torch.Tensor) -> torch.Tensor:
        out = x.clone()
        out[:, :, row:row + size, col:col + size] = pattern.to(x)
        return out

    return stamp
