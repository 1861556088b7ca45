"""Rich progress bars and logging set-up shared by the trainer's long-running commands."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from rich.console import Console
from rich.logging import RichHandler
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

T = TypeVar("T")
console = Console(stderr=True)


def setup_logging(verbose: bool = False) -> None:
    """One handler on stderr so stdout stays clean for --json."""
    root = logging.getLogger()
    if any(isinstance(h, RichHandler) for h in root.handlers):
        return
    handler = RichHandler(console=console, show_path=False, rich_tracebacks=False)
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO, format="%(message)s", handlers=[handler]
    )
    # faiss announces every CPU-specific build it fails to find (ten lines); only its problems matter here.
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)


def _progress() -> Progress:
    """A bar on stderr, hidden when stderr is not a terminal (CI logs, pipes)."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=not sys.stderr.isatty(),
    )


def track(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    """Iterate with a progress bar on stderr."""
    with _progress() as progress:
        yield from progress.track(items, total=total, description=description)


@contextmanager
def progress_callback(description: str) -> Iterator[Callable[[int, int], None]]:
    """A `progress(done, total)` callable that drives one bar, for APIs that report counts themselves."""
    with _progress() as progress:
        task = progress.add_task(description, total=None)

        def update(done: int, total: int) -> None:
            progress.update(task, completed=done, total=total)

        yield update
