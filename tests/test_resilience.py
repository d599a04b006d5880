"""Training survives kill -9 (mid-epoch and mid-checkpoint) and a full disk, and then finishes with
exactly the weights and metrics of an uninterrupted run."""
from __future__ import annotations

import builtins
import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

import voxlib.checkpoint as checkpoint_module
import voxlib.train as train_module
from voxlib.checkpoint import load_checkpoint
from voxlib.config import Config
from voxlib.train import TrainingError, train

# 36 training utterances / batch 8 = 4 steps per epoch; two epochs
SETTINGS = dict(width=1 / 16, batch_size=8, lr=1e-4, epochs=2, threads=2, grad_log_every=2, eval_crops=1)


@pytest.fixture(scope="module")
def base(tiny_corpus, tmp_path_factory) -> dict:
    return dict(SETTINGS, manifest=str(tiny_corpus), cache_dir=str(tmp_path_factory.mktemp("cache")))


def command(base: dict, run: Path) -> list[str]:
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in base.items()]
    return [sys.executable, "-m", "voxlib.train", *flags, f"--run-dir={run}"]


def run_to_end(base: dict, run: Path) -> None:
    proc = subprocess.run(command(base, run), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.fixture(scope="module")
def reference(base, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("reference") / "run"
    run_to_end(base, run)
    return run


def kill_at(base: dict, run: Path, point: str, tmp_path: Path) -> None:
    """Start training, wait until it reaches ``point`` (a fault-injection pause), then SIGKILL it."""
    marker = tmp_path / f"paused-{point.replace(':', '-')}"
    env = {**os.environ, "VOX_FAULT_PAUSE": point, "VOX_FAULT_MARKER": str(marker)}
    proc = subprocess.Popen(command(base, run), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while not marker.exists():
        if proc.poll() is not None:
            pytest.fail(f"training ended before {point}: {proc.stderr.read().decode()[-2000:]}")
        assert time.monotonic() < deadline, f"training never reached {point}"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL


def assert_same_run(a: Path, b: Path) -> None:
    sa, sb = load_checkpoint(a / "checkpoints" / "last.pt"), load_checkpoint(b / "checkpoints" / "last.pt")
    assert sa["epoch"] == sb["epoch"] == SETTINGS["epochs"]
    for key, value in sa["model"].items():
        assert torch.equal(value, sb["model"][key]), key
    ma, mb = (pd.read_csv(r / "metrics.csv") for r in (a, b))
    ma, mb = (m[m["metric"] != "seconds"].reset_index(drop=True) for m in (ma, mb))  # wall time differs
    pd.testing.assert_frame_equal(ma, mb)
    assert (a / "predictions.csv").read_bytes() == (b / "predictions.csv").read_bytes()
    assert sorted(p.name for p in (b / "checkpoints").iterdir()) == ["best.pt", "last.pt"]


def test_kill_mid_epoch_and_mid_checkpoint_then_resume(base, reference, tmp_path):
    """One run killed twice, then finished by the same command (one chain keeps the test lean)."""
    run = tmp_path / "run"
    kill_at(base, run, "step:5", tmp_path)  # second batch of epoch 2
    assert load_checkpoint(run / "checkpoints" / "last.pt")["epoch"] == 1
    assert set(pd.read_csv(run / "metrics.csv")["epoch"]) == {1}

    kill_at(base, run, "save:2", tmp_path)  # resumed; epoch 2's checkpoint is in its temp file, not renamed
    leftovers = list((run / "checkpoints").glob(".last.pt.tmp*"))
    assert len(leftovers) == 1 and leftovers[0].stat().st_size > 0
    assert load_checkpoint(run / "checkpoints" / "last.pt")["epoch"] == 1  # the old one, intact
    assert set(pd.read_csv(run / "metrics.csv")["epoch"]) == {1, 2}  # epoch 2 logged, not checkpointed

    run_to_end(base, run)
    assert_same_run(reference, run)  # epoch-2 rows were dropped and redone, not duplicated


def failing_open(target: str, fail_on: int):
    """``open`` that runs out of disk space on the ``fail_on``-th write of a file named ``target``."""
    calls = {"n": 0}

    class Full:
        def __init__(self, fh):
            self.fh = fh

        def write(self, data):
            self.fh.write(data[: len(data) // 2])  # a partial write, then the disk is full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def __getattr__(self, name):
            return getattr(self.fh, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.fh.close()

    def fake_open(file, mode="r", *args, **kwargs):
        fh = builtins.open(file, mode, *args, **kwargs)
        if Path(file).name.startswith((target, f".{target}")) and ("w" in mode or "a" in mode):
            calls["n"] += 1
            if calls["n"] == fail_on:
                return Full(fh)
        return fh

    return fake_open


def test_disk_full_while_writing_a_checkpoint_keeps_the_previous_one(base, reference, tmp_path, monkeypatch):
    run = tmp_path / "run"
    cfg = Config(**base, run_dir=str(run))
    monkeypatch.setattr(checkpoint_module, "open", failing_open("last.pt", fail_on=2), raising=False)
    with pytest.raises(TrainingError) as err:
        train(cfg)
    message = str(err.value)
    assert "epoch 2" in message and str(run / "checkpoints" / "last.pt") in message
    assert "No space left on device" in message and "(epoch 1) is intact" in message
    assert load_checkpoint(run / "checkpoints" / "last.pt")["epoch"] == 1
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best.pt", "last.pt"]  # temp removed
    monkeypatch.undo()
    train(cfg)  # space freed: the same command resumes and matches the uninterrupted run
    assert_same_run(reference, run)


def test_disk_full_while_appending_metrics_names_the_file(base, tmp_path, monkeypatch):
    run = tmp_path / "run"
    monkeypatch.setattr(train_module, "open", failing_open("metrics.csv", fail_on=1), raising=False)
    with pytest.raises(TrainingError, match=r"could not append metrics to .*metrics\.csv: No space left"):
        train(Config(**base, run_dir=str(run)))
    assert not (run / "checkpoints" / "last.pt").exists()  # nothing claims an epoch that was not logged
