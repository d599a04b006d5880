"""'Complete' means the run-folder contract holds: every file it lists is present and loads.

Training says "complete; nothing to do" only then (runfolder.is_complete, called by train.py). A
file training writes again from its checkpoints (predictions, embeddings, summary, labels, config,
splits) that is missing or damaged is written again, identical to the original; a best.pt lost at
the last epoch is restored from last.pt; metrics.csv or a checkpoint that cannot be rebuilt is
refused, naming the file. The fold runner never pools an incomplete member (test_experiment.py
tries that on a real experiment).
"""
from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import LogLines, copy_run
from run_folder_factory import make_run_folder
from voxlib import experiment, runfolder
from voxlib.checkpoint import CheckpointError, load_checkpoint
from voxlib.config import Config
from voxlib.predict import Classifier
from voxlib.runfolder import RunError
from voxlib.train import train

REWRITTEN = (runfolder.PREDICTIONS, runfolder.EMBEDDINGS, runfolder.SUMMARY, runfolder.LABELS, runfolder.SPLITS_FILE,
             runfolder.CONFIG)


def replay(run: Path, trained: Path) -> Config:
    """The command that trained ``trained``, pointed at its copy ``run``."""
    return Config.from_json(trained / runfolder.CONFIG).replace(run_dir=str(run))


def damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "delete":
        path.unlink()
    elif how == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif how == "random":
        path.write_bytes(np.random.default_rng(0).bytes(max(len(data), 64)))
    elif how == "text":
        path.write_text("not what it should be\n")
    else:
        raise ValueError(how)


@pytest.mark.parametrize("name,how", [(runfolder.PREDICTIONS, "delete"), (runfolder.EMBEDDINGS, "truncate"),
                                      (runfolder.LABELS, "text"), (runfolder.SUMMARY, "random"),
                                      (runfolder.SPLITS_FILE, "delete"), (runfolder.CONFIG, "truncate")])
def test_a_damaged_output_is_written_again_identical(trained_run, tmp_path, name, how):
    run = copy_run(trained_run, tmp_path / "run")
    damage(run / name, how)
    assert name in runfolder.contract_problems(run)
    with LogLines() as lines:
        train(replay(run, trained_run))
    assert any(str(run / name) in line and "written again" in line for line in lines), lines
    assert runfolder.contract_problems(run) == {}
    for file in REWRITTEN:
        if file == runfolder.CONFIG:  # the record of this launch: the same settings, its own git commit
            assert Config.from_json(run / file) == Config.from_json(trained_run / file).replace(run_dir=str(run))
        elif file != runfolder.EMBEDDINGS:
            assert (run / file).read_bytes() == (trained_run / file).read_bytes(), file
    with np.load(run / runfolder.EMBEDDINGS) as new, np.load(trained_run / runfolder.EMBEDDINGS) as old:
        assert all(np.array_equal(new[k], old[k]) for k in ("features", "row", "split"))


def test_a_lost_best_checkpoint_at_the_last_epoch_is_restored_from_last(trained_run, tmp_path):
    run = copy_run(trained_run, tmp_path / "run")
    (run / "checkpoints" / "best.pt").unlink()
    with pytest.raises(CheckpointError, match="best.pt: checkpoint missing from the finished run"):
        Classifier.from_run(run)
    with LogLines() as lines:
        train(replay(run, trained_run))
    assert any("its best epoch is the last one, so it is restored from last.pt" in line for line in lines)
    restored, original = load_checkpoint(run / "checkpoints" / "best.pt"), load_checkpoint(trained_run / "checkpoints" / "best.pt")
    assert restored["epoch"] == original["epoch"] == 1
    assert all(torch.equal(restored["model"][k], original["model"][k]) for k in original["model"])
    clip = pd.read_csv(run / runfolder.PREDICTIONS)["path"].iloc[0]
    assert Classifier.from_run(run).predict([clip])["problem"].tolist() == [""]


@pytest.mark.parametrize("name,how,message", [
    ("metrics.csv", "delete", r"metrics\.csv: missing; it cannot be rebuilt without training again"),
    ("metrics.csv", "text", r"metrics\.csv: missing column"),
    ("checkpoints/best.pt", "random", r"best\.pt: damaged \(not a PyTorch checkpoint"),
    ("checkpoints/best.pt", "truncate", r"best\.pt: damaged \(truncated or corrupt zip archive"),
])
def test_what_cannot_be_rebuilt_is_refused_naming_the_file(trained_run, tmp_path, name, how, message):
    """best.pt is refused here as if the best epoch were an earlier one (then last.pt is not its twin)."""
    run = copy_run(trained_run, tmp_path / "run")
    damage(run / name, how)
    with pytest.raises(RunError, match=message) as caught:
        runfolder.is_complete(run, epochs=1, trained=1, best_epoch=0)
    assert "move" in str(caught.value) and str(run) in str(caught.value)
    if name == "metrics.csv":  # through training too: nothing is rewritten before the refusal
        def files():
            return {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file() and ".lock" not in p.name}

        before = files()
        with pytest.raises(RunError, match=message):
            train(replay(run, trained_run))
        assert files() == before


def test_a_damaged_last_checkpoint_stops_training_naming_it_as_damaged(trained_run, tmp_path):
    run = copy_run(trained_run, tmp_path / "run")
    damage(run / "checkpoints" / "last.pt", "truncate")
    with pytest.raises(CheckpointError, match=r"last\.pt: damaged \(truncated") as caught:
        train(replay(run, trained_run))
    assert "pickle" not in str(caught.value) and "weights_only" not in str(caught.value)


def test_a_lost_last_checkpoint_trains_the_run_again_to_the_same_result(trained_run, tmp_path):
    run = copy_run(trained_run, tmp_path / "run")
    (run / "checkpoints" / "last.pt").unlink()
    train(replay(run, trained_run))
    assert runfolder.contract_problems(run) == {}
    assert (run / runfolder.PREDICTIONS).read_bytes() == (trained_run / runfolder.PREDICTIONS).read_bytes()


def test_the_contract_check_names_each_broken_file(tmp_path):
    run = make_run_folder(tmp_path / "run")  # no checkpoints: a factory folder is not a training's
    problems = runfolder.contract_problems(run)
    assert problems == {"checkpoints/best.pt": "missing", "checkpoints/last.pt": "missing"}
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "best.pt").write_bytes(b"")
    with zipfile.ZipFile(run / "checkpoints" / "last.pt", "w") as archive:
        archive.writestr("x/other.txt", "a zip, but not a checkpoint")
    (run / runfolder.PREDICTIONS).write_text("row,path\n1,a.wav\n")
    problems = runfolder.contract_problems(run)
    assert problems["checkpoints/best.pt"] == "damaged (empty file, 0 bytes)"
    assert "without the data.pkl" in problems["checkpoints/last.pt"]
    assert problems[runfolder.PREDICTIONS].startswith("missing column")


def test_pooled_files_are_never_written_from_an_incomplete_member(tmp_path):
    root = runfolder.claim(tmp_path / "pooled")
    plan = experiment.members(Config(folds=2, run_dir=str(root)))
    for name, _ in plan:
        make_run_folder(root / name)
    with pytest.raises(RunError, match=r"fold0/checkpoints/best\.pt: missing; the pooled files are not written"):
        experiment.refuse_incomplete_members(root, plan)
    assert not any((root / f).exists() for f in (runfolder.POOLED, runfolder.POOLED_PREDICTIONS, runfolder.MEMBER_SCORES))
    assert os.listdir(root) and "pooled.json" not in os.listdir(root)
