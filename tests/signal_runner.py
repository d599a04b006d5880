"""Run a vox command with a pause installed in one phase, for the signal tests (tests/test_signals.py).

Usage: python tests/signal_runner.py PHASE MARKER -- MODULE ARGS...

The first process to reach PHASE (the command itself, a pool worker or a helper process) writes
MARKER, holding its PID, and every process that reaches it sleeps there until it is stopped: the test
then signals the command in the middle of that phase. The hooks are installed here, by the test
harness; production code never looks for them. Phases:

- ``validation``: decoding clips in read_manifest's process pool (the pool is used for any corpus size)
- ``cache``: a feature-cache pool worker computing spectrograms
- ``demo``: an espeak-ng pool worker of the demo corpus' render helper (through signal_site/sitecustomize.py)
- ``epoch``: before training step 1, with the data loader's workers running
- ``write``: predictions.csv written to its temp file, not yet renamed (training's end or an evaluation)
- ``predict``: reading the first clip in ``python -m voxlib.predict``
- ``report``: the first notebook's kernel has run two cells
"""
from __future__ import annotations

import functools
import importlib
import os
import signal
import sys
import time
from pathlib import Path

PAUSE_S = 300
SITE = Path(__file__).with_name("signal_site")


def pause(marker: str) -> None:
    try:
        fd = os.open(marker + ".part", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        pass
    else:
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        os.replace(marker + ".part", marker)  # the test sees the marker complete or not at all
    time.sleep(PAUSE_S)


def pausing(function, marker: str):
    @functools.wraps(function)  # keeps the name, so the wrapper pickles as the function it replaces
    def paused(*args, **kwargs):
        pause(marker)
        return function(*args, **kwargs)

    return paused


def install(phase: str, marker: str) -> None:
    if phase == "validation":
        import voxlib.corpora.manifest as manifest

        manifest.POOL_MIN_ROWS = 1
        manifest._probe = pausing(manifest._probe, marker)
    elif phase == "cache":
        import voxlib.features as features

        features._features_chunk = pausing(features._features_chunk, marker)
    elif phase == "demo":
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SITE), os.environ.get("PYTHONPATH")]))
        os.environ["VOX_SIGNAL_TEST_MARKER"] = marker  # read by signal_site/sitecustomize.py only
    elif phase == "epoch":
        import voxlib.record as record

        record.FAULT_HOOKS.append(lambda point, detail: pause(marker) if (point, detail) == ("step", 1) else None)
    elif phase == "write":
        import voxlib.fileio as fileio

        fileio.BEFORE_REPLACE_HOOKS.append(lambda path, tmp: pause(marker) if path.name == "predictions.csv" else None)
    elif phase == "predict":
        import voxlib.predict as predict

        predict.Classifier._load = pausing(predict.Classifier._load, marker)
    elif phase == "report":
        from papermill.clientwrap import PapermillNotebookClient

        run_cell = PapermillNotebookClient.execute_cell

        def execute_cell(self, cell, index, *args, **kwargs):
            result = run_cell(self, cell, index, *args, **kwargs)
            if index == 1:
                pause(marker)
            return result

        PapermillNotebookClient.execute_cell = execute_cell
    else:
        raise SystemExit(f"unknown phase {phase!r}")


def terminal_signals() -> None:
    """SIGINT and SIGTERM as a command started from a terminal gets them.

    A shell without job control starts a background job (``nohup make test &``) with SIGINT ignored, and
    an ignored signal stays ignored across exec: the command and every process it starts would then
    never see the Ctrl-C the test sends. A Python handler is reset to the default on exec, so the
    command's own children (pool workers, the notebook kernel) start with the default too.
    """
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def main() -> int:
    terminal_signals()
    phase, marker, _, module, *args = sys.argv[1:]
    install(phase, marker)
    from voxlib.cli import run_command

    return run_command(importlib.import_module(module).main, args)


if __name__ == "__main__":
    sys.exit(main())
