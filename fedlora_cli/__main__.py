"""`python -m fedlora_cli` runs the CLI."""

from fedlora_cli.app import main

main()
