"""Where files live and how they are written: the cache dir, the data root, the one atomic write.

Every file another process may read while it is written (checkpoints, cached arrays and statistics, extractor
weights, best.yaml) goes through `atomic_write`: a temp file in the same folder, flushed to disk, then one rename,
so a reader -- or the next process after a kill -9 or a machine crash -- sees the old file or the whole new one,
never half of it. A write that fails removes its temp file and leaves the old file as it was.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any


def cache_dir() -> Path:
    """Decoded datasets, domain extractors, real-data statistics: $GANCORE_CACHE, else ~/.cache/gancore."""
    return Path(os.environ.get("GANCORE_CACHE") or Path.home() / ".cache" / "gancore")


@contextlib.contextmanager
def file_lock(path: str | Path) -> Iterator[None]:
    """Hold an exclusive lock on `path` (created if missing) between processes on this machine, e.g. so that two
    test workers needing the same cached extractor train it once: the second waits, then finds the file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def data_root(root: str | None) -> Path:
    """Where datasets are looked for: data.root, $GANCORE_DATA, ./data (in that order)."""
    return Path(root or os.environ.get("GANCORE_DATA") or "data").expanduser()


def atomic_write(path: str | Path, write: Callable[[IO[Any]], Any] | str | bytes) -> Path:
    """Write `path` through a temp file beside it and one os.replace.

    `write` is text, bytes, or a function given the open binary file (np.save, torch.save, np.savez: a file
    object, so nothing appends a suffix to the name).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            if isinstance(write, str):
                fh.write(write.encode())
            elif isinstance(write, bytes):
                fh.write(write)
            else:
                write(fh)
            fh.flush()
            os.fsync(fh.fileno())  # the data is on disk before the rename makes it the file (crash safety)
        os.replace(tmp, path)
        _fsync_dir(path.parent)  # ... and the rename itself survives a machine crash
    finally:
        tmp.unlink(missing_ok=True)
    return path


def temp_name_pattern(name: str) -> str:
    """The glob matching the temp files `atomic_write` uses for `name` (any process): `.NAME.<pid>.tmp`."""
    return f".{name}.*.tmp"


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # a platform or filesystem without directory handles: the rename is as durable as it gets
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
