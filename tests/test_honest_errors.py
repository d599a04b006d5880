"""Messages that say what happened: damaged checkpoints, errors in loader workers, extended runs.

- A checkpoint that is not one (random bytes, text, empty, truncated, a member failing its CRC, a
  zip without torch's data.pkl, a pickle stream torch cannot parse, a non-dict) is called damaged,
  by the loader, by predict's API and by its command line; never "pickled Python objects", never a
  hint to load with weights_only=False. A file naming Python code is still refused as such.
- An error raised in a DataLoader worker reaches the user as its own sentence and exit status, not
  torch's "Caught X in DataLoader worker process 0" wrapper (cli.describe_error unwraps it).
- A re-run that raises ``epochs`` of a finished run says what it extends and keeps the earlier
  results (summary.json, predictions.csv) until the new ones are written.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

import voxlib.record as record
from conftest import LogLines, copy_run, hooked
from voxlib import runfolder
from voxlib.checkpoint import CheckpointError, load_checkpoint
from voxlib.cli import describe_error
from voxlib.config import Config, ConfigError
from voxlib.corpora.manifest import ManifestError
from voxlib.data import CropDataset, load_run_data
from voxlib.features import FeatureCacheError
from voxlib.predict import Classifier
from voxlib.train import train

ROOT = Path(__file__).resolve().parent.parent


# --- damaged checkpoints ------------------------------------------------------------------------------
def rezip(source: Path, target: Path, change) -> None:
    """Copy a checkpoint's zip archive member by member, ``change(name, data) -> data``."""
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(target, "w", zipfile.ZIP_STORED) as new:
        for item in old.infolist():
            new.writestr(item, change(item.filename, old.read(item.filename)))


def flip_inside_member(source: Path, target: Path) -> None:
    """One byte of the stored data.pkl changed in place: the archive's CRC no longer matches."""
    data = bytearray(source.read_bytes())
    with zipfile.ZipFile(source) as archive:
        info = next(i for i in archive.infolist() if i.filename.endswith("data.pkl"))
    local = info.header_offset  # the local header's own name and extra-field lengths (torch pads the extra field)
    start = local + 30 + int.from_bytes(data[local + 26: local + 28], "little") + \
        int.from_bytes(data[local + 28: local + 30], "little")
    data[start + 5] ^= 0xFF
    target.write_bytes(bytes(data))


DAMAGE = {
    "random bytes": (lambda src, dst: dst.write_bytes(np.random.default_rng(1).bytes(4096)),
                     r"damaged \(not a PyTorch checkpoint: 4096 bytes starting"),
    "text": (lambda src, dst: dst.write_text("epoch,loss\n1,0.5\n"), r"damaged \(not a PyTorch checkpoint"),
    "empty": (lambda src, dst: dst.write_bytes(b""), r"damaged \(empty file, 0 bytes\)"),
    "half": (lambda src, dst: dst.write_bytes(src.read_bytes()[: src.stat().st_size // 2]),
             r"damaged \(truncated or corrupt zip archive"),
    "last bytes cut": (lambda src, dst: dst.write_bytes(src.read_bytes()[:-20]),
                       r"damaged \(truncated or corrupt zip archive"),
    "crc": (flip_inside_member, r"damaged \(member .*data\.pkl fails its CRC check\)"),
    "no data.pkl": (lambda src, dst: _drop_pickle(src, dst), r"damaged \(a zip archive without the data\.pkl"),
    "garbage pickle": (lambda src, dst: rezip(src, dst, lambda n, d: b"\xff\xfe garbage" if n.endswith("data.pkl") else d),
                       r"damaged \(its contents cannot be read as a checkpoint: Unsupported operand"),
    "not a dict": (lambda src, dst: torch.save([torch.ones(2)], dst), r"damaged \(holds a list"),
}


def _drop_pickle(source: Path, target: Path) -> None:
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(target, "w") as new:
        for item in old.infolist():
            if not item.filename.endswith("data.pkl"):
                new.writestr(item, old.read(item.filename))


@pytest.mark.parametrize("how", list(DAMAGE))
def test_a_damaged_checkpoint_is_called_damaged_everywhere(trained_run, tmp_path, how):
    make, message = DAMAGE[how]
    run = copy_run(trained_run, tmp_path / "run")
    best = run / "checkpoints" / "best.pt"
    make(trained_run / "checkpoints" / "best.pt", best)
    for call in (lambda: load_checkpoint(best), lambda: Classifier.from_run(run)):
        with pytest.raises(CheckpointError, match=message) as caught:
            call()
        text = str(caught.value)
        assert str(best) in text and "pickled" not in text and "weights_only" not in text, text
    status, line = describe_error(caught.value)
    assert status == 1 and line.startswith("error: ") and "\n" not in line


def test_the_command_line_says_damaged_in_one_line(trained_run, tmp_path):
    run = copy_run(trained_run, tmp_path / "run")
    (run / "checkpoints" / "best.pt").write_bytes(os.urandom(2048))
    clip = pd.read_csv(run / runfolder.PREDICTIONS)["path"].iloc[0]
    proc = subprocess.run([sys.executable, "-m", "voxlib.predict", "--run-dir", str(run), clip], capture_output=True,
                          text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "best.pt: damaged (not a PyTorch checkpoint" in proc.stderr
    assert "weights_only" not in proc.stderr and "pickled" not in proc.stderr


class Payload:
    def __reduce__(self):
        return (os.makedirs, ("/tmp/vox-honest-payload-ran",))


class Mine:
    pass


@pytest.mark.parametrize("payload,named", [(Payload(), "os.makedirs"), (Mine(), "test_honest_errors.Mine")])
def test_a_checkpoint_naming_python_code_is_still_refused_as_such(tmp_path, payload, named):
    path = tmp_path / "code.pt"
    torch.save({"epoch": 1, "model": payload}, path)
    with pytest.raises(CheckpointError, match=f"refusing to load .*code.pt: it contains pickled Python objects "
                                              f"\\({named}\\)") as caught:
        load_checkpoint(path)
    assert "weights_only" not in str(caught.value) and not Path("/tmp/vox-honest-payload-ran").exists()


# --- errors raised in loader workers ----------------------------------------------------------------
class Failing(Dataset):
    def __init__(self, error: BaseException):
        self.error = error

    def __len__(self):
        return 2

    def __getitem__(self, i):
        raise self.error


class TwoArguments(Exception):
    def __init__(self, a, b):
        super().__init__(f"{a} and {b}")


@pytest.mark.parametrize("error,status,line", [
    (FeatureCacheError("feature cache /c/k: row 3 (manifest row 4) does not match the checksum"), 1,
     "error: feature cache /c/k: row 3 (manifest row 4) does not match the checksum"),
    (ConfigError("parameter 'n_fft': too small"), 2, "error: parameter 'n_fft': too small"),
    (ManifestError("m.csv", [(3, "a.wav", "missing file"), (9, "b.wav", "empty file")]), 1,  # not rebuilt by torch
     "error: m.csv: 2 problems\nrow 3 (a.wav): missing file\nrow 9 (b.wav): empty file"),
    (PermissionError(13, "Permission denied", "/data/a.wav"), 1, "error: permission denied: /data/a.wav"),
    (FileNotFoundError(2, "No such file or directory", "/data/it's gone.wav"), 1,
     "error: no such file or folder: /data/it's gone.wav"),
    (OSError(28, "No space left on device", "/cache/features.f16"), 1, "error: no space left on device: /cache/features.f16"),
])
def test_an_error_in_a_loader_worker_keeps_its_own_sentence_and_status(error, status, line):
    with pytest.raises(BaseException) as caught:
        for _ in DataLoader(Failing(error), num_workers=1):
            pass
    assert "Caught" in str(caught.value)  # torch's wrapper, which the user must not see
    assert describe_error(caught.value) == describe_error(error) == (status, line)


@pytest.mark.parametrize("error", [ZeroDivisionError("division by zero"), TwoArguments(1, 2),
                                   OSError(28, "No space left on device")])
def test_a_bug_in_a_loader_worker_keeps_its_traceback_as_it_would_in_the_main_process(error):
    with pytest.raises(BaseException) as caught:
        for _ in DataLoader(Failing(error), num_workers=1):
            pass
    assert describe_error(caught.value) is None and describe_error(error) is None


def damage_every_row(cache_dir: Path) -> None:
    """One byte changed in every row's frames: the row checksums fail on first read, in whichever process."""
    index = pd.read_csv(cache_dir / "index.csv")
    with open(cache_dir / "features.f16", "r+b") as fh:
        for offset in index["offset"]:
            fh.seek(int(offset) * 512 + 7)
            byte = fh.read(1)
            fh.seek(int(offset) * 512 + 7)
            fh.write(bytes([byte[0] ^ 0x55]))


def test_a_damaged_cache_read_in_a_worker_stops_training_with_its_own_line(trained_run, tiny_corpus, tmp_path):
    config = json.loads((trained_run / runfolder.CONFIG).read_text())
    cache = tmp_path / "cache"
    shutil.copytree(Path(config["cache_dir"]) / config["cache_key"], cache / config["cache_key"])
    damage_every_row(cache / config["cache_key"])
    data = load_run_data(Config(manifest=str(tiny_corpus), cache_dir=str(cache)), progress=False)
    rows = data.rows("train")
    with pytest.raises(FeatureCacheError) as caught:  # the loader of training, its worker reading the rows
        for _ in DataLoader(CropDataset(data.cache, rows, data.targets, 256, train=True, seed=0), num_workers=1):
            pass
    assert str(caught.value).startswith("Caught FeatureCacheError in DataLoader worker process 0")
    proc = subprocess.run([sys.executable, "-m", "voxlib.train", "--manifest", str(tiny_corpus), "--cache-dir",
                           str(cache), "--run-dir", str(tmp_path / "run"), "--num-workers", "1", "--width", "0.0625",
                           "--epochs", "1", "--batch-size", "8", "--precision", "fp32", "--threads", "1"],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 1, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: feature cache {cache / config['cache_key']}: row ") and "does not match" in last
    assert "Caught" not in proc.stderr and "Traceback" not in proc.stderr


# --- an extended run says so and keeps its results until the new ones are written ---------------------
def test_raising_epochs_says_what_it_extends_and_keeps_the_earlier_results(trained_run, tmp_path):
    run = copy_run(trained_run, tmp_path / "run")
    cfg = Config.from_json(run / runfolder.CONFIG).replace(run_dir=str(run), epochs=2)
    kept = {name: (run / name).read_bytes() for name in (runfolder.SUMMARY, runfolder.PREDICTIONS, runfolder.EMBEDDINGS)}
    seen = {}

    def stop_before_outputs(point, detail):
        if (point, detail) == ("write", runfolder.PREDICTIONS):  # epoch 2 is trained and checkpointed
            seen["unchanged"] = all((run / n).read_bytes() == b for n, b in kept.items())
            with pytest.raises(runfolder.UnfinishedRunError, match="it is being written by PID"):
                runfolder.load_run(run)
            raise KeyboardInterrupt("stopped before the new predictions")

    with hooked(record.FAULT_HOOKS, stop_before_outputs), LogLines() as lines, pytest.raises(KeyboardInterrupt):
        train(cfg)
    assert seen == {"unchanged": True}
    assert f"extending finished run {run} from 1 to 2 epochs (it trained 1); its 1-epoch results stay in place " \
           f"until the new ones are written" in lines
    assert all((run / n).read_bytes() == b for n, b in kept.items())  # the earlier results survive the stop
    with pytest.raises(runfolder.UnfinishedRunError, match="an extension from 1 to 2 epochs stopped after epoch 2"):
        Classifier.from_run(run)
    train(cfg)
    summary = json.loads((run / runfolder.SUMMARY).read_text())
    assert (summary["epochs"], summary["epochs_trained"]) == (2, 2)
    assert len(runfolder.load_run(run).metrics["epoch"].unique()) == 2


# --- a TMPDIR too deep for the loader's socket: training runs without workers instead of waiting forever ----
def test_a_tmpdir_too_deep_for_the_loaders_socket_trains_without_workers(tiny_corpus, tmp_path):
    deep = tmp_path / ("d" * 60) / ("e" * 60)  # multiprocessing's socket under it would exceed 107 bytes
    deep.mkdir(parents=True)
    proc = subprocess.run([sys.executable, "-m", "voxlib.train", "--manifest", str(tiny_corpus), "--cache-dir",
                           str(tmp_path / "cache"), "--run-dir", str(tmp_path / "run"), "--num-workers", "2",
                           "--width", "0.0625", "--epochs", "1", "--batch-size", "8", "--precision", "fp32",
                           "--threads", "1"], capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env=dict(os.environ, TMPDIR=str(deep)))
    assert proc.returncode == 0, proc.stderr[-3000:]  # before: the worker's sender died and the loader waited
    assert f"data-loader workers off: TMPDIR is too deep for the socket they hand batches over by ({deep})" \
        in proc.stderr
    runfolder.require_finished(tmp_path / "run")


def test_loader_settings_keep_workers_where_the_socket_fits(monkeypatch, tmp_path):
    from voxlib import step
    cfg = Config(num_workers=2)
    monkeypatch.setattr(step.multiprocessing.util, "get_temp_dir", lambda: "/tmp/pymp-abcdefgh")
    assert step.loader_settings(cfg, torch.device("cpu")) == (2, False)
    monkeypatch.setattr(step.multiprocessing.util, "get_temp_dir", lambda: "/" + "x" * 90 + "/pymp-abcdefgh")
    with LogLines() as lines:
        assert step.loader_settings(cfg, torch.device("cpu")) == (0, False)
    assert any(line.startswith("data-loader workers off: TMPDIR is too deep") for line in lines)
