"""Accuracies, baselines and per-class metrics, read from a run folder.

Everything here works from the files a training run leaves behind (ARCHITECTURE.md, "Run folder"),
so a notebook can judge a run without re-training or importing torch. Every accuracy is reported
beside the two numbers that say whether it means anything: chance (1 / number of classes) and the
majority-class baseline, whose class is chosen on the *training* rows and then applied to the split
being scored (choosing it on the scored split itself would flatter the baseline).
"""
from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pandas as pd
from sklearn.metrics import balanced_accuracy_score, confusion_matrix, precision_recall_fscore_support

HELD_OUT_SPLITS = ("seen_val", "seen_test", "unseen_val", "unseen_test")
SEEN_SPLITS = ("seen_val", "seen_test")  # held-out utterances of training speakers
UNSEEN_SPLITS = ("unseen_val", "unseen_test")  # speakers never trained on
CURVE_SPLITS = ("train", "seen_val", "unseen_val")
REQUIRED_FILES = ("config.json", "labels.json", "splits.csv", "metrics.csv", "predictions.csv")
TOP_K_STORED = 5  # predictions.csv keeps the five best classes per head

Splits = str | Sequence[str]


class RunError(ValueError):
    """A run folder with a missing file or content that breaks the run-folder contract."""


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
        return (self.path / "embeddings.npz").exists()

    @cached_property
    def embeddings(self) -> Embeddings:
        return _read_embeddings(self.path / "embeddings.npz", self.splits)

    @cached_property
    def train(self) -> pd.DataFrame:
        """The training rows of splits.csv: the only rows a baseline may learn from."""
        return self.splits[self.splits["split"] == "train"]


# --- loading ---------------------------------------------------------------------------------------
def load_run(run_dir: str | Path) -> Run:
    """Read and check a run folder; a problem names the file (and row) at fault."""
    path = Path(run_dir)
    if not path.is_dir():
        raise RunError(f"{path}: run folder not found")
    missing = [name for name in REQUIRED_FILES if not (path / name).is_file()]
    if missing:
        raise RunError(f"{path}: missing {', '.join(missing)} (a finished run folder has {', '.join(REQUIRED_FILES)})")
    config = _read_json(path / "config.json")
    labels = _read_json(path / "labels.json")
    if not isinstance(labels, dict) or not all(
        isinstance(v, list) and len(v) >= 2 and all(isinstance(c, str) for c in v) for v in labels.values()
    ):
        raise RunError(f"{path / 'labels.json'}: expected {{head: [at least two class names]}}")
    splits = _read_csv(path / "splits.csv", ["row", "speaker", "split"] + [h for h in labels if h != "speaker"])
    splits["row"] = _as_numbers(splits, "row", path / "splits.csv", int)
    if splits["row"].duplicated().any():
        dup = splits.loc[splits["row"].duplicated(), "row"].tolist()[:5]
        raise RunError(f"{path / 'splits.csv'}: duplicate row ids {dup}")
    metrics = _read_csv(path / "metrics.csv", ["epoch", "split", "head", "metric", "value"])
    metrics["epoch"] = _as_numbers(metrics, "epoch", path / "metrics.csv", int)
    metrics["value"] = _as_numbers(metrics, "value", path / "metrics.csv", float)
    predictions = _read_predictions(path / "predictions.csv", labels)
    unknown = sorted(set(predictions["row"]) - set(splits["row"]))
    if unknown:
        raise RunError(f"{path / 'predictions.csv'}: rows {unknown[:5]} are not in splits.csv")
    return Run(path, config, labels, splits, metrics, predictions)


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise RunError(f"{path}: not valid JSON ({err})") from err


def _read_csv(path: Path, required: Iterable[str]) -> pd.DataFrame:
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


def _read_predictions(path: Path, labels: dict[str, list[str]]) -> pd.DataFrame:
    columns = ["row", "speaker", "split"]
    for head in labels:
        columns += [f"{head}_true", f"{head}_pred", f"{head}_prob", f"{head}_top5"]
    frame = _read_csv(path, columns)
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
                f"head {head!r} in labels.json"
            )
    return frame


def _read_embeddings(path: Path, splits: pd.DataFrame) -> Embeddings:
    if not path.is_file():
        raise RunError(f"{path}: missing (trunk features are needed for projections and probes)")
    with np.load(path, allow_pickle=False) as data:
        missing = [k for k in ("features", "row", "split") if k not in data.files]
        if missing:
            raise RunError(f"{path}: missing array(s) {missing}")
        features = data["features"].astype(np.float32)
        row = data["row"].astype(np.int64)
        split = data["split"].astype(str)
    if features.ndim != 2 or not (len(features) == len(row) == len(split)):
        raise RunError(f"{path}: expected features (N, D), row (N,), split (N,); got "
                       f"{features.shape}, {row.shape}, {split.shape}")
    unknown = sorted(set(row.tolist()) - set(splits["row"]))
    if unknown:
        raise RunError(f"{path}: rows {unknown[:5]} are not in splits.csv")
    expected = splits.set_index("row")["split"].reindex(row).to_numpy()
    disagree = np.flatnonzero(expected != split)
    if disagree.size:
        k = int(disagree[0])
        raise RunError(f"{path}: row {row[k]} is marked {str(split[k])!r} but splits.csv puts it in "
                       f"{str(expected[k])!r}")
    if not np.isfinite(features).all():
        bad = row[~np.isfinite(features).all(axis=1)][:5].tolist()
        raise RunError(f"{path}: non-finite features for rows {bad}")
    return Embeddings(features, row, split)


# --- selections ------------------------------------------------------------------------------------
def _split_list(splits: Splits) -> list[str]:
    return [splits] if isinstance(splits, str) else list(splits)


def scored(run: Run, head: str, splits: Splits) -> pd.DataFrame:
    """Prediction rows of ``splits`` that have a target for ``head``.

    Only the speaker head lacks targets, on unseen speakers (they are not among its classes); those
    rows cannot be scored rather than being wrong.
    """
    _check_head(run, head)
    rows = run.predictions[run.predictions["split"].isin(_split_list(splits))]
    return rows[rows[f"{head}_true"] != ""]


def _check_head(run: Run, head: str) -> None:
    if head not in run.labels:
        raise RunError(f"{run.path}: no head {head!r} in labels.json (heads: {run.heads})")


def majority_class(run: Run, head: str) -> str:
    """The most frequent training class of ``head`` (ties broken by name, so it is reproducible)."""
    _check_head(run, head)
    if head not in run.train.columns:
        raise RunError(f"{run.path / 'splits.csv'}: no column {head!r} to find the majority class")
    counts = run.train[head].value_counts()
    if counts.empty:
        raise RunError(f"{run.path / 'splits.csv'}: no training rows")
    top = counts[counts == counts.max()].index
    return sorted(top)[0]


def class_sizes(run: Run, head: str) -> pd.DataFrame:
    """Training utterances and speakers per class of ``head``, largest class first."""
    _check_head(run, head)
    train = run.train
    sizes = pd.DataFrame({
        "train_utterances": train.groupby(head).size(),
        "train_speakers": train.groupby(head)["speaker"].nunique(),
    }).reindex(run.labels[head]).fillna(0).astype(int)
    sizes.index.name = "class"
    return _largest_first(sizes)


def _largest_first(sizes: pd.DataFrame) -> pd.DataFrame:
    order = sorted(sizes.index, key=lambda c: (-sizes.at[c, "train_utterances"], str(c)))
    return sizes.loc[order]


# --- scores ----------------------------------------------------------------------------------------
def top_k_accuracy(rows: pd.DataFrame, head: str, k: int) -> float:
    """Share of rows whose true class is among the first ``k`` names of ``{head}_top5``.

    Only the five best classes are stored, so scikit-learn's score-based version cannot be used.
    """
    if not 1 <= k <= TOP_K_STORED:
        raise ValueError(f"k must be in 1..{TOP_K_STORED} (predictions.csv stores the top {TOP_K_STORED})")
    if rows.empty:
        return float("nan")
    top = rows[f"{head}_top5"].str.split("|")
    hits = [true in names[:k] for true, names in zip(rows[f"{head}_true"], top)]
    return float(np.mean(hits))


def balanced_accuracy(rows: pd.DataFrame, head: str) -> float:
    """Mean per-class recall over the classes present in ``rows``."""
    if rows.empty:
        return float("nan")
    with warnings.catch_warnings():  # predictions of classes absent from y_true are expected
        warnings.simplefilter("ignore", UserWarning)
        return float(balanced_accuracy_score(rows[f"{head}_true"], rows[f"{head}_pred"]))


def scores(run: Run, head: str, rows: pd.DataFrame) -> dict:
    """Accuracy, top-3, balanced accuracy, chance and majority baseline of ``rows`` for ``head``."""
    majority = majority_class(run, head)
    truth = rows[f"{head}_true"]
    return {
        "n": len(rows),
        "accuracy": float((truth == rows[f"{head}_pred"]).mean()) if len(rows) else float("nan"),
        "top3": top_k_accuracy(rows, head, 3),
        "balanced_accuracy": balanced_accuracy(rows, head),
        "chance": 1.0 / len(run.labels[head]),
        "majority": float((truth == majority).mean()) if len(rows) else float("nan"),
        "majority_class": majority,
    }


def accuracy_table(run: Run, heads: Sequence[str] | None = None,
                   splits: Sequence[str] = HELD_OUT_SPLITS) -> pd.DataFrame:
    """One row per head and held-out split: accuracy beside chance and the majority baseline.

    ``n`` counts the scored rows; ``unscored`` the split's rows without a target for the head (e.g.
    a class the head was never trained on), which are left out of every score rather than hidden.
    A (head, split) pair with no target at all (speaker on unseen speakers) has no row.
    """
    records = []
    for head in heads or run.heads:
        for split in splits:
            rows = scored(run, head, split)
            if len(rows):
                total = int((run.predictions["split"] == split).sum())
                records.append({"head": head, "split": split, **scores(run, head, rows),
                                "unscored": total - len(rows)})
    return pd.DataFrame(records, columns=["head", "split", "n", "accuracy", "top3", "balanced_accuracy",
                                          "chance", "majority", "majority_class", "unscored"])


def per_class_metrics(run: Run, head: str, splits: Splits = UNSEEN_SPLITS) -> pd.DataFrame:
    """Precision, recall, F1 and support per class, beside its training size; largest class first.

    Classes that neither occur nor are predicted in ``splits`` are left out (no evidence either way).
    """
    rows = scored(run, head, splits)
    sizes = class_sizes(run, head)
    present = set(rows[f"{head}_true"]) | set(rows[f"{head}_pred"])
    classes = [c for c in sizes.index if c in present] + sorted(present - set(sizes.index))
    if not classes:
        return pd.DataFrame(columns=["class", "train_speakers", "train_utterances", "support",
                                     "precision", "recall", "f1"])
    precision, recall, f1, support = precision_recall_fscore_support(
        rows[f"{head}_true"], rows[f"{head}_pred"], labels=classes, zero_division=0)
    table = pd.DataFrame({"class": classes, "precision": precision, "recall": recall, "f1": f1,
                          "support": support})
    table = table.join(sizes.reindex(classes).fillna(0).astype(int).reset_index(drop=True))
    # A class never present in the split has no recall to speak of (scikit-learn reports 0).
    table.loc[table["support"] == 0, "recall"] = np.nan
    return table[["class", "train_speakers", "train_utterances", "support", "precision", "recall", "f1"]]


def confusion(run: Run, head: str, splits: Splits = UNSEEN_SPLITS, normalize: str | None = "true") -> pd.DataFrame:
    """Confusion matrix (rows = true class, columns = predicted), rows normalised to sum to 1.

    Labels are ordered by training size, largest first, so the big classes sit top-left and a
    column of errors toward them is easy to spot. Only classes seen in ``splits`` are shown.
    """
    rows = scored(run, head, splits)
    sizes = class_sizes(run, head)
    present = set(rows[f"{head}_true"]) | set(rows[f"{head}_pred"])
    classes = [c for c in sizes.index if c in present] + sorted(present - set(sizes.index))
    if not classes:
        return pd.DataFrame()
    matrix = confusion_matrix(rows[f"{head}_true"], rows[f"{head}_pred"], labels=classes, normalize=normalize)
    frame = pd.DataFrame(matrix, index=pd.Index(classes, name="true"), columns=pd.Index(classes, name="predicted"))
    return frame


# --- curves ----------------------------------------------------------------------------------------
def learning_curves(run: Run, metric: str = "loss", splits: Sequence[str] = CURVE_SPLITS,
                    heads: Sequence[str] | None = None) -> pd.DataFrame:
    """``epoch, split, head, value`` for one metric (``loss`` or ``acc``), ready for seaborn."""
    heads = list(heads or run.heads)
    m = run.metrics
    curves = m[(m["metric"] == metric) & m["split"].isin(splits) & m["head"].isin(heads)]
    if curves.empty:
        raise RunError(f"{run.path / 'metrics.csv'}: no {metric!r} values for heads {heads} on splits {list(splits)}")
    order = {h: i for i, h in enumerate(heads)}  # keep the run's head order for panels
    curves = curves[["epoch", "split", "head", "value"]]
    curves = curves.sort_values(["head", "split", "epoch"], key=lambda c: c.map(order) if c.name == "head" else c)
    return curves.reset_index(drop=True)
