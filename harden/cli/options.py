"""Options every command shares, and the context they resolve to.

Kept in one place so that `--device`, `--seed`, `--tracking-uri`, `-q/-v`, the model
loading flags and `--format/--output` mean the same thing on every command.
"""

from __future__ import annotations

import functools
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import click
import torch
from rich.console import Console

from harden import progress, tracking
from harden.errors import HardenError
from harden.models import LoadedModel, load_model
from harden.runtime import reproducible, resolve_device, seed_everything

STATE = {"verbose": 0}


@dataclass
class CommandContext:
    device: torch.device
    seed: int
    verbose: int
    quiet: bool
    tracking_uri: str
    console: Console

    def info(self, message: str) -> None:
        if not self.quiet:
            self.console.print(message, highlight=False)


def common_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """Adds --tracking-uri, --device, --seed, -q, -v and passes a `CommandContext` first."""

    @click.option("--tracking-uri", envvar="MLFLOW_TRACKING_URI", default=None, show_envvar=True,
                  help="MLflow tracking URI [default: sqlite:///mlflow.db in the working directory].")
    @click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda[:N] (auto picks CUDA when present).")
    @click.option("--seed", type=int, default=0, show_default=True, help="Seed for splits, sampling and training.")
    @click.option("-q", "--quiet", is_flag=True, help="Only print the report (no progress, no hints).")
    @click.option("-v", "--verbose", count=True, help="More logging; -v also shows tracebacks on errors.")
    @functools.wraps(func)
    def wrapper(*args, tracking_uri, device, seed, quiet, verbose, **kwargs):
        STATE["verbose"] = verbose
        logging.basicConfig(level=logging.DEBUG if verbose > 1 else logging.INFO if verbose else logging.WARNING,
                            format="%(levelname)s %(name)s: %(message)s")
        tracking.quiet_library_logs(verbose > 0)
        if not verbose:
            warnings.filterwarnings("ignore")
        progress.set_enabled(False if quiet else None)
        context = CommandContext(
            device=resolve_device(device),
            seed=seed,
            verbose=verbose,
            quiet=quiet,
            tracking_uri=tracking.configure(tracking_uri),
            console=Console(stderr=True),
        )
        seed_everything(seed)
        reproducible(context.device)
        return func(context, *args, **kwargs)

    return wrapper


def _floats(_ctx, _param, value: str | None) -> tuple[float, ...] | None:
    if value is None:
        return None
    try:
        return tuple(float(v) for v in value.replace(" ", "").split(",") if v)
    except ValueError:
        raise click.BadParameter(f"{value!r}: expected comma-separated numbers such as 0.485,0.456,0.406") from None


def model_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """MODEL argument plus the flags that help harden read it."""
    decorators = [
        click.argument("model"),
        click.option("--arch", default=None, help="Architecture for weight-only files (see `harden list archs`)."),
        click.option("--num-classes", type=int, default=None, help="Classes of a weight-only model (default: inferred)."),
        click.option("--input-size", default=None, help="Input CxHxW when the model does not record it, e.g. 3x32x32."),
        click.option("--mean", callback=_floats, default=None, help="Per-channel mean the model expects (applied inside harden's wrapper)."),
        click.option("--std", callback=_floats, default=None, help="Per-channel std the model expects."),
        click.option("--allow-pickle", is_flag=True, help="Allow pickle-based model files (scanned for unsafe opcodes first)."),
    ]
    for decorator in reversed(decorators):
        func = decorator(func)
    return func


def open_model(ctx: CommandContext, model: str, arch, num_classes, input_size, mean, std, allow_pickle, *, embedding: bool = False) -> LoadedModel:
    loaded = load_model(model, arch=arch, num_classes=num_classes, input_size=input_size, mean=mean, std=std,
                        allow_pickle=allow_pickle, device=ctx.device, embedding=embedding)
    ctx.info(f"model: {loaded.describe()}")
    return loaded


def data_options(func: Callable[..., Any] | None = None, *, required: bool = True, default: str | None = None) -> Callable[..., Any]:
    """--data and --resize. `@data_options` requires --data; `@data_options(required=False)` makes it
    optional and `@data_options(default="digits")` gives it a default."""
    if func is None:
        return functools.partial(data_options, required=required, default=default)
    func = click.option("--resize", is_flag=True, help="Rescale array data whose size differs from the model's input.")(func)
    # click 8.3+ treats an explicit default=None as a value, which would defeat required=True.
    extra = {"default": default, "show_default": True} if default is not None else {}
    return click.option("--data", "data", required=required and default is None, **extra,
                        help="ImageFolder dir, .npz (x, y), torchvision:NAME:/root[:train|test], digits, or an MLflow artifact URI (runs:/ID/clean.npz).")(func)


def report_options(func: Callable[..., Any] | None = None, *, flag: str = "--output") -> Callable[..., Any]:
    """--format and the report file (`output`); commands whose --output is a model directory take
    `flag="--report"`, and the file arrives as `report_file`."""
    if func is None:
        return functools.partial(report_options, flag=flag)
    names = (flag, "-o") if flag == "--output" else (flag,)
    dest = "output" if flag == "--output" else "report_file"
    func = click.option(*names, dest, type=click.Path(dir_okay=False, path_type=Path), default=None, callback=_under_directories,
                        help="Write the report here (stdout when omitted).")(func)
    from harden.report import RENDERERS

    return click.option("--format", "fmt", type=click.Choice(list(RENDERERS)), default="text", show_default=True,
                        help="Report format.")(func)


def _under_directories(_ctx: click.Context, _param: click.Parameter, path: Path | None) -> Path | None:
    """Refuse a report path below a file at once, not after minutes of scanning (missing directories are made)."""
    blocking = next((parent for parent in path.parents if parent.exists() and not parent.is_dir()), None) if path else None
    if blocking is not None:
        raise click.BadParameter(f"{blocking} is a file, so {path} cannot be written")
    return path


def reject(message: str) -> None:
    """Stop with a one-line bad-input error (exit 2)."""
    raise HardenError(message)
