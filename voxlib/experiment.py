"""Speaker folds and training seeds: K x N ordinary runs inside one pooled folder.

``folds=K`` trains K runs whose unseen speakers are disjoint and together hold out every speaker of
each class that can spare one (data.unseen_folds); ``seeds=N`` repeats each with training seeds
``seed, seed+1, ...``. Every member is a normal, resumable run folder inside the pooled folder
(runfolder.member_name: ``fold<k>``, ``seed<s>`` or ``fold<k>-seed<s>``), trained by the runner the
caller gives, so re-running the same command resumes the member that was
interrupted and finds the finished ones complete. The member runner is passed in (train.py passes
``train_run``), so this module knows folds and seeds, never the training loop. When every member is finished the pooled folder
gets, through runfolder.py:

- ``pooled_predictions.csv``: every member's unseen-speaker prediction rows, ``fold`` and ``seed``
  first (per seed, each eligible speaker exactly once);
- ``member_scores.csv``: each member's seen and unseen accuracy per head beside its majority baseline;
- ``pooled.json`` (last): per head the unseen accuracy pooled over folds with a bootstrap interval
  over speakers and the per-fold spread, and the seen accuracy over seeds (mean, spread); see
  pooled.pooled_summary.

folds=1 and seeds=1 is the single run folder of train_run, with no members. The cost is K x N
trainings.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from pathlib import Path
from typing import Callable

import pandas as pd

from voxlib import runfolder
from voxlib.config import Config, ConfigError
from voxlib.corpora.source import default_run_dir
from voxlib.evaluate import scored, scores
from voxlib.pooled import pooled_summary

log = logging.getLogger("voxlib.train")  # the trainer's log: one stream for the whole experiment


def members(cfg: Config) -> list[tuple[str, Config]]:
    """(folder name, Config) of every member, folds outermost; each member is one plain run."""
    root = pooled_dir(cfg)
    found = []
    for fold in range(cfg.folds):
        for offset in range(cfg.seeds):
            seed = cfg.seed + offset
            name = runfolder.member_name(fold, seed, cfg.folds, cfg.seeds)
            found.append((name, dataclasses.replace(cfg, fold=fold, seed=seed, seeds=1, run_dir=str(root / name))))
    return found


def pooled_dir(cfg: Config) -> Path:
    return Path(cfg.run_dir) if cfg.run_dir else default_run_dir(cfg)


def run_experiment(cfg: Config, train_run: Callable[[Config], Path]) -> Path:
    """Train (or resume, or find finished) every member with ``train_run(member_cfg)``, then pool
    them; return the pooled folder."""
    if cfg.folds == 1 and cfg.seeds == 1:
        return train_run(cfg)
    refuse_fixed_splits(cfg)
    root = pooled_dir(cfg)
    main = int(os.environ.get("RANK", "0")) == 0  # under torchrun every rank trains, rank 0 writes
    plan = members(cfg)
    # the pooled folder's lock is held throughout (one experiment per folder); each member has its own
    with runfolder.writing(root, "pooled folder") if main else contextlib.nullcontext(root):
        if main:
            check_pooled_folder(root, cfg)
            (root / runfolder.POOLED).unlink(missing_ok=True)  # complete again only once pooled below
            runfolder.write_json(root, runfolder.EXPERIMENT, {
                "config": cfg.to_dict(), "members": [{"name": n, "fold": m.fold, "seed": m.seed} for n, m in plan]})
        for i, (name, member) in enumerate(plan, 1):
            log.info("member %d of %d: %s (fold %d of %d, seed %d)", i, len(plan), name, member.fold + 1,
                     cfg.folds, member.seed)
            train_run(member)
        if main:
            pool(root, plan)
    return root


def refuse_fixed_splits(cfg: Config) -> None:
    """folds > 1 needs vox to choose the unseen speakers: a manifest's own ``split`` column fixes them."""
    if cfg.folds == 1 or not cfg.manifest:
        return
    frame = pd.read_csv(cfg.manifest, usecols=lambda c: c.strip() == "split", dtype=str, keep_default_na=False,
                        encoding="utf-8-sig")
    if len(frame.columns) and frame.iloc[:, 0].str.strip().ne("").any():
        raise ConfigError(f"parameter 'folds': {cfg.manifest} assigns its own splits (a 'split' column), so every "
                          f"fold would hold out the same speakers; use folds=1, or clear the split column")


def check_pooled_folder(root: Path, cfg: Config) -> None:
    """Refuse a single run folder, or a pooled folder made with other folds or seeds."""
    if (root / runfolder.CONFIG).is_file():
        raise ConfigError(f"{root} holds a single run (folds=1, seeds=1); folds={cfg.folds}, seeds={cfg.seeds} "
                          f"need a new --run-dir")
    if runfolder.is_pooled(root):
        old = runfolder.read_json(root / runfolder.EXPERIMENT).get("config", {})
        changed = [f"{k}: {old.get(k)!r} -> {getattr(cfg, k)!r}" for k in ("folds", "seeds", "seed")
                   if old.get(k) != getattr(cfg, k)]
        if changed:
            raise ConfigError(f"{root} was made with other folds or seeds ({'; '.join(changed)}); use a new "
                              f"--run-dir, or restore them to continue it")


def pool(root: Path, plan: list[tuple[str, Config]]) -> None:
    """Write the pooled files from the finished members (pooled.json last)."""
    frames, records = [], []
    heads: list[str] = []
    for name, member in plan:
        run = runfolder.load_run(root / name)
        heads = heads or run.heads
        unseen = run.predictions[run.predictions["split"].isin(runfolder.UNSEEN_SPLITS)]
        frames.append(unseen.assign(fold=member.fold, seed=member.seed)[["fold", "seed", *unseen.columns]])
        for head in run.heads:
            for group, splits in (("seen", runfolder.SEEN_SPLITS), ("unseen", runfolder.UNSEEN_SPLITS)):
                rows = scored(run, head, splits)
                if len(rows):
                    s = scores(run, head, rows)
                    records.append({"member": name, "fold": member.fold, "seed": member.seed, "head": head,
                                    "group": group, "n": s["n"], "accuracy": s["accuracy"],
                                    "majority": s["majority"], "chance": s["chance"]})
    predictions = pd.concat(frames, ignore_index=True)
    member_scores = pd.DataFrame(records, columns=list(runfolder.MEMBER_SCORE_COLUMNS))
    summary = pooled_summary(member_scores, predictions, [h for h in heads if h != "speaker"] + (
        ["speaker"] if "speaker" in heads else []))
    runfolder.write_csv(root, runfolder.POOLED_PREDICTIONS, predictions)
    runfolder.write_csv(root, runfolder.MEMBER_SCORES, member_scores)
    runfolder.write_json(root, runfolder.POOLED, summary)
