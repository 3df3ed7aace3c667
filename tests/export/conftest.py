"""Fixtures for the export and serving tests: a private MLflow store and BentoML home, one exported model.

Everything is real: MLflow on sqlite in a temp dir (artifacts under it), the BentoML
model store in a temp `BENTOML_HOME`, torch's exporter and ONNX Runtime. The demo
model trains for a few epochs (seconds); accuracy does not matter here, only that
its logits are not all tied, so that top-1 agreement is meaningful.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pytest
from click.testing import CliRunner

from harden import tracking
from harden.cli import cli

DEMO_NAME = "export-demo"
LINEAGE_TAGS = {
    "harden.scan.verdict": "backdoor",
    "harden.scan.p_backdoor": "0.97",
    "harden.purified_from": "models:/upstream-model/2",
}


@pytest.fixture(scope="session")
def export_home(tmp_path_factory):
    """MLflow store, artifacts and BentoML home in one temp dir; env and cwd restored afterwards."""
    home = tmp_path_factory.mktemp("export-home")
    uri = f"sqlite:///{home / 'mlflow.db'}"
    saved_env = {key: os.environ.get(key) for key in ("MLFLOW_TRACKING_URI", "BENTOML_HOME", "MLFLOW_EXPERIMENT_NAME")}
    saved_cwd, saved_uri = Path.cwd(), mlflow.get_tracking_uri()
    os.environ.update(MLFLOW_TRACKING_URI=uri, BENTOML_HOME=str(home / "bentoml"))
    os.environ.pop("MLFLOW_EXPERIMENT_NAME", None)
    os.chdir(home)
    tracking.configure(uri)
    yield home
    os.chdir(saved_cwd)
    for key, value in saved_env.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    tracking.configure(saved_uri)


def _use_export_home(home: Path) -> None:
    os.environ.update(MLFLOW_TRACKING_URI=f"sqlite:///{home / 'mlflow.db'}", BENTOML_HOME=str(home / "bentoml"))
    tracking.configure(os.environ["MLFLOW_TRACKING_URI"])


@pytest.fixture(autouse=True)
def _export_store_active(export_home):
    """The session-wide store of tests/conftest.py is restored after every test; when it was set up
    before these tests ran, point MLflow and BentoML back at this private home for each of them.
    The session fixtures below do the same themselves: pytest sets them up before this one."""
    _use_export_home(export_home)


@pytest.fixture(scope="session")
def lineage_tags() -> dict[str, str]:
    return dict(LINEAGE_TAGS)


@pytest.fixture(scope="session")
def demo_model(export_home):
    """The demo CNN registered as models:/export-demo/1, with the tags a scan and a purification leave."""
    from harden.demo import run_demo

    _use_export_home(export_home)
    result = run_demo(export_home / "demo-data", name=DEMO_NAME, epochs=2, seed=0)
    tracking.set_version_tags(result.version, LINEAGE_TAGS)
    return result


@pytest.fixture
def harden_cli(export_home):
    """Invoke the CLI in-process: (exit code, stdout, stderr)."""
    runner = CliRunner()

    def invoke(*args):
        result = runner.invoke(cli, [str(a) for a in args], catch_exceptions=False)
        return result.exit_code, result.stdout, result.stderr

    return invoke


@dataclass
class Exported:
    report: dict
    onnx_file: Path
    stdout: str


@pytest.fixture(scope="session")
def exported(demo_model, export_home) -> Exported:
    """`harden export` of the demo version with --onnx and --bento, run once for the session."""
    out = export_home / "out"
    report = export_home / "export.json"
    _use_export_home(export_home)
    result = CliRunner().invoke(cli, ["export", demo_model.version.uri, "--onnx", str(out / "model.onnx"), "--bento", DEMO_NAME,
                                      "--format", "json", "--output", str(report)], catch_exceptions=False)
    assert result.exit_code == 0, result.stderr
    return Exported(json.loads(report.read_text()), out / "model.onnx", result.stdout)
