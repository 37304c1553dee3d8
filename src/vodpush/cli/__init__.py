"""The ``vodpush`` command: thin subcommands over the library, one module a group."""

from vodpush.cli.main import cli, main

__all__ = ["cli", "main"]
