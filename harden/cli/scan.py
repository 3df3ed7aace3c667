"""`harden scan`: backdoor and artifact checks with one calibrated verdict."""

from __future__ import annotations

from pathlib import Path

import click

from harden.cli.options import CommandContext, common_options, data_options, model_options, report_options
from harden.report import emit
from harden.scan import TASKS, default_checks, scan_and_record
from harden.scan.base import CHECKS
from harden.scan.inversion import STRATEGIES


def _checks(_ctx, _param, value: str | None) -> list[str] | None:
    if not value:
        return None
    names = [v.strip() for v in value.split(",") if v.strip()]
    unknown = [n for n in names if n not in CHECKS]
    if unknown:
        raise click.BadParameter(f"unknown check(s) {', '.join(unknown)}; known: {', '.join(CHECKS)}")
    return names


@click.command("scan")
@model_options
@data_options(required=False)
@click.option("--train-data", default=None, help="The suspect training set, for the sensitivity test (D-BR).")
@click.option("--task", type=click.Choice(TASKS), default="classifier", show_default=True)
@click.option("--checks", callback=_checks, default=None, help="Comma-separated checks (default: all that apply to --task).")
@click.option("--probe-per-class", type=click.IntRange(1), default=10, show_default=True, help="Clean probe images per class for trigger inversion.")
@click.option("--max-steps", type=click.IntRange(1), default=200, show_default=True, help="Hard cap on inversion steps per class.")
@click.option("--strategy", type=click.Choice(STRATEGIES), default="auto", show_default=True,
              help="Inversion execution: auto groups classes per forward pass up to 256 images of 32x32 (fastest measured, "
                   "CPU and GPU); loop runs one class at a time (least memory); batched runs all classes in one pass.")
@click.option("--sarif-location", default=None, help="Repository file SARIF results point at (e.g. deploy/model.yaml).")
@report_options
@common_options
def command(ctx: CommandContext, model, arch, num_classes, input_size, mean, std, allow_pickle, data, resize, train_data, task,
            checks, probe_per_class, max_steps, strategy, sarif_location, fmt, output: Path | None) -> int:
    """Scan MODEL for unsafe artifacts and backdoors; exit 0 clean, 1 findings, 2 error, 3 nothing scannable.

    \b
    Examples:
      harden scan models:/harden-demo@candidate --data harden-demo-data/clean.npz
      harden scan models:/fraud-cnn/7 --data clean/ --format sarif --output harden.sarif --sarif-location deploy/model.yaml
      harden scan ./model.pt --checks artifact
      harden scan models:/encoder/2 --task encoder --data unlabeled.npz
    """
    names = checks or default_checks(task)
    params = {"data": data, "train_data": train_data, "task": task, "checks": ",".join(names), "probe_per_class": probe_per_class,
              "max_steps": max_steps, "strategy": strategy, "device": str(ctx.device), "seed": ctx.seed}
    options = {"inversion": {"probe_per_class": probe_per_class, "max_steps": max_steps, "strategy": strategy}}
    load_options = {"arch": arch, "num_classes": num_classes, "input_size": input_size, "mean": mean, "std": std, "allow_pickle": allow_pickle}
    result, report = scan_and_record(model, params, sarif_location, data=data, train_data=train_data, task=task, checks=names,
                                     device=ctx.device, seed=ctx.seed, options=options, load_options=load_options, resize=resize)
    emit(report, fmt, output)
    return result.exit_code
