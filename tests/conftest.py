"""Shared fixtures: small generated corpora, so no test needs a real recording."""
from __future__ import annotations

import contextlib
import csv
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from voxlib.config import Config, usable_cores
from voxlib.train import train

BIRTHPLACES = ("north", "south", "east")


def pytest_configure(config):
    """Under pytest-xdist (``make test``: one worker per core) each worker gets its share of the cores.

    torch, MKL and OpenMP otherwise start one thread per core in every worker and in every command a
    test starts (trainings, notebook kernels, torchrun), and N workers on N cores would run N x N
    threads that mostly wait for each other. The environment reaches the commands; ``set_num_threads``
    covers torch and the BLAS libraries in the worker itself, which may have been loaded before this ran.
    """
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers <= 1:
        return
    threads = str(max(1, usable_cores() // workers))
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ.setdefault(name, threads)
    import torch  # heavy: imported here only when workers share the cores
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    threadpool_limits(int(os.environ["OMP_NUM_THREADS"]))  # numpy's and scikit-learn's BLAS, already loaded


def synth_clip(f0: float, tilt: float, seconds: float, sr: int, rng: np.random.Generator) -> np.ndarray:
    """A harmonic 'voice': pitch f0 carries the speaker, spectral tilt the birthplace."""
    t = np.arange(int(seconds * sr)) / sr
    vibrato = 1 + 0.01 * np.sin(2 * np.pi * 5 * t + rng.uniform(0, 6.28))
    phase = 2 * np.pi * np.cumsum(f0 * vibrato) / sr
    wave = sum(np.sin(k * phase) * k ** (-tilt) for k in range(1, 20))
    envelope = np.clip(np.sin(np.pi * t / seconds) * 3, 0, 1)
    wave = wave * envelope + rng.normal(0, 0.01, t.size)
    return (0.3 * wave / np.abs(wave).max()).astype(np.float32)


def make_tiny_corpus(
    root: Path,
    birthplaces: tuple[str, ...] = BIRTHPLACES,
    speakers_per_birthplace: int = 4,
    utterances: int = 6,
    seconds: float = 2.5,
    sr: int = 16000,
    seed: int = 0,
) -> Path:
    """Write wav clips and manifest.csv under root; return the manifest path.

    Speakers alternate female/male (f0 ~200 vs ~110 Hz); each birthplace has its own spectral tilt,
    so every head has something real to learn in a few epochs.
    """
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for b, birthplace in enumerate(birthplaces):
        for s in range(speakers_per_birthplace):
            speaker = f"{birthplace}{s}"
            sex = "female" if s % 2 == 0 else "male"
            f0 = (200 if sex == "female" else 110) * (1 + 0.08 * s)
            tilt = 0.6 + 0.7 * b
            (root / speaker).mkdir(exist_ok=True)
            for u in range(utterances):
                rel = f"{speaker}/{speaker}_{u:03d}.wav"
                clip = synth_clip(f0 * rng.uniform(0.97, 1.03), tilt, seconds * rng.uniform(0.8, 1.2), sr, rng)
                sf.write(root / rel, clip, sr)
                rows.append({"path": rel, "speaker": speaker, "birthplace": birthplace, "sex": sex})
    manifest = root / "manifest.csv"
    with manifest.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["path", "speaker", "birthplace", "sex"])
        writer.writeheader()
        writer.writerows(rows)
    return manifest


def speaker_table(sizes: dict[str, int], utterances: int = 6) -> "pd.DataFrame":
    """A manifest-like table without audio: ``sizes[place]`` speakers per birthplace, sexes alternating,
    ``utterances`` rows each, and the 1-based ``row`` column read_manifest adds (for split tests)."""
    import pandas as pd

    rows = [{"path": f"/c/{place}{s}_{u}.wav", "speaker": f"{place}{s}", "birthplace": place,
             "sex": "female" if s % 2 == 0 else "male", "split": ""}
            for place, n in sizes.items() for s in range(n) for u in range(utterances)]
    table = pd.DataFrame(rows)
    table["row"] = np.arange(1, len(table) + 1)
    return table


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> Path:
    """3 birthplaces x 4 speakers x 6 utterances of ~2.5 s; read-only for tests (copy to modify)."""
    return make_tiny_corpus(tmp_path_factory.mktemp("tiny_corpus"))


@pytest.fixture(autouse=True)
def _isolated_outputs(tmp_path, monkeypatch):
    """No test writes into the checkout's outputs/ folder."""
    monkeypatch.setenv("VOX_OUTPUTS", str(tmp_path / "outputs"))


# A small, finished run shared by the predict and run-folder tests (one training for the session).
TRAINED_SETTINGS = dict(width=1 / 16, batch_size=8, lr=1e-4, epochs=1, threads=2, grad_log_every=0, eval_crops=2)


@pytest.fixture(scope="session")
def trained_run(tiny_corpus, tmp_path_factory) -> Path:
    """A finished 1-epoch run on the tiny corpus; read-only for tests (copy it with ``copy_run`` to change it)."""
    return train(Config(**TRAINED_SETTINGS, manifest=str(tiny_corpus), cache_dir=str(tmp_path_factory.mktemp("cache")),
                        run_dir=str(tmp_path_factory.mktemp("runs") / "run")))


def copy_run(run: Path, to: Path) -> Path:
    """A copy of a run folder to damage or change (the lock file and its note are not copied)."""
    shutil.copytree(run, to, ignore=shutil.ignore_patterns(".vox-run.lock*"))
    return to


@contextlib.contextmanager
def hooked(hooks: list, hook):
    """``hook`` in one of vox's test hook lists (record.FAULT_HOOKS, fileio.BEFORE_REPLACE_HOOKS) for
    the block, removed afterwards whatever the block raised."""
    hooks.append(hook)
    try:
        yield
    finally:
        hooks.remove(hook)


class LogLines(logging.Handler):
    """vox's log lines during a ``with`` block, as text (the 'voxlib' logger may not propagate to caplog)."""

    def __init__(self):
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())

    def __enter__(self) -> list[str]:
        logger = logging.getLogger("voxlib")
        self.level = logger.level
        logger.setLevel(logging.INFO)
        logger.addHandler(self)
        return self.lines

    def __exit__(self, *exc):
        logger = logging.getLogger("voxlib")
        logger.removeHandler(self)
        logger.setLevel(self.level)
