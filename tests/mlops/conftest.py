"""Real servers for the MLOps tests: `mlflow server` on the session's sqlite store, and `harden hook serve`.

The MLflow server runs with the environment it needs to call a loopback URL
(`MLFLOW_WEBHOOK_ALLOWED_SCHEMES=http,https`, `MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS=true`, a
Fernet key for stored secrets) and a 1 s webhook cache, so that a webhook created by a
test is used by the next event. It shares the session's database with the in-process
store, so the demo model trained once for the session can be registered through it.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SECRET_ENV = "HARDEN_TEST_HOOK_SECRET"
SECRET = "test-secret-3f1c9a"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float, proc: subprocess.Popen | None = None) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.args[:4]} exited {proc.returncode}: {proc.stderr.read().decode()[-2000:] if proc.stderr else ''}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                body = response.read()
                return json.loads(body) if body.startswith(b"{") else {}
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"{url} did not answer within {timeout} s")


def child_env(**extra: str) -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, SECRET_ENV: SECRET, "OMP_NUM_THREADS": "1", **extra}


@dataclass
class MlflowServer:
    url: str
    proc: subprocess.Popen

    def client(self):
        from mlflow.tracking import MlflowClient

        return MlflowClient(self.url, self.url)


@pytest.fixture(scope="session")
def mlflow_server(mlflow_home, tmp_path_factory):
    from cryptography.fernet import Fernet

    port = free_port()
    env = child_env(MLFLOW_WEBHOOK_ALLOWED_SCHEMES="http,https", MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS="true",
                    MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY=Fernet.generate_key().decode(), MLFLOW_WEBHOOK_CACHE_TTL="1")
    env.pop("MLFLOW_TRACKING_URI", None)
    artifacts = tmp_path_factory.mktemp("mlflow-artifacts")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{mlflow_home / 'mlflow.db'}",
         "--artifacts-destination", str(artifacts), "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=mlflow_home)
    try:
        wait_http(f"http://127.0.0.1:{port}/health", 90, proc)
        yield MlflowServer(f"http://127.0.0.1:{port}", proc)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@dataclass
class Hook:
    url: str
    proc: subprocess.Popen
    queue_path: Path

    def health(self) -> dict:
        return wait_http(self.url.replace("/webhook", "/healthz"), 5)

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)


@pytest.fixture
def start_hook(mlflow_server):
    """Start `harden hook serve` (a real subprocess) against the MLflow server; stopped at teardown."""
    started: list[Hook] = []

    def start(queue_path: Path, *args: str, port: int | None = None) -> Hook:
        port = port or free_port()
        proc = subprocess.Popen([sys.executable, "-m", "harden", "hook", "serve", "--port", str(port), "--secret-env", SECRET_ENV,
                                 "--queue", str(queue_path), "--tracking-uri", mlflow_server.url, *args],
                                env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        hook = Hook(f"http://127.0.0.1:{port}/webhook", proc, queue_path)
        started.append(hook)
        wait_http(f"http://127.0.0.1:{port}/healthz", 60, proc)
        return hook

    yield start
    for hook in started:
        if hook.proc.poll() is None:
            hook.proc.terminate()
            hook.proc.wait(timeout=60)


def register_copy(server: MlflowServer, demo, name: str, alias: str | None = None):
    """A new version of `name` holding the demo model's files, registered through the server (fires webhooks)."""
    from mlflow.exceptions import MlflowException

    client = server.client()
    try:
        client.create_registered_model(name)
    except MlflowException:
        pass  # exists
    source = client.get_model_version(demo.version.name, demo.version.version)
    model_id = source.source.removeprefix("models:/") if source.source.startswith("models:/m-") else None
    mv = client.create_model_version(name, source.source, run_id=source.run_id, model_id=model_id)
    if alias:
        client.set_registered_model_alias(name, alias, mv.version)
    return mv


def wait_for(predicate, timeout: float, what: str, interval: float = 0.25):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
