"""The MLflow layer (URI resolution, runs, atomic registration) and the report renderers."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import mlflow
import pytest
import torch

from harden import tracking
from harden.demo import run_demo
from harden.models import create_model
from harden.report import RENDERERS, Report, Table, emit, write_atomic
from harden.training import TrainConfig, fit
from harden.data import TensorDataset
from tests.conftest import registry_snapshot


def test_tracking_uri_precedence(tmp_path, monkeypatch, mlflow_home):
    session_uri = os.environ["MLFLOW_TRACKING_URI"]
    try:
        monkeypatch.delenv("MLFLOW_TRACKING_URI")
        monkeypatch.chdir(tmp_path)
        assert tracking.configure(None) == f"sqlite:///{tmp_path / 'mlflow.db'}"
        monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///from-env.db")
        assert tracking.configure(None) == "sqlite:///from-env.db"
        assert tracking.configure("sqlite:///flag.db") == "sqlite:///flag.db"
        assert mlflow.get_tracking_uri() == "sqlite:///flag.db"
    finally:
        tracking.configure(session_uri)


def test_demo_registers_backdoored_model_with_alias(demo):
    assert demo.clean.accuracy >= 0.95 and demo.clean.asr >= 0.95
    client = mlflow.tracking.MlflowClient()
    version = client.get_model_version_by_alias("harden-demo", "candidate")
    assert str(version.version) == demo.version.version
    assert version.tags["harden.demo.target"] == "0" and version.tags["harden.arch"] == "small_cnn"
    assert (demo.data_dir / "clean.npz").exists() and (demo.data_dir / "test.npz").exists()
    run = mlflow.get_run(demo.run_id)
    assert run.data.tags["harden.command"] == "demo"
    assert run.data.metrics["asr"] == pytest.approx(demo.clean.asr)


def test_demo_command_prints_next_steps(run_cli, tmp_path):
    code, out, err = run_cli("demo", "--name", "demo-cli", "--epochs", "1", "--data-dir", tmp_path / "d", "--format", "json", "-q")
    assert code == 0, err
    report = json.loads(out)
    assert report["schema"] == "harden.demo/1" and report["model_uri"].startswith("models:/demo-cli/")
    assert 0.0 <= report["accuracy"] <= 1.0 and (tmp_path / "d" / "test.npz").exists()


def test_failed_alias_rolls_back_the_new_version(mlflow_home):
    net = create_model("small_cnn", num_classes=3)
    with mlflow.start_run():
        info = tracking.log_model(net, (3, 32, 32), {"arch": "small_cnn"})
    before = registry_snapshot()
    with pytest.raises(Exception):
        tracking.register_model(info.model_uri, "rollback-test", alias="v1")  # `v<digits>` aliases are reserved
    assert registry_snapshot() == before


def test_interrupted_demo_registers_nothing(mlflow_home, tmp_path):
    """Ctrl-C during training: no version appears and the run is marked failed, saying why."""
    before = registry_snapshot()

    def interrupt(epoch, loss):
        raise KeyboardInterrupt

    import harden.demo as demo_module

    original = demo_module.fit
    demo_module.fit = lambda *a, **k: original(*a, **{**k, "on_epoch_end": interrupt})
    try:
        with pytest.raises(KeyboardInterrupt):
            run_demo(tmp_path, name="interrupted-demo", epochs=2)
    finally:
        demo_module.fit = original
    assert registry_snapshot() == before
    runs = mlflow.search_runs(experiment_names=["harden"], filter_string="tags.`harden.command` = 'demo'", order_by=["start_time DESC"], max_results=1)
    assert runs.iloc[0]["status"] in ("FAILED", "KILLED")
    assert runs.iloc[0]["tags.harden.error"] == "KeyboardInterrupt"


def test_fit_reduces_loss():
    torch.manual_seed(0)
    x = torch.rand(64, 3, 8, 8)
    y = (x[:, 0].mean((1, 2)) > 0.5).long()
    model = create_model("small_cnn", num_classes=2, width=8)
    history = fit(model, TensorDataset(x, y.numpy()), TrainConfig(epochs=8, lr=1e-2, batch_size=16))
    assert history[-1] < history[0] * 0.8


def _report():
    return Report("harden.test/1", "Title", {"value": 0.5, "items": [1, 2]},
                  [Table("Numbers", ["name", "value"], [["a", 0.123456], ["b", None]])], next_steps=["harden next"])


def test_renderers_share_one_report(tmp_path):
    assert set(RENDERERS) >= {"text", "json", "markdown"}
    payload = json.loads(RENDERERS["json"](_report()))
    assert payload == {"schema": "harden.test/1", "value": 0.5, "items": [1, 2]}
    markdown = RENDERERS["markdown"](_report())
    assert "| a | 0.1235 |" in markdown and "| b | - |" in markdown
    text = RENDERERS["text"](_report())
    assert "Numbers" in text and "0.1235" in text and "harden next" in text
    emit(_report(), "json", tmp_path / "sub" / "r.json")
    assert json.loads((tmp_path / "sub" / "r.json").read_text())["schema"] == "harden.test/1"


def test_atomic_write_leaves_old_file_on_failure(tmp_path):
    target = tmp_path / "r.txt"
    write_atomic(target, "old")


    with pytest.raises(TypeError):
        write_atomic(target, 42)  # type: ignore[arg-type]
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["r.txt"]


def test_python_dash_m_entry_point():
    proc = subprocess.run([sys.executable, "-m", "harden", "--version"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "harden, version" in proc.stdout


def test_a_tracking_server_that_does_not_answer_is_not_reported_as_a_missing_model(monkeypatch, mlflow_home):
    """A refused connection used to read "model ... not found in the registry" (the session store comes back after the test)."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    import socket

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    tracking.configure(f"http://127.0.0.1:{port}")
    with pytest.raises(tracking.TrackingError, match=r"cannot resolve models:/any/1: the tracking server does not answer"):
        tracking.resolve_registered_version("models:/any/1")
