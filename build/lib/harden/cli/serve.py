"""`harden serve`: run the BentoML service (serving/) with `bentoml serve` over a stored Bento model.

MODEL may be a Bento model tag (`harden-demo`, `harden-demo:<version>`) or anything
`harden export` takes; the latter is exported first (with its parity gate) and
stored under --bento.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, NoReturn

import click

from harden.cli.export import run_export
from harden.cli.options import CommandContext, common_options, data_options, model_options, open_model
from harden.errors import EXIT_FINDINGS, HardenError
from harden.export import check_bento_name
from harden.export.bento import ONNX_FILE
from harden.models import LoadedModel

SERVICE = "serving.service:HardenedClassifier"
MODEL_ENV = "HARDEN_BENTO_MODEL"
_MODEL_REF = re.compile(r"^[a-zA-Z][\w+.-]*:/|/|\\")  # URIs and paths, never Bento tags


def find_bento(ref: str) -> str | None:
    """The full tag of Bento model `ref` in the local store; None when `ref` is a model file or URI."""
    import bentoml
    from bentoml.exceptions import NotFound

    if _MODEL_REF.search(ref) or Path(ref).expanduser().exists():
        return None
    try:
        model = bentoml.models.get(ref)
    except (NotFound, ValueError):
        store = os.environ.get("BENTOML_HOME", str(Path.home() / "bentoml"))
        raise HardenError(f"{ref!r} is neither a Bento model in {store} nor a model file or URI") from None
    if "input_shape" not in model.info.metadata or not Path(model.path_of(ONNX_FILE)).is_file():
        raise HardenError(f"Bento model {model.tag} was not stored by `harden export` (no {ONNX_FILE} and input shape)")
    return str(model.tag)


def bento_name_for(loaded: LoadedModel) -> str:
    """A valid Bento model name from the registered or file name: `models:/My Model/3` → `my-model`."""
    stem = loaded.registered.name if loaded.registered else Path(loaded.uri.rstrip("/")).stem
    return re.sub(r"[^a-z0-9_.-]+", "-", stem.lower()).strip("-_.")[:63] or "harden-model"


def serve_bento(tag: str, host: str, port: int) -> NoReturn:
    """Become `bentoml serve` (exec): signals and the exit code go straight to BentoML, no orphaned server."""
    command = [sys.executable, "-m", "bentoml", "serve", SERVICE, "--host", host, "--port", str(port)]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, command, {**os.environ, MODEL_ENV: tag})


@contextmanager
def serve_in_background(model: str, *options: str, cwd: Path, timeout: float = 120.0) -> Iterator[str]:
    """`harden serve MODEL` on a free loopback port in its own process group; yields the URL once ready.

    For tests, benchmarks and notebooks. The server's output goes to `cwd/serve.log`;
    the whole group (BentoML starts workers) is stopped when the block ends.
    """
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    log_path = Path(cwd) / "serve.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen([sys.executable, "-m", "harden.cli", "serve", model, *options, "--port", str(port)],
                                   cwd=cwd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + timeout
            while not _ready(url):
                if process.poll() is not None or time.monotonic() > deadline:
                    raise HardenError(f"harden serve {model} did not start: {log_path.read_text()[-2000:]}")
                time.sleep(0.5)
            yield url
        finally:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def _ready(url: str) -> bool:
    import httpx

    try:
        return httpx.get(f"{url}/readyz", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


@click.command("serve")
@model_options
@data_options(default="digits")
@click.option("--bento", "bento_name", default=None,
              help="Bento model name when MODEL is exported first [default: from the model's name].")
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to listen on (0.0.0.0 inside a container).")
@click.option("--port", type=click.IntRange(1, 65535), default=3000, show_default=True)
@common_options
def command(ctx: CommandContext, model, arch, num_classes, input_size, mean, std, allow_pickle, data, resize,
            bento_name: str | None, host: str, port: int) -> int:
    """Serve MODEL (a Bento model tag, or a model to export first) over HTTP with BentoML.

    \b
    Routes: POST /predict (PNG/JPEG files as `images`, or JSON {"pixels": N×C×H×W in [0, 1]}),
            GET /healthz, GET /metadata (scan verdict, lineage, preprocessing).
    \b
    Examples:
      harden serve harden-demo --port 3000
      harden serve models:/harden-demo@candidate --bento harden-demo --port 3000
      curl -F images=@digit.png http://127.0.0.1:3000/predict
    """
    tag = find_bento(model)
    if tag is None:
        if bento_name is not None:
            check_bento_name(bento_name)
        loaded = open_model(ctx, model, arch, num_classes, input_size, mean, std, allow_pickle)
        name = bento_name or check_bento_name(bento_name_for(loaded))
        run = run_export(ctx, loaded, data, resize, onnx_path=None, bento_name=name)
        if run.published is None or run.published.bento is None:
            click.echo(f"harden: export of {run.source_uri} failed parity (top-1 agreement {run.export.top1_agreement:.2%}, "
                       f"max |diff| {run.export.max_abs_diff:.2e}); not serving it", err=True)
            return EXIT_FINDINGS
        tag = run.published.bento.tag
    ctx.info(f"serving {tag} on http://{host}:{port} (POST /predict, GET /healthz, GET /metadata)")
    serve_bento(tag, host, port)
