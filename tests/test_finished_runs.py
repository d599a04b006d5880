"""A run is usable only when finished: every reader refuses one still being written or stopped before its end.

"Finished" is decided in one place (runfolder.unfinished_reason): no process holds the writer lock,
summary.json is there, and it describes the epochs metrics.csv holds. Each reader (predict's
Classifier and command line, runfolder.load_run, load_pooled, the model loader, the notebooks'
prepare) is tried on each kind of unfinished run, and each takes ``allow_unfinished`` to use the
latest checkpoint. A missing folder, a folder that is not a run, and an unfinished run read
differently.
"""
from __future__ import annotations

import fcntl
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest

from conftest import copy_run
from run_folder_factory import make_run_folder
from voxlib import index_page, lock, runfolder
from voxlib.config import Config, ConfigError
from voxlib.model import Discriminator, load_discriminator
from voxlib.notebook import prepare
from voxlib.predict import Classifier
from voxlib.runfolder import RunError, UnfinishedRunError

ROOT = Path(__file__).resolve().parent.parent


def readers(folder: Path, allow_unfinished: bool = False) -> dict:
    """Every way vox reads a run folder, each a call that raises or returns."""
    return {
        "Classifier.from_run": lambda: Classifier.from_run(folder, allow_unfinished=allow_unfinished),
        "Discriminator.from_run": lambda: Discriminator.from_run(folder, allow_unfinished=allow_unfinished),
        "runfolder.load_run": lambda: runfolder.load_run(folder, allow_unfinished=allow_unfinished),
        "notebook prepare": lambda: prepare(Config(run_dir=str(folder)), need="run", allow_unfinished=allow_unfinished),
    }


def refused_everywhere(folder: Path, because: str) -> None:
    for name, read in readers(folder).items():
        with pytest.raises((UnfinishedRunError, ConfigError), match=because) as caught:
            read()
        text = str(caught.value)
        assert "unfinished run" in text and "--allow-unfinished" in text and "\n" not in text, (name, text)


def predict_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "voxlib.predict", *args], capture_output=True, text=True,
                          timeout=300, cwd=ROOT)


def some_clip(run: Path) -> str:
    return pd.read_csv(run / runfolder.PREDICTIONS, keep_default_na=False)["path"].iloc[0]


# --- kinds of unfinished run ------------------------------------------------------------------------
def test_a_run_whose_writer_holds_the_lock_is_refused_until_it_lets_go(trained_run, tmp_path):
    run = copy_run(trained_run, tmp_path / "run")
    with runfolder.writing(run):  # this process is the writer now; readers use their own descriptors
        refused_everywhere(run, "being written by PID")
        proc = predict_cli("--run-dir", str(run), some_clip(run))
        assert proc.returncode == 1 and proc.stdout == ""
        assert proc.stderr.count("\n") == 1 and "unfinished run: it is being written by PID" in proc.stderr
        used = predict_cli("--run-dir", str(run), "--allow-unfinished", some_clip(run))
        assert used.returncode == 0, used.stderr
        assert "last.pt: using epoch 1 of an unfinished run" in used.stderr  # the latest checkpoint, said so
        clf = Classifier.from_run(run, allow_unfinished=True)
        assert clf.checkpoint["path"].endswith("last.pt")
    assert Classifier.from_run(run).checkpoint["path"].endswith("best.pt")  # finished again once released


def test_a_run_killed_before_its_summary_is_refused_naming_the_epoch(trained_run, tmp_path):
    run = copy_run(trained_run, tmp_path / "run")
    (run / runfolder.SUMMARY).unlink()
    refused_everywhere(run, r"no summary\.json: its training stopped after epoch 1 of 1")
    assert Classifier.from_run(run, allow_unfinished=True).checkpoint["epoch"] == 1
    assert len(runfolder.load_run(run, allow_unfinished=True).predictions)


def test_a_run_stopped_before_its_first_epoch_has_no_checkpoint_to_allow(trained_run, tmp_path):
    run = runfolder.claim(tmp_path / "run")
    for name in (runfolder.CONFIG, runfolder.LABELS, runfolder.SPLITS_FILE):
        (run / name).write_bytes((trained_run / name).read_bytes())
    refused_everywhere(run, "stopped before its first epoch was saved")
    with pytest.raises(Exception, match=r"last\.pt: no checkpoint yet"):
        Classifier.from_run(run, allow_unfinished=True)


def test_an_extension_that_stopped_half_way_is_refused_and_keeps_the_earlier_results(trained_run, tmp_path):
    """Epochs raised from 1 to 3, stopped after epoch 2 was saved: summary.json and predictions.csv still
    describe the 1-epoch run, while metrics and checkpoints have moved on."""
    run = copy_run(trained_run, tmp_path / "run")
    metrics = pd.read_csv(run / runfolder.METRICS)
    pd.concat([metrics, metrics.assign(epoch=2)]).to_csv(run / runfolder.METRICS, index=False)
    config = json.loads((run / runfolder.CONFIG).read_text())
    (run / runfolder.CONFIG).write_text(json.dumps({**config, "epochs": 3}))
    refused_everywhere(run, "an extension from 1 to 3 epochs stopped after epoch 2")
    assert json.loads((run / runfolder.SUMMARY).read_text())["epochs_trained"] == 1  # the earlier results, kept
    assert (run / runfolder.PREDICTIONS).read_bytes() == (trained_run / runfolder.PREDICTIONS).read_bytes()


def test_a_replaced_best_checkpoint_is_not_taken_for_the_runs_own(trained_run, tmp_path):
    run = copy_run(trained_run, tmp_path / "run")
    summary = json.loads((run / runfolder.SUMMARY).read_text())
    (run / runfolder.SUMMARY).write_text(json.dumps({**summary, "best_epoch": 7}))
    with pytest.raises(Exception, match=r"best\.pt holds epoch 1, but .*summary\.json says the run's best epoch is 7"):
        Classifier.from_run(run)


# --- not a run, not there ---------------------------------------------------------------------------
def test_missing_folders_files_and_foreign_folders_are_not_called_unfinished(trained_run, tmp_path):
    (tmp_path / "a file").write_text("x")
    (tmp_path / "empty").mkdir()
    cases = {tmp_path / "nowhere": "no such folder", tmp_path / "a file": "a file, not a run folder",
             tmp_path / "empty": r"not a vox run folder \(no config\.json\)"}
    for folder, message in cases.items():
        for name, read in readers(folder).items():
            with pytest.raises((RunError, ConfigError), match=message) as caught:
                read()
            assert "unfinished" not in str(caught.value), name
        proc = predict_cli("--run-dir", str(folder), some_clip(trained_run))
        assert proc.returncode == 1 and "unfinished" not in proc.stderr and proc.stderr.count("\n") == 1
    assert "train first" in str(pytest.raises(ConfigError, prepare, Config(run_dir=str(tmp_path / "nowhere")),
                                              need="run").value)


# --- pooled folders -----------------------------------------------------------------------------------
def pooled_folder(root: Path) -> Path:
    """A constructed, finished 2-fold pooled folder (factory members, no checkpoints)."""
    from voxlib import experiment

    cfg = Config(folds=2, epochs=10, run_dir=str(runfolder.claim(root)))
    plan = experiment.members(cfg)
    for name, member in plan:
        make_run_folder(root / name, seed=member.fold)
        for file in (runfolder.SPLITS_FILE, runfolder.PREDICTIONS):  # each fold holds out its own speakers
            path = root / name / file
            path.write_text(path.read_text().replace("_u4", f"_f{member.fold}u4"))
        (root / name / runfolder.MARKER).write_text("vox\n")
    runfolder.write_json(root, runfolder.EXPERIMENT, {"config": cfg.to_dict(), "members": [
        {"name": n, "fold": m.fold, "seed": m.seed} for n, m in plan]})
    experiment.pool(root, plan)
    return root


def test_a_pooled_folder_is_finished_only_with_every_member(tmp_path):
    root = pooled_folder(tmp_path / "pooled")
    assert runfolder.load_pooled(root).member(1).name == "fold1"
    with runfolder.writing(root / "fold1"):
        with pytest.raises(UnfinishedRunError, match="member fold1: it is being written by PID"):
            runfolder.load_pooled(root)
    (root / "fold1" / runfolder.SUMMARY).unlink()
    with pytest.raises(UnfinishedRunError, match=r"member fold1: it has no summary\.json"):
        runfolder.load_pooled(root)
    with pytest.raises(ConfigError, match="member fold1"):
        prepare(Config(run_dir=str(root)), need="run")
    assert runfolder.load_pooled(root, allow_unfinished=True).summary  # as asked, with a warning
    (root / runfolder.POOLED).unlink()
    with pytest.raises(UnfinishedRunError, match=r"not all trained and pooled \(no pooled\.json\)"):
        runfolder.load_pooled(root)


def test_a_pooled_extension_not_yet_finished_keeps_its_pooled_results(tmp_path):
    root = pooled_folder(tmp_path / "pooled")
    before = (root / runfolder.POOLED).read_bytes()
    record = json.loads((root / runfolder.EXPERIMENT).read_text())
    record["config"]["epochs"] = 12  # a re-run with --epochs 12 writes this first, then extends member by member
    (root / runfolder.EXPERIMENT).write_text(json.dumps(record))
    with pytest.raises(UnfinishedRunError, match=r"extension to 12 epochs per member is not finished \(fold0 has 10\)"):
        runfolder.load_pooled(root)
    assert (root / runfolder.POOLED).read_bytes() == before


# --- the real thing: a training process in mid-epoch, then killed ---------------------------------------
TRAINER = """
import sys, time
from pathlib import Path
from voxlib import record, runfolder, train as train_module
from voxlib.config import Config
saved = []
def pause(point, detail):
    if point == "write" and detail == runfolder.LAST:
        saved.append(detail)
        if len(saved) == 2:  # epoch 1 is checkpointed; epoch 2's metrics are written, its last.pt not yet
            Path(sys.argv[1]).write_text("paused")
            time.sleep(600)
record.FAULT_HOOKS.append(pause)
train_module.train(Config(width=1 / 16, batch_size=8, epochs=3, threads=1, grad_log_every=0, eval_crops=1,
                          precision="fp32", manifest=sys.argv[2], cache_dir=sys.argv[3], run_dir=sys.argv[4]))
"""


def test_predict_on_a_run_while_it_trains_and_after_it_is_killed(tiny_corpus, tmp_path):
    marker, run = tmp_path / "paused", tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    trainer = subprocess.Popen([sys.executable, "-c", TRAINER, str(marker), str(tiny_corpus), str(tmp_path / "cache"),
                                str(run)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 600
        while not marker.exists():
            assert trainer.poll() is None, trainer.stderr.read()
            assert time.monotonic() < deadline
            time.sleep(0.2)
        clip = str(next(tiny_corpus.parent.rglob("*.wav")))
        busy = predict_cli("--run-dir", str(run), clip)
        assert busy.returncode == 1 and f"being written by PID {trainer.pid}" in busy.stderr
        latest = predict_cli("--run-dir", str(run), "--allow-unfinished", clip)
        assert latest.returncode == 0 and "using epoch 1 of an unfinished run" in latest.stderr
        assert pd.read_csv(io.StringIO(latest.stdout))["problem"].isna().all()
    finally:
        trainer.send_signal(signal.SIGKILL)
        trainer.wait()
        trainer.stderr.close()
    killed = predict_cli("--run-dir", str(run), clip)
    assert killed.returncode == 1
    assert "no summary.json: its training stopped after epoch 2 of 3" in killed.stderr
    assert load_discriminator(run, allow_unfinished=True)[1]["epoch"] == 1


def test_the_reports_headline_says_the_run_is_unfinished(trained_run, tmp_path):
    run = copy_run(trained_run, tmp_path / "run")
    (run / runfolder.SUMMARY).unlink()
    page = index_page.headline_html(index_page.Report(run, run / "reports" / "index.html", []))
    assert "cannot read the run" in page and "unfinished run: it has no summary.json" in page


def test_a_reader_probing_the_lock_never_turns_a_writer_away(tmp_path, monkeypatch):
    """held() takes a shared lock for an instant; a writer arriving in that instant waits it out."""
    assert lock.PROBE_GRACE_S > 0
    folder = runfolder.claim(tmp_path / "run")
    (folder / runfolder.LOCK).touch()
    monkeypatch.setattr(lock, "PROBE_GRACE_S", 30.0)  # the rule under test, with room for a loaded machine
    entered = threading.Event()

    def write():
        with runfolder.writing(folder):
            entered.set()

    with open(folder / runfolder.LOCK) as probe:
        fcntl.flock(probe, fcntl.LOCK_SH)  # a reader in the middle of its probe
        writer = threading.Thread(target=write)
        writer.start()
        assert not entered.wait(0.3)  # the writer waits for the probe, it is not refused
        fcntl.flock(probe, fcntl.LOCK_UN)
    writer.join()
    assert entered.is_set()
    monkeypatch.setattr(lock, "PROBE_GRACE_S", 0.0)
    with open(folder / runfolder.LOCK) as probe:  # without the grace the same writer is turned away
        fcntl.flock(probe, fcntl.LOCK_SH)
        with pytest.raises(lock.LockedError):
            write()
