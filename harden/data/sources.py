"""Where images come from: ImageFolder trees, .npz arrays, torchvision datasets on disk, digits.

Each source yields items lazily as (C×H×W float tensor in [0, 1], int label) at the
source's native size; `harden.data.pipeline` fits them to the model's input. Sources
are found through one small registry (by scheme, by file suffix, or directory).
"""

from __future__ import annotations

import re
import struct
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from harden.errors import DataError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}


@dataclass
class ImageSource:
    """Base class: a random-access collection of labelled images."""

    name: str
    labels: np.ndarray
    classes: list[str] | None = None
    # (C, H, W) when every image has that shape; None when sizes vary (folders of files).
    native_shape: tuple[int, int, int] | None = None
    # Whether fitting to another size is the normal thing to do for this source.
    resizable: bool = False
    # Labels are positions of class names in sorted order (named folders): the model's
    # own order only when every one of its classes is named.
    sorted_names: bool = False
    # What keeps a downloaded source's files on disk (a TemporaryDirectory), when it was downloaded.
    download: Any = field(default=None, repr=False)

    def __len__(self) -> int:
        return int(len(self.labels))

    def image(self, index: int) -> torch.Tensor:
        raise NotImplementedError


class DigitsSource(ImageSource):
    """scikit-learn's bundled 8×8 handwritten digits (1,797 images), rendered to any size.

    `digits-inverted` (dark strokes on white) is the same images as a second domain:
    harden's built-in two-domain task for non-fine-tunable learning (`harden sophon`).
    """

    def __init__(self, inverted: bool = False) -> None:
        from sklearn.datasets import load_digits

        bunch = load_digits()
        images = (bunch.images / 16.0).astype(np.float32)
        self._images = 1.0 - images if inverted else images
        name = "digits-inverted" if inverted else "digits"
        super().__init__(name, bunch.target.astype(np.int64), [str(i) for i in range(10)], (1, 8, 8), resizable=True)

    def image(self, index: int) -> torch.Tensor:
        return torch.from_numpy(self._images[index]).unsqueeze(0)


# What other people's code names the arrays of an .npz (np.savez(f, images=..., labels=...)), first match wins.
NPZ_IMAGE_KEYS = ("x", "X", "images", "imgs", "image", "data", "inputs", "x_test", "X_test")
NPZ_LABEL_KEYS = ("y", "Y", "labels", "label", "targets", "target", "y_test", "Y_test")


def _npz_key(path: Path, names: list[str], candidates: tuple[str, ...], what: str) -> str:
    key = next((k for k in candidates if k in names), None)
    if key is None:
        raise DataError(f"{path}: no {what} array; expected one named {', '.join(candidates[:6])} (found: {', '.join(names) or 'none'})")
    return key


def _npz_member(path: Path, key: str) -> np.ndarray:
    """Memory-map an uncompressed .npz member (never read whole); decompress otherwise."""
    member = f"{key}.npy"
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo(member)
        if info.compress_type != zipfile.ZIP_STORED:
            with archive.open(member) as handle:
                return np.lib.format.read_array(handle)
    with open(path, "rb") as handle:
        handle.seek(info.header_offset)
        local_header = handle.read(30)
        name_len, extra_len = struct.unpack("<HH", local_header[26:30])
        handle.seek(info.header_offset + 30 + name_len + extra_len)
        version = np.lib.format.read_magic(handle)
        reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = reader(handle)
        offset = handle.tell()
    if dtype.hasobject:
        raise DataError(f"{path}: array {key!r} holds Python objects; harden never unpickles data")
    return np.memmap(path, dtype=dtype, mode="r", shape=shape, offset=offset, order="F" if fortran else "C")


def _class_indices(path: Path, y: np.ndarray, count: int) -> np.ndarray:
    """(N,) labels as given, or the class index of each (N, classes) one-hot row. Strings of digits
    ("3", as a CSV export writes them) are class indices, as integer folder names are."""
    y = np.asarray(y)
    if y.dtype.kind in "US" and y.size and all(str(label).strip().isdigit() for label in y.reshape(-1)):
        y = np.array([int(str(label)) for label in y.reshape(-1)], dtype=np.int64).reshape(y.shape)
    if y.dtype.kind in "US":
        raise DataError(f"{path}: labels are strings ({', '.join(map(str, y.reshape(-1)[:3]))}, ...); "
                        f"harden needs the model's class indices (0, 1, ...), and a name's index is the model's to say")
    if y.ndim == 2 and y.shape[0] == count and y.shape[1] > 1:
        if not (np.all((y == 0) | (y == 1)) and np.all(y.sum(axis=1) == 1)):
            raise DataError(f"{path}: labels have shape {y.shape} but are not one-hot rows; give one integer label per image")
        return y.argmax(axis=1)
    return y.reshape(-1)


class NpzSource(ImageSource):
    """Images as (N,H,W), (N,H,W,C) or (N,C,H,W), uint8 (or other integers in 0..255), uint16 or float
    in [0,1] (`x`, or a common name such as `images`); labels as (N,) integers or (N, classes) one-hot (`y`, `labels`, `targets`)."""

    def __init__(self, path: Path) -> None:
        try:
            with zipfile.ZipFile(path) as archive:
                names = sorted(n[:-4] for n in archive.namelist() if n.endswith(".npy"))
            x = _npz_member(path, _npz_key(path, names, NPZ_IMAGE_KEYS, "image"))
            y = _npz_member(path, _npz_key(path, names, NPZ_LABEL_KEYS, "label"))
        except (zipfile.BadZipFile, OSError, ValueError) as exc:
            raise DataError(f"{path}: not a readable .npz file ({exc})") from None
        y = _class_indices(path, y, len(x))
        if len(x) != len(y):
            raise DataError(f"{path}: x has {len(x)} images but y has {len(y)} labels")
        if y.dtype.kind == "f" and not np.all(np.mod(y, 1) == 0):
            raise DataError(f"{path}: labels y must be integers")
        if x.ndim == 3:
            self._layout, shape = "NHW", (1, *x.shape[1:])
        elif x.ndim == 4 and x.shape[1] in (1, 3) and x.shape[3] not in (1, 3, 4):
            self._layout, shape = "NCHW", tuple(x.shape[1:])
        elif x.ndim == 4 and x.shape[3] in (1, 3, 4):
            self._layout, shape = "NHWC", (x.shape[3], *x.shape[1:3])
        else:
            raise DataError(f"{path}: x has shape {tuple(x.shape)}; expected (N,H,W), (N,H,W,C) or (N,C,H,W) images")
        if x.dtype.kind not in "uif":
            raise DataError(f"{path}: x has dtype {x.dtype}; expected uint8 or float images")
        self._x = x
        # uint16 arrays are 16-bit images; other integer arrays (int64 from arithmetic on uint8) hold 0..255
        self._scale = 1.0 if x.dtype.kind == "f" else 65535.0 if x.dtype == np.uint16 else 255.0
        super().__init__(path.name, y.astype(np.int64), None, tuple(int(s) for s in shape))

    def image(self, index: int) -> torch.Tensor:
        array = np.asarray(self._x[index], dtype=np.float32) / self._scale
        if self._layout == "NHW":
            array = array[None]
        elif self._layout == "NHWC":
            array = array.transpose(2, 0, 1)
        return torch.from_numpy(np.ascontiguousarray(array))


class ImageFolderSource(ImageSource):
    """`root/<class>/<image>`; integer folder names are class indices, otherwise sorted order."""

    def __init__(self, root: Path) -> None:
        class_dirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
        files: list[Path] = []
        labels: list[int] = []
        numeric = bool(class_dirs) and all(d.name.isdigit() for d in class_dirs)
        ordered = sorted(class_dirs, key=lambda d: int(d.name)) if numeric else class_dirs
        for position, directory in enumerate(ordered):
            label = int(directory.name) if numeric else position
            for file in sorted(directory.rglob("*")):
                if file.suffix.lower() in IMAGE_SUFFIXES and file.is_file():
                    files.append(file)
                    labels.append(label)
        if not files:
            raise DataError(f"{root}: no images found (expected {root}/<class>/<image>.png ...)")
        self._files = files
        names = [d.name for d in ordered]
        classes = None if numeric else names
        super().__init__(root.name, np.asarray(labels, dtype=np.int64), classes, None, resizable=True, sorted_names=classes is not None)

    def image(self, index: int) -> torch.Tensor:
        from PIL import Image, UnidentifiedImageError

        path = self._files[index]
        try:
            with Image.open(path) as img:
                array = _unit_pixels(img, path)
        except (OSError, UnidentifiedImageError) as exc:
            raise DataError(f"cannot read image {path}: {exc}") from None
        return torch.from_numpy(array[None] if array.ndim == 2 else array.transpose(2, 0, 1).copy())


_SIXTEEN_BIT_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")  # PIL opens 16-bit PNG/TIFF/PGM greys as these


def _unit_pixels(img, path: Path) -> np.ndarray:
    """An image's pixels as floats in [0, 1], H×W (grey) or H×W×3, at the file's own depth:
    PIL's convert("L") clips 16-bit greys at 255 (all white) and truncates float pixels to 0."""
    if img.mode in _SIXTEEN_BIT_MODES:
        array = np.asarray(img, dtype=np.float64)
        if array.size and (array.min() < 0 or array.max() > 65535):
            raise DataError(f"cannot read image {path}: pixel values span [{array.min():.0f}, {array.max():.0f}]; "
                            f"harden reads 8- and 16-bit images")
        return (array / 65535.0).astype(np.float32)
    if img.mode == "F":
        array = np.asarray(img, dtype=np.float32)
        if array.size and (array.min() < -1e-3 or array.max() > 1 + 1e-3):
            raise DataError(f"cannot read image {path}: float pixel values span [{array.min():.3g}, {array.max():.3g}]; "
                            f"harden expects floats in [0, 1]")
        return array.clip(0, 1)
    img = img.convert("L") if img.mode in ("1", "L", "LA") else img.convert("RGB")
    return np.asarray(img, dtype=np.float32) / 255.0


class TorchvisionSource(ImageSource):
    """`torchvision:NAME:/root[:train|test]` for a torchvision dataset already on disk (never downloads)."""

    def __init__(self, spec: str) -> None:
        import torchvision

        parts = spec.split(":")
        if len(parts) < 3 or not parts[1] or not parts[2]:
            raise DataError(f"{spec!r}: expected torchvision:NAME:/path[:train|test]")
        name, root = parts[1], parts[2]
        split = parts[3] if len(parts) > 3 else "test"
        factory = getattr(torchvision.datasets, name, None)
        if factory is None:
            raise DataError(f"{spec!r}: torchvision has no dataset {name!r}")
        try:
            try:
                dataset = factory(root=root, train=(split == "train"), download=False)
            except TypeError:
                dataset = factory(root=root, split=split, download=False)
        except (RuntimeError, OSError, ValueError) as exc:
            raise DataError(f"{spec!r}: cannot open {name} under {root}: {str(exc).splitlines()[0]}") from None
        labels = getattr(dataset, "targets", None)
        if labels is None:
            labels = getattr(dataset, "labels", None)
        if labels is None:
            raise DataError(f"{spec!r}: dataset exposes no targets/labels")
        self._dataset = dataset
        first = self._to_tensor(dataset[0][0])
        super().__init__(f"{name}:{split}", np.asarray(labels, dtype=np.int64), list(getattr(dataset, "classes", []) or []) or None, tuple(first.shape))

    @staticmethod
    def _to_tensor(image) -> torch.Tensor:
        array = np.asarray(image, dtype=np.float32) / 255.0
        return torch.from_numpy(array[None] if array.ndim == 2 else array.transpose(2, 0, 1).copy())

    def image(self, index: int) -> torch.Tensor:
        return self._to_tensor(self._dataset[index][0])


_SCHEMES: dict[str, Callable[[str], ImageSource]] = {
    "digits": lambda spec: DigitsSource(),
    "digits-inverted": lambda spec: DigitsSource(inverted=True),
    "torchvision": TorchvisionSource,
}
_SUFFIXES: dict[str, Callable[[Path], ImageSource]] = {".npz": NpzSource}
_ARTIFACT_URI = re.compile(r"^[a-zA-Z][\w+.-]+:/")  # a scheme of two letters or more: `C:/` is a path


def is_artifact_uri(spec: str) -> bool:
    """`runs:/…`, `mlflow-artifacts:/…`, `s3://…` and other URIs MLflow downloads (not `digits`, not a local path)."""
    spec = str(spec).strip()
    return spec.split(":", 1)[0] not in _SCHEMES and bool(_ARTIFACT_URI.match(spec))


def is_local_path(spec: str) -> bool:
    """A file or folder on this machine: not a built-in source (`digits`, `torchvision:…`), not an artifact URI."""
    spec = str(spec).strip()
    return spec.split(":", 1)[0] not in _SCHEMES and not _ARTIFACT_URI.match(spec)


def open_source(spec: str) -> ImageSource:
    """Resolve a `--data` value to a source; raises `DataError` with the reason."""
    spec = str(spec).strip()
    scheme = spec.split(":", 1)[0]
    if scheme in _SCHEMES:
        return _SCHEMES[scheme](spec)
    if is_artifact_uri(spec):
        return _download_source(spec)
    return _open_path(Path(spec).expanduser(), spec)


def _download_source(uri: str) -> ImageSource:
    """Data kept as an MLflow artifact (or in object storage): downloaded to a temporary directory
    that lives as long as the source, since images are read lazily from it."""
    from harden import tracking

    if uri.startswith("file://"):
        return _open_path(Path(uri[len("file://"):]), uri)
    if uri.startswith(("runs:/", "models:/")):
        tracking.require_store(f"resolve {uri}")
    path, tmp = tracking.download(uri, what="data")
    try:
        source = _open_path(path, uri)
    except DataError as exc:  # name the URI the user gave, not the temporary directory
        tmp.cleanup()
        raise DataError(str(exc).replace(str(path), uri)) from None
    source.download = tmp
    return source


def _open_path(path: Path, spec: str) -> ImageSource:
    if not path.exists():
        raise DataError(f"data not found: {spec}")
    if path.is_dir():
        return ImageFolderSource(path)
    reader = _SUFFIXES.get(path.suffix.lower())
    if reader is None:
        raise DataError(f"{spec}: unsupported data file (expected an ImageFolder directory, .npz, torchvision:NAME:/path, digits or digits-inverted)")
    return reader(path)
