"""The one rich Console every module prints progress and messages to (stderr, so stdout stays data)."""

from rich.console import Console

console = Console(stderr=True)
