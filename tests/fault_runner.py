"""Run ``python -m voxlib.train ARGS`` with a pause installed at one fault point, for kill -9 tests.

Usage: python tests/fault_runner.py POINT MARKER -- TRAIN_ARGS...
POINT is ``step:N`` (before global training step N) or ``save:EPOCH`` (epoch EPOCH's last.pt is in its
temp file, not yet renamed). At the point the runner writes MARKER and sleeps until it is killed.
The hooks are installed here, by the test harness; production code never looks for them.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import voxlib.fileio as fileio
import voxlib.record as record
import voxlib.train as train


def main() -> int:
    point, marker, _, *args = sys.argv[1:]
    kind, _, value = point.partition(":")
    target = int(value)

    def pause(where: str) -> None:
        Path(marker).write_text(where)
        time.sleep(120)

    if kind == "step":
        record.FAULT_HOOKS.append(lambda p, detail: pause(f"before step {detail}") if (p, detail) == ("step", target) else None)
    else:
        from voxlib.checkpoint import load_checkpoint

        def on_replace(path: Path, tmp: Path) -> None:
            if path.name == "last.pt" and load_checkpoint(tmp)["epoch"] == target:
                pause(f"{tmp} written, not renamed")

        fileio.BEFORE_REPLACE_HOOKS.append(on_replace)
    return train.main(args)


if __name__ == "__main__":
    sys.exit(main())
