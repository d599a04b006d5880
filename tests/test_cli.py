"""The command line: help generated from Config, one meaning per flag, one-line errors and exit codes."""
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from voxlib import demo
from voxlib.bench import runner
from voxlib.cli import (EXIT_FAILED, EXIT_INTERRUPTED, EXIT_TERMINATED, EXIT_USAGE, flag_name, make_parser, parse,
                        parse_config, run_command)
from voxlib.evaluate import training_summary
from voxlib.config import GROUPS, Config, ConfigError, field_info, git_commit, outputs_dir
from voxlib.corpora.__main__ import parser as corpora_parser
from voxlib.corpora.manifest import ManifestError

ROOT = Path(__file__).resolve().parent.parent


def train_help(capsys) -> str:
    with pytest.raises(SystemExit):
        parse_config(["--help"])
    return capsys.readouterr().out


def test_help_shows_every_field_with_its_help_default_and_choices_grouped(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")  # no wrapping, so each entry can be found whole
    text = train_help(capsys)
    assert text.startswith("usage: python -m voxlib.train [options]")
    for f in field_info():
        line = _entry(text, flag_name(f.name))
        assert f.metadata["help"] in line, f.name
        assert "default: " in line, f.name
        for choice in f.metadata["choices"] or ():
            assert (choice or '""') in line, (f.name, choice)
    assert "--epochs INT  " in text and "range: 1..1000000" in text
    assert '--lr-schedule {"",cosine,onecycle,plateau}' in text and "default: 0.0001" in text
    positions = [text.index(f"\n{g} (Config fields):") for g in GROUPS]
    assert positions == sorted(positions)  # the groups in config.py's order
    assert "exit status: 0 done" in text


def _entry(text: str, flag: str) -> str:
    """One flag's --help entry (its line, and the next one when the flag is too long to share it)."""
    lines = text.splitlines()
    i = next(i for i, ln in enumerate(lines) if ln.strip().split(" ")[0].rstrip(",") == flag)
    return lines[i] + (" " + lines[i + 1].strip() if not lines[i + 1].strip().startswith("-") else "")


def test_unknown_flag_is_one_line_with_the_nearest_name(capsys):
    with pytest.raises(SystemExit) as stop:
        parse_config(["--epoch", "3", "--lr-schedul", "cosine"])
    err = capsys.readouterr().err
    assert stop.value.code == EXIT_USAGE
    assert err == ("python -m voxlib.train: error: unknown flags --epoch (did you mean --epochs?), "
                   "--lr-schedul (did you mean --lr-schedule?) (see python -m voxlib.train --help)\n")


def test_no_prefix_guessing_and_typed_values(capsys):
    with pytest.raises(SystemExit):
        parse_config(["--lr-sched", "cosine"])  # argparse would have taken it for --lr-schedule
    assert "did you mean --lr-schedule?" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_config(["--batch-size", "many"])
    assert "argument --batch-size: must be int, got 'many'" in capsys.readouterr().err
    assert parse_config(["--no-channels-last", "--lr", "3e-4"]) == Config(channels_last=False, lr=3e-4)


def test_a_flag_means_the_same_config_field_in_every_command():
    names = {f.name for f in field_info()}
    parsers = {"demo": _parser_of(demo), "bench": runner.parser(), "train": make_parser("t", replay=True)}
    for command, parser in parsers.items():
        for action in parser._actions:
            if action.dest in names:
                assert action.option_strings[0] == flag_name(action.dest), (command, action.dest)
            else:  # a command's own flag never takes a Config field's name
                assert not set(action.option_strings) & {flag_name(n) for n in names}, (command, action.dest)
    demo_flags = set(parsers["demo"]._option_string_actions)
    assert "--demo-seed" in demo_flags and "--seed" not in demo_flags


def _parser_of(module):
    """The parser a command's main builds (captured from the make_parser it calls)."""
    seen = []
    original = module.make_parser

    def capture(*a, **k):
        seen.append(original(*a, **k))
        raise SystemExit(0)

    module.make_parser = capture
    try:
        with pytest.raises(SystemExit):
            module.main([])
    finally:
        module.make_parser = original
    return seen[0]


def test_corpora_subcommand_suggests_its_own_flags(capsys):
    with pytest.raises(SystemExit):
        corpora_parser().parse_args(["vctk", "/x", "--min-utterance", "3"])
    assert "--min-utterance (did you mean --min-utterances?)" in capsys.readouterr().err


def test_replay_a_recorded_run_and_change_only_the_flags_given(tmp_path):
    record = {**Config(epochs=3, lr=1e-3, width=0.5, lr_schedule="cosine").to_dict(), "git_commit": "abc",
              "voxlib_version": "0.1.0"}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(record))
    cfg = parse_config(["--config", str(path), "--epochs", "5"])
    assert cfg == Config(epochs=5, lr=1e-3, width=0.5, lr_schedule="cosine")
    with pytest.raises(ConfigError, match="cannot read settings"):
        parse_config(["--config", str(tmp_path / "missing.json")])


def test_outputs_flag_sets_the_outputs_root_for_everything_after(tmp_path, monkeypatch):
    monkeypatch.delenv("VOX_OUTPUTS")
    parse(make_parser("t"), ["--outputs", str(tmp_path / "out")])
    assert os.environ["VOX_OUTPUTS"] == str(tmp_path / "out") and outputs_dir() == tmp_path / "out"


# --- run_command ---------------------------------------------------------------------------------
def _raises(err: BaseException):
    def main(argv):
        raise err
    return main


@pytest.mark.parametrize("err, status, message", [
    (ConfigError("parameter 'epochs' must be int, got str 'ten'"), EXIT_USAGE,
     "error: parameter 'epochs' must be int, got str 'ten'\n"),
    (ManifestError("m.csv", [(1, "a.wav", "missing file"), (2, "b.wav", "empty speaker")]), EXIT_FAILED,
     "error: m.csv: 2 problems\nrow 1 (a.wav): missing file\nrow 2 (b.wav): empty speaker\n"),
    (FileNotFoundError(2, "No such file or directory", "/data/x.wav"), EXIT_FAILED,
     "error: no such file or folder: /data/x.wav\n"),
    (PermissionError(13, "Permission denied", "/runs/a"), EXIT_FAILED, "error: permission denied: /runs/a\n"),
    (KeyboardInterrupt(), EXIT_INTERRUPTED, "error: interrupted; re-run the same command to resume\n"),
])
def test_user_errors_are_one_message_and_a_documented_status(err, status, message, capsys, monkeypatch):
    monkeypatch.delenv("VOX_DEBUG", raising=False)
    assert run_command(_raises(err), []) == status
    assert capsys.readouterr().err == message


def test_a_long_problem_list_is_cut_with_a_count(capsys):
    err = ManifestError("m.csv", [(i, f"{i}.wav", "missing file") for i in range(1, 41)])
    assert run_command(_raises(err), []) == EXIT_FAILED
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 14 and lines[-1] == "(28 more lines: re-run with --debug)"


def test_debug_and_bugs_keep_the_traceback(monkeypatch):
    with pytest.raises(ConfigError):
        run_command(_raises(ConfigError("x")), ["--debug"])
    monkeypatch.setenv("VOX_DEBUG", "1")
    with pytest.raises(ConfigError):
        run_command(_raises(ConfigError("x")), [])
    monkeypatch.delenv("VOX_DEBUG")
    with pytest.raises(ZeroDivisionError):  # not the user's error: the traceback is the report
        run_command(_raises(ZeroDivisionError("bug")), [])
    assert run_command(lambda argv: 3, []) == 3 and run_command(lambda argv: Path("x"), []) == 0


def test_sigterm_ends_the_command_like_ctrl_c(capsys):
    before = signal.getsignal(signal.SIGTERM)
    assert run_command(lambda argv: os.kill(os.getpid(), signal.SIGTERM) or signal.pause(), []) == EXIT_TERMINATED
    assert capsys.readouterr().err == "error: interrupted (SIGTERM); re-run the same command to resume\n"
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_command_prints_one_line_not_a_traceback(tmp_path):
    env = dict(os.environ, VOX_OUTPUTS=str(tmp_path))
    env.pop("VOX_DEBUG", None)
    proc = subprocess.run([sys.executable, "-m", "voxlib.demo", "--demo-utterances", "0"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == EXIT_USAGE
    assert proc.stderr == "error: parameter 'demo_utterances' must be in [1, 1000], got 0\n"


# --- git commit and summary ----------------------------------------------------------------------
def _git(cwd: Path, *args: str) -> str:
    env = dict(os.environ, GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@x", GIT_COMMITTER_NAME="t",
               GIT_COMMITTER_EMAIL="t@x")
    return subprocess.run(["git", *args], cwd=cwd, env=env, check=True, capture_output=True, text=True).stdout


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_git_commit_is_voxlibs_own_checkout_never_the_folder_it_runs_in(tmp_path):
    # an installed copy (no pyproject beside it) run from inside an unrelated repository
    other = tmp_path / "other_repo"
    (other / "site").mkdir(parents=True)
    shutil.copytree(ROOT / "voxlib", other / "site" / "voxlib", ignore=shutil.ignore_patterns("__pycache__"))
    _git(other, "init", "-q")
    _git(other, "commit", "-q", "--allow-empty", "-m", "unrelated")
    # a checkout of vox of its own
    checkout = tmp_path / "vox"
    shutil.copytree(ROOT / "voxlib", checkout / "voxlib", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", checkout)
    _git(checkout, "init", "-q")
    _git(checkout, "add", ".")
    _git(checkout, "commit", "-q", "-m", "vox")
    code = "from voxlib.config import git_commit; print(git_commit())"
    for path, cwd, want in ((other / "site", other, "None"), (checkout, other, _git(checkout, "rev-parse", "HEAD"))):
        out = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=dict(os.environ, PYTHONPATH=str(path)),
                             capture_output=True, text=True, timeout=60, check=True).stdout
        assert out.strip() == want.strip()
    assert git_commit() in (None, _git(ROOT, "rev-parse", "HEAD").strip())


def test_training_summary_states_best_epoch_and_accuracy_beside_majority(tmp_path):
    from run_folder_factory import make_run_folder

    run = make_run_folder(tmp_path / "run", birthplace_seen=0.75, birthplace_unseen=1 / 3)
    (run / "summary.json").write_text(json.dumps({"best_epoch": 7, "predictions_from": "best.pt"}))
    text = training_summary(run)
    lines = text.splitlines()
    assert lines[0] == f"run {run}: 10 epochs, best epoch 7 (predictions from best.pt)"
    birthplace = next(ln for ln in lines if ln.strip().startswith("birthplace"))
    assert "seen_test 75.0% (above majority 33.3%, n=24)" in birthplace
    assert "unseen_test 33.3% (NOT above majority 33.3%, n=15)" in birthplace
    assert lines[-1] == f"report: python -m voxlib.report --run-dir {run}  (notebooks 01-03 as HTML)"
