"""Atomic, durable file writes (no torch): temp file in the same folder, fsync, rename.

A file is replaced, never overwritten in place: a crash or a full disk at any moment leaves either
the old or the new content, complete. Errors name the file and the reason.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable


# Test-only: tests append callables (path, temp_path) that run after a temp file is on disk and before
# it is renamed into place, to fail or pause every write at its most delicate point.
BEFORE_REPLACE_HOOKS: list[Callable[[Path, Path], None]] = []


class WriteError(OSError):
    """A write that failed; the message names the file (the previous content, if any, is intact)."""

    def __str__(self) -> str:
        return str(self.strerror)


def fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def temp_name(path: Path) -> Path:
    """The temp file a write of ``path`` goes through (hidden, per process)."""
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def write_atomic(path: str | Path, data: bytes, before_replace: Callable[[Path], None] | None = None) -> None:
    """Write ``data`` to ``path`` through a temp file + fsync + rename; on failure the old file stays.

    ``before_replace(temp_path)`` runs after the temp file is on disk and before the rename (tests
    pause or fail there).
    """
    path = Path(path)
    tmp = temp_name(path)
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        for hook in BEFORE_REPLACE_HOOKS:
            hook(path, tmp)
        if before_replace is not None:
            before_replace(tmp)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        reason = os.strerror(err.errno) if err.errno else str(err)
        raise WriteError(err.errno, f"could not write {path}: {reason}") from err
