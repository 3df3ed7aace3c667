"""`harden export`: the ONNX file, its parity proof, MLflow lineage, the Bento model, and refusals."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import bentoml
import mlflow
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from safetensors.torch import save_file

from harden.data import load_data
from harden.export import MAX_ABS_DIFF, label_value
from harden.models import create_model, load_model

K8S_LABEL_VALUE = re.compile(r"^(?:[A-Za-z0-9](?:[-A-Za-z0-9_.]*[A-Za-z0-9])?)?$")


def error_line(stderr: str) -> str:
    """The one `harden: error:` line of a failed command (progress/info lines may precede it)."""
    errors = [line for line in stderr.splitlines() if line.startswith("harden: error:")]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr
    return errors[0]


def _sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_report_records_opset_file_hash_and_parity(exported):
    report = exported.report
    assert report["schema"] == "harden.export/1"
    assert report["passed"] is True
    assert report["file"] == str(exported.onnx_file)
    assert report["sha256"] == _sha256(exported.onnx_file)
    assert report["opset"] == 20
    assert [o.version for o in onnx.load(str(exported.onnx_file)).opset_import if o.domain in ("", "ai.onnx")] == [20]
    checks = report["parity"]["checks"]
    assert [(c["batch_size"], c["samples"]) for c in checks] == [(1, 32), (64, 256)]
    for check in checks:
        assert check["top1_agreement"] == 1.0 and check["max_abs_diff"] <= MAX_ABS_DIFF and check["passed"]
    assert report["providers"] == ["CPUExecutionProvider"]
    assert report["bento_tag"].startswith("export-demo:")
    assert report["duration_s"] > 0
    # Atomic write: the target directory holds the file and nothing half-written beside it; others may read it.
    assert [p.name for p in exported.onnx_file.parent.iterdir()] == ["model.onnx"]
    assert exported.onnx_file.stat().st_mode & 0o044 == 0o044


def test_onnx_file_is_single_dynamic_batch_pixel_model(exported, demo_model):
    """Batch 1 and an odd batch both run; outputs match harden's pixel-space model on real digits."""
    session = ort.InferenceSession(str(exported.onnx_file), providers=["CPUExecutionProvider"])
    (inp,), (out,) = session.get_inputs(), session.get_outputs()
    assert (inp.name, inp.shape[1:], out.name) == ("images", [3, 32, 32], "logits")
    assert isinstance(inp.shape[0], str)  # symbolic batch axis
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in onnx.load(str(exported.onnx_file)).graph.initializer)
    loaded = load_model(demo_model.version.uri)
    images, _ = next(iter(torch.utils.data.DataLoader(load_data("digits", loaded.input_spec), batch_size=7)))
    with torch.no_grad():
        expected = loaded.module(images).numpy()
    for batch in (images[:1], images):
        got = session.run(None, {"images": batch.numpy()})[0]
        assert got.shape == (len(batch), 10)
        np.testing.assert_allclose(got, expected[: len(batch)], atol=MAX_ABS_DIFF, rtol=0)


def test_mlflow_run_holds_onnx_model_and_source_version_is_tagged(exported, demo_model):
    client = mlflow.MlflowClient()
    run = client.get_run(exported.report["run_id"])
    assert run.data.tags["harden.command"] == "export"
    assert run.data.tags["harden.source_model_uri"] == demo_model.version.uri
    assert run.data.metrics["max_abs_diff"] <= MAX_ABS_DIFF
    assert [a.path for a in client.list_artifacts(run.info.run_id, "export")] == ["export/model.onnx"]
    logged = mlflow.get_logged_model(exported.report["onnx_model_uri"].removeprefix("models:/"))
    assert logged.source_run_id == run.info.run_id
    assert logged.tags["harden.source_model_uri"] == demo_model.version.uri
    proto = mlflow.onnx.load_model(exported.report["onnx_model_uri"])
    assert hashlib.sha256(proto.SerializeToString()).hexdigest() == hashlib.sha256(
        onnx.load(str(exported.onnx_file)).SerializeToString()).hexdigest()
    tags = client.get_model_version(demo_model.version.name, demo_model.version.version).tags
    assert tags["harden.export.onnx_sha256"] == exported.report["sha256"]
    assert tags["harden.export.run_id"] == run.info.run_id


def test_bento_model_carries_lineage_and_preprocessing(exported, demo_model, lineage_tags):
    model = bentoml.models.get(exported.report["bento_tag"])
    labels, meta = model.info.labels, model.info.metadata
    assert labels["harden.scan.verdict"] == "backdoor"
    assert labels["harden.purified_from"] == "upstream-model_2"
    assert labels["harden.source"] == "export-demo_1"
    assert (labels["harden.input_size"], labels["harden.channels"]) == ("3x32x32", "3")
    assert (labels["harden.mean"], labels["harden.std"]) == ("none", "none")
    assert labels["harden.classes"] == "0_1_2_3_4_5_6_7_8_9"
    assert all(len(v) <= 63 and K8S_LABEL_VALUE.match(v) for v in labels.values())
    assert exported.report["bento_labels"] == labels
    assert meta["source_model_uri"] == demo_model.version.uri
    assert lineage_tags.items() <= meta["lineage"].items()
    assert not [key for key in meta["lineage"] if key.startswith("harden.export.")]
    assert meta["input_shape"] == [3, 32, 32] and meta["class_names"] == [str(i) for i in range(10)]
    assert meta["onnx_sha256"] == exported.report["sha256"] == _sha256(model.path_of("model.onnx"))


def test_text_report_shows_parity_and_bento_labels(exported, harden_cli, demo_model):
    code, out, _ = harden_cli("export", demo_model.version.uri, "--samples", "16", "--batch-size", "8")
    assert code == 0
    assert "parity passed" in out and "100.00%" in out
    assert "Bento" in out and "MLflow model" in out


def test_pt2_with_fixed_batch_is_rebuilt_only_with_its_architecture(export_home, harden_cli):
    """A .pt2 exported from a batch-1 example accepts only batch 1; --arch lets export rebuild it dynamically."""
    torch.manual_seed(0)
    net = create_model("small_cnn", num_classes=10).eval()
    path = export_home / "fixed-batch.pt2"
    torch.export.save(torch.export.export(net, (torch.rand(1, 3, 32, 32),)), str(path))
    target = export_home / "fixed" / "model.onnx"

    code, _, err = harden_cli("export", path, "--onnx", target)
    assert code == 2 and "pass --arch" in error_line(err)
    assert not target.exists()

    code, _, _ = harden_cli("export", path, "--arch", "small_cnn", "--onnx", target, "--samples", "16", "--batch-size", "8")
    assert code == 0
    session = ort.InferenceSession(str(target), providers=["CPUExecutionProvider"])
    assert session.run(None, {"images": np.random.rand(5, 3, 32, 32).astype(np.float32)})[0].shape == (5, 10)


def test_parity_failure_exits_1_and_keeps_nothing(export_home, harden_cli):
    """Logits around 1e6 cannot agree to 1e-4 between two fp32 runtimes: the gate must say so."""
    torch.manual_seed(0)
    state = create_model("small_cnn", num_classes=10).state_dict()
    state["fc.weight"] = state["fc.weight"] * 1e6
    weights = export_home / "huge-logits.safetensors"
    save_file(state, str(weights))
    target = export_home / "failed" / "model.onnx"
    report = export_home / "failed.json"
    logged_before = len(mlflow.search_logged_models(output_format="list"))

    code, _, _ = harden_cli("export", weights, "--arch", "small_cnn", "--onnx", target, "--bento", "must-not-exist",
                            "--format", "json", "--output", report)

    assert code == 1
    payload = json.loads(report.read_text())
    assert payload["passed"] is False and payload["file"] is None and payload["bento_tag"] is None
    assert max(c["max_abs_diff"] for c in payload["parity"]["checks"]) > MAX_ABS_DIFF
    assert not target.exists() and (not target.parent.exists() or not any(target.parent.iterdir()))
    assert not [m for m in bentoml.models.list() if m.tag.name == "must-not-exist"]
    assert len(mlflow.search_logged_models(output_format="list")) == logged_before


@pytest.mark.parametrize("args, exit_code, message", [
    (["{model}", "--bento", "Bad Name"], 2, "lowercase"),
    (["{model}", "--bento", "demo:v1"], 2, "name only"),
    (["{model}", "--data", "/nonexistent/data.npz"], 2, "data not found"),
    (["{home}/missing.pt2"], 2, "model not found"),
    (["{model}", "--onnx", "{home}"], 4, "is a directory"),
])
def test_bad_input_fails_with_one_line_and_writes_nothing(args, exit_code, message, demo_model, export_home, harden_cli):
    before = {m.tag for m in bentoml.models.list()}
    tags_before = mlflow.MlflowClient().get_model_version(demo_model.version.name, demo_model.version.version).tags
    argv = [a.format(model=demo_model.version.uri, home=export_home) for a in args]
    code, out, err = harden_cli("export", *argv)
    assert code == exit_code and out == ""
    assert message in (error_line(err) if exit_code == 2 else err)
    assert {m.tag for m in bentoml.models.list()} == before
    assert mlflow.MlflowClient().get_model_version(demo_model.version.name, demo_model.version.version).tags == tags_before


def test_torchscript_is_refused_with_a_reason(export_home, harden_cli):
    path = export_home / "scripted.pt"
    torch.jit.trace(create_model("small_cnn", num_classes=10).eval(), torch.rand(2, 3, 32, 32)).save(str(path))
    code, _, err = harden_cli("export", path, "--input-size", "3x32x32")
    assert code == 2 and "TorchScript" in error_line(err)


def test_digits_default_fits_any_input_size_and_class_count(export_home, harden_cli):
    """--data defaults to digits, resized and converted to the model's input (here 1x28x28); its ten
    labels do not matter to the parity check, so a 3-class model exports with it too."""
    torch.manual_seed(0)
    save_file(create_model("small_cnn", num_classes=3, in_channels=1).state_dict(), str(export_home / "gray.safetensors"))
    code, out, err = harden_cli("export", export_home / "gray.safetensors", "--arch", "small_cnn", "--input-size", "1x28x28",
                                "--samples", "8", "--batch-size", "4", "--format", "json")
    assert code == 0, err
    report = json.loads(out)
    assert report["data"] == "digits" and report["input"]["shape"] == ["batch", 1, 28, 28]
    assert report["output"]["shape"] == ["batch", 3] and report["parity"]["passed"]



@pytest.mark.parametrize("classes, ending, output", [(10, torch.nn.Softmax(dim=1), "probabilities"),
                                                     (1, torch.nn.Sigmoid(), "binary_probability")])
def test_probability_model_exports_logits_that_softmax_back_to_its_own(export_home, classes, ending, output):
    """A network ending in a softmax (or a one-output sigmoid): the ONNX graph outputs harden's logits,
    so the serving softmax returns the network's own probabilities (not a softmax of probabilities)."""
    from harden.export.onnx import export_onnx

    torch.manual_seed(0)
    net = torch.nn.Sequential(create_model("small_cnn", num_classes=classes, width=8), ending).eval()
    example = torch.rand(4, 3, 32, 32)
    torch.export.save(torch.export.export(net, (example,), dynamic_shapes=({0: torch.export.Dim("batch", min=2, max=512)},)),
                      str(export_home / f"{output}.pt2"))
    loaded = load_model(export_home / f"{output}.pt2")
    assert loaded.output == output
    with export_onnx(loaded, load_data("digits", loaded.input_spec), samples=8, batch_size=4) as result:
        assert result.passed
        session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
        out = session.run(None, {session.get_inputs()[0].name: example.numpy()})[0]
    with torch.no_grad():
        own = net(example)
        own = torch.cat([1 - own, own], 1) if classes == 1 else own
        assert np.allclose(torch.softmax(torch.from_numpy(out), 1).numpy(), own.numpy(), atol=1e-5)


@pytest.mark.parametrize("value, expected", [
    ("models:/harden-demo/3", "harden-demo_3"),
    ((0.485, 0.456, 0.406), "0.485_0.456_0.406"),
    (["airplane", "automobile", "bird"], "airplane_automobile_bird"),
    ("  ", "none"),
    ("--weird value!--", "weird_value"),
])
def test_label_values_are_kubernetes_safe(value, expected):
    assert label_value(value) == expected


def test_long_label_values_are_truncated_to_valid_labels():
    value = label_value([f"class number {i}" for i in range(100)])
    assert len(value) <= 63 and K8S_LABEL_VALUE.match(value) and value.startswith("class_number_0_class")
