"""Export: an ONNX model with a parity proof, its MLflow lineage and the BentoML model store.

    import harden
    from harden import tracking
    from harden.export import export_onnx, publish

    model = harden.load_model("models:/harden-demo@candidate")
    data = harden.load_data("digits", model.input_spec)  # images for the parity check; labels are not used
    with tracking.command_run("export", model.registered.uri) as run, export_onnx(model, data) as onnx:
        if onnx.passed:
            publish(onnx, model, run_id=run.info.run_id, onnx_path=Path("model.onnx"), bento_name="demo")
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from harden import tracking
from harden.export.bento import BentoResult, check_bento_name, describe, label_value, store_bento
from harden.export.onnx import (
    INPUT_NAME, MAX_ABS_DIFF, MIN_TOP1_AGREEMENT, OUTPUT_NAME, ExportError, ExportResult, ParityCheck, export_onnx,
    ort_providers,
)
from harden.models import LoadedModel
from harden.report import write_atomic

__all__ = [
    "BentoResult", "ExportError", "ExportResult", "INPUT_NAME", "MAX_ABS_DIFF", "MIN_TOP1_AGREEMENT", "OUTPUT_NAME",
    "ParityCheck", "Published", "check_bento_name", "describe", "export_onnx", "label_value", "ort_providers", "publish",
    "store_bento",
]


@dataclass
class Published:
    """Where a parity-checked export went."""

    onnx_model_uri: str
    onnx_file: Path | None
    bento: BentoResult | None


def publish(export: ExportResult, loaded: LoadedModel, *, run_id: str, onnx_path: Path | None = None,
            bento_name: str | None = None) -> Published:
    """Keep a passed export: MLflow model, Bento model, `--onnx` file, and last the source version's tag.

    Call inside the export's MLflow run and only when `export.passed`.
    """
    if not export.passed:
        raise ValueError("refusing to publish an export that failed its parity check")
    assert loaded.input_spec is not None  # export_onnx refuses models without an input size
    source = loaded.registered.uri if loaded.registered else loaded.uri
    metadata = {**loaded.harden_metadata(), "onnx_sha256": export.sha256, "opset": export.opset,
                "input": "float32 pixels in [0, 1], NCHW, normalisation inside the model"}
    logged = tracking.log_onnx_model(
        export.path, input_name=INPUT_NAME, input_shape=loaded.input_spec.shape, output_name=OUTPUT_NAME,
        num_classes=loaded.num_classes, metadata=metadata,
        tags={"harden.source_model_uri": source, "harden.export.onnx_sha256": export.sha256},
    )
    bento = None
    if bento_name:
        version_tags = tracking.version_tags(loaded.registered) if loaded.registered else {}
        bento = store_bento(bento_name, export.path, describe(loaded, export, version_tags, run_id))
    if onnx_path is not None:
        write_atomic(onnx_path, export.path.read_bytes())
    if loaded.registered:
        tracking.set_version_tags(loaded.registered, {"harden.export.onnx_sha256": export.sha256, "harden.export.run_id": run_id})
    return Published(logged.model_uri, onnx_path, bento)
