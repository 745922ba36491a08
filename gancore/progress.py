"""The one rich progress bar, used by the training loop, metrics, extractor training and diffusion sampling.

It steps aside (does nothing) when disabled, when another live display already runs (rich allows one per console:
the trainer's bar wins over the metrics' bar inside it), and, for `transient` bars, when stdout is not a terminal.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any


class Bar:
    """`with Bar("FID", total=n) as bar: bar.advance(k)`; `bar.update(completed=step, stats="...")`."""

    def __init__(self, description: str, total: int, enabled: bool = True, completed: int = 0,
                 elapsed: bool = False, transient: bool = False, **fields: Any):
        self._p = None
        self._task = None
        if not enabled:
            return
        from rich import get_console
        from rich.errors import LiveError
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                   TimeRemainingColumn)

        if transient and not get_console().is_terminal:
            return
        columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn()]
        if elapsed:
            columns += [TimeElapsedColumn(), TextColumn("eta")]
        columns += [TimeRemainingColumn(), *(TextColumn(f"{{task.fields[{k}]}}") for k in fields)]
        p = Progress(*columns, transient=transient)
        try:
            p.start()
        except LiveError:  # another live display is up: the caller's bar wins
            return
        self._p = p
        self._task = p.add_task(description, total=total, completed=completed, **fields)

    def advance(self, k: int = 1, **fields: Any) -> None:
        if self._p is not None:
            self._p.update(self._task, advance=k, **fields)

    def update(self, completed: int, **fields: Any) -> None:
        if self._p is not None:
            self._p.update(self._task, completed=completed, **fields)

    def close(self) -> None:
        if self._p is not None:
            self._p.stop()
            self._p = None

    def __enter__(self) -> Bar:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def track(seq: Iterable[int], description: str, total: int, enabled: bool = True) -> Iterator[int]:
    """Iterate `seq` under a transient bar (shown only on a terminal)."""
    with Bar(description, total, enabled=enabled, transient=True) as bar:
        for item in seq:
            yield item
            bar.advance()
