"""One writer per place: an exclusive lock that names its holder and dies with it.

The lock is an OS file lock (``filelock``, flock on POSIX), so the kernel frees it when the holding
process ends, however it ends: a lock left by a killed process is simply free again. Beside it a small
JSON note names the holder (PID, host, start time, command) so a second process can say who holds
the place instead of waiting or corrupting it.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Iterator

import filelock

try:
    import fcntl
except ImportError:  # Windows: no flock; held() falls back to the holder note
    fcntl = None

# A writer waits this long for the lock before it is refused: a reader's held() probe takes the lock
# for a few microseconds, and that must never turn a writer away.
PROBE_GRACE_S = 0.2


class LockedError(RuntimeError):
    """The place is being written by another process; the message names it."""


def holder_note(lock_path: Path) -> dict:
    try:
        return json.loads(Path(f"{lock_path}.holder").read_text())
    except (OSError, ValueError):
        return {}


def describe_holder(note: dict) -> str:
    if not note:
        return "another process"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(note.get("since", 0)))
    return f"PID {note.get('pid')} on {note.get('host')} since {since} ({note.get('command', '?')})"


@contextlib.contextmanager
def exclusive_lock(lock_path: str | Path, what: str, wait_s: float = 0.0) -> Iterator[None]:
    """Hold ``lock_path`` for the block; refuse at once (or after ``wait_s``) if another process has it.

    ``what`` names the place in the error, e.g. "run folder outputs/runs/x".
    """
    lock_path = Path(lock_path)
    lock = filelock.FileLock(lock_path, timeout=max(wait_s, PROBE_GRACE_S))
    try:
        lock.acquire()
    except filelock.Timeout:
        raise LockedError(f"{what} is in use by {describe_holder(holder_note(lock_path))}; wait for it to "
                          f"finish or stop it (a lock of a process that has ended frees itself)") from None
    note = Path(f"{lock_path}.holder")
    try:
        note.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(),
                                    "command": " ".join(Path(a).name if i == 0 else a
                                                        for i, a in enumerate(sys.argv))[:200]}))
        yield
    finally:
        with contextlib.suppress(OSError):
            note.unlink()
        lock.release()


def held(lock_path: str | Path) -> dict | None:
    """The holder note (``{}`` when it names no one) if a process holds ``lock_path`` now, else None.

    Asks the OS with a shared, non-blocking flock that is dropped at once, so it never waits, never
    creates the lock file and never blocks a writer (which waits ``PROBE_GRACE_S`` for a probe).
    A lock held by this very process through another descriptor counts as held: a folder being
    written is being written, whoever asks.
    """
    lock_path = Path(lock_path)
    try:
        fd = os.open(lock_path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    except OSError:
        return holder_note(lock_path) or None
    try:
        if fcntl is None:
            return holder_note(lock_path) or None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                return holder_note(lock_path)
            return holder_note(lock_path) or None  # no flock on this filesystem: trust the note
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)
