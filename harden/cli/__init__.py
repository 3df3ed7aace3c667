"""The `harden` command line: a click group over the library.

Exit codes (all commands): 0 ok/clean, 1 findings (backdoor suspected, policy failed,
guardrail tripped), 2 error or bad input (one line; traceback with -v), 4 usage error.
"""

from __future__ import annotations

import signal
import sys
import threading
import traceback

import click

from harden import __version__
from harden.cli.options import STATE
from harden.errors import EXIT_ERROR, EXIT_OK, EXIT_USAGE, HardenError

_INTERRUPTED = 130


class HardenGroup(click.Group):
    """Maps every failure to harden's exit codes instead of click's defaults."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):  # type: ignore[override]
        STATE["verbose"] = 0
        previous_handler = _interrupt_on_sigterm()
        try:
            result = super().main(args=args, prog_name=prog_name or "harden", complete_var=complete_var, standalone_mode=False, **extra)
            code = result if isinstance(result, int) else EXIT_OK
        except click.UsageError as exc:
            exc.show()
            code = EXIT_USAGE
        except click.ClickException as exc:
            exc.show()
            code = EXIT_ERROR
        except (click.Abort, KeyboardInterrupt):
            click.echo("harden: interrupted", err=True)
            code = _INTERRUPTED
        except HardenError as exc:
            if STATE["verbose"]:
                traceback.print_exc()
            click.echo(f"harden: error: {exc}", err=True)
            code = exc.exit_code
        except Exception as exc:  # noqa: BLE001 - the CLI's last line of defence
            if STATE["verbose"]:
                traceback.print_exc()
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            click.echo(f"harden: error: {type(exc).__name__}: {message} (re-run with -v for details)", err=True)
            code = EXIT_ERROR
        finally:
            if previous_handler is not None:
                signal.signal(signal.SIGTERM, previous_handler)
        if standalone_mode:
            sys.exit(code)
        return code


def _raise_interrupt(_signum, _frame) -> None:
    raise KeyboardInterrupt


def _interrupt_on_sigterm():
    """`kill` unwinds like Ctrl-C, so cleanup (deleting a half-registered version,
    temporary files) runs for both. Returns the handler to restore afterwards."""
    if threading.current_thread() is threading.main_thread():
        return signal.signal(signal.SIGTERM, _raise_interrupt)
    return None


@click.group(cls=HardenGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="harden")
def cli() -> None:
    """Scan, purify and harden PyTorch models from MLflow before they ship.

    \b
    Quick start:
      harden demo
      harden evaluate models:/harden-demo@candidate --data harden-demo-data/test.npz --trigger grid_paste --target 0
    """


def _register_commands() -> None:
    from harden.cli import demo, evaluate, export, finetune_test, fleet, gate, hook, listing, purify, scan, serve, sophon, watermark

    for module in (demo, evaluate, export, listing, purify, scan, serve, sophon, finetune_test, watermark, gate, hook, fleet):
        cli.add_command(module.command)


_register_commands()


def main() -> None:
    cli.main()
