"""`harden gate`: pass/fail a model against harden-policy.yaml for CI (0 pass, 1 fail, 2 error)."""

from __future__ import annotations

from pathlib import Path

import click

from harden.cli.options import CommandContext, common_options, report_options
from harden.gate import Policy, gate
from harden.report import emit


@click.command("gate")
@click.argument("model")
@click.option("--policy", "policy_path", type=click.Path(dir_okay=False, path_type=Path), default=Path("harden-policy.yaml"),
              show_default=True, help="The policy file.")
@click.option("--data", default=None, help="Clean data for a fresh scan (default: the policy's scan.data).")
@click.option("--fresh", is_flag=True, help="Always scan, even when a current scan result is cached on the version.")
@click.option("--cached-only", is_flag=True, help="Never scan: error (exit 2) when no current scan result is cached.")
@click.option("--sarif", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Also write SARIF 2.1.0 here.")
@click.option("--junit", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Also write JUnit XML here.")
@click.option("--sarif-location", default=None, help="Repository file SARIF results point at (default: the policy file).")
@report_options
@common_options
def command(ctx: CommandContext, model, policy_path, data, fresh, cached_only, sarif, junit, sarif_location, fmt, output) -> int:
    """Evaluate MODEL against a policy; exit 0 pass, 1 fail, 2 could not decide. Reports are written before exiting.

    \b
    Examples:
      harden gate models:/fraud-cnn@candidate --policy harden-policy.yaml --sarif harden.sarif --junit harden.xml
      harden gate models:/fraud-cnn/7 --cached-only --format json
    """
    if fresh and cached_only:
        raise click.UsageError("--fresh and --cached-only exclude each other")
    policy = Policy.load(policy_path)
    result = gate(model, policy, fresh=fresh, cached_only=cached_only, data=data, device=ctx.device, seed=ctx.seed)
    report = result.report(sarif_location)
    for path, rendering in ((sarif, "sarif"), (junit, "junit")):
        if path is not None:
            emit(report, rendering, path)
    emit(report, fmt, output)
    return result.exit_code
