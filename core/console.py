"""The one console for progress output (stderr, readable width also when piped to a log)."""

from rich.console import Console

console = Console(stderr=True, highlight=False)
if not console.is_terminal:
    console = Console(stderr=True, highlight=False, width=140)
