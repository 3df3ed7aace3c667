"""Publish a model harden has changed (purified, hardened, watermarked) as a new version.

The order is what keeps the registry clean: the caller first checks its guardrails, then
the complete model is logged to the command's run, registered in one call that carries
every tag, and only then is the alias moved. `--output` is written to a temporary directory
that is renamed into place only when complete. A command publishes through a `Publication`,
which withdraws everything again (the version deleted, the alias given back to the version
that held it, `--output` removed) when the command fails or is interrupted before it has
finished: logging its report, closing its run.
"""

from __future__ import annotations

import copy
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from harden import tracking
from harden.errors import HardenError
from harden.models.loader import LoadedModel
from harden.models.spec import RegisteredVersion


@dataclass
class PublishedModel:
    logged_uri: str  # runs:/<run>/model
    registration: tracking.Registration | None = None
    local_path: Path | None = None

    @property
    def version(self) -> RegisteredVersion | None:
        return self.registration.version if self.registration else None

    @property
    def uri(self) -> str:
        """The registry URI when registered, else the run's model URI."""
        return self.version.uri if self.version else self.logged_uri

    def withdraw(self) -> None:
        """Undo the publication: delete the version (its alias goes back) and the local copy."""
        if self.registration is not None:
            self.registration.withdraw()
            self.registration = None
        if self.local_path is not None:
            shutil.rmtree(self.local_path, ignore_errors=True)
            self.local_path = None


class Publication:
    """What a command publishes stays only if the command completes.

        with Publication() as publication, tracking.command_run(...):
            ...
            published = publication.publish(net, loaded, ...)
            tracking.log_report(...)

    An exception or interrupt anywhere inside, closing the run included, withdraws it."""

    def __init__(self) -> None:
        self.published: PublishedModel | None = None

    def publish(self, *args: Any, **kwargs: Any) -> PublishedModel:
        self.published = publish(*args, **kwargs)
        return self.published

    def __enter__(self) -> "Publication":
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if exc_type is not None and self.published is not None:
            self.published.withdraw()


def check_output_dir(output: Path | None) -> None:
    """Refuse an `--output` that would overwrite something, before any work is done."""
    if output is not None and output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise HardenError(f"--output {output} already exists and is not empty; choose a new directory")


def target_name(source: LoadedModel, register_as: str | None) -> str | None:
    """The registered model a result goes to: `--register-as`, else the source's own name."""
    return register_as or (source.registered.name if source.registered else None)


def publish(
    net: nn.Module,
    source: LoadedModel,
    *,
    tags: Mapping[str, Any],
    register_as: str | None = None,
    alias: str | None = None,
    output: Path | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> PublishedModel:
    """Log `net` (the raw network, without harden's pixel wrapper) in the input's layout and register it.

    `net` must take the same input as `source` (same normalisation, same shape); its
    harden metadata is the source's plus `metadata`. Without a registered source and
    without `register_as` the model is only logged to the run.
    """
    meta = {**source.harden_metadata(), **(metadata or {})}
    shape = source.network_input_shape
    if shape is None:
        raise HardenError(f"{source.uri}: input shape unknown; pass --input-size")
    example_batch = source.module.static_batch or 2
    net, dtype = _in_logged_dtype(net, source.dtype)
    if not source.input_dtype.is_floating_point:  # a network of uint8 images is exported and signed on uint8 ones again
        dtype = str(source.input_dtype).removeprefix("torch.")
    info = tracking.log_model(net, shape, meta, example_batch=example_batch, dtype=dtype)
    published = PublishedModel(info.model_uri)
    try:
        if output is not None:
            published.local_path = _save_local(net, shape, meta, example_batch, dtype, output)
        name = target_name(source, register_as)
        if name is not None:
            published.registration = tracking.register_model(info.model_uri, name, tags={k: str(v) for k, v in tags.items()}, alias=alias)
    except BaseException:
        published.withdraw()  # the local copy of a version that was never registered
        raise
    return published


# dtypes MLflow's numpy input example can carry; a model in another (bfloat16) is logged in float32
_LOGGABLE_DTYPES = {torch.float16: "float16", torch.float32: "float32", torch.float64: "float64"}


def _in_logged_dtype(net: nn.Module, source_dtype: torch.dtype) -> tuple[nn.Module, str]:
    """A copy of `net` in the dtype the source was logged in (harden computes in float32), and that dtype's name."""
    dtype = source_dtype if source_dtype in _LOGGABLE_DTYPES else torch.float32
    if dtype != torch.float32:
        net = copy.deepcopy(net).to(dtype)
    return net, _LOGGABLE_DTYPES[dtype]


def _save_local(net: nn.Module, shape: tuple[int, ...], meta: Mapping[str, Any], example_batch: int, dtype: str, output: Path) -> Path:
    import mlflow

    check_output_dir(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}-", dir=output.parent))
    try:
        model_dir = staging / "model"
        mlflow.pytorch.save_model(tracking.eval_mode(net), str(model_dir), **tracking.model_kwargs(net, shape, meta, example_batch, dtype))
        if output.exists():
            output.rmdir()  # empty, checked above
        os.replace(model_dir, output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return output
