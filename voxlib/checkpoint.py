"""Atomic writes and safe loading of checkpoints and run-folder files.

A checkpoint is replaced, never overwritten: the new bytes go to a temporary file in the same
folder, are flushed to disk, and only then renamed over the old file (an atomic step on POSIX), so
a crash or a full disk at any moment leaves either the old or the new checkpoint, complete. Loading
uses ``torch.load(weights_only=True)``: a checkpoint is tensors and plain containers only, and a
file that would run Python code while unpickling is refused.
"""
from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any, Callable

import torch

from voxlib.fileio import WriteError, fsync_dir, write_atomic  # noqa: F401 (re-exported)


class CheckpointError(RuntimeError):
    """A checkpoint or run file that cannot be written or safely read; the message names the file."""


def save_checkpoint(state: dict[str, Any], path: str | Path,
                    before_replace: Callable[[Path], None] | None = None) -> None:
    """Serialise ``state`` (tensors, numbers, strings, lists, dicts) and write it atomically."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    try:
        write_atomic(path, buffer.getvalue(), before_replace)
    except WriteError as err:
        raise CheckpointError(str(err)) from err


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
