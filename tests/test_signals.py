"""Class 6: SIGTERM or Ctrl-C in any phase ends the command within seconds, with one line, no process
and no temp file left, and the same command then finishes.

Each test starts a real command through tests/signal_runner.py, which pauses it inside one phase
(manifest validation, feature-cache build, demo corpus, a training epoch, writing predictions,
predict, a report notebook); the test waits for the runner's marker, notes every descendant process,
sends the signal, then checks the exit status, the last stderr line, that every descendant is gone,
that no temp file or folder is left (TMPDIR is a folder of the test's own) and that re-running the
same command (without the pause) ends with status 0.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from voxlib.cli import EXIT_INTERRUPTED, EXIT_TERMINATED
from voxlib.config import Config

REPO = Path(__file__).resolve().parent.parent
RUNNER = Path(__file__).with_name("signal_runner.py")
LINES = {signal.SIGTERM: "error: interrupted (SIGTERM); re-run the same command to resume",
         signal.SIGINT: "error: interrupted; re-run the same command to resume"}
STATUS = {signal.SIGTERM: EXIT_TERMINATED, signal.SIGINT: EXIT_INTERRUPTED}
TRAIN = dict(width=1 / 16, batch_size=8, epochs=1, threads=1, eval_crops=1, grad_log_every=2)
REACH_S, STOP_S, GONE_S = 240, 30, 10


def flags(settings: dict) -> list[str]:
    return [f"--{k.replace('_', '-')}={v}" for k, v in settings.items()]


@pytest.fixture(scope="module")
def trained(tiny_corpus, tmp_path_factory) -> Path:
    """A finished run for the predict phases."""
    from voxlib.train import train

    run = tmp_path_factory.mktemp("trained") / "run"
    train(Config(**TRAIN, manifest=str(tiny_corpus), cache_dir=str(tmp_path_factory.mktemp("cache")),
                 run_dir=str(run)))
    return run


def command(phase: str, tiny_corpus: Path, trained_run, tmp: Path) -> tuple[str, list[str]]:
    """(module, arguments) of the command signalled in ``phase``; arguments name folders under tmp."""
    train_args = flags(dict(TRAIN, manifest=tiny_corpus, cache_dir=tmp / "cache", run_dir=tmp / "run"))
    if phase in ("validation", "cache", "write"):
        return "voxlib.train", train_args
    if phase == "epoch":
        return "voxlib.train", train_args + ["--num-workers=2"]
    if phase == "demo":
        return "voxlib.demo", ["--out", str(tmp / "demo"), "--demo-accents=us,gb-rp", "--demo-speakers-per-accent=2",
                               "--demo-utterances=1"]
    if phase == "predict":
        return "voxlib.predict", ["--run-dir", str(trained_run()), "--manifest", str(tiny_corpus),
                                  "--out-dir", str(tmp / "evaluation")]
    if phase == "report":
        return "voxlib.report", flags(dict(TRAIN, manifest=tiny_corpus, cache_dir=tmp / "cache", run_dir=tmp / "run",
                                           batch_size=16))
    raise ValueError(phase)


@pytest.fixture
def short_tmp(tmp_path) -> Path:
    """The command's TMPDIR, short enough for the loader workers' socket (a pytest-xdist tmp_path is
    not: there the workers would be turned off, test_honest_errors checks that case)."""
    folder = Path(tempfile.mkdtemp(prefix="vox-signal-", dir="/tmp" if os.path.isdir("/tmp") else None))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def environment(tmp: Path, tmpdir: Path) -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(REPO), VOX_OUTPUTS=str(tmp / "outputs"), TMPDIR=str(tmpdir),
                OMP_NUM_THREADS="1")


def left_behind(tmp: Path, tmpdir: Path) -> list[str]:
    """Temp files and folders of fileio (``.NAME.tmpPID``), features (``.KEY.tmp-...``), the demo
    renderer and the report kernel (anything in TMPDIR)."""
    found = [str(p) for p in tmpdir.iterdir()]
    for folder in ("run", "cache", "outputs", "demo", "evaluation"):
        if (tmp / folder).exists():
            found += [str(p) for p in (tmp / folder).rglob("*") if ".tmp" in p.name or p.name.endswith(".part")]
    return found


def alive(processes: list[psutil.Process]) -> list[str]:
    gone, still = psutil.wait_procs(processes, timeout=GONE_S)
    return [f"{p.pid} {p.info.get('cmdline') if hasattr(p, 'info') else ''}" for p in still
            if _status(p) != psutil.STATUS_ZOMBIE]


def _status(p: psutil.Process) -> str:
    try:
        return p.status()
    except psutil.NoSuchProcess:
        return psutil.STATUS_ZOMBIE


# phase -> descendants expected while paused (pool workers, loader workers, helper, kernel)
PHASES = {"validation": 2, "cache": 2, "demo": 2, "epoch": 2, "write": 0, "predict": 0, "report": 1}
CASES = [(phase, signal.SIGTERM, "") for phase in PHASES] + [
    (phase, signal.SIGINT, "") for phase in ("validation", "cache", "epoch", "report")] + [
    ("validation", signal.SIGINT, "background")]  # started as `nohup make test &` starts it: SIGINT ignored
# a shell without job control starts a background job with SIGINT ignored, and exec keeps it ignored
BACKGROUND = ["/bin/sh", "-c", 'trap "" INT; exec "$@"', "sh"]


@pytest.mark.parametrize("phase,signum,started", CASES,
                         ids=["-".join(filter(None, [p, signal.Signals(s).name, b])) for p, s, b in CASES])
def test_a_signal_in_any_phase_ends_cleanly_and_the_command_then_finishes(phase, signum, started, tiny_corpus,
                                                                         trained, tmp_path, short_tmp):
    if phase == "demo" and shutil.which("espeak-ng") is None:
        pytest.importorskip("espeakng_loader")
    module, args = command(phase, tiny_corpus, lambda: trained, tmp_path)
    env = environment(tmp_path, short_tmp)
    marker = tmp_path / "reached"
    launcher = BACKGROUND if started == "background" else []
    proc = subprocess.Popen([*launcher, sys.executable, str(RUNNER), phase, str(marker), "--", module, *args],
                            cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # its own process group: SIGINT to the group is Ctrl-C
    try:
        deadline = time.monotonic() + REACH_S
        while not marker.exists():
            if proc.poll() is not None:
                pytest.fail(f"{module} ended before the {phase} phase: {proc.stderr.read()[-3000:]}")
            assert time.monotonic() < deadline, f"{module} never reached the {phase} phase"
            time.sleep(0.05)
        descendants = psutil.Process(proc.pid).children(recursive=True)
        assert len(descendants) >= PHASES[phase], [p.cmdline() for p in descendants]
        if signum == signal.SIGINT:
            os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
        else:
            proc.send_signal(signal.SIGTERM)  # what kill PID or a batch scheduler does: the parent only
        _, err = proc.communicate(timeout=STOP_S)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    lines = [line for line in err.splitlines() if line.strip()]
    assert proc.returncode == STATUS[signum], err[-3000:]
    assert lines[-1] == LINES[signum] and "Traceback" not in err, err[-3000:]
    assert alive(descendants) == []
    assert left_behind(tmp_path, short_tmp) == []

    if phase == "report" and signum == signal.SIGINT or started:
        return  # the same clean-up as the cases above, which re-run the command (the report: ~40 s)
    again = subprocess.run([sys.executable, "-m", module, *args], cwd=tmp_path, env=env, capture_output=True,
                           text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert left_behind(tmp_path, short_tmp) == []
