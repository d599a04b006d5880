"""Atomic writes and safe loading of checkpoints and run-folder files.

A checkpoint is replaced, never overwritten: the new bytes go to a temporary file in the same
folder, are flushed to disk, and only then renamed over the old file (an atomic step on POSIX), so
a crash or a full disk at any moment leaves either the old or the new checkpoint, complete. Loading
uses ``torch.load(weights_only=True)``: a checkpoint is tensors and plain containers only, and a
file that would run Python code while unpickling is refused.

A file that cannot be a checkpoint (random bytes, a truncated archive, a member failing its CRC, a
pickle stream torch cannot parse) is called damaged, never mistaken for one holding Python code: the
refusal of pickled code is kept for a well-formed file that names a Python global, and no message
ever suggests loading with ``weights_only=False``.
"""
from __future__ import annotations

import io
import pickle
import re
from pathlib import Path
from typing import Any, Callable

import torch

from voxlib.fileio import WriteError, write_atomic
from voxlib.runfolder import checkpoint_problem

# torch's weights-only unpickler names a refused Python global this way; anything else it raises is damage
_GLOBAL = re.compile(r"unsupported (?:global: )?GLOBAL (\S+)", re.IGNORECASE)


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
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    damage = checkpoint_problem(path)
    if damage:
        raise CheckpointError(f"{path}: {damage}; it cannot be used")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except OSError as err:
        raise CheckpointError(f"{path}: cannot read checkpoint ({err.strerror or err})") from err
    except (pickle.UnpicklingError, RuntimeError, EOFError, KeyError, ValueError, TypeError, AttributeError,
            IndexError, UnicodeDecodeError) as err:
        named = _GLOBAL.search(str(err))
        if named:
            raise CheckpointError(
                f"refusing to load {path}: it contains pickled Python objects ({named.group(1)}), not only "
                f"tensors and plain containers, and unpickling it could run arbitrary code; use a checkpoint "
                f"written by vox"
            ) from err
        raise CheckpointError(f"{path}: damaged (its contents cannot be read as a checkpoint: "
                              f"{_first_words(err)}); it cannot be used") from err
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: damaged (holds a {type(state).__name__}, not a checkpoint's dict)")
    return state


def _first_words(err: Exception) -> str:
    """torch's reason in a few words, without its advice (which suggests weights_only=False)."""
    text = str(err)
    detail = text.rsplit("WeightsUnpickler error:", 1)[-1] if "WeightsUnpickler error:" in text else text
    line = next((line.strip() for line in detail.splitlines() if line.strip()), type(err).__name__)
    return line.split(". ")[0][:120]
