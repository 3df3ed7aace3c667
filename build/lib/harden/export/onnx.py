"""ONNX export through torch's dynamo exporter, proven against ONNX Runtime before anything is kept.

What is exported is harden's `PixelModel`: the network *with* its mean/std
normalisation folded in. The ONNX model therefore takes exactly what harden
measures and what the service receives: float32 pixels in [0, 1], N×C×H×W, with a
dynamic batch axis. Nobody downstream has to re-implement the preprocessing, and
the Bento labels record it for reference.

Parity: the same images go through the eager model (CPU, fp32) and through ONNX
Runtime at batch 1 and at a larger batch; export passes only with 100% top-1
agreement and a max absolute logit difference ≤ 1e-4.
"""

from __future__ import annotations

import hashlib
import re
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn

from harden.data import LabelledDataset, make_loader
from harden.errors import HardenError
from harden.models import LoadedModel

INPUT_NAME = "images"
OUTPUT_NAME = "logits"
MAX_ABS_DIFF = 1e-4
MIN_TOP1_AGREEMENT = 1.0
BATCH_1_SAMPLES = 32
_ANSI = re.compile(r"\x1b\[[0-9;]*m")  # the exporter colours its messages


class ExportError(HardenError):
    """The model could not be exported to a valid ONNX file."""


@dataclass
class ParityCheck:
    """ONNX Runtime against the eager model on the same images at one batch size."""

    batch_size: int
    samples: int
    top1_agreement: float
    max_abs_diff: float

    @property
    def passed(self) -> bool:
        return self.top1_agreement >= MIN_TOP1_AGREEMENT and self.max_abs_diff <= MAX_ABS_DIFF

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "passed": self.passed}


@dataclass
class ExportResult:
    path: Path  # inside a temporary directory until the caller keeps it
    opset: int
    ir_version: int
    sha256: str
    size_bytes: int
    providers: list[str]
    parity: list[ParityCheck]
    export_s: float
    parity_s: float

    @property
    def passed(self) -> bool:
        return all(check.passed for check in self.parity)

    @property
    def max_abs_diff(self) -> float:
        return max(check.max_abs_diff for check in self.parity)

    @property
    def top1_agreement(self) -> float:
        return min(check.top1_agreement for check in self.parity)


def ort_providers(device: torch.device) -> list[Any]:
    """CUDA when asked for and onnxruntime-gpu can use it (TF32 off: parity is an fp32 claim), else CPU."""
    import onnxruntime as ort

    if device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
        return [("CUDAExecutionProvider", {"device_id": device.index or 0, "use_tf32": 0}), "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def _exportable(loaded: LoadedModel) -> nn.Module:
    """The pixel-space module on CPU; a pt2 model fixed to one batch size is rebuilt from its weights."""
    module = loaded.module
    if isinstance(module.net, torch.jit.ScriptModule):
        raise ExportError(f"{loaded.uri} is TorchScript, which torch's dynamo ONNX exporter cannot read; "
                          "export the original nn.Module, a .pt2 or an MLflow pt2 model instead")
    if module.static_batch is not None:
        if loaded.arch is None:
            raise ExportError(f"{loaded.uri} was saved with a fixed batch of {module.static_batch}; "
                              "rebuilding it with a dynamic batch needs its architecture: pass --arch")
        module = loaded.trainable()
    return module.to("cpu").eval()


def _parity_images(data: LabelledDataset, samples: int) -> torch.Tensor:
    """`samples` images spread evenly over the dataset (class-sorted folders still give variety)."""
    indices = np.unique(np.linspace(0, len(data) - 1, min(samples, len(data))).round().astype(np.int64))
    return torch.cat([images for images, _ in make_loader(data.subset(indices), batch_size=256)])


@torch.no_grad()
def _parity(session, reference: nn.Module, images: torch.Tensor, batch_size: int) -> ParityCheck:
    expected, actual = [], []
    for chunk in torch.split(images, batch_size):
        expected.append(reference(chunk).numpy())
        actual.append(session.run([OUTPUT_NAME], {INPUT_NAME: chunk.numpy()})[0])
    want, got = np.concatenate(expected), np.concatenate(actual)
    diff = float(np.abs(want - got).max()) if np.isfinite(got).all() else float("inf")
    agreement = float((want.argmax(1) == got.argmax(1)).mean())
    return ParityCheck(batch_size, len(images), agreement, diff)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _export_file(module: nn.Module, shape: tuple[int, int, int], path: Path, opset: int | None) -> None:
    example = torch.rand(2, *shape)  # batch 2: a batch-1 example would specialise the batch axis
    try:
        torch.onnx.export(module, (example,), str(path), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          dynamic_shapes=({0: "batch"},), opset_version=opset, dynamo=True, external_data=False,
                          verbose=False)
    except Exception as exc:  # noqa: BLE001 - the exporter raises many types; the user needs one line
        text = _ANSI.sub("", str(exc)).strip()
        raise ExportError(f"ONNX export failed: {text.splitlines()[0][:300] if text else type(exc).__name__}") from None


@contextmanager
def export_onnx(
    loaded: LoadedModel,
    data: LabelledDataset,
    *,
    opset: int | None = None,
    samples: int = 256,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
) -> Iterator[ExportResult]:
    """Export to a temporary `model.onnx`, check it and measure parity; the file lives while the block runs."""
    import onnx
    import onnxruntime as ort

    if loaded.input_spec is None:
        raise ExportError(f"{loaded.uri}: input size unknown; pass --input-size CxHxW")
    if samples < 1 or batch_size < 2:
        raise ExportError("parity needs --samples ≥ 1 and --batch-size ≥ 2 (batch 1 is always checked too)")
    module = _exportable(loaded)
    reference = loaded.module.to("cpu").eval()  # what harden loaded, not the rebuild: parity proves both
    with tempfile.TemporaryDirectory(prefix="harden-onnx-") as tmp:
        path = Path(tmp) / "model.onnx"
        start = time.perf_counter()
        _export_file(module, loaded.input_spec.shape, path, opset)
        try:
            onnx.checker.check_model(str(path), full_check=True)
        except onnx.checker.ValidationError as exc:
            raise ExportError(f"the exported ONNX model is invalid: {str(exc).splitlines()[0]}") from None
        proto = onnx.load(str(path), load_external_data=False)
        export_s = time.perf_counter() - start

        start = time.perf_counter()
        session = ort.InferenceSession(str(path), providers=ort_providers(torch.device(device)))
        images = _parity_images(data, samples)
        parity = [_parity(session, reference, images[:BATCH_1_SAMPLES], 1), _parity(session, reference, images, batch_size)]
        yield ExportResult(
            path=path,
            opset=next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")),
            ir_version=int(proto.ir_version),
            sha256=_sha256(path),
            size_bytes=path.stat().st_size,
            providers=session.get_providers(),
            parity=parity,
            export_s=round(export_s, 3),
            parity_s=round(time.perf_counter() - start, 3),
        )
