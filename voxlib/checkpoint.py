"""Atomic writes and safe loading of checkpoints and run-folder files.

A checkpoint is replaced, never overwritten: the new bytes go to a temporary file in the same
folder, are flushed to disk, and only then renamed over the old file (an atomic step on POSIX), so
a crash or a full disk at any moment leaves either the old or the new checkpoint, complete. Loading
uses ``torch.load(weights_only=True)``: a checkpoint is tensors and plain containers only, and a
file that would run Python code while unpickling is refused.
"""
from __future__ import annotations

import io
import os
import pickle
from pathlib import Path
from typing import Any, Callable

import torch


class CheckpointError(RuntimeError):
    """A checkpoint or run file that cannot be written or safely read; the message names the file."""


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


def write_atomic(path: str | Path, data: bytes, before_replace: Callable[[Path], None] | None = None) -> None:
    """Write ``data`` to ``path`` through a temp file + fsync + rename; on failure the old file stays.

    ``before_replace(temp_path)`` runs after the temp file is on disk and before the rename; the
    resilience tests use it to pause there and kill the process.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        if before_replace is not None:
            before_replace(tmp)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        reason = os.strerror(err.errno) if err.errno else str(err)
        raise CheckpointError(f"could not write {path}: {reason} ({err})") from err


def save_checkpoint(state: dict[str, Any], path: str | Path,
                    before_replace: Callable[[Path], None] | None = None) -> None:
    """Serialise ``state`` (tensors, numbers, strings, lists, dicts) and write it atomically."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    write_atomic(path, buffer.getvalue(), before_replace)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint onto the CPU, refusing anything that is not plain tensors and containers."""
    path = Path(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"refusing to load {path}: it contains pickled Python objects, not only tensors and plain "
            f"containers, and loading it could run arbitrary code ({str(err).splitlines()[0]})"
        ) from err
    except (OSError, RuntimeError, EOFError) as err:
        raise CheckpointError(f"cannot read checkpoint {path}: {err}") from err
