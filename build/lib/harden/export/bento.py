"""The BentoML model store: the parity-checked ONNX file with labels and metadata carrying its lineage.

Labels are for listing and filtering (`bentoml models list`, BentoCloud). BentoML
itself only insists on string values, but labels travel to BentoCloud, which runs on
Kubernetes, so every value is kept Kubernetes-label safe: at most 63 characters of
`[A-Za-z0-9_.-]`, alphanumeric at both ends. Metadata keeps the exact values (class
names, mean/std as numbers, URIs); the service reads its preprocessing from there.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from harden import __version__
from harden.errors import HardenError
from harden.export.onnx import INPUT_NAME, OUTPUT_NAME, ExportResult
from harden.models import LoadedModel

ONNX_FILE = "model.onnx"
UNSCANNED = "unscanned"
_LABEL_MAX = 63
_LINEAGE_PREFIX = "harden."
_OWN_TAGS = "harden.export."


@dataclass
class BentoResult:
    tag: str
    labels: dict[str, str]
    metadata: dict[str, Any]


def label_value(value: Any) -> str:
    """A Kubernetes-safe label value: `models:/demo/3` → `demo_3`, lists joined by `_`, `none` when empty."""
    text = "_".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
    text = re.sub(r"^[A-Za-z][\w+.-]*:/+", "", text)
    text = re.sub(r"[^A-Za-z0-9_.-]+", "_", text)[:_LABEL_MAX].strip("_.-")
    return text or "none"


def check_bento_name(name: str) -> str:
    """Fail before any work when `--bento` is not a BentoML model name (BentoML picks the version)."""
    from bentoml import Tag

    if ":" in name:
        raise HardenError(f"--bento {name!r}: give a name only; BentoML assigns the version")
    if name != name.lower():
        raise HardenError(f"--bento {name!r}: BentoML model names are lowercase")
    try:
        Tag.from_taglike(name)
    except ValueError as exc:
        raise HardenError(f"--bento {str(exc).splitlines()[0]}") from None
    return name


def describe(loaded: LoadedModel, export: ExportResult, version_tags: Mapping[str, str], run_id: str) -> BentoResult:
    """Labels and metadata for the stored model; the tag is filled in by `store_bento`."""
    spec = loaded.input_spec
    assert spec is not None  # export_onnx refuses models without an input size
    classes = loaded.class_names or [str(i) for i in range(loaded.num_classes)]
    source = loaded.registered.uri if loaded.registered else loaded.uri
    lineage = {k: v for k, v in version_tags.items() if k.startswith(_LINEAGE_PREFIX) and not k.startswith(_OWN_TAGS)}
    labels = {
        "harden.scan.verdict": label_value(lineage.get("harden.scan.verdict", UNSCANNED)),
        "harden.purified_from": label_value(lineage.get("harden.purified_from", "none")),
        "harden.source": label_value(source),
        "harden.input_size": str(spec),
        "harden.channels": str(spec.channels),
        "harden.mean": label_value(loaded.mean or "none"),
        "harden.std": label_value(loaded.std or "none"),
        "harden.classes": label_value(classes),
        "harden.num_classes": str(loaded.num_classes),
        "harden.preprocessing": "pixels_0-1_nchw_normalised_in_model" if loaded.mean else "pixels_0-1_nchw",
        "harden.parity": "passed" if export.passed else "failed",
    }
    metadata = {
        "source_model_uri": source,
        "source_run_id": loaded.registered.run_id if loaded.registered else None,
        "export_run_id": run_id,
        "onnx_file": ONNX_FILE,
        "onnx_sha256": export.sha256,
        "opset": export.opset,
        "input_name": INPUT_NAME,
        "output_name": OUTPUT_NAME,
        "input_shape": list(spec.shape),
        "input_range": [0.0, 1.0],
        "layout": "NCHW",
        "mean": list(loaded.mean) if loaded.mean else None,
        "std": list(loaded.std) if loaded.std else None,
        "normalisation": "inside the model" if loaded.mean else "none",
        "class_names": classes,
        "parity": {"max_abs_diff": export.max_abs_diff, "top1_agreement": export.top1_agreement},
        "lineage": lineage,
        "harden_version": __version__,
    }
    # BentoML metadata accepts no None values.
    return BentoResult("", labels, {k: v for k, v in metadata.items() if v is not None})


def store_bento(name: str, onnx_file: Path, description: BentoResult) -> BentoResult:
    """Create `name:<new version>` in the BentoML model store; nothing is saved if the copy fails."""
    import bentoml

    with bentoml.models.create(name, labels=description.labels, metadata=description.metadata) as model:
        shutil.copyfile(onnx_file, model.path_of(ONNX_FILE))
    return BentoResult(str(model.tag), description.labels, description.metadata)
