"""The run-folder contract: what a vox run folder holds, how each file is written and read.

This module alone knows the file names, their columns, the split names and how many classes a
prediction keeps; training writes through it, and evaluation, analysis, predict and the notebooks
read through it. It needs no torch, so a run can be judged on a machine without the training stack.

Ownership and one writer. vox writes only into a folder it owns: an empty (or new) folder, which it
then marks with ``.vox-run``, or a folder that already carries that mark. Anything else is refused,
so pointing ``--run-dir`` at a folder of your own never touches your files. While a process writes a
folder it holds ``.vox-run.lock`` (an OS lock that dies with its holder); a second writer is refused
at once with the holder's PID, host and start time.

Every file is replaced atomically (temp file, fsync, rename), and CSV text fields are always quoted,
so labels and paths with commas, quotes, newlines or carriage returns read back unchanged.

Finished. A run folder is usable (by predict, evaluate, the notebooks, the model loader) only when
it is finished, decided here alone (:func:`unfinished_reason`): no process holds its writer lock,
``summary.json`` is there, and the summary describes the epochs metrics.csv holds (an extension of a
finished run that stopped half-way leaves the old summary beside newer checkpoints). "Complete", the
check training and the fold runner make before saying "nothing to do" or pooling, is stronger
(:func:`contract_problems`): every file the contract lists is present and loads, checkpoints
included. A missing folder, an unfinished run and a damaged file are three different messages.
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import zipfile
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import pandas as pd

from voxlib.fileio import write_atomic
from voxlib.lock import describe_holder, exclusive_lock, held

log = logging.getLogger("voxlib.runfolder")

# --- names --------------------------------------------------------------------------------------------
CONFIG = "config.json"
LABELS = "labels.json"
SPLITS_FILE = "splits.csv"
METRICS = "metrics.csv"
PREDICTIONS = "predictions.csv"
EMBEDDINGS = "embeddings.npz"
SUMMARY = "summary.json"  # written last: its presence means the run (or evaluation) is complete
REJECTED = "rejected_clips.csv"  # clips left out by on_bad_file=skip (an adapter's rejected.csv is its own)
SCORES = "scores.csv"  # evaluation folders: one row per head and split
UNKNOWN_LABELS = "unknown_labels.csv"  # evaluation folders: labels the run never trained on, per head
CHECKPOINTS = "checkpoints"
LAST, BEST = "last.pt", "best.pt"
TENSORBOARD = "tb"
EVALS = "evals"
MARKER = ".vox-run"
LOCK = ".vox-run.lock"
REQUIRED_FILES = (CONFIG, LABELS, SPLITS_FILE, METRICS, PREDICTIONS)
CHECKPOINT_FILES = (f"{CHECKPOINTS}/{BEST}", f"{CHECKPOINTS}/{LAST}")
# everything a finished training run holds; each must be present and load ("complete")
RUN_CONTRACT = REQUIRED_FILES + (EMBEDDINGS, SUMMARY) + CHECKPOINT_FILES
# contract files training cannot write again from its checkpoints: damage here needs a new training
NOT_REBUILDABLE = (METRICS, *CHECKPOINT_FILES)
ALLOW_UNFINISHED = "--allow-unfinished (allow_unfinished=True in Python)"
# a pooled folder (folds > 1 or seeds > 1): member run folders inside, the pooled results beside them
EXPERIMENT = "experiment.json"  # written first: the settings and the member folders
MEMBER_SCORES = "member_scores.csv"  # one row per member, head and seen/unseen group
POOLED_PREDICTIONS = "pooled_predictions.csv"  # every member's unseen-speaker rows, with fold and seed
POOLED = "pooled.json"  # written last: its presence means every member is finished and pooled
MEMBER_SCORE_COLUMNS = ("member", "fold", "seed", "head", "group", "n", "accuracy", "majority", "chance")
# a remedies study folder (python -m voxlib.remedies): one pooled folder per variant, the study's files beside them
STUDY_CSV = "study.csv"  # one row per variant and per reference baseline
STUDY_MD, STUDY_PNG = "study.md", "study.png"  # the same as a Markdown table and as a figure
STUDY = "study.json"  # written last: its presence means every variant is trained and tabled
STUDY_COLUMNS = ("variant", "label", "changes", "seen_speaker", "seen_birthplace", "unseen_birthplace", "unseen_low",
                 "unseen_high", "unseen_speakers", "chance", "unseen_sex", "sex_low", "sex_high", "train_minutes")

SPLITS = ("train", "seen_val", "seen_test", "unseen_val", "unseen_test")
HELD_OUT_SPLITS = SPLITS[1:]
SEEN_SPLITS = ("seen_val", "seen_test")  # held-out utterances of training speakers
UNSEEN_SPLITS = ("unseen_val", "unseen_test")  # speakers never trained on
CURVE_SPLITS = ("train", "seen_val", "unseen_val")
TOP_K_STORED = 5  # predictions keep the five best classes per head
TOP_K_SEPARATOR = "|"
METRIC_COLUMNS = ("epoch", "split", "head", "metric", "value")


class RunError(ValueError):
    """A run folder with a missing file or content that breaks the run-folder contract."""


class UnfinishedRunError(RunError):
    """A run (or pooled) folder that a process is still writing, or whose training stopped before its end."""


class FolderError(RuntimeError):
    """A folder vox may not write: not empty and not marked as vox's own."""


def member_name(fold: int, seed: int, folds: int, seeds: int) -> str:
    """The member run folder's name inside a pooled folder: ``fold<k>``, ``seed<s>`` or ``fold<k>-seed<s>``.

    Flat (one level) so every folder below a pooled one is itself a complete run folder; ``seed`` is
    the training seed the member used. folds=1 and seeds=1 has no members (the run folder itself).
    """
    parts = ([f"fold{fold}"] if folds > 1 else []) + ([f"seed{seed}"] if seeds > 1 else [])
    if not parts:
        raise ValueError("folds=1 and seeds=1 is a single run folder, not a pooled one")
    return "-".join(parts)


def is_pooled(path: str | Path) -> bool:
    """True for a pooled folder (folds or seeds), finished or not."""
    return (Path(path) / EXPERIMENT).is_file()


def prediction_columns(head: str) -> list[str]:
    return [f"{head}_true", f"{head}_pred", f"{head}_prob", f"{head}_top5"]


# --- writing ------------------------------------------------------------------------------------------
def csv_bytes(frame: pd.DataFrame) -> bytes:
    """CSV with every text field quoted (newlines, carriage returns, commas and quotes survive)."""
    return frame.to_csv(index=False, quoting=csv.QUOTE_NONNUMERIC, lineterminator="\n").encode("utf-8")


def json_bytes(value) -> bytes:
    return json.dumps(value, indent=2, ensure_ascii=False, allow_nan=False).encode("utf-8")


def claim(path: Path, what: str = "run folder") -> Path:
    """Make ``path`` vox's own: create it or adopt it when empty; accept it when already marked.

    Refuses a folder that holds anything without the mark (the user's files are never touched).
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FolderError(f"{what} {path} is a file, not a folder")
    if (path / MARKER).is_file():
        return path
    if path.is_dir():
        # a marker another process is writing this instant does not make the folder foreign
        found = sorted(p.name for p in path.iterdir() if not p.name.startswith(MARKER))
        if found:
            shown = ", ".join(found[:5]) + (f" and {len(found) - 5} more" if len(found) > 5 else "")
            raise FolderError(f"{what} {path} is not empty and was not made by vox (it holds {shown}); "
                              f"vox writes only into an empty folder or one it made: choose another folder")
    path.mkdir(parents=True, exist_ok=True)
    write_atomic(path / MARKER, b"This folder is written by vox; see ARCHITECTURE.md, 'Run folder'.\n")
    return path


@contextlib.contextmanager
def writing(path: Path, what: str = "run folder") -> Iterator[Path]:
    """Claim ``path`` and hold its writer lock for the block (one writer per folder)."""
    claim(path, what)
    with exclusive_lock(Path(path) / LOCK, f"{what} {path}"):
        yield Path(path)


def write_json(folder: Path, name: str, value) -> None:
    write_atomic(folder / name, json_bytes(value))


def write_text(folder: Path, name: str, text: str) -> None:
    write_atomic(folder / name, text.encode("utf-8"))


def write_figure(folder: Path, name: str, figure, dpi: int = 120) -> None:
    """A matplotlib figure as PNG, written atomically (the figure is drawn by the caller's matplotlib)."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    write_atomic(folder / name, buffer.getvalue())


def write_csv(folder: Path, name: str, frame: pd.DataFrame) -> None:
    write_atomic(folder / name, csv_bytes(frame))


def write_metrics(folder: Path, rows: Iterable[tuple], keep_until: int | None = None) -> None:
    """Rewrite metrics.csv atomically: the stored rows up to epoch ``keep_until`` plus ``rows``.

    A whole-file rewrite (not an append) means a crash or a full disk leaves the previous epoch's
    file complete, never a half-written line.
    """
    old = read_metric_rows(folder / METRICS)
    if keep_until is not None:
        old = [r for r in old if int(r[0]) <= keep_until]
    buffer = io.StringIO()
    out = csv.writer(buffer, lineterminator="\n")
    out.writerow(METRIC_COLUMNS)
    # repr of a Python float round-trips exactly, so a resumed run compares equal to an uninterrupted one
    out.writerows((int(e), s, h, m, repr(float(v))) for e, s, h, m, v in [*old, *rows])
    write_atomic(folder / METRICS, buffer.getvalue().encode())


def read_metric_rows(path: Path) -> list[tuple]:
    if not path.is_file():
        return []
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    return [(int(e), s, h, m, float(v)) for e, s, h, m, v in frame[list(METRIC_COLUMNS)].itertuples(index=False)]


def write_embeddings(folder: Path, features: np.ndarray, row: np.ndarray, split: Sequence[str]) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, features=np.asarray(features, dtype=np.float16), row=np.asarray(row, dtype=np.int64),
             split=np.asarray(split, dtype=str))
    write_atomic(folder / EMBEDDINGS, buffer.getvalue())


def prediction_frame(ids: dict[str, np.ndarray], vocab: dict[str, list[str]], probs: dict[str, np.ndarray],
                     targets: dict[str, np.ndarray] | None = None) -> pd.DataFrame:
    """The predictions table: ``ids`` columns first (row, path, speaker, split, ...), then per head
    ``{head}_true`` (class name, "" where there is no target), ``_pred``, ``_prob`` and ``_top5``.

    ``probs[head]`` is (N, classes) crop-averaged probabilities in ``vocab[head]`` order; ``targets``
    class indices (-1 = none) or None (new audio: no truth).
    """
    frame = pd.DataFrame(ids)
    n = len(frame)
    for head, classes in vocab.items():
        names = np.array(classes, dtype=object)
        p = np.asarray(probs[head])
        top = np.argsort(-p, axis=1, kind="stable")[:, :TOP_K_STORED]
        t = targets[head] if targets is not None else np.full(n, -1)
        frame[f"{head}_true"] = np.where(t >= 0, names[np.clip(t, 0, None)], "")
        frame[f"{head}_pred"] = names[top[:, 0]]
        frame[f"{head}_prob"] = p[np.arange(n), top[:, 0]]
        frame[f"{head}_top5"] = [TOP_K_SEPARATOR.join(names[r]) for r in top]
    return frame


# --- reading ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Embeddings:
    """Trunk features of some utterances: ``features[i]`` belongs to splits.csv row ``row[i]``."""

    features: np.ndarray  # (N, D) float32
    row: np.ndarray  # (N,) int
    split: np.ndarray  # (N,) str


@dataclass
class Run:
    """The parsed content of one run folder; embeddings are read on first use (they can be large)."""

    path: Path
    config: dict
    labels: dict[str, list[str]]
    splits: pd.DataFrame
    metrics: pd.DataFrame
    predictions: pd.DataFrame

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def heads(self) -> list[str]:
        return list(self.labels)

    @property
    def has_embeddings(self) -> bool:
        return (self.path / EMBEDDINGS).exists()

    @cached_property
    def embeddings(self) -> Embeddings:
        return _read_embeddings(self.path / EMBEDDINGS, self.splits)

    @cached_property
    def train(self) -> pd.DataFrame:
        """The training rows of splits.csv: the only rows a baseline may learn from."""
        return self.splits[self.splits["split"] == "train"]

    @cached_property
    def summary(self) -> dict:
        path = self.path / SUMMARY
        return read_json(path) if path.is_file() else {}


def load_run(run_dir: str | Path, allow_unfinished: bool = False) -> Run:
    """Read and check a finished run folder; a problem names the file (and row) at fault.

    An unfinished one (being written, or stopped before its end) is refused with the reason, unless
    ``allow_unfinished`` (then whatever files it has are read, with a warning).
    """
    path = Path(run_dir)
    require_finished(path, allow_unfinished)
    if is_pooled(path):
        raise RunError(f"{path}: a pooled folder (folds or seeds); its members are the run folders "
                       f"({', '.join(p.name for p in pooled_members(path))}): read it with load_pooled")
    return _parse_run(path)


def pooled_members(path: str | Path) -> list[Path]:
    """The member run folders a pooled folder's experiment.json lists."""
    return [Path(path) / m["name"] for m in read_json(Path(path) / EXPERIMENT)["members"]]


def read_run(path: str | Path) -> Run:
    """Read a run or evaluation folder without the finished check: only for the process writing it."""
    return _parse_run(Path(path))


def _parse_run(path: Path) -> Run:
    missing = [name for name in REQUIRED_FILES if not (path / name).is_file()]
    if missing:
        raise RunError(f"{path}: missing {', '.join(missing)} (a finished run folder has {', '.join(REQUIRED_FILES)})")
    config = read_json(path / CONFIG)
    labels = read_labels(path)
    splits = read_csv(path / SPLITS_FILE, ["row", "speaker", "split"] + [h for h in labels if h != "speaker"])
    splits["row"] = _as_numbers(splits, "row", path / SPLITS_FILE, int)
    if splits["row"].duplicated().any():
        dup = splits.loc[splits["row"].duplicated(), "row"].tolist()[:5]
        raise RunError(f"{path / SPLITS_FILE}: duplicate row ids {dup}")
    metrics = read_csv(path / METRICS, list(METRIC_COLUMNS))
    metrics["epoch"] = _as_numbers(metrics, "epoch", path / METRICS, int)
    metrics["value"] = _as_numbers(metrics, "value", path / METRICS, float)
    predictions = read_predictions(path / PREDICTIONS, labels)
    unknown = sorted(set(predictions["row"]) - set(splits["row"]))
    if unknown:
        raise RunError(f"{path / PREDICTIONS}: rows {unknown[:5]} are not in {SPLITS_FILE}")
    return Run(path, config, labels, splits, metrics, predictions)


@dataclass
class Pooled:
    """A finished pooled folder: its settings, member folders and pooled results."""

    path: Path
    experiment: dict  # {"config": the experiment's Config record, "members": [{name, fold, seed}]}
    summary: dict  # pooled.json
    member_scores: pd.DataFrame
    predictions: pd.DataFrame  # pooled unseen-speaker rows (fold, seed, then predictions.csv's columns)
    allow_unfinished: bool = False  # read as asked although unfinished: members are read the same way

    @property
    def members(self) -> list[Path]:
        return [self.path / m["name"] for m in self.experiment["members"]]

    def member(self, index: int = 0) -> Run:
        return load_run(self.members[index], self.allow_unfinished)


def load_pooled(path: str | Path, allow_unfinished: bool = False) -> Pooled:
    """Read a finished pooled folder; a missing or unfinished one says which and why."""
    path = Path(path)
    if not is_pooled(path):
        check_folder(path)
        raise RunError(f"{path}: not a pooled folder (no {EXPERIMENT}; folds and seeds were 1)")
    require_finished(path, allow_unfinished)
    if not (path / POOLED).is_file():
        raise RunError(f"{path}: pooling not finished (no {POOLED}); re-run the same command to finish it")
    experiment = read_json(path / EXPERIMENT)
    scores = read_csv(path / MEMBER_SCORES, MEMBER_SCORE_COLUMNS)
    for column, kind in (("fold", int), ("seed", int), ("n", int), ("accuracy", float), ("majority", float),
                         ("chance", float)):
        scores[column] = _as_numbers(scores, column, path / MEMBER_SCORES, kind)
    labels = read_labels(path / experiment["members"][0]["name"])
    predictions = read_csv(path / POOLED_PREDICTIONS, ["fold", "seed", "row", "speaker", "split"])
    for column in ("fold", "seed", "row"):
        predictions[column] = _as_numbers(predictions, column, path / POOLED_PREDICTIONS, int)
    for head in labels:
        if f"{head}_prob" in predictions.columns:
            predictions[f"{head}_prob"] = _as_numbers(predictions, f"{head}_prob", path / POOLED_PREDICTIONS, float)
    return Pooled(path, experiment, read_json(path / POOLED), scores, predictions, allow_unfinished)


# --- finished and complete ----------------------------------------------------------------------------
def check_folder(path: Path) -> None:
    """A missing path, a file, or a folder training never wrote: each its own message (never "unfinished")."""
    if not path.exists():
        raise RunError(f"{path}: no such folder")
    if not path.is_dir():
        raise RunError(f"{path}: a file, not a run folder")
    if not any((path / name).is_file() for name in (CONFIG, MARKER, EXPERIMENT)):
        raise RunError(f"{path}: not a vox run folder (no {CONFIG}); give a folder that training wrote")


def writer(path: Path) -> dict | None:
    """The holder note of the process writing ``path`` now (``{}`` if it names no one), else None."""
    return held(Path(path) / LOCK)


def unfinished_reason(path: str | Path) -> str | None:
    """Why the run, evaluation or pooled folder ``path`` is not finished, or None when it is.

    The one definition of "finished" every reader uses: no writer holds the folder's lock, its last
    file (summary.json; pooled.json for a pooled folder) is there, and what that file describes is
    what the folder holds now.
    """
    path = Path(path)
    holder = writer(path)
    if holder is not None:
        return f"it is being written by {describe_holder(holder)}"
    if is_pooled(path):
        return _pooled_unfinished_reason(path)
    summary_path = path / SUMMARY
    trained, epochs = _metric_epochs(path), _config_epochs(path)
    if not summary_path.is_file():
        where = f"after epoch {trained} of {epochs}" if trained else "before its first epoch was saved"
        return (f"it has no {SUMMARY}: its training stopped {where}; re-run the same training command to "
                f"finish it")
    try:
        summary = read_json(summary_path)
    except RunError:
        return None  # damage, not an unfinished run: the contract check names the file
    said = summary.get("epochs_trained") if isinstance(summary, dict) else None
    if isinstance(said, int) and trained is not None and trained != said:
        if trained > said:
            return (f"an extension from {said} to {epochs} epochs stopped after epoch {trained}: {SUMMARY} and "
                    f"{PREDICTIONS} still describe the {said}-epoch run, the checkpoints have moved on; re-run "
                    f"the same training command to finish the extension")
        return (f"its training was restarted and stopped after epoch {trained}, while {SUMMARY} describes "
                f"{said} epochs; re-run the same training command to finish it")
    return None


def require_finished(path: str | Path, allow_unfinished: bool = False) -> str | None:
    """Refuse an unfinished folder (:class:`UnfinishedRunError`, one line naming why); with
    ``allow_unfinished`` return the reason instead (None when finished) after a warning."""
    path = Path(path)
    check_folder(path)
    reason = unfinished_reason(path)
    if reason is None:
        return None
    if not allow_unfinished:
        raise UnfinishedRunError(f"{path}: unfinished run: {reason}; or pass {ALLOW_UNFINISHED} to use "
                                 f"its latest checkpoint")
    log.warning("%s: unfinished run (%s); used as it is now, as asked", path, reason)
    return reason


def _metric_epochs(path: Path) -> int | None:
    """The last epoch metrics.csv holds (None without a readable one)."""
    try:
        epochs = pd.to_numeric(pd.read_csv(path / METRICS, usecols=["epoch"])["epoch"], errors="coerce")
    except (OSError, ValueError, pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError):
        return None
    return int(epochs.max()) if len(epochs) and np.isfinite(epochs.max()) else 0


def _config_epochs(path: Path):
    try:
        return read_json(path / CONFIG).get("epochs", "?")
    except (RunError, AttributeError):
        return "?"


def _pooled_unfinished_reason(path: Path) -> str | None:
    try:
        experiment = read_json(path / EXPERIMENT)
        epochs = experiment["config"]["epochs"]
        names = [m["name"] for m in experiment["members"]]
    except (RunError, KeyError, TypeError) as err:
        return f"{EXPERIMENT} is unreadable ({err})"
    if not (path / POOLED).is_file():
        return f"its members are not all trained and pooled (no {POOLED}); re-run the same command to finish it"
    for name in names:
        member = path / name
        if not member.is_dir():
            return f"member {name} is missing"
        reason = unfinished_reason(member)
        if reason:
            return f"member {name}: {reason}"
        try:
            member_epochs = read_json(member / SUMMARY).get("epochs")
        except (RunError, AttributeError):
            continue
        if member_epochs != epochs:
            return (f"an extension to {epochs} epochs per member is not finished ({name} has {member_epochs}); "
                    f"{POOLED} still holds the earlier results; re-run the same command to finish it")
    return None


def checkpoint_problem(path: Path) -> str | None:
    """Why ``path`` is not a loadable checkpoint file, judged from its structure (no torch), or None.

    torch.save writes a zip archive; a file that is not one (random bytes, text), whose central
    directory is gone (truncated) or whose members fail their CRC is damaged. The old pre-zip torch
    format (pickle protocol 2 with torch's magic number) is accepted as it is.
    """
    path = Path(path)
    if not path.is_file():
        return "missing"
    size = path.stat().st_size
    if size == 0:
        return "damaged (empty file, 0 bytes)"
    with open(path, "rb") as fh:
        head = fh.read(4)
    if head[:2] == b"\x80\x02":  # the legacy torch format (pickle protocol 2): loading will tell
        return None
    if head != b"PK\x03\x04":
        return f"damaged (not a PyTorch checkpoint: {size} bytes starting {head!r}, not a zip archive)"
    try:
        with zipfile.ZipFile(path) as archive:
            if not any(n.endswith("/data.pkl") or n == "data.pkl" for n in archive.namelist()):
                return "damaged (a zip archive without the data.pkl of a PyTorch checkpoint)"
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as err:
        return f"damaged (truncated or corrupt zip archive: {err})"
    if bad is not None:
        return f"damaged (member {bad} fails its CRC check)"
    return None


def contract_problems(path: str | Path) -> dict[str, str]:
    """{file name: what is wrong} for every file of the run-folder contract (RUN_CONTRACT) that is
    missing or does not load; empty when the run folder is complete."""
    path = Path(path)
    problems: dict[str, str] = {}
    for name in RUN_CONTRACT:
        if not (path / name).is_file():
            problems[name] = "missing"
    for name in CHECKPOINT_FILES:
        if name not in problems:
            why = checkpoint_problem(path / name)
            if why:
                problems[name] = why
    readers = {CONFIG: lambda: read_json(path / CONFIG), LABELS: lambda: read_labels(path),
               SUMMARY: lambda: read_json(path / SUMMARY)}
    for name, read in readers.items():
        if name not in problems:
            try:
                read()
            except RunError as err:
                problems[name] = _without_path(err, path / name)
    if not problems.keys() & {CONFIG, LABELS, SPLITS_FILE, METRICS, PREDICTIONS}:
        try:
            run = _parse_run(path)
        except RunError as err:
            named = next((n for n in RUN_CONTRACT if str(err).startswith(str(path / n))), PREDICTIONS)
            problems[named] = _without_path(err, path / named)
        else:
            if EMBEDDINGS not in problems:
                try:
                    run.embeddings
                except RunError as err:
                    problems[EMBEDDINGS] = _without_path(err, path / EMBEDDINGS)
    return problems


def _without_path(err: Exception, path: Path) -> str:
    text = str(err)
    return text[len(str(path)) + 2:] if text.startswith(f"{path}: ") else text


def is_complete(run_dir: str | Path, epochs: int, trained: int, best_epoch: int | None) -> bool:
    """Training's "complete; nothing to do": summary.json says ``epochs`` with ``trained`` trained, and
    every contract file is present and loads.

    A file training writes again from its checkpoints (predictions, embeddings, summary, config,
    labels, splits) that is missing or damaged makes the run incomplete, so training writes it again.
    A best.pt lost at the last epoch is last.pt's twin and is restored from it. metrics.csv or a
    checkpoint that cannot be rebuilt is refused, naming the file.
    """
    run_dir = Path(run_dir)
    if not (run_dir / SUMMARY).is_file():
        return False
    try:
        done = read_json(run_dir / SUMMARY)
    except RunError as err:
        log.warning("%s; written again from the checkpoints", err)
        return False
    if not isinstance(done, dict) or done.get("epochs") != epochs or done.get("epochs_trained") != trained:
        return False
    problems = contract_problems(run_dir)
    best = f"{CHECKPOINTS}/{BEST}"
    if best in problems and best_epoch == trained and f"{CHECKPOINTS}/{LAST}" not in problems:
        log.warning("%s: %s; its best epoch is the last one, so it is restored from %s", run_dir / best,
                    problems.pop(best), LAST)
        write_atomic(run_dir / best, (run_dir / CHECKPOINTS / LAST).read_bytes())
    fatal = [name for name in NOT_REBUILDABLE if name in problems]
    if fatal:
        name = fatal[0]
        raise RunError(f"{run_dir / name}: {problems[name]}; it cannot be rebuilt without training again: move "
                       f"{run_dir} away (or delete it) and re-run the same command to train it anew")
    for name, why in problems.items():
        log.warning("%s: %s; written again from the checkpoints", run_dir / name, why)
    return not problems


def resume_note(run_dir: str | Path, epochs: int, trained: int) -> str:
    """The log line of a resumed run; an extension of a finished run says what it extends."""
    try:
        done = read_json(Path(run_dir) / SUMMARY)
    except RunError:
        done = None
    if isinstance(done, dict) and done.get("epochs_trained") == trained and done.get("epochs") != epochs:
        return (f"extending finished run {run_dir} from {done.get('epochs')} to {epochs} epochs (it trained "
                f"{trained}); its {trained}-epoch results stay in place until the new ones are written")
    return f"resuming {run_dir} after epoch {trained}"


@dataclass
class Study:
    """A finished remedies study: its table (variants, then the reference baselines) and its record."""

    path: Path
    table: pd.DataFrame
    record: dict  # study.json: folds, base settings, each variant's changes


def load_study(path: str | Path) -> Study:
    """Read a finished study folder; an unfinished or foreign one is named as such."""
    path = Path(path)
    if not path.is_dir():
        raise RunError(f"{path}: no such study folder")
    if not (path / STUDY).is_file():
        raise RunError(f"{path}: not a finished remedies study (no {STUDY}); run python -m voxlib.remedies --out "
                       f"{path} to finish it")
    table = read_csv(path / STUDY_CSV, STUDY_COLUMNS)
    for column in STUDY_COLUMNS[3:]:
        table[column] = pd.to_numeric(table[column].replace("", np.nan), errors="coerce")
    return Study(path, table, read_json(path / STUDY))


def read_json(path: Path):
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as err:
        raise RunError(f"{path}: cannot read ({err.strerror or err})") from err
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise RunError(f"{path}: not valid JSON ({err})") from err


def read_labels(folder: Path) -> dict[str, list[str]]:
    labels = read_json(Path(folder) / LABELS)
    if not isinstance(labels, dict) or not labels or not all(
        isinstance(v, list) and len(v) >= 2 and all(isinstance(c, str) for c in v) for v in labels.values()
    ):
        raise RunError(f"{Path(folder) / LABELS}: expected {{head: [at least two class names]}}")
    return labels


def read_csv(path: Path, required: Iterable[str]) -> pd.DataFrame:
    # Everything as text, and no "NA"/"None" guessing: a birthplace may well be called "NA".
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise RunError(f"{path}: unreadable CSV ({err})") from err
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise RunError(f"{path}: missing column(s) {missing}; found {list(frame.columns)}")
    return frame


def _as_numbers(frame: pd.DataFrame, column: str, path: Path, kind: type) -> pd.Series:
    values = pd.to_numeric(frame[column], errors="coerce").astype(float)
    bad = ~np.isfinite(values)
    if kind is int:
        bad = bad | (values.fillna(0) % 1 != 0)
    if bad.any():
        i = int(np.flatnonzero(bad.to_numpy())[0])
        raise RunError(f"{path}: line {i + 2}: {column} {frame[column].iloc[i]!r} is not a {kind.__name__}")
    return values.astype(kind)


def read_predictions(path: Path, labels: dict[str, list[str]]) -> pd.DataFrame:
    columns = ["row", "speaker", "split"] + [c for head in labels for c in prediction_columns(head)]
    frame = read_csv(path, columns)
    frame["row"] = _as_numbers(frame, "row", path, int)
    bad_split = ~frame["split"].isin(HELD_OUT_SPLITS)
    if bad_split.any():
        i = int(np.flatnonzero(bad_split.to_numpy())[0])
        raise RunError(f"{path}: line {i + 2}: split {frame['split'].iloc[i]!r} is not one of {HELD_OUT_SPLITS}")
    for head, classes in labels.items():
        frame[f"{head}_prob"] = _as_numbers(frame, f"{head}_prob", path, float)
        bad = ~frame[f"{head}_pred"].isin(classes)
        if bad.any():
            i = int(np.flatnonzero(bad.to_numpy())[0])
            raise RunError(
                f"{path}: line {i + 2}: {head}_pred {frame[f'{head}_pred'].iloc[i]!r} is not a class of "
                f"head {head!r} in {LABELS}"
            )
    return frame


def _read_embeddings(path: Path, splits: pd.DataFrame) -> Embeddings:
    if not path.is_file():
        raise RunError(f"{path}: missing (trunk features are needed for projections and probes)")
    try:
        with np.load(path, allow_pickle=False) as data:
            missing = [k for k in ("features", "row", "split") if k not in data.files]
            if missing:
                raise RunError(f"{path}: missing array(s) {missing}")
            features = data["features"].astype(np.float32)
            row = data["row"].astype(np.int64)
            split = data["split"].astype(str)
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError) as err:
        raise RunError(f"{path}: damaged ({err})") from err
    if features.ndim != 2 or not (len(features) == len(row) == len(split)):
        raise RunError(f"{path}: expected features (N, D), row (N,), split (N,); got "
                       f"{features.shape}, {row.shape}, {split.shape}")
    unknown = sorted(set(row.tolist()) - set(splits["row"]))
    if unknown:
        raise RunError(f"{path}: rows {unknown[:5]} are not in {SPLITS_FILE}")
    expected = splits.set_index("row")["split"].reindex(row).to_numpy()
    disagree = np.flatnonzero(expected != split)
    if disagree.size:
        k = int(disagree[0])
        raise RunError(f"{path}: row {row[k]} is marked {str(split[k])!r} but {SPLITS_FILE} puts it in "
                       f"{str(expected[k])!r}")
    if not np.isfinite(features).all():
        bad = row[~np.isfinite(features).all(axis=1)][:5].tolist()
        raise RunError(f"{path}: non-finite features for rows {bad}")
    return Embeddings(features, row, split)
