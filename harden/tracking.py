"""The one MLflow layer: tracking URI, command runs, logged models and registry writes.

Rules every command follows through this module:
- the tracking URI is `--tracking-uri`, else `MLFLOW_TRACKING_URI`, else an embedded
  `sqlite:///mlflow.db` in the working directory;
- each command that computes something opens exactly one run tagged with
  `harden.command`, `harden.version` and `harden.source_model_uri`;
- a model version is registered only once the model is completely logged, and a
  failure or interrupt after registration deletes the version again.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np

from harden import __version__
from harden.errors import TrackingError
from harden.models.spec import RegisteredVersion

DEFAULT_EXPERIMENT = "harden"
_MODELS_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>[^/]+)|@(?P<alias>[\w\-]+))/?$")


def configure(tracking_uri: str | None = None) -> str:
    """Point MLflow at the chosen store and return its URI."""
    import mlflow

    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"
    # A CLI should fail in seconds, not minutes, when a tracking server is down.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    # MLflow prints "View run ... at: <url>" to stdout for tracking servers; harden's stdout is its report (JSON, SARIF).
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    quiet_library_logs(logging.getLogger("harden").getEffectiveLevel() < logging.WARNING)
    return uri


def _unreachable(exc: Exception) -> bool:
    """An MLflow error that means the server never answered (refused, timed out), not that something is missing."""
    text = str(exc)
    return "API request to" in text and any(word in text for word in ("Connection refused", "Max retries", "timed out", "Failed to establish"))


def _sqlite_path(uri: str) -> Path | None:
    if uri.startswith("sqlite:///"):
        return Path(uri[len("sqlite:///"):])
    return None


def require_store(action: str) -> None:
    """Refuse to read from an embedded sqlite store that does not exist yet.

    Opening a missing sqlite store would silently create an empty database; for a
    read (resolving `models:/...`) that is never what the user meant.
    """
    import mlflow

    uri = mlflow.get_tracking_uri()
    path = _sqlite_path(uri)
    if path is not None and not path.exists():
        raise TrackingError(f"cannot {action}: no MLflow store at {path} (set --tracking-uri or MLFLOW_TRACKING_URI)")


def resolve_registered_version(uri: str) -> RegisteredVersion | None:
    """Resolve `models:/name/version|@alias|/latest` to a registry entry; None for other URIs."""
    match = _MODELS_URI.match(uri)
    if not match:
        return None
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    name, version, alias = match["name"], match["version"], match["alias"]
    try:
        if alias:
            mv = client.get_model_version_by_alias(name, alias)
        elif version == "latest":
            versions = client.search_model_versions(f"name = '{name}'", order_by=["version_number DESC"], max_results=1)
            if not versions:
                raise TrackingError(f"registered model {name!r} has no versions (or does not exist)")
            mv = versions[0]
        elif version and version.isdigit():
            mv = client.get_model_version(name, version)
        else:
            return None  # a LoggedModel id (models:/m-...) or a stage: not a registry version
    except MlflowException as exc:
        if _unreachable(exc):
            raise TrackingError(f"cannot resolve {uri}: the tracking server does not answer: {_first_line(exc)}") from None
        raise TrackingError(f"model {uri} not found in the registry: {_first_line(exc)}") from None
    return RegisteredVersion(mv.name, str(mv.version), mv.run_id, mv.source)


def _first_line(exc: BaseException) -> str:
    text = str(getattr(exc, "message", None) or exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    flat: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{name}."))
        elif value is not None:
            flat[name] = str(value)[:6000]
    return flat


def _experiment_id() -> str:
    """The experiment of harden's runs, looked up in the *current* store every time.

    (mlflow.set_experiment caches the active experiment process-wide, which goes stale
    when a process talks to more than one store.)"""
    from mlflow.tracking import MlflowClient

    if os.environ.get("MLFLOW_EXPERIMENT_ID"):
        return os.environ["MLFLOW_EXPERIMENT_ID"]
    name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT
    client = MlflowClient()
    experiment = client.get_experiment_by_name(name)
    return experiment.experiment_id if experiment else client.create_experiment(name)


@contextmanager
def command_run(command: str, source_uri: str | None, params: Mapping[str, Any] | None = None) -> Iterator[Any]:
    """Open the one MLflow run of a command; if the block raises, the run is marked FAILED and tagged `harden.error`."""
    import mlflow
    from mlflow.exceptions import MlflowException

    tags = {"harden.command": command, "harden.version": __version__}
    if source_uri:
        tags["harden.source_model_uri"] = source_uri
    try:
        run = mlflow.start_run(experiment_id=_experiment_id(), run_name=f"{command} {source_uri or ''}".strip(), tags=tags)
    except MlflowException as exc:
        raise TrackingError(f"cannot open an MLflow run: {_first_line(exc)}") from None
    with run:
        if params:
            mlflow.log_params(_flatten(params))
        try:
            yield run
        except BaseException as exc:  # the FAILED run says why, not only which params it had
            with contextlib.suppress(MlflowException):  # a tracking server gone away must not hide the error
                mlflow.set_tag("harden.error", _first_line(exc)[:500] or type(exc).__name__)
            raise


def log_metrics(metrics: Mapping[str, float | None], step: int | None = None) -> None:
    import mlflow

    clean = {k: float(v) for k, v in metrics.items() if v is not None and np.isfinite(v)}
    if clean:
        mlflow.log_metrics(clean, step=step)


def log_json(payload: Mapping[str, Any], artifact_file: str) -> None:
    import mlflow

    mlflow.log_text(json.dumps(payload, indent=2, sort_keys=True, default=str), artifact_file)


def log_report(report, name: str) -> None:
    """The report as JSON plus every other registered rendering, and its images as PNGs."""
    import mlflow

    from harden.report import RENDERERS

    suffixes = {"json": "json", "markdown": "md", "html": "html", "sarif": "sarif", "junit": "xml"}
    for fmt, suffix in suffixes.items():
        if fmt in RENDERERS:
            mlflow.log_text(RENDERERS[fmt](report), f"reports/{name}.{suffix}")
    for index, image in enumerate(report.images):
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / f"{index:02d}-{_slug(image.title)}.png"
            path.write_bytes(image.png)
            mlflow.log_artifact(str(path), "images")


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:60] or "image"


def eval_mode(net):
    """`net` in eval mode on CPU; torch.export GraphModules refuse `.eval()` and are always in it."""
    try:
        net.eval()
    except NotImplementedError:
        pass
    return net.cpu()


def example_input(input_shape: tuple[int, ...], batch: int = 2, dtype: str = "float32") -> np.ndarray:
    """The input example MLflow exports and signs models with: batch > 1 keeps the batch dynamic;
    its dtype is the one the model takes (pt2 export traces the model on it): its weights' dtype, or
    uint8 for a network of uint8 images."""
    return np.zeros((batch, *input_shape), dtype=dtype)


# What loading a pt2 model through pyfunc imports. Naming it saves MLflow's requirement inference,
# which re-loads the model in a subprocess and costs 5-7 s per logged model.
_PT2_REQUIREMENTS = ("mlflow", "torch", "cloudpickle", "numpy", "pandas")


def pip_requirements() -> list[str]:
    """Pinned requirements of a logged pt2 model, at the installed versions (local tags like +cpu dropped)."""
    from importlib.metadata import version

    return [f"{name}=={version(name).split('+')[0]}" for name in _PT2_REQUIREMENTS]


def model_kwargs(net, input_shape: tuple[int, ...], harden_metadata: Mapping[str, Any], example_batch: int = 2,
                 dtype: str = "float32") -> dict[str, Any]:
    """What `mlflow.pytorch.log_model` and `save_model` get for a model harden writes.

    MLflow infers the signature from the example's output, but only when the network returns one
    tensor; one that returns (logits, features) or a dict gets an input-only signature, which the
    pt2 format requires.
    """
    import torch
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    example = example_input(input_shape, example_batch, dtype)
    with torch.no_grad():
        single_tensor = isinstance(eval_mode(net)(torch.from_numpy(example)), torch.Tensor)
    signature = None if single_tensor else ModelSignature(inputs=Schema([TensorSpec(example.dtype, (-1, *input_shape))]))
    return {"input_example": example, "signature": signature, "metadata": {"harden": dict(harden_metadata)},
            "pip_requirements": pip_requirements()}


def log_model(net, input_shape: tuple[int, ...], harden_metadata: Mapping[str, Any], name: str = "model", example_batch: int = 2,
              dtype: str = "float32"):
    """Log a model as pt2 (+ pyfunc) with a numpy example; a batch-2 example gives a dynamic batch."""
    import mlflow

    return mlflow.pytorch.log_model(eval_mode(net), name=name, **model_kwargs(net, input_shape, harden_metadata, example_batch, dtype))


@dataclass
class Registration:
    """A version harden registered, and where its alias pointed before, so that it can be undone."""

    version: RegisteredVersion
    alias: str | None = None
    previous_alias_holder: str | None = None

    def withdraw(self) -> None:
        """Delete the version and give the alias back to its previous holder (deleting a version takes
        its aliases with it): an interrupted command leaves the registry as it found it."""
        from mlflow.tracking import MlflowClient

        client = MlflowClient()
        client.delete_model_version(self.version.name, self.version.version)
        if self.alias and self.previous_alias_holder:
            client.set_registered_model_alias(self.version.name, self.alias, self.previous_alias_holder)


def register_model(model_uri: str, name: str, tags: Mapping[str, str] | None = None, alias: str | None = None) -> Registration:
    """Register a fully logged model, then move `alias` onto it; if anything after creation fails,
    the registration is withdrawn again."""
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    previous = alias_holder(name, alias) if alias else None
    try:
        # register_model prints "Successfully registered..." itself; the report says it once.
        with contextlib.redirect_stderr(io.StringIO()):
            mv = mlflow.register_model(model_uri, name, tags={k: str(v) for k, v in (tags or {}).items()})
    except MlflowException as exc:
        raise TrackingError(f"cannot register {name!r}: {_first_line(exc)}") from None
    registration = Registration(RegisteredVersion(mv.name, str(mv.version), mv.run_id, mv.source), alias, previous)
    try:
        if alias:
            MlflowClient().set_registered_model_alias(name, alias, mv.version)
    except BaseException as exc:
        registration.withdraw()
        if isinstance(exc, MlflowException):
            raise TrackingError(f"cannot set alias {alias!r} on {name}: {_first_line(exc)} (version {mv.version} removed again)") from None
        raise
    return registration


def alias_holder(name: str, alias: str, client: Any = None) -> str | None:
    """The version `alias` points at in registered model `name` (through `client`, default the
    configured store), None when it points nowhere."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        return str((client or MlflowClient()).get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def set_version_tags(version: RegisteredVersion, tags: Mapping[str, Any]) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    for key, value in tags.items():
        client.set_model_version_tag(version.name, version.version, key, str(value))


def version_tags(version: RegisteredVersion) -> dict[str, str]:
    """The tags of a registered version (scan verdict, purification lineage, ...)."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        return dict(MlflowClient().get_model_version(version.name, version.version).tags)
    except MlflowException as exc:
        raise TrackingError(f"cannot read the tags of {version.uri}: {_first_line(exc)}") from None


def log_onnx_model(
    path: Path,
    *,
    input_name: str,
    input_shape: tuple[int, int, int],
    output_name: str,
    num_classes: int,
    metadata: Mapping[str, Any],
    tags: Mapping[str, str],
):
    """Log an ONNX file as a run artifact and as an `mlflow.onnx` model with a dynamic-batch signature.

    Single file (`save_as_external_data=False`), pip requirements given rather than
    inferred (inference would load the model in a subprocess only to learn them).
    """
    import mlflow
    import onnx
    import onnxruntime
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    mlflow.log_artifact(str(path), artifact_path="export")
    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, *input_shape), input_name)]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, num_classes), output_name)]),
    )
    return mlflow.onnx.log_model(
        onnx.load(str(path)), name="onnx", signature=signature, save_as_external_data=False,
        pip_requirements=[f"onnx=={onnx.__version__}", f"onnxruntime=={onnxruntime.__version__}"],
        metadata={"harden": dict(metadata)}, tags=dict(tags),
    )


def download(uri: str, what: str = "model") -> tuple[Path, tempfile.TemporaryDirectory]:
    """Download a model's (or data's) files into a temporary directory; nothing is executed."""
    import mlflow
    from mlflow.exceptions import MlflowException

    tmp = tempfile.TemporaryDirectory(prefix=f"harden-{what}-")
    try:
        local = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=tmp.name)
    except MlflowException as exc:
        tmp.cleanup()
        raise TrackingError(f"{what} {uri} not found: {_first_line(exc)}") from None
    except OSError as exc:
        tmp.cleanup()
        raise TrackingError(f"cannot download {uri}: {_first_line(exc)}") from None
    return Path(local), tmp


def quiet_library_logs(verbose: bool) -> None:
    """MLflow logs migrations at INFO and torch.export logs tracebacks at WARNING; a CLI
    reports problems itself, once, so both stay quiet unless -v is given."""
    for name, quiet_level in (("mlflow", logging.WARNING), ("alembic", logging.WARNING), ("torch", logging.ERROR)):
        logging.getLogger(name).setLevel(logging.INFO if verbose else quiet_level)


def read_run_json(run_id: str, artifact_path: str) -> dict[str, Any] | None:
    """A JSON artifact of a run (e.g. `reports/scan.json`), or None when the run or file is gone.

    Parsed with `json` only: a report read back is data, never code."""
    import mlflow
    from mlflow.exceptions import MlflowException

    with tempfile.TemporaryDirectory(prefix="harden-report-") as tmp:
        try:
            local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact_path, dst_path=tmp)
        except (MlflowException, OSError):
            return None
        try:
            return json.loads(Path(local).read_text())
        except (OSError, ValueError):
            return None
