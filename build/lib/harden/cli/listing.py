"""`harden list archs|triggers`: what the registries hold."""

from __future__ import annotations

import click

from harden.attacks import list_triggers
from harden.models import list_archs


@click.command("list")
@click.argument("what", type=click.Choice(["archs", "triggers"]))
def command(what: str) -> None:
    """List registered architectures or triggers.

    \b
    Examples:
      harden list archs
      harden list triggers
    """
    if what == "archs":
        for info in list_archs():
            c, h, w = info.default_input
            click.echo(f"{info.name:32} {c}x{h}x{w}  {info.description}")
    else:
        for name, description in list_triggers().items():
            click.echo(f"{name:14} {description}")
