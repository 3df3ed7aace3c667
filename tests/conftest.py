"""Shared fixtures: a real MLflow store (sqlite in a temp dir) and small models trained in seconds."""

from __future__ import annotations

import os
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from harden import tracking
from harden.cli import cli


@pytest.fixture(scope="session")
def mlflow_home(tmp_path_factory) -> Path:
    """One sqlite store for the session (creating one costs seconds); the CLI sees it via the env."""
    home = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{home / 'mlflow.db'}"
    os.environ["MLFLOW_TRACKING_URI"] = uri
    os.environ.pop("MLFLOW_EXPERIMENT_NAME", None)
    previous = Path.cwd()
    os.chdir(home)  # MLflow puts artifacts under ./mlruns
    tracking.configure(uri)
    _SESSION_STORE["uri"] = uri
    yield home
    os.chdir(previous)


_SESSION_STORE: dict[str, str] = {}


@pytest.fixture(autouse=True)
def _session_store_restored():
    """`mlflow.set_tracking_uri` also rewrites MLFLOW_TRACKING_URI: after a test that pointed a
    command at a tracking server (`--tracking-uri http://...`), point everything back."""
    yield
    uri = _SESSION_STORE.get("uri")
    if uri and os.environ.get("MLFLOW_TRACKING_URI") != uri:
        os.environ["MLFLOW_TRACKING_URI"] = uri
        tracking.configure(uri)


@pytest.fixture(scope="session")
def demo(mlflow_home, tmp_path_factory):
    """The demo model: trained once, registered as models:/harden-demo/<v>@candidate."""
    from harden.demo import run_demo

    return run_demo(tmp_path_factory.mktemp("demo-data"), epochs=12, seed=0)


@pytest.fixture(scope="session")
def run_cli(mlflow_home):
    """Invoke the CLI in-process and return (exit_code, stdout, stderr)."""
    runner = CliRunner()

    def invoke(*args: str):
        result = runner.invoke(cli, [str(a) for a in args], catch_exceptions=False)
        return result.exit_code, result.stdout, result.stderr

    return invoke


def registry_snapshot() -> list[tuple[str, str]]:
    client = mlflow.tracking.MlflowClient()
    return sorted((mv.name, str(mv.version)) for mv in client.search_model_versions(max_results=1000))


def write_npz(path: Path, x: np.ndarray, y: np.ndarray) -> Path:
    np.savez(path, x=x, y=y)
    return path


@pytest.fixture(scope="session")
def digits_arrays():
    """Digits rendered 3x32x32 as NHWC uint8 plus labels (what a user's .npz would hold)."""
    from harden.data import load_data, to_uint8_arrays
    from harden.models import InputSpec

    return to_uint8_arrays(load_data("digits", InputSpec(3, 32, 32)))


class CustomNet(torch.nn.Module):
    """An architecture harden has never seen: plain convs, BatchNorm, odd names."""

    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 12, 5, padding=2)
        self.norm = torch.nn.BatchNorm2d(12)
        self.squash = torch.nn.Conv2d(12, 24, 3, stride=2)
        self.head = torch.nn.Linear(24 * 16, 10)

    def forward(self, x):
        x = torch.relu(self.norm(self.stem(x)))
        x = torch.nn.functional.adaptive_avg_pool2d(torch.relu(self.squash(x)), 4)
        return self.head(x.flatten(1))


class TinyEncoder(torch.nn.Module):
    """A small self-supervised-style encoder: image -> 32-d embedding."""

    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(
            torch.nn.Conv2d(3, 16, 3, 2, 1), torch.nn.ReLU(), torch.nn.Conv2d(16, 32, 3, 2, 1), torch.nn.ReLU(),
            torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten(), torch.nn.Linear(128, 32))

    def forward(self, x):
        return self.body(x)


def train_quickly(model: torch.nn.Module, x: np.ndarray, y: np.ndarray, epochs: int = 4) -> torch.nn.Module:
    """A few epochs of plain PyTorch training, as an outside user would write it."""
    images = torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255
    labels = torch.from_numpy(y).long()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    torch.manual_seed(0)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(labels)).split(64):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(images[idx]), labels[idx]).backward()
            opt.step()
    return model.eval()


@pytest.fixture(scope="session")
def custom_pt2(mlflow_home, digits_arrays):
    """A custom CNN logged by someone else's code with plain mlflow.pytorch.log_model (pt2)."""
    x, y = digits_arrays
    torch.manual_seed(0)  # its initial weights must not depend on which tests ran before the fixture
    model = train_quickly(CustomNet(), x[:900], y[:900])
    with mlflow.start_run():
        info = mlflow.pytorch.log_model(model, name="custom", input_example=(x[:4].transpose(0, 3, 1, 2) / 255).astype(np.float32),
                                        registered_model_name="outsider-cnn")
    return model, info
