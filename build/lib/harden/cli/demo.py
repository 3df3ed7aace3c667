"""`harden demo`: train and register a backdoored demo model, then show what to run next."""

from __future__ import annotations

from pathlib import Path

import click

from harden import __version__
from harden.cli.options import CommandContext, common_options, report_options
from harden.demo import run_demo
from harden.report import Report, Table, emit


@click.command("demo")
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), default=Path("harden-demo-data"), show_default=True,
              help="Where to write the clean data the demo used.")
@click.option("--name", default="harden-demo", show_default=True, help="Registered model name.")
@click.option("--alias", default="candidate", show_default=True, help="Alias set on the new version.")
@click.option("--epochs", type=int, default=12, show_default=True)
@report_options
@common_options
def command(ctx: CommandContext, data_dir: Path, name: str, alias: str, epochs: int, fmt: str, output: Path | None) -> int:
    """Train a small CNN on digits with a BadNets backdoor and register it in MLflow.

    \b
    Examples:
      harden demo
      harden demo --tracking-uri http://127.0.0.1:5000 --name my-demo
    """
    ctx.info(f"tracking: {ctx.tracking_uri}  device: {ctx.device}")
    result = run_demo(data_dir, name=name, alias=alias, epochs=epochs, seed=ctx.seed, device=ctx.device)
    uri = f"models:/{name}@{alias}"
    payload = {
        "model_uri": result.model_uri,
        "alias": alias,
        "run_id": result.run_id,
        "trigger": result.trigger,
        "target": result.target,
        "accuracy": result.clean.accuracy,
        "asr": result.clean.asr,
        "ra": result.clean.ra,
        "n_test": result.clean.n,
        "data_dir": str(result.data_dir),
        "duration_s": result.duration_s,
        "peak_memory_mb": result.peak_memory_mb,
        "harden_version": __version__,
    }
    test = result.data_dir / "test.npz"
    report = Report(
        "harden.demo/1",
        f"Registered {result.model_uri} (alias {alias}) with a {result.trigger} backdoor toward class {result.target}",
        payload,
        [Table("Demo model on held-out digits", ["metric", "value"], [
            ["accuracy (ACC)", result.clean.accuracy], ["attack success (ASR)", result.clean.asr],
            ["robust accuracy (RA)", result.clean.ra], ["test images", result.clean.n], ["seconds", result.duration_s],
        ])],
        next_steps=[
            f"harden evaluate {uri} --data {test} --trigger {result.trigger} --target {result.target}",
            f"mlflow ui --backend-store-uri {ctx.tracking_uri}",
        ],
    )
    emit(report, fmt, output)
    return 0
