"""A live terminal line for long waits: what is awaited, elapsed time and the limit (rich).

Used while a server starts (health check) and while a capacity probe step runs, so the terminal
never sits silent for minutes. Writes to stderr; on a non-terminal (CI logs) rich prints plain lines.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterator

from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

_console = Console(stderr=True, highlight=False)


@contextmanager
def waiting(what: str, limit_s: float | None = None) -> Iterator[None]:
    """Show ``what`` with a spinner and the elapsed time (of ``limit_s``); print how long it took."""
    limit = f"(limit {limit_s:.0f}s)" if limit_s else ""
    start = time.monotonic()
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), TextColumn(limit),
                  console=_console, transient=True) as progress:
        progress.add_task(what, total=None)
        try:
            yield
        finally:
            elapsed = time.monotonic() - start
    _console.print(f"  {what}: {elapsed:.0f}s")
