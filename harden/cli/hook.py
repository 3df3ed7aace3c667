"""`harden hook serve|register`: MLflow registry webhooks that scan every new model version."""

from __future__ import annotations

import os
from pathlib import Path

import click

from harden.cli.options import CommandContext, common_options, reject, report_options
from harden.cli.purify import setting_pairs
from harden.integrations.mlflow import EVENTS, HookSettings, register_webhook, serve
from harden.integrations.mlflow.worker import ON_BACKDOOR
from harden.purify import DEFAULT_METHOD, METHODS
from harden.purify.base import split_settings
from harden.report import Report, Table, emit


def _secret(var: str) -> str:
    secret = os.environ.get(var, "")
    if not secret:
        reject(f"--secret-env {var}: the environment variable is not set or empty")
    return secret


@click.group("hook")
def command() -> None:
    """MLflow model-registry webhooks: scan each new version, tag it, optionally purify or block an alias.

    \b
    Examples:
      export HARDEN_HOOK_SECRET=$(openssl rand -hex 32)
      harden hook register --url https://hook.example.com/webhook --secret-env HARDEN_HOOK_SECRET
      harden hook serve --port 8765 --secret-env HARDEN_HOOK_SECRET --data clean.npz --block-alias production
    """


@command.command("serve")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(0, 65535), default=8765, show_default=True, help="Port (0 picks a free one).")
@click.option("--secret-env", required=True, help="Environment variable holding the webhook's HMAC secret.")
@click.option("--queue", "queue_path", type=click.Path(dir_okay=False, path_type=Path), default=Path("harden-hook.db"),
              show_default=True, help="SQLite job queue; survives restarts.")
@click.option("--data", default=None, help="Clean data for scans and purification (see harden scan --data).")
@click.option("--checks", default=None, help="Scan checks, comma-separated (default: all).")
@click.option("--on-backdoor", type=click.Choice(ON_BACKDOOR), default="tag", show_default=True,
              help="tag: only tag the version; purify: also purify it and register the result.")
@click.option("--purify-method", type=click.Choice(list(METHODS)), default=DEFAULT_METHOD, show_default=True, help="harden purify --method for --on-backdoor purify.")
@click.option("--purify-set", "purify_settings", multiple=True, callback=setting_pairs, metavar="KEY=VALUE",
              help="harden purify --set for --on-backdoor purify, repeatable (e.g. --purify-set epochs=20).")
@click.option("--register-as", default=None, help="Registered model for purified versions (default: the flagged model's).")
@click.option("--block-alias", default=None, help="Move this alias back when a flagged version receives it.")
@click.option("--workers", type=click.IntRange(0, 64), default=1, show_default=True, help="Jobs run at once (0: only receive).")
@click.option("--tolerance", type=click.FloatRange(1), default=300.0, show_default=True, help="Max age of a delivery, seconds.")
@common_options
def serve_command(ctx: CommandContext, host, port, secret_env, queue_path, data, checks, on_backdoor, purify_method, purify_settings, register_as,
                  block_alias, workers, tolerance) -> None:
    """Receive MLflow webhooks and scan each new model version (runs until Ctrl-C / SIGTERM)."""
    if on_backdoor == "purify" and not data:
        reject("--on-backdoor purify needs --data")
    split_settings(METHODS[purify_method], purify_settings)  # a typo fails now, not at the first flagged version
    settings = HookSettings(data=data, checks=checks, on_backdoor=on_backdoor, purify_method=purify_method, purify_settings=purify_settings,
                            purify_register_as=register_as, block_alias=block_alias, tracking_uri=ctx.tracking_uri)
    try:
        serve(host, port, _secret(secret_env), queue_path, settings, workers=workers, tolerance_s=tolerance,
              on_ready=lambda server: ctx.info(f"harden hook: listening on {server.url} (queue {queue_path}, {workers} worker(s))"))
    except OSError as exc:
        reject(f"cannot listen on {host}:{port}: {exc.strerror or exc}")


@command.command("register")
@click.option("--url", required=True, help="The receiver's URL, e.g. https://hook.example.com/webhook.")
@click.option("--secret-env", required=True, help="Environment variable holding the HMAC secret (same as for serve).")
@click.option("--events", default=",".join(EVENTS), show_default=True, help="Comma-separated MLflow webhook events.")
@click.option("--name", default="harden-hook", show_default=True, help="Webhook name (lowercase, digits, . _ -).")
@report_options
@common_options
def register_command(ctx: CommandContext, url, secret_env, events, name, fmt, output) -> None:
    """Create the registry webhook on the MLflow tracking server (`--tracking-uri http://...`)."""
    chosen = [e.strip() for e in events.split(",") if e.strip()]
    webhook = register_webhook(url, _secret(secret_env), chosen, name)
    payload = {"webhook_id": webhook.webhook_id, "name": webhook.name, "url": webhook.url,
               "events": [str(e) for e in webhook.events], "tracking_uri": ctx.tracking_uri}
    report = Report("harden.hook.register/1", f"webhook {webhook.name} ({webhook.webhook_id}) -> {webhook.url}", payload,
                    [Table("Webhook", ["field", "value"], [[k, ", ".join(v) if isinstance(v, list) else v] for k, v in payload.items()])])
    emit(report, fmt, output)
