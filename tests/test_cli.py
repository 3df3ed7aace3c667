"""CLI conventions and the bad-input contract: exit 2, one clear line, nothing written."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest

from tests.conftest import CustomNet, registry_snapshot


def test_version_and_help(run_cli):
    code, out, _ = run_cli("--version")
    assert code == 0 and "harden, version" in out
    for command in ("evaluate", "demo", "list"):
        code, out, _ = run_cli(command, "--help")
        assert code == 0 and "Examples:" in out


def test_usage_errors_exit_4(run_cli):
    code, _, err = run_cli("evaluate", "models:/x/1")
    assert code == 4 and "Missing option '--data'" in err
    code, _, _ = run_cli("evaluate", "m", "--data", "digits", "--format", "yaml")
    assert code == 4
    code, _, _ = run_cli("no-such-command")
    assert code == 4
    code, _, err = run_cli("evaluate", "m", "--data", "digits", "--output", Path(__file__) / "report.json")  # below a file
    assert code == 4 and "is a file, so" in err


def test_list_archs_and_triggers(run_cli):
    code, out, _ = run_cli("list", "archs")
    assert code == 0 and "resnet18_cifar" in out and "torchvision/resnet18" in out
    code, out, _ = run_cli("list", "triggers")
    assert code == 0 and "wanet" in out and "grid_paste" in out


def test_evaluate_demo_model_json_and_run_tags(demo, run_cli, tmp_path):
    out_file = tmp_path / "report.json"
    code, _, err = run_cli("evaluate", "models:/harden-demo@candidate", "--data", demo.data_dir / "test.npz",
                           "--trigger", "badnets", "--target", "0", "--format", "json", "--output", out_file, "-q")
    assert code == 0, err
    report = json.loads(out_file.read_text())
    assert report["schema"] == "harden.evaluate/1"
    assert report["model_uri"] == demo.version.uri
    assert report["accuracy"] >= 0.95 and report["asr"] >= 0.95
    assert set(report) >= {"accuracy", "asr", "ra", "n", "n_triggered", "run_id", "duration_s", "harden_version"}

    import mlflow

    run = mlflow.get_run(report["run_id"])
    assert run.data.tags["harden.command"] == "evaluate"
    assert run.data.tags["harden.source_model_uri"] == demo.version.uri
    assert run.data.tags["harden.version"] == report["harden_version"]
    assert run.data.metrics["asr"] == pytest.approx(report["asr"])


def test_markdown_and_text_formats(demo, run_cli):
    code, out, _ = run_cli("evaluate", demo.model_uri, "--data", demo.data_dir / "test.npz", "--format", "markdown", "-q")
    assert code == 0 and out.startswith("# harden evaluate") and "| accuracy (ACC) |" in out
    code, out, _ = run_cli("evaluate", demo.model_uri, "--data", demo.data_dir / "test.npz", "-q")
    assert code == 0 and "accuracy (ACC)" in out


@pytest.fixture
def bad_inputs(tmp_path, demo):
    corrupt = tmp_path / "corrupt.pt2"
    corrupt.write_bytes(b"\x00garbage" * 100)
    pickled = tmp_path / "model.pkl"
    pickled.write_bytes(pickle.dumps({"weights": [1, 2, 3]}))
    wrong_size = tmp_path / "wrong.npz"
    np.savez(wrong_size, x=np.zeros((4, 28, 28, 3), np.uint8), y=np.zeros(4, int))
    bad_labels = tmp_path / "labels.npz"
    np.savez(bad_labels, x=np.zeros((4, 32, 32, 3), np.uint8), y=np.array([0, 1, 2, 11]))
    empty = tmp_path / "empty"
    (empty / "a").mkdir(parents=True)
    good = str(demo.data_dir / "test.npz")
    return {
        "missing model": (["evaluate", tmp_path / "nope.pt2", "--data", good], "model not found"),
        "unknown registered model": (["evaluate", "models:/does-not-exist/1", "--data", good], "not found"),
        "malformed uri": (["evaluate", "models:/harden-demo", "--data", good], "not found"),
        "corrupted file": (["evaluate", corrupt, "--data", good], "not a readable torch.export"),
        "pickle without --allow-pickle": (["evaluate", pickled, "--data", good], "--allow-pickle"),
        "data shape does not fit": (["evaluate", demo.model_uri, "--data", wrong_size], "28x28 but the model takes 32x32"),
        "empty folder": (["evaluate", demo.model_uri, "--data", empty], "no images found"),
        "labels outside classes": (["evaluate", demo.model_uri, "--data", bad_labels], "outside the model's 10 classes"),
        "target outside classes": (["evaluate", demo.model_uri, "--data", good, "--trigger", "badnets", "--target", "12"], "outside the model's 10 classes"),
        "unknown trigger": (["evaluate", demo.model_uri, "--data", good, "--trigger", "zap", "--target", "0"], "unknown trigger"),
        "bad device": (["evaluate", demo.model_uri, "--data", good, "--device", "tpu"], "--device"),
    }


CASES = ["missing model", "unknown registered model", "malformed uri", "corrupted file", "pickle without --allow-pickle",
         "data shape does not fit", "empty folder", "labels outside classes", "target outside classes", "unknown trigger", "bad device"]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_exit_2_one_line_nothing_registered(case, bad_inputs, run_cli):
    args, message = bad_inputs[case]
    before = registry_snapshot()
    code, out, err = run_cli(*args)
    assert code == 2, (case, out, err)
    lines = [line for line in err.strip().splitlines() if not line.startswith("model:")]
    assert len(lines) == 1, err
    assert lines[0].startswith("harden: error:") and message in lines[0], lines[0]
    assert "Traceback" not in err
    assert registry_snapshot() == before


def test_a_refused_registered_model_is_named_by_its_uri(demo, run_cli):
    """Not by the temporary directory harden fetched it to."""
    with mlflow.start_run():
        info = mlflow.pytorch.log_model(CustomNet().eval(), name="model", input_example=np.zeros((2, 3, 32, 32), np.float32),
                                        serialization_format="pickle", registered_model_name="pickled-outsider")
    uri = f"models:/pickled-outsider/{info.registered_model_version}"
    code, _, err = run_cli("evaluate", uri, "--data", demo.data_dir / "test.npz")
    assert code == 2 and f"harden: error: {uri} is pickle-based" in err, err


def test_missing_default_store_is_not_created(tmp_path):
    """Resolving models:/ against the embedded default store must not create an empty mlflow.db."""
    env = {k: v for k, v in __import__("os").environ.items() if k != "MLFLOW_TRACKING_URI"}
    proc = subprocess.run([sys.executable, "-m", "harden", "evaluate", "models:/x/1", "--data", "digits"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "no MLflow store at" in proc.stderr
    assert not (tmp_path / "mlflow.db").exists()


def test_verbose_shows_traceback(run_cli, tmp_path):
    code, _, err = run_cli("evaluate", tmp_path / "nope.pt2", "--data", "digits", "-v")
    assert code == 2 and "Traceback" in err
