"""Data: sources (ImageFolder, .npz, torchvision on disk, digits) and the one pipeline."""

from harden.data.pipeline import (
    FittedDataset, LabelledDataset, TensorDataset, convert_channels, load_data, make_loader, split, to_uint8_arrays,
)
from harden.data.sources import ImageSource, open_source

__all__ = [
    "FittedDataset", "ImageSource", "LabelledDataset", "TensorDataset", "convert_channels", "load_data",
    "make_loader", "open_source", "split", "to_uint8_arrays",
]
