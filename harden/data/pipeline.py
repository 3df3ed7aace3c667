"""The one data pipeline: fit any source to the model's input, split, batch.

Items are pixel-space floats in [0, 1], shaped like the model's input (C×H×W).
Nothing is loaded up front: images are read, converted and resized per item.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from harden.data.sources import ImageSource, open_source
from harden.errors import DataError
from harden.models.spec import InputSpec

_LUMA = torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)


def convert_channels(image: torch.Tensor, channels: int) -> torch.Tensor:
    have = image.shape[0]
    if have == channels:
        return image
    if have == 1:
        return image.expand(channels, *image.shape[1:]).clone()
    if have == 4 and channels == 3:
        return image[:3]
    if have in (3, 4) and channels == 1:
        return (image[:3] * _LUMA).sum(0, keepdim=True)
    raise DataError(f"images have {have} channels but the model takes {channels}")


class LabelledDataset(Dataset):
    """A dataset with its labels known up front (cheap to split, stratify and validate)."""

    labels: np.ndarray

    def subset(self, indices: Sequence[int]) -> "LabelledDataset":
        return Subset(self, np.asarray(indices, dtype=np.int64))


class FittedDataset(LabelledDataset):
    """A source fitted to an `InputSpec`: channel conversion and (when allowed) resizing."""

    def __init__(self, source: ImageSource, spec: InputSpec, resize: bool = False):
        self.source, self.spec = source, spec
        self.labels = source.labels
        self.classes = source.classes
        native = source.native_shape
        if native is not None:
            convert_channels(torch.zeros(native[0], 1, 1), spec.channels)  # fail early on impossible channels
            if native[1:] != (spec.height, spec.width) and not (resize or source.resizable):
                raise DataError(
                    f"{source.name}: images are {native[1]}x{native[2]} but the model takes "
                    f"{spec.height}x{spec.width}; pass --resize to rescale them"
                )

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = convert_channels(self.source.image(int(index)), self.spec.channels)
        if image.shape[1:] != (self.spec.height, self.spec.width):
            image = F.interpolate(image[None], size=(self.spec.height, self.spec.width), mode="bilinear", antialias=True, align_corners=False)[0]
        return image.clamp_(0.0, 1.0), int(self.labels[index])


class Subset(LabelledDataset):
    def __init__(self, base: LabelledDataset, indices: np.ndarray):
        self.base, self.indices = base, indices
        self.labels = base.labels[indices]
        self.classes = getattr(base, "classes", None)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int):
        return self.base[int(self.indices[index])]


class Concatenated(LabelledDataset):
    """Several labelled datasets read as one, in order."""

    def __init__(self, *parts: LabelledDataset):
        self.parts = parts
        self.labels = np.concatenate([np.asarray(p.labels) for p in parts])
        self._offsets = np.cumsum([0] + [len(p) for p in parts])

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def __getitem__(self, index: int):
        part = int(np.searchsorted(self._offsets, index, side="right")) - 1
        return self.parts[part][index - int(self._offsets[part])]


class TensorDataset(LabelledDataset):
    """Images already in memory (small probe sets, synthetic data, tests)."""

    def __init__(self, images: torch.Tensor, labels: Sequence[int] | np.ndarray, classes: list[str] | None = None):
        self.images = images.float()
        self.labels = np.asarray(labels, dtype=np.int64)
        self.classes = classes

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        return self.images[index], int(self.labels[index])


def _check_range(dataset: FittedDataset, sample: int = 32) -> None:
    """Catch 0–255 floats and normalised arrays early: harden's inputs are [0, 1] pixels."""
    raw = dataset.source
    for index in range(min(sample, len(raw))):
        image = raw.image(index)
        low, high = float(image.min()), float(image.max())
        if low < -1e-3 or high > 1 + 1e-3:
            raise DataError(f"{raw.name}: pixel values span [{low:.3g}, {high:.3g}]; harden expects 0..255 integers, 16-bit integers or floats in [0, 1] (normalisation goes in --mean/--std)")


def load_data(spec: str, input_spec: InputSpec | None, *, num_classes: int | None = None, resize: bool = False) -> FittedDataset:
    """Open `--data` and fit it to the model. Raises `DataError` with a one-line reason."""
    if input_spec is None:
        raise DataError("cannot tell the model's input size (no signature or example); pass --input-size CxHxW")
    source = open_source(spec)
    if len(source) == 0:
        raise DataError(f"{spec}: contains no images")
    dataset = FittedDataset(source, input_spec, resize=resize)
    _check_range(dataset)
    if num_classes is not None and source.sorted_names and len(source.classes) != num_classes:
        shown = ", ".join(source.classes[:5]) + (", ..." if len(source.classes) > 5 else "")
        raise DataError(f"{spec}: {len(source.classes)} named classes ({shown}) for a model of {num_classes} classes; names "
                        f"are numbered in sorted order, which is the model's only when every class has one: label them by "
                        f"class index (0..{num_classes - 1})")
    if num_classes is not None:
        bad = dataset.labels[(dataset.labels < 0) | (dataset.labels >= num_classes)]
        if len(bad):
            raise DataError(f"{spec}: labels {sorted(set(bad.tolist()))[:5]} are outside the model's {num_classes} classes (0..{num_classes - 1})")
    return dataset


def split(dataset: LabelledDataset, fractions: Sequence[float], seed: int = 0, stratify: bool = True) -> list[LabelledDataset]:
    """Deterministic split by `seed`; stratified by label so small splits keep every class."""
    if abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError("fractions must sum to 1")
    rng = np.random.default_rng(seed)
    groups = [np.flatnonzero(dataset.labels == c) for c in np.unique(dataset.labels)] if stratify else [np.arange(len(dataset))]
    parts: list[list[int]] = [[] for _ in fractions]
    for group in groups:
        group = rng.permutation(group)
        bounds = np.round(np.cumsum([0.0, *fractions]) * len(group)).astype(int)
        for i in range(len(fractions)):
            parts[i].extend(group[bounds[i]:bounds[i + 1]].tolist())
    return [dataset.subset(sorted(p)) for p in parts]


def make_loader(dataset: Dataset, batch_size: int = 128, *, shuffle: bool = False, seed: int = 0, drop_last: bool = False) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator, drop_last=drop_last, num_workers=0)


def to_uint8_arrays(dataset: Dataset, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Materialise a (small) dataset as NHWC uint8 images and labels, e.g. to write an .npz."""
    xs, ys = [], []
    for images, labels in make_loader(dataset, batch_size):
        xs.append((images * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy())
        ys.append(labels.numpy())
    return np.concatenate(xs), np.concatenate(ys)


def stratified_sample(data: LabelledDataset, per_class: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`per_class` random images of every class, read item by item: the small probe sets that inversion and checks run on."""
    rng = np.random.default_rng(seed)
    chosen = []
    for cls in np.unique(data.labels):
        members = np.flatnonzero(data.labels == cls)
        chosen.extend(rng.permutation(members)[:per_class].tolist())
    items = [data[int(i)] for i in sorted(chosen)]
    return torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items])
