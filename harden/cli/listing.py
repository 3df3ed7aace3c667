"""`harden list archs|triggers|methods`: what the registries hold."""

from __future__ import annotations

import click

from harden.attacks import list_triggers
from harden.models import list_archs


@click.command("list")
@click.argument("what", type=click.Choice(["archs", "triggers", "methods"]))
def command(what: str) -> None:
    """List registered architectures, triggers, or purification methods with their settings.

    \b
    Examples:
      harden list archs
      harden list triggers
      harden list methods
    """
    if what == "archs":
        for info in list_archs():
            c, h, w = info.default_input
            click.echo(f"{info.name:32} {c}x{h}x{w}  {info.description}")
    elif what == "methods":
        from harden.purify import DEFAULT_METHOD, METHODS

        for name, method in METHODS.items():
            default = " (default)" if name == DEFAULT_METHOD else ""
            click.echo(f"{name}{default}: {method.description}")
            click.echo("    --set " + " ".join(f"{key}={value}" for key, value in method.defaults.items()))
    else:
        for name, description in list_triggers().items():
            click.echo(f"{name:14} {description}")
