"""The command line: thin typer commands, the single error boundary, and all presentation (rich tables,
progress, JSON). Nothing below this package prints."""

from .app import main

__all__ = ["main"]
