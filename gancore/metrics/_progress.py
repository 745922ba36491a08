"""A rich progress bar that steps aside when another live display (e.g. the trainer's bar) is already running."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator


@contextlib.contextmanager
def progress_bar(description: str, total: int, enabled: bool = True) -> Iterator[Callable[..., None]]:
    """Yields `advance(k=1, **fields)`; a no-op when disabled or when rich already shows a live display."""
    from rich.errors import LiveError
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    if not enabled:
        yield lambda k=1, **fields: None
        return
    bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("{task.fields[note]}"), TimeRemainingColumn())
    try:
        bar.start()
    except LiveError:  # rich allows one live display per console; the caller's bar wins
        yield lambda k=1, **fields: None
        return
    task = bar.add_task(description, total=total, note="")
    try:
        yield lambda k=1, **fields: bar.update(task, advance=k, **fields)
    finally:
        bar.stop()
