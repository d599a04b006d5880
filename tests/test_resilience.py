"""Training survives a kill or a failure at every write of an epoch, and then finishes with exactly
the weights, checkpoints and outputs of an uninterrupted run."""
from __future__ import annotations

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

from conftest import hooked
import voxlib.fileio as fileio
import voxlib.record as record
from voxlib.checkpoint import load_checkpoint
from voxlib.config import Config
from voxlib.record import TrainingError
from voxlib.train import train

# 36 training utterances / batch 8 = 4 steps per epoch; two epochs
SETTINGS = dict(width=1 / 16, batch_size=8, lr=1e-4, epochs=2, threads=2, grad_log_every=2, eval_crops=1)
RUNNER = Path(__file__).with_name("fault_runner.py")
# every file an epoch or the end of a run writes, in the order training writes them
WRITES = ("metrics.csv", "tb", "best.pt", "last.pt", "predictions.csv", "embeddings.npz", "summary.json")


@pytest.fixture(scope="module")
def base(tiny_corpus, tmp_path_factory) -> dict:
    return dict(SETTINGS, manifest=str(tiny_corpus), cache_dir=str(tmp_path_factory.mktemp("cache")))


def flags(base: dict, run: Path) -> list[str]:
    return [f"--{k.replace('_', '-')}={v}" for k, v in base.items()] + [f"--run-dir={run}"]


def run_to_end(base: dict, run: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "voxlib.train", *flags(base, run)], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.fixture(scope="module")
def reference(base, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("reference") / "run"
    run_to_end(base, run)
    return run


def kill_at(base: dict, run: Path, point: str, tmp_path: Path) -> None:
    """Start training, wait until it reaches ``point`` (a pause the runner installs), then SIGKILL it."""
    marker = tmp_path / f"paused-{point.replace(':', '-')}"
    proc = subprocess.Popen([sys.executable, str(RUNNER), point, str(marker), "--", *flags(base, run)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
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
    for name in ("last.pt", "best.pt"):
        sa, sb = (load_checkpoint(r / "checkpoints" / name) for r in (a, b))
        assert sa["epoch"] == sb["epoch"], name
        for key, value in sa["model"].items():
            assert torch.equal(value, sb["model"][key]), (name, key)
    assert load_checkpoint(b / "checkpoints" / "last.pt")["epoch"] == SETTINGS["epochs"]
    ma, mb = (pd.read_csv(r / "metrics.csv") for r in (a, b))
    ma, mb = (m[m["metric"] != "seconds"].reset_index(drop=True) for m in (ma, mb))  # wall time differs
    pd.testing.assert_frame_equal(ma, mb)
    for name in ("predictions.csv", "embeddings.npz"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert (b / "summary.json").is_file()
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


class SimulatedKill(BaseException):
    """Raised at a write point: nothing in vox catches it, so no cleanup runs, as under kill -9."""


def write_counts(base: dict, tmp_path: Path) -> dict[str, int]:
    """How often a clean run passes each write point (the fault goes to the last one: the end state)."""
    counts: dict[str, int] = {}

    def count(point, detail):
        if point == "write":
            counts[detail] = counts.get(detail, 0) + 1

    with hooked(record.FAULT_HOOKS, count):
        train(Config(**base, run_dir=str(tmp_path / "counting")))
    return counts


@pytest.fixture(scope="module")
def counts(base, tmp_path_factory) -> dict[str, int]:
    return write_counts(base, tmp_path_factory.mktemp("counts"))


@pytest.mark.parametrize("how", ["disk full", "kill"])
@pytest.mark.parametrize("target", WRITES)
def test_a_failure_at_any_write_resumes_to_the_uninterrupted_run(base, reference, counts, tmp_path, target, how):
    """Fail the last write of each file in turn (inside the atomic write, after its temp file is on disk,
    or just before a TensorBoard flush), then re-run the same command: every file ends identical."""
    assert set(counts) == set(WRITES)
    run = tmp_path / "run"
    seen = {"n": 0}

    def fail() -> None:
        seen["n"] += 1
        if seen["n"] == counts[target]:
            if how == "kill":
                raise SimulatedKill(target)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def at_point(point, detail):
        if point == "write" and detail == target and target == "tb":
            fail()

    def at_replace(path: Path, tmp: Path):
        if path.name == target:
            fail()

    with hooked(record.FAULT_HOOKS, at_point), hooked(fileio.BEFORE_REPLACE_HOOKS, at_replace), \
            pytest.raises(SimulatedKill if how == "kill" else TrainingError) as err:
        train(Config(**base, run_dir=str(run)))
    if how == "disk full" and target != "tb":
        assert target in str(err.value) and "No space left on device" in str(err.value)
        assert not list(run.rglob(f".{target}.tmp*"))  # a failed write leaves no temp file
    train(Config(**base, run_dir=str(run)))
    assert_same_run(reference, run)


def test_disk_full_names_the_file_and_the_intact_checkpoint(base, tmp_path):
    run = tmp_path / "run"

    def full(path: Path, tmp: Path):
        if path.name == "last.pt" and load_checkpoint(tmp)["epoch"] == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with hooked(fileio.BEFORE_REPLACE_HOOKS, full), pytest.raises(TrainingError) as err:
        train(Config(**base, run_dir=str(run)))
    message = str(err.value)
    assert "epoch 2" in message and str(run / "checkpoints" / "last.pt") in message
    assert "No space left on device" in message and "(epoch 1) is intact" in message
    assert load_checkpoint(run / "checkpoints" / "last.pt")["epoch"] == 1
