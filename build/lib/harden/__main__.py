"""`python -m harden` runs the CLI."""

from harden.cli import main

main()
