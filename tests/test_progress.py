"""Training progress on the report command's terminal: the training loggers' lines reach a file the command
follows, and each epoch line gets the training's position and an estimate of the time left."""
from __future__ import annotations

import io
import logging

import pytest

from voxlib.cli import log_to
from voxlib.progress import (
    relay,
    PROGRESS_FILE_ENV,
    ProgressFileHandler,
    TrainingProgress,
    duration,
    follow,
    send_to_report,
)
from voxlib.report import Terminal


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_each_epoch_line_says_where_training_stands_and_how_long_is_left():
    """3 folds x 4 epochs; fold1 was finished before, fold2 resumes after epoch 1. After the first epoch the
    estimate is its logged time (18 s) per epoch left; then the wall time per epoch trained since (20 s)."""
    clock = Clock()
    progress = TrainingProgress(members=3, epochs=4, clock=clock)
    assert progress.line("member 1 of 3: fold0 (fold 1 of 3, seed 0)") == "member 1 of 3: fold0 (fold 1 of 3, seed 0)"
    clock.now += 20
    assert progress.line("epoch 1/4 (18 s): train loss 5.123; seen_val accuracy: birthplace 12.5%") == (
        "fold0 epoch 1/4 (18 s): train loss 5.123; seen_val accuracy: birthplace 12.5%  "
        "[1/12 epochs, about 3 min left]")  # 11 epochs x 18 s
    for epoch in (2, 3, 4):
        clock.now += 20
        line = progress.line(f"epoch {epoch}/4 (18 s): train loss 4.0; seen_val accuracy: birthplace 25.0%")
    assert line.endswith("[4/12 epochs, about 3 min left]")  # 8 x 20 s = 160 s
    progress.line("member 2 of 3: fold1 (fold 2 of 3, seed 0)")
    assert progress.line("/runs/x/fold1 is complete (4 epochs); nothing to do").endswith("nothing to do")
    progress.line("member 3 of 3: fold2 (fold 3 of 3, seed 0)")
    progress.line("resuming /runs/x/fold2 after epoch 1")
    clock.now += 20
    line = progress.line("epoch 2/4 (18 s): train loss 3.0; seen_val accuracy: birthplace 37.5%")
    assert line.startswith("fold2 epoch 2/4") and line.endswith("[10/12 epochs, about 40 s left]")  # 2 x 20 s
    clock.now += 20
    progress.line("epoch 3/4 (18 s): train loss 3.0; seen_val accuracy: birthplace 37.5%")
    assert progress.line("early stop after epoch 3: seen_val:acc has not improved for 2 epochs").startswith("early")
    assert progress.done == progress.total == 12 and progress.time_left() == ""


def test_a_single_run_has_no_member_lines():
    clock = Clock()
    progress = TrainingProgress(members=1, epochs=2, clock=clock)
    assert progress.line("building feature cache abc for demo (288 clips)") == "building feature cache abc for demo (288 clips)"
    clock.now += 80
    assert progress.line("epoch 1/2 (70 s): train loss 1.0; seen_val accuracy: sex 50.0%").endswith(
        "[1/2 epochs, about 70 s left]")


@pytest.mark.parametrize("seconds, text", [(40, "40 s"), (89.6, "90 s"), (600, "10 min"), (5400, "1.5 h")])
def test_durations_are_as_precise_as_an_estimate_deserves(seconds, text):
    assert duration(seconds) == text


def test_training_log_lines_reach_the_followed_file_even_after_log_to(tmp_path, monkeypatch):
    """notebook.prepare calls send_to_report; notebook 02 then calls cli.log_to, which replaces the handlers
    of the 'voxlib' logger: the progress handlers sit on the training loggers themselves and stay."""
    path = tmp_path / "progress.log"
    monkeypatch.setenv(PROGRESS_FILE_ENV, str(path))
    saved = {name: (logging.getLogger(name).handlers[:], logging.getLogger(name).level)
             for name in ("voxlib", "voxlib.train", "voxlib.features", "voxlib.data", "voxlib.precision")}
    shown: list[str] = []
    try:
        send_to_report()
        send_to_report()  # a re-run first cell: still one handler per logger
        assert sum(isinstance(h, ProgressFileHandler) for h in logging.getLogger("voxlib.train").handlers) == 1
        notebook_output = io.StringIO()
        log_to(notebook_output)
        with follow(path, shown.append, TrainingProgress(members=2, epochs=1), poll_s=0.01):
            logging.getLogger("voxlib.train").info("member %d of %d: %s (fold 1 of 2, seed 0)", 1, 2, "fold0")
            logging.getLogger("voxlib.features").info("built feature cache %s", "/cache/\nkey")
            logging.getLogger("voxlib.train").info("%s", "epoch 1/1 (3 s): train loss 1.000; seen_val accuracy: x 1.0%")
    finally:
        for name, (handlers, level) in saved.items():
            logging.getLogger(name).handlers[:] = handlers
            logging.getLogger(name).setLevel(level)
    assert shown[0] == "member 1 of 2: fold0 (fold 1 of 2, seed 0)"
    assert shown[1] == "built feature cache /cache/\\nkey"  # one line per record, control characters escaped
    assert shown[2].startswith("fold0 epoch 1/1 (3 s)") and "[1/2 epochs, about" in shown[2]
    assert "epoch 1/1 (3 s)" in notebook_output.getvalue()  # the notebook's own output is unchanged


def test_lines_written_as_the_body_ends_are_shown(tmp_path):
    """The reader may be between its read and its look at the stop flag when the body writes its last
    lines and ends: those lines are still shown (they were lost when the flag was looked at last)."""
    path = tmp_path / "progress.log"
    path.write_text("")

    class EndsWhileReading:  # the body writes and ends between the reader's steps
        def is_set(self):
            with path.open("a") as fh:
                fh.write("epoch 1/1 (3 s): train loss 1.000; seen_val accuracy: x 1.0%\n")
            return True

        def wait(self, seconds):
            raise AssertionError("the reader waited after the body had ended")

    shown: list[str] = []
    with path.open() as fh:
        relay(fh, shown.append, TrainingProgress(members=1, epochs=1), EndsWhileReading(), poll_s=60)
    assert shown == ["epoch 1/1 (3 s): train loss 1.000; seen_val accuracy: x 1.0%  [1/1 epochs]"]


def test_without_the_report_command_nothing_is_attached(monkeypatch):
    monkeypatch.delenv(PROGRESS_FILE_ENV, raising=False)
    before = logging.getLogger("voxlib.train").handlers[:]
    send_to_report()
    assert logging.getLogger("voxlib.train").handlers == before


def test_the_terminal_keeps_one_line_per_notebook_with_training_lines_below():
    out = io.StringIO()
    terminal = Terminal(out)
    terminal.start("01_explore")
    terminal.end("ok in 49.0 s")
    terminal.start("02_train")
    terminal.detail("member 1 of 3: fold0 (fold 1 of 3, seed 0)")
    terminal.detail("fold0 epoch 1/8 (41 s): train loss 5.1  [1/24 epochs, about 16 min left]")
    terminal.end("ok in 668.0 s")
    assert out.getvalue().splitlines() == [
        "01_explore ... ok in 49.0 s", "02_train ...", "  member 1 of 3: fold0 (fold 1 of 3, seed 0)",
        "  fold0 epoch 1/8 (41 s): train loss 5.1  [1/24 epochs, about 16 min left]", "02_train ok in 668.0 s"]
    silent = Terminal(None)
    silent.start("x")
    silent.detail("y")
    silent.end("z")  # prints nothing, raises nothing
