"""The pooled numbers of a folds/seeds experiment: one accuracy per head over every member run.

One split holds out few speakers, so its unseen-speaker accuracy is one draw of voices. A folds
experiment holds out every eligible speaker exactly once (per seed); these functions pool the members'
rows into one unseen-speaker accuracy with an interval resampled over whole speakers (their utterances
are not independent evidence), the spread between folds, and the seen-speaker accuracy over seeds.
``experiment.pool`` writes :func:`pooled_summary` as ``pooled.json``; notebook 03, index.html and the
verdict read it back. No torch, no audio: predictions and member scores only.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import pandas as pd

from voxlib.runfolder import SEEN_SPLITS, UNSEEN_SPLITS

GROUPS = {"seen": SEEN_SPLITS, "unseen": UNSEEN_SPLITS}


def pooled_over_folds(predictions: pd.DataFrame, head: str = "birthplace", n_boot: int = 2000,
                      level: float = 0.95, seed: int = 0) -> dict:
    """Unseen-speaker accuracy pooled over speaker folds, with an interval resampled over speakers.

    ``predictions``: the scored unseen-speaker rows of every fold together, with columns ``fold``,
    ``speaker``, ``{head}_true`` and ``{head}_pred``. Each speaker is unseen in exactly one fold, so the
    pooled accuracy counts every held-out utterance once. The interval is a percentile bootstrap that
    draws whole speakers with replacement (their utterances are not independent evidence), which is
    what varies when a different set of voices is recorded. Returns ``accuracy, low, high, level, n,
    speakers, folds, fold_accuracy ({fold: accuracy}), fold_std`` (spread of the per-fold accuracies).
    """
    folds_per_speaker = predictions.groupby("speaker")["fold"].nunique()
    repeated = folds_per_speaker.index[folds_per_speaker > 1].tolist()
    if repeated:
        raise ValueError(f"speaker(s) {repeated[:5]} are unseen in more than one fold; folds must be disjoint")
    if predictions.empty:
        raise ValueError(f"no unseen-speaker {head} predictions to pool")
    correct = (predictions[f"{head}_true"] == predictions[f"{head}_pred"]).astype(float)
    low, high = _speaker_interval(correct, predictions["speaker"], n_boot, level, seed)
    by_fold = correct.groupby(predictions["fold"]).mean()
    return {"accuracy": float(correct.mean()), "low": low, "high": high, "level": level,
            "n": len(correct), "speakers": int(predictions["speaker"].nunique()), "folds": len(by_fold),
            "fold_accuracy": {int(f): float(a) for f, a in by_fold.items()},
            "fold_std": float(by_fold.std(ddof=1)) if len(by_fold) > 1 else float("nan")}


def _speaker_interval(correct: pd.Series, speaker: pd.Series, n_boot: int, level: float,
                      seed: int) -> tuple[float, float]:
    """Percentile bootstrap of the pooled accuracy, drawing whole speakers (with all their rows)."""
    per_speaker = correct.groupby(speaker).agg(["sum", "count"])
    draws = np.random.default_rng(seed).integers(0, len(per_speaker), size=(n_boot, len(per_speaker)))
    hits, counts = per_speaker["sum"].to_numpy()[draws].sum(1), per_speaker["count"].to_numpy()[draws].sum(1)
    low, high = np.quantile(hits / counts, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


def pooled_over_seeds(predictions: pd.DataFrame, head: str = "birthplace", n_boot: int = 2000,
                      level: float = 0.95, seed: int = 0) -> dict:
    """:func:`pooled_over_folds` for every training seed of a pooled folder, combined.

    ``predictions`` has a ``seed`` column besides ``fold``; within each seed every speaker is unseen in
    one fold (the seed also deals the folds, so a speaker's fold may differ between seeds). The
    accuracy counts every row of every seed; the interval draws whole speakers with their rows of
    every seed; ``members`` lists each (seed, fold) run's accuracy and ``fold_std`` their spread;
    ``seed_accuracy`` is each seed's pooled accuracy and ``seed_std`` their spread.
    """
    if predictions.empty:
        raise ValueError(f"no unseen-speaker {head} predictions to pool")
    per_seed = {int(s): pooled_over_folds(group, head, n_boot, level, seed)
                for s, group in predictions.groupby("seed", sort=True)}
    correct = (predictions[f"{head}_true"] == predictions[f"{head}_pred"]).astype(float)
    low, high = _speaker_interval(correct, predictions["speaker"], n_boot, level, seed)
    members = [{"seed": s, "fold": f, "accuracy": a} for s, r in per_seed.items() for f, a in r["fold_accuracy"].items()]
    spread = pd.Series([m["accuracy"] for m in members])
    seed_accuracy = pd.Series({s: r["accuracy"] for s, r in per_seed.items()})
    return {"accuracy": float(correct.mean()), "low": low, "high": high, "level": level, "n": len(correct),
            "speakers": int(predictions["speaker"].nunique()), "folds": max(r["folds"] for r in per_seed.values()),
            "seeds": len(per_seed), "members": members,
            "fold_std": float(spread.std(ddof=1)) if len(spread) > 1 else float("nan"),
            "seed_accuracy": {s: float(a) for s, a in seed_accuracy.items()},
            "seed_std": float(seed_accuracy.std(ddof=1)) if len(seed_accuracy) > 1 else float("nan")}


def pooled_summary(member_scores: pd.DataFrame, predictions: pd.DataFrame, heads: Sequence[str],
                   n_boot: int = 2000, level: float = 0.95) -> dict:
    """Per head, the pooled numbers of a folds/seeds experiment (what ``pooled.json`` holds).

    ``unseen``: :func:`pooled_over_seeds` of the pooled unseen-speaker rows, with the majority baseline
    pooled the same way (each member's own training majority class, counted over its rows).
    ``seen``: per seed, the accuracy over every member's seen-speaker rows (the folds of that seed
    together); ``accuracy`` is the mean over seeds and ``std`` their spread (None for one seed).
    """
    def plain(value):
        return None if isinstance(value, float) and math.isnan(value) else value

    out: dict = {}
    for head in heads:
        mine = member_scores[member_scores["head"] == head]
        entry: dict = {"chance": float(mine["chance"].iloc[0]) if len(mine) else None}
        for group in GROUPS:
            rows = mine[mine["group"] == group]
            if rows.empty:
                continue
            weighted = rows.assign(hits=rows["n"] * rows["accuracy"], base=rows["n"] * rows["majority"])
            per_seed = weighted.groupby("seed")[["hits", "base", "n"]].sum()
            accuracy, majority = per_seed["hits"] / per_seed["n"], per_seed["base"] / per_seed["n"]
            entry[group] = {"accuracy": float(accuracy.mean()), "majority": float(majority.mean()),
                            "n": int(per_seed["n"].sum()), "seeds": len(per_seed),
                            "std": plain(float(accuracy.std(ddof=1))) if len(per_seed) > 1 else None,
                            "per_seed": {str(int(s)): float(a) for s, a in accuracy.items()}}
        scored_rows = predictions[predictions.get(f"{head}_true", pd.Series("", index=predictions.index)) != ""]
        if "unseen" in entry and len(scored_rows):
            pooled = pooled_over_seeds(scored_rows, head, n_boot, level)
            pooled["seed_accuracy"] = {str(s): a for s, a in pooled["seed_accuracy"].items()}
            entry["unseen"] |= {k: plain(v) for k, v in pooled.items()}
        out[head] = entry
    return out


def pooled_table(summary: dict) -> pd.DataFrame:
    """The pooled headline per head: seen (mean and spread over seeds) and unseen (pooled, interval)."""
    records = []
    for head, entry in summary.items():
        seen, unseen = entry.get("seen", {}), entry.get("unseen", {})
        records.append({"head": head, "seen": seen.get("accuracy"), "seen_std_over_seeds": seen.get("std"),
                        "seen_majority": seen.get("majority"), "unseen": unseen.get("accuracy"),
                        "unseen_low": unseen.get("low"), "unseen_high": unseen.get("high"),
                        "fold_std": unseen.get("fold_std"), "unseen_majority": unseen.get("majority"),
                        "chance": entry.get("chance"), "unseen_speakers": unseen.get("speakers"),
                        "unseen_n": unseen.get("n")})
    return pd.DataFrame(records)


def member_table(summary: dict, head: str = "birthplace") -> pd.DataFrame:
    """Each member run's unseen-speaker accuracy for ``head`` (the per-fold spread, seed by seed)."""
    unseen = summary.get(head, {}).get("unseen", {})
    return pd.DataFrame(unseen.get("members", []), columns=["seed", "fold", "accuracy"])


def member_accuracy(member_scores: pd.DataFrame) -> pd.DataFrame:
    """One row per member run and head: its final accuracy on seen and on unseen speakers (member_scores.csv
    made wide), in the members' order."""
    wide = member_scores.pivot_table(index=["member", "fold", "seed", "head"], columns="group", values="accuracy",
                                     sort=False).reset_index()
    wide.columns.name = None
    return wide[[c for c in ("member", "fold", "seed", "head", "seen", "unseen") if c in wide.columns]]
