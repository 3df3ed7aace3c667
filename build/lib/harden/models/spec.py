"""Small value types describing a model's input and its place in the registry."""

from __future__ import annotations

import re
from dataclasses import dataclass

from harden.errors import HardenError


@dataclass(frozen=True)
class InputSpec:
    """Pixel-space input of an image model: channels × height × width."""

    channels: int
    height: int
    width: int

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.channels, self.height, self.width)

    def __str__(self) -> str:
        return f"{self.channels}x{self.height}x{self.width}"

    @classmethod
    def parse(cls, text: str) -> "InputSpec":
        """`3x32x32` (C×H×W), or `32` for a 3-channel square image."""
        parts = [p for p in re.split(r"[x×, ]+", text.strip().lower()) if p]
        try:
            numbers = [int(p) for p in parts]
        except ValueError:
            numbers = []
        if len(numbers) == 1:
            numbers = [3, numbers[0], numbers[0]]
        if len(numbers) != 3 or min(numbers) <= 0:
            raise HardenError(f"--input-size {text!r}: expected CxHxW such as 3x32x32")
        return cls(*numbers)

    @classmethod
    def from_shape(cls, shape) -> "InputSpec | None":
        """From a (C,H,W) or (N,C,H,W) shape whose image dims are concrete."""
        dims = list(shape)[-3:]
        if len(dims) == 3 and all(isinstance(d, int) and d > 0 for d in dims):
            return cls(*dims)
        return None


@dataclass(frozen=True)
class RegisteredVersion:
    """A model version in the MLflow registry, resolved from a `models:/` URI."""

    name: str
    version: str
    run_id: str | None = None
    source: str | None = None

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"
