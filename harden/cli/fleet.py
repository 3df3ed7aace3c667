"""`harden scan-registry`: scan a registry's versions in parallel (local processes or Ray)."""

from __future__ import annotations

import click

from harden import tracking
from harden.cli.options import CommandContext, common_options, report_options
from harden.fleet import EXECUTORS, scan_registry
from harden.report import emit
from harden.scan.base import CHECKS


@click.command("scan-registry")
@click.option("--filter", "filter_string", default=None, help="MLflow search_model_versions filter, e.g. \"name LIKE 'fraud-%'\".")
@click.option("--data", default=None, help="Clean data for the scans: a path every worker can read, or an MLflow artifact URI (runs:/ID/clean.npz).")
@click.option("--checks", default=None, help=f"Comma-separated checks (default: all; known: {', '.join(CHECKS)}).")
@click.option("--max-steps", type=click.IntRange(1), default=None, help="Cap on inversion steps per class.")
@click.option("--executor", type=click.Choice(EXECUTORS), default="local", show_default=True)
@click.option("--workers", type=click.IntRange(1), default=1, show_default=True, help="Parallel scans (local processes or Ray CPUs).")
@click.option("--address", default=None, help="Ray cluster, e.g. ray://head:10001 (default: start a local Ray).")
@click.option("--rescan", is_flag=True, help="Scan versions already scanned by this harden version too.")
@click.option("--max-versions", type=click.IntRange(1), default=None, help="Stop listing after this many versions.")
@report_options
@common_options
def command(ctx: CommandContext, filter_string, data, checks, max_steps, executor, workers, address, rescan, max_versions, fmt, output) -> int:
    """Scan every matching registered version not yet scanned by this harden version; one summary.

    Exit 0 all clean, 1 a version is flagged (backdoor or unsafe artifact), 2 a scan failed.

    \b
    Examples:
      harden scan-registry --filter "name LIKE 'fraud-%'" --data clean.npz --workers 4
      harden scan-registry --data /shared/clean.npz --executor ray --address ray://head:10001 --workers 64
    """
    names = [c.strip() for c in checks.split(",") if c.strip()] if checks else None
    if names and any(n not in CHECKS for n in names):
        raise click.BadParameter(f"unknown check in {checks!r}; known: {', '.join(CHECKS)}", param_hint="--checks")
    params = {"filter": filter_string, "data": data, "checks": checks, "max_steps": max_steps, "executor": executor,
              "workers": workers, "address": address, "rescan": rescan}
    with tracking.command_run("scan-registry", None, params):
        result = scan_registry(filter_string, data=data, checks=names, max_steps=max_steps, executor=executor, workers=workers,
                               address=address, device=str(ctx.device), rescan=rescan, max_versions=max_versions,
                               on_result=lambda item: ctx.info(f"{item.model_uri}: {item.verdict or item.error}"))
        report = result.report()
        tracking.log_metrics({"versions": len(result.items), "scanned": len(result.scanned), "duration_s": result.duration_s,
                              "throughput_per_min": result.throughput_per_min})
        tracking.log_report(report, "scan-registry")
    emit(report, fmt, output)
    return result.exit_code
