"""Atomic, durable file writes and guarded reads of metadata (no torch).

A file is replaced, never overwritten in place: a crash or a full disk at any moment leaves either
the old or the new content, complete. Errors name the file and the reason.

Metadata (a manifest, a corpus table, a talk XML) is read only from a regular file of sane size:
a FIFO named like metadata would block the reader forever, ``/dev/zero`` would be read without end,
a folder or socket fails with an unhelpful error. ``os.stat`` never blocks, so the kind is checked
before anything is opened, and once more on the opened descriptor (opened with ``O_NONBLOCK``) in
case the name was swapped in between.
"""
from __future__ import annotations

import io
import os
import stat
from pathlib import Path
from typing import Callable


# Test-only: tests append callables (path, temp_path) that run after a temp file is on disk and before
# it is renamed into place, to fail or pause every write at its most delicate point.
BEFORE_REPLACE_HOOKS: list[Callable[[Path, Path], None]] = []


# Largest metadata file read whole (a corpus table, a manifest) or streamed (a Common Voice tsv);
# anything bigger is refused with its size rather than read into memory.
MAX_METADATA_BYTES = 1 << 30
MAX_STREAMED_BYTES = 16 << 30


class UnreadableFile(ValueError):
    """A metadata file that is not read: not a regular file, or too large. ``str`` names path and kind."""

    def __init__(self, path: str | os.PathLike, kind: str) -> None:
        super().__init__(f"{path}: {kind}; not read")
        self.path, self.kind = Path(path), kind


def file_kind(path: str | os.PathLike) -> str | None:
    """None for a regular file (symlinks followed), else what the name is: 'a FIFO (named pipe)',
    'a character device', 'a folder', ... ('a symlink to ...' when a link leads there). Never blocks."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "missing" if not os.path.islink(path) else "a broken symlink"
    if stat.S_ISREG(mode):
        return None
    kind = _mode_kind(mode)
    return f"a symlink to {kind}" if os.path.islink(path) else kind


def _mode_kind(mode: int) -> str:
    for test, kind in ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a folder")):
        if test(mode):
            return kind
    return "not a regular file"


def open_regular(path: str | os.PathLike, max_bytes: int = MAX_METADATA_BYTES) -> io.BufferedReader:
    """Open a regular file of at most ``max_bytes`` for reading; raise UnreadableFile for anything else.

    FileNotFoundError and PermissionError pass through unchanged (callers already name those).
    """
    kind = file_kind(path)
    if kind == "missing":
        raise FileNotFoundError(2, "No such file or directory", str(path))
    if kind is not None:
        raise UnreadableFile(path, f"{kind}, not a regular file")
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0))
    try:
        st = os.fstat(fd)  # the name may have been swapped for something else since the check
        if not stat.S_ISREG(st.st_mode):
            raise UnreadableFile(path, f"{_mode_kind(st.st_mode)}, not a regular file")
        if st.st_size > max_bytes:
            raise UnreadableFile(path, f"{st.st_size:,} bytes, more than the {max_bytes:,} a metadata file may have")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_regular(path: str | os.PathLike, max_bytes: int = MAX_METADATA_BYTES) -> bytes:
    """The bytes of a regular file of at most ``max_bytes`` (see open_regular); a file that grows
    past the cap while being read is refused too."""
    with open_regular(path, max_bytes) as fh:
        data = fh.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise UnreadableFile(path, f"more than the {max_bytes:,} bytes a metadata file may have")
    return data


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
    except BaseException:  # Ctrl-C or SIGTERM (raised as an interrupt) mid-write: no temp file stays
        tmp.unlink(missing_ok=True)
        raise
