"""`python -m harden.cli ...`: the same CLI as the `harden` script."""

from harden.cli import main

main()
