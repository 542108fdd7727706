"""`python -m mixtral_cli` runs the `mixtral` command."""

from .cli import main

main()
