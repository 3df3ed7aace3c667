"""Opcode-level pickle scanning before anything is unpickled.

Uses picklescan (MIT, maintained, used by Hugging Face's hub): it reads pickle opcodes
without executing them, understands PyTorch checkpoints, numpy and joblib files, and
grades each imported global as innocuous / suspicious / dangerous. harden fails
closed: a dangerous global *or* pickle data that cannot be parsed counts as unsafe.

picklescan's own directory walk only opens files with known extensions and does not
look inside archives nested in archives, so harden walks the files itself and hands
picklescan each pickle it finds:

- every file of a directory tree is examined, whatever its extension;
- zip archives (PyTorch checkpoints, `.pt2` ExportedPrograms, `.npz`) are opened and
  their members examined the same way, recursively (a `.pt2` keeps `torch.save`
  archives inside it), up to `_MAX_NESTING` levels;
- data *named* like a pickle (`PICKLE_SUFFIXES`) must parse completely, else it is
  unsafe; data that merely starts with a pickle protocol header is scanned too, but
  when it does not parse at all it is taken for raw bytes (tensor storages can start
  with any byte pair) rather than a pickle.

A consequence of failing closed: joblib files that hold numpy arrays interleave raw
array bytes with the pickle stream, so they cannot be parsed to the end and count as
unsafe; save such models with safetensors or skops instead.
"""

from __future__ import annotations

import io
import json
import os
import pickletools
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from picklescan.scanner import ScanResult, SafetyLevel, scan_bytes, scan_numpy

PICKLE_SUFFIXES = frozenset({".pkl", ".pickle", ".joblib", ".dat", ".data", ".pt", ".pth", ".ckpt", ".bin", ".tar"})
_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")
_NUMPY_MAGIC = b"\x93NUMPY"
_PICKLE_MAGIC = tuple(bytes([0x80, protocol]) for protocol in range(2, 6))
_MAX_NESTING = 4
# A model class defined in __main__ or a notebook is pickled by value: its code runs on load.
_CLOUDPICKLE_HINT = ("; cloudpickle stores classes and functions defined in __main__ or a notebook as code that runs on load: "
                     "re-log the model with mlflow.pytorch.log_model(..., serialization_format=\"pt2\") (MLflow 3's default), "
                     "or save its weights as safetensors and pass --arch")


@dataclass(frozen=True)
class PickleGlobal:
    module: str
    name: str
    severity: str  # innocuous | suspicious | dangerous
    file: str = ""  # where it was imported: a path under the scanned root, `archive:member` inside zips

    def __str__(self) -> str:
        return f"{self.module}.{self.name}"


@dataclass
class PickleScan:
    path: str
    files_scanned: int
    globals: list[PickleGlobal] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # "file: why" for data that could not be parsed
    pickle_files: list[str] = field(default_factory=list)  # files and archive members holding pickle data

    @property
    def parse_error(self) -> bool:
        return bool(self.errors)

    @property
    def dangerous(self) -> list[PickleGlobal]:
        return [g for g in self.globals if g.severity == SafetyLevel.Dangerous.value]

    @property
    def suspicious(self) -> list[PickleGlobal]:
        return [g for g in self.globals if g.severity == SafetyLevel.Suspicious.value]

    @property
    def unsafe(self) -> bool:
        return bool(self.dangerous) or self.parse_error

    def summary(self, name: str | None = None) -> str:
        """One line; `name` (e.g. the model URI) stands in for the scanned path, which may be a temporary download."""
        where = name or self.path
        if self.dangerous:
            names = ", ".join(sorted({str(g) for g in self.dangerous}))
            cloudpickled = any(g.module.startswith("cloudpickle") for g in self.dangerous)
            return f"{where}: dangerous pickle globals: {names}{_CLOUDPICKLE_HINT if cloudpickled else ''}"
        if self.parse_error:
            return f"{where}: pickle data could not be parsed (treated as unsafe): {self.errors[0]}"
        return f"{where}: no dangerous pickle globals in {self.files_scanned} file(s)"


def scan_pickles(path: str | Path) -> PickleScan:
    """Scan a file or every file of a directory tree for unsafe pickle data, without loading it."""
    root = Path(path)
    if root.is_dir():
        files = sorted(Path(base, name) for base, _, names in os.walk(root) for name in names)
    else:
        files = [root]
    scan = PickleScan(str(root), len(files))
    for file in files:
        name = file.relative_to(root).as_posix() if root.is_dir() else file.name
        try:
            with open(file, "rb") as handle:
                _scan_stream(handle, name, scan, depth=0)
        except Exception as exc:  # noqa: BLE001 - fail closed: whatever cannot be read is unsafe
            scan.errors.append(f"{name}: {type(exc).__name__}: {str(exc)[:200]}")
    return scan


def _scan_stream(stream: IO[bytes], name: str, scan: PickleScan, depth: int) -> None:
    head = stream.read(8)
    stream.seek(0)
    suffix = Path(name.rsplit(":", 1)[-1]).suffix.lower()
    if head.startswith(_ZIP_MAGIC):
        _scan_zip(stream, name, scan, depth)
    elif head.startswith(_NUMPY_MAGIC):
        result = scan_numpy(stream, name)
        if result.globals or result.scan_err:  # only object arrays hold pickle data
            _add(scan, name, result, complete=True)
    elif suffix in PICKLE_SUFFIXES or head.startswith(_PICKLE_MAGIC):
        result = scan_bytes(stream, name, suffix)
        stream.seek(0)
        complete = _parses(stream)
        if result.globals or result.scan_err or complete or suffix in PICKLE_SUFFIXES:
            _add(scan, name, result, complete)


def _scan_zip(stream: IO[bytes], name: str, scan: PickleScan, depth: int) -> None:
    if depth >= _MAX_NESTING:
        scan.errors.append(f"{name}: archives nested more than {_MAX_NESTING} deep")
        return
    with zipfile.ZipFile(stream) as archive:
        for info in archive.infolist():
            if info.is_dir():
                continue
            with archive.open(info) as handle:
                head = handle.read(8)
            if head.startswith((*_ZIP_MAGIC, _NUMPY_MAGIC, *_PICKLE_MAGIC)) or Path(info.filename).suffix.lower() in PICKLE_SUFFIXES:
                _scan_stream(io.BytesIO(archive.read(info)), f"{name}:{info.filename}", scan, depth + 1)


def _parses(stream: IO[bytes]) -> bool:
    """Whether the stream starts with one complete pickle (opcodes only; nothing is executed)."""
    try:
        for _ in pickletools.genops(stream):
            pass
    except Exception:  # noqa: BLE001 - any decoding failure means "not a complete pickle"
        return False
    return True


def _add(scan: PickleScan, name: str, result: ScanResult, complete: bool) -> None:
    scan.pickle_files.append(name)
    scan.globals += [PickleGlobal(g.module, g.name, g.safety.value, name) for g in result.globals]
    if result.scan_err or not complete:
        scan.errors.append(f"{name}: pickle data could not be parsed to the end")


def pt2_pickled_members(path: str | Path) -> list[str]:
    """Members of a torch.export archive that `torch.export.load` would unpickle without restriction.

    It loads weights and constants flagged `use_pickle`, custom and opaque objects, and sample
    inputs or legacy weight files that torch's `weights_only` unpickler rejects, with the full
    unpickler: such an archive can run code on load, like any pickle. A plain export (raw tensor
    files, sample inputs of tensors) has none. Each sample-input and legacy `.pt` member is tried
    with `weights_only=True` here, which only rebuilds tensors and containers.
    """
    import torch

    pickled: list[str] = []
    with zipfile.ZipFile(path) as archive:
        for member in archive.namelist():
            inner = member.split("/", 1)[-1]  # members sit under the archive's own top folder
            if inner.startswith(("data/weights/", "data/constants/")) and inner.endswith("_config.json"):
                for key, entry in (json.loads(archive.read(member)).get("config") or {}).items():
                    file = str(entry.get("path_name", ""))
                    if entry.get("use_pickle") or file.startswith(("custom_obj", "opaque_obj")):
                        pickled.append(f"{member}:{key}")
            elif inner.startswith(("data/sample_inputs/", "data/weights/", "data/constants/")) and inner.endswith(".pt"):
                try:
                    torch.load(io.BytesIO(archive.read(member)), weights_only=True, map_location="cpu")
                except Exception:  # noqa: BLE001 - anything the restricted unpickler refuses
                    pickled.append(member)
    return pickled
