"""`python -m mixtral_cli` runs the `mixtral` command."""

from .cli.app import main

main()
