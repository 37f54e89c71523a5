"""Subcommands of the ``saint`` CLI, one module each (see ``saint.cli``)."""
