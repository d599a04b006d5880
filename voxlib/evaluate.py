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
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from sklearn.metrics import balanced_accuracy_score, confusion_matrix, precision_recall_fscore_support

from voxlib.runfolder import (
    CURVE_SPLITS,
    HELD_OUT_SPLITS,
    TOP_K_SEPARATOR,
    TOP_K_STORED,
    UNSEEN_SPLITS,
    Run,
    RunError,
    is_pooled,
    load_pooled,
    load_run,
)
from voxlib.text import percent

Splits = str | Sequence[str]


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
    top = rows[f"{head}_top5"].str.split(TOP_K_SEPARATOR, regex=False)
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


# --- the end of training in a few lines -----------------------------------------------------------------------------
def pooled_summary_lines(run_dir: Path) -> str:
    """training_summary of a pooled folder: per head, seen over seeds and unseen pooled over folds."""
    pooled = load_pooled(run_dir)
    config = pooled.experiment["config"]
    lines = [f"pooled folder {run_dir}: {len(pooled.members)} runs (folds={config['folds']}, "
             f"seeds={config['seeds']})"]
    for head, entry in pooled.summary.items():
        parts = []
        if "seen" in entry:
            seen = entry["seen"]
            spread = f" ± {percent(seen['std'])} over seeds" if seen.get("std") is not None else ""
            parts.append(f"seen {percent(seen['accuracy'])}{spread} (majority {percent(seen['majority'])})")
        if "unseen" in entry and "low" in entry["unseen"]:
            u = entry["unseen"]
            parts.append(f"unseen {percent(u['accuracy'])} [{percent(u['low'])}, {percent(u['high'])}] over "
                         f"{u['speakers']} speakers (majority {percent(u['majority'])})")
        lines.append(f"  {head:<12} " + "; ".join(parts))
    index = run_dir / "reports" / "index.html"
    lines.append(f"report: {index}" if index.is_file()
                 else f"report: python -m voxlib.report --run-dir {run_dir} --folds {config['folds']} "
                      f"--seeds {config['seeds']}  (notebooks 01-03 as HTML)")
    return "\n".join(lines)


def training_summary(run_dir: str | Path) -> str:
    """A few lines for the end of training: best epoch, test accuracy per head beside the majority
    baseline, where the report is (or how to make it)."""
    if is_pooled(run_dir):
        return pooled_summary_lines(Path(run_dir))
    run = load_run(run_dir)
    summary_path = run.path / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    epochs = int(run.metrics["epoch"].max()) if len(run.metrics) else 0
    best = summary.get("best_epoch")
    lines = [f"run {run.path}: {epochs} epoch{'s' if epochs != 1 else ''}"
             + (f", best epoch {best} (predictions from {summary.get('predictions_from', 'best.pt')})"
                if best else "")]
    table = accuracy_table(run, splits=("seen_test", "unseen_test"))
    for head in dict.fromkeys(table["head"]):
        parts = []
        for r in table[table["head"] == head].itertuples(index=False):
            verdict = "above" if r.accuracy > r.majority else "NOT above"
            parts.append(f"{r.split} {percent(r.accuracy)} ({verdict} majority {percent(r.majority)}, n={r.n})")
        lines.append(f"  {head:<12} " + "; ".join(parts))
    index = run.path / "reports" / "index.html"
    lines.append(f"report: {index}" if index.is_file()
                 else f"report: python -m voxlib.report --run-dir {run.path}  (notebooks 01-03 as HTML)")
    return "\n".join(lines)
