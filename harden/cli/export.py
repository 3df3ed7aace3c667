"""`harden export`: ONNX with a parity proof, logged to MLflow and optionally stored as a Bento model."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import click

from harden import __version__, tracking
from harden.cli.options import CommandContext, common_options, data_options, model_options, open_model, report_options
from harden.data import load_data
from harden.errors import EXIT_FINDINGS, EXIT_OK
from harden.export import (
    INPUT_NAME, MAX_ABS_DIFF, MIN_TOP1_AGREEMENT, OUTPUT_NAME, ExportResult, Published, check_bento_name, export_onnx,
    publish,
)
from harden.models import LoadedModel
from harden.report import Report, Table, emit
from harden.runtime import Measurement, measure


@dataclass
class ExportRun:
    """One `harden export` as the CLI ran it: the export, where it went, the run and its cost."""

    loaded: LoadedModel
    source_uri: str
    export: ExportResult
    published: Published | None
    run_id: str
    cost: Measurement


def run_export(ctx: CommandContext, loaded: LoadedModel, data: str, resize: bool, *, onnx_path: Path | None,
               bento_name: str | None, opset: int | None = None, samples: int = 256, batch_size: int = 64) -> ExportRun:
    """Export inside one MLflow run and keep the results only when parity passes (shared with `harden serve`)."""
    dataset = load_data(data, loaded.input_spec, resize=resize)  # parity needs images only: labels of any range will do
    source_uri = loaded.registered.uri if loaded.registered else loaded.uri
    params = {"data": data, "samples": samples, "batch_size": batch_size, "opset": opset, "onnx": onnx_path,
              "bento": bento_name, "device": str(ctx.device)}
    with tracking.command_run("export", source_uri, params) as run:
        run_id = run.info.run_id
        with measure(ctx.device) as cost, export_onnx(loaded, dataset, opset=opset, samples=samples,
                                                     batch_size=batch_size, device=ctx.device) as export:
            published = publish(export, loaded, run_id=run_id, onnx_path=onnx_path, bento_name=bento_name) if export.passed else None
        tracking.log_metrics({
            "max_abs_diff": export.max_abs_diff, "top1_agreement": export.top1_agreement, "export_s": export.export_s,
            "parity_s": export.parity_s, "onnx_size_mb": export.size_bytes / 2**20, "duration_s": cost.duration_s,
            **{f"max_abs_diff_batch_{c.batch_size}": c.max_abs_diff for c in export.parity},
        })
        result = ExportRun(loaded, source_uri, export, published, run_id, cost)
        tracking.log_json(export_report(result, data, str(ctx.device)).to_dict(), "reports/export.json")
    return result


def export_report(run: ExportRun, data: str, device: str) -> Report:
    export, published, spec = run.export, run.published, run.loaded.input_spec
    assert spec is not None
    bento = published.bento if published else None
    normalisation = "inside the model" if run.loaded.mean else "none"
    payload = {
        "model_uri": run.source_uri,
        "data": data,
        "passed": export.passed,
        "opset": export.opset,
        "ir_version": export.ir_version,
        "file": str(published.onnx_file) if published and published.onnx_file else None,
        "sha256": export.sha256,
        "size_bytes": export.size_bytes,
        "input": {"name": INPUT_NAME, "shape": ["batch", *spec.shape], "dtype": "float32", "range": [0.0, 1.0],
                  "normalisation": normalisation, "mean": run.loaded.mean, "std": run.loaded.std},
        "output": {"name": OUTPUT_NAME, "shape": ["batch", run.loaded.num_classes]},
        "providers": export.providers,
        "parity": {"passed": export.passed, "max_abs_diff_limit": MAX_ABS_DIFF, "min_top1_agreement": MIN_TOP1_AGREEMENT,
                   "checks": [check.to_dict() for check in export.parity]},
        "onnx_model_uri": published.onnx_model_uri if published else None,
        "bento_tag": bento.tag if bento else None,
        "bento_labels": bento.labels if bento else None,
        "device": device,
        "run_id": run.run_id,
        "export_s": export.export_s,
        "parity_s": export.parity_s,
        "duration_s": run.cost.duration_s,
        "peak_memory_mb": run.cost.peak_memory_mb,
        "harden_version": __version__,
    }
    verdict = "passed" if export.passed else "FAILED: nothing was kept"
    tables = [
        Table(f"Parity with ONNX Runtime ({', '.join(export.providers)}): {verdict}",
              ["batch", "samples", "top-1 agreement", "max |diff|", "result"],
              [[c.batch_size, c.samples, f"{c.top1_agreement:.2%}", f"{c.max_abs_diff:.2e}", "ok" if c.passed else "FAIL"]
               for c in export.parity]),
        Table("ONNX model", ["field", "value"], [
            ["opset", export.opset], ["file", payload["file"]], ["sha256", export.sha256],
            ["size (MB)", round(export.size_bytes / 2**20, 2)], ["input", f"{INPUT_NAME}: batch × {spec} float32 pixels in 0..1"],
            ["MLflow model", payload["onnx_model_uri"]], ["Bento model", payload["bento_tag"]], ["seconds", run.cost.duration_s],
        ]),
    ]
    if bento:
        tables.append(Table(f"Bento labels ({bento.tag})", ["label", "value"], [[k, v] for k, v in bento.labels.items()]))
    steps = [f"harden serve {bento.tag} --port 3000"] if bento else []
    limits = f"top-1 agreement {MIN_TOP1_AGREEMENT:.0%}, max |diff| ≤ {MAX_ABS_DIFF:g}"
    title = (f"Exported {run.source_uri} to ONNX (opset {export.opset}); parity passed ({limits})" if export.passed
             else f"Export of {run.source_uri} FAILED parity ({limits} required); no file, model or tag was written")
    return Report("harden.export/1", title, payload, tables, steps)


@click.command("export")
@model_options
@data_options(default="digits")
@click.option("--onnx", "onnx_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the ONNX model to this file (it is always logged to MLflow).")
@click.option("--bento", "bento_name", default=None, help="Store the ONNX model in the BentoML model store under this name.")
@click.option("--opset", type=int, default=None, help="ONNX opset [default: the exporter's, 20].")
@click.option("--samples", type=click.IntRange(min=1), default=256, show_default=True, help="Images from --data for the parity check.")
@click.option("--batch-size", type=click.IntRange(min=2), default=64, show_default=True,
              help="The larger parity batch (batch 1 is always checked too).")
@report_options
@common_options
def command(ctx: CommandContext, model, arch, num_classes, input_size, mean, std, allow_pickle, data, resize,
            onnx_path: Path | None, bento_name: str | None, opset: int | None, samples: int, batch_size: int,
            fmt: str, output: Path | None) -> int:
    """Export MODEL to ONNX (dynamic batch, pixel-space input) and prove parity with ONNX Runtime.

    The exported graph includes harden's normalisation: it takes float32 pixels in
    [0, 1], NCHW. Parity is checked on --data at batch 1 and --batch-size; it must
    reach 100% top-1 agreement and a max |logit difference| of 1e-4, otherwise the
    export exits 1 and keeps nothing.

    \b
    Examples:
      harden export models:/harden-demo@candidate --onnx model.onnx --bento harden-demo
      harden export models:/my-model/3 --data ./val-images --format json --output export.json
    """
    if bento_name is not None:
        check_bento_name(bento_name)
    loaded = open_model(ctx, model, arch, num_classes, input_size, mean, std, allow_pickle)
    run = run_export(ctx, loaded, data, resize, onnx_path=onnx_path, bento_name=bento_name, opset=opset,
                     samples=samples, batch_size=batch_size)
    emit(export_report(run, data, str(ctx.device)), fmt, output)
    return EXIT_OK if run.export.passed else EXIT_FINDINGS
