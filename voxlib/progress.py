"""Training progress on the terminal while ``python -m voxlib.report`` (``make demo``) runs the notebooks.

Training runs inside notebook 02's kernel, so its log lines (one per member and epoch) reach the executed
notebook and its HTML report, never the terminal that started the command: the demo showed
``02_train ...`` and nothing else for half an hour. The report command therefore names a file in
``VOX_PROGRESS_FILE`` before it starts a kernel; ``notebook.prepare`` (every notebook's first cell)
calls :func:`send_to_report`, which writes each record of vox's training loggers to that file, one line
each; the command follows the file (:func:`follow`) and prints every line, the epoch lines with where the
training stands and an estimate of the time left (:class:`TrainingProgress`). No tqdm bar is involved, so
nothing of this reaches the HTML reports.

The training loop is not touched: it logs what it always logged, and this module reads the log.
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

from voxlib.text import one_line

PROGRESS_FILE_ENV = "VOX_PROGRESS_FILE"
# the loggers whose lines a person waiting for training wants: members and epochs, resume and early
# stop, the feature cache being built, the precision chosen, clips or heads left out
TRAINING_LOGGERS = ("voxlib.train", "voxlib.data", "voxlib.features", "voxlib.precision")
POLL_S = 0.5

_MEMBER = re.compile(r"^member (\d+) of (\d+): (\S+)")
_EPOCH = re.compile(r"^epoch (\d+)/(\d+) \((\d+) s\)")
_COMPLETE = re.compile(r"is complete \((\d+) epochs\); nothing to do$")
_RESUMING = re.compile(r"^resuming .* after epoch (\d+)$")
_EARLY_STOP = re.compile(r"^early stop after epoch (\d+)")


class ProgressFileHandler(logging.Handler):
    """Appends each record as one line (control characters escaped) to the report's progress file."""

    def __init__(self, path: str | Path):
        super().__init__(logging.INFO)
        self.path = Path(path)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            with self.path.open("a", encoding="utf-8") as fh:  # one write per line: the reader never sees half
                fh.write(one_line(record.getMessage()) + "\n")
        except Exception:  # a full disk must not stop training; logging's own policy for a failed handler
            self.handleError(record)


def send_to_report() -> None:
    """Write the training loggers' records to ``$VOX_PROGRESS_FILE`` when the report command set it.

    Attached to each training logger itself (not to "voxlib", whose handlers ``cli.log_to`` replaces),
    at most once per logger however often a notebook's first cell runs.
    """
    path = os.environ.get(PROGRESS_FILE_ENV)
    if not path:
        return
    for name in TRAINING_LOGGERS:
        logger = logging.getLogger(name)
        logger.handlers[:] = [h for h in logger.handlers if not isinstance(h, ProgressFileHandler)]
        logger.addHandler(ProgressFileHandler(path))
        logger.setLevel(logging.INFO)


class TrainingProgress:
    """Turns the trainer's log lines into terminal lines; epoch lines get the training's position and an
    estimate of the time left.

    ``members`` trainings (folds x seeds) of ``epochs`` epochs each. An epoch's cost is the wall time
    between the first epoch line seen and the latest, per epoch trained in between: what each epoch really
    costs here (validation, checkpoints, each member's start-up); after the first epoch line, its own
    logged training time. Epochs a resumed or finished member did not need to train count as done without
    taking time; early stopping makes the estimate an upper bound.
    """

    def __init__(self, members: int, epochs: int, clock: Callable[[], float] = time.monotonic):
        self.members, self.epochs, self.clock = max(1, members), epochs, clock
        self.member, self.name = 1, ""
        self.done = 0  # epochs finished or skipped, over all members
        self.trained = 0  # epochs trained while this object watched
        self.first_epoch_at: float | None = None
        self.first_epoch_s = 0.0

    @property
    def total(self) -> int:
        return self.members * self.epochs

    def line(self, message: str) -> str:
        """The terminal line for one log line."""
        member = _MEMBER.match(message)
        if member:
            self.member, self.name = int(member.group(1)), member.group(3)
            self.done = max(self.done, (self.member - 1) * self.epochs)
            return message
        epoch = _EPOCH.match(message)
        if epoch:
            self.trained += 1
            if self.first_epoch_at is None:
                self.first_epoch_at, self.first_epoch_s = self.clock(), float(epoch.group(3))
            self.done = max(self.done, (self.member - 1) * self.epochs + int(epoch.group(1)))
            where = f"{self.name} " if self.name else ""
            return f"{where}{message}  [{self.done}/{self.total} epochs{self.time_left()}]"
        complete = _COMPLETE.search(message)
        if complete:
            self.done = max(self.done, self.member * self.epochs)
            return message
        resuming = _RESUMING.match(message)
        if resuming:
            self.done = max(self.done, (self.member - 1) * self.epochs + int(resuming.group(1)))
            return message
        if _EARLY_STOP.match(message):
            self.done = max(self.done, self.member * self.epochs)
        return message

    def time_left(self) -> str:
        left = self.total - self.done
        if not self.trained or not left:
            return ""
        per_epoch = (self.first_epoch_s if self.trained == 1 else
                     (self.clock() - self.first_epoch_at) / (self.trained - 1))
        return f", about {duration(per_epoch * left)} left"


def duration(seconds: float) -> str:
    """``40 s``, ``12 min``, ``2.5 h``: as precise as an estimate deserves."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def relay(fh, show: Callable[[str], None], progress: TrainingProgress, stop: threading.Event, poll_s: float) -> None:
    """Show each complete line appended to ``fh`` until ``stop`` is set, and then the lines written before it."""
    pending = ""
    while True:
        ending = stop.is_set()  # asked before reading: once the body has ended, this read sees all it wrote
        pending += fh.read()
        *lines, pending = pending.split("\n")
        for line in lines:
            show(progress.line(line))
        if ending:
            return
        stop.wait(poll_s)


@contextlib.contextmanager
def follow(path: str | Path, show: Callable[[str], None], progress: TrainingProgress,
           poll_s: float = POLL_S) -> Iterator[None]:
    """While the body runs, hand every complete line appended to ``path`` to ``progress`` and ``show`` the
    result; the lines written before the body ends are all shown before this returns."""
    path = Path(path)
    path.touch()
    start = path.stat().st_size  # only what is written from now on, however late the reader starts
    stop = threading.Event()

    def read() -> None:
        with path.open(encoding="utf-8") as fh:
            fh.seek(start)
            relay(fh, show, progress, stop, poll_s)

    reader = threading.Thread(target=read, name="vox-progress", daemon=True)
    reader.start()
    try:
        yield
    finally:
        stop.set()
        reader.join()
