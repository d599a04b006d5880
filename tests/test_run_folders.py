"""Classes 1 and 2: vox writes only into folders it owns, and one writer at a time.

A folder holding the user's own files (named like a run's) is refused before anything is written,
whatever the command (training, an evaluation folder); the files keep their bytes. A second writer
of a run folder is refused at once, naming the holder; a holder killed without releasing frees it.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from voxlib import runfolder
from voxlib.config import Config
from voxlib.lock import LockedError
from voxlib.train import train

FAST = dict(width=1 / 16, batch_size=8, epochs=1, threads=2, eval_crops=1)
USER_FILES = {"config.json": b'{"mine": true}\n', "metrics.csv": b"a,b\n1,2\n", "summary.json": b"{}\n"}
HOLD = """
import sys, time
from pathlib import Path
from voxlib import runfolder
with runfolder.writing(Path(sys.argv[1])):
    print("held", flush=True)
    time.sleep(600)
"""


def foreign(folder: Path) -> Path:
    folder.mkdir(parents=True)
    for name, data in USER_FILES.items():
        (folder / name).write_bytes(data)
    return folder


@pytest.mark.parametrize("what", ["run folder", "evaluation folder"])
def test_a_folder_vox_did_not_make_is_refused_and_left_as_it_was(what, tiny_corpus, tmp_path):
    folder = foreign(tmp_path / "mine")
    with pytest.raises(runfolder.FolderError, match="not empty and was not made by vox") as caught:
        if what == "run folder":
            train(Config(**FAST, manifest=str(tiny_corpus), cache_dir=str(tmp_path / "cache"), run_dir=str(folder)))
        else:
            with runfolder.writing(folder, what):
                pass
    assert "config.json" in str(caught.value) and what in str(caught.value)
    assert sorted(p.name for p in folder.iterdir()) == sorted(USER_FILES)
    assert all((folder / n).read_bytes() == data for n, data in USER_FILES.items())


def test_a_second_writer_is_refused_naming_the_holder_and_a_dead_holder_frees_the_folder(tiny_corpus, tmp_path):
    run = tmp_path / "run"
    cfg = Config(**FAST, manifest=str(tiny_corpus), cache_dir=str(tmp_path / "cache"), run_dir=str(run))
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(LockedError) as caught:
            train(cfg)
        assert f"PID {holder.pid}" in str(caught.value)
    finally:
        holder.send_signal(signal.SIGKILL)  # dies holding the lock: the kernel releases it
        holder.wait()
        holder.stdout.close()
    assert train(cfg) == run
    assert (run / runfolder.PREDICTIONS).is_file()
