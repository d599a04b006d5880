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
trainings, so an experiment whose folds cannot all hold out a speaker is refused before any of them
(:func:`refuse_useless_folds`). The pooled files are written only from complete members
(runfolder.contract_problems), and a re-run that raises ``epochs`` says what it extends and keeps
the earlier pooled results until every member is extended.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from collections import Counter
from pathlib import Path
from typing import Callable

import pandas as pd

from voxlib import runfolder
from voxlib.config import Config, ConfigError
from voxlib.corpora.source import default_run_dir, manifest_path
from voxlib.data import unseen_folds
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
    refuse_useless_folds(cfg)
    root = pooled_dir(cfg)
    main = int(os.environ.get("RANK", "0")) == 0  # under torchrun every rank trains, rank 0 writes
    plan = members(cfg)
    # the pooled folder's lock is held throughout (one experiment per folder); each member has its own
    with runfolder.writing(root, "pooled folder") if main else contextlib.nullcontext(root):
        if main:
            check_pooled_folder(root, cfg)
            note_extension(root, cfg)
            runfolder.write_json(root, runfolder.EXPERIMENT, {
                "config": cfg.to_dict(), "members": [{"name": n, "fold": m.fold, "seed": m.seed} for n, m in plan]})
        for i, (name, member) in enumerate(plan, 1):
            log.info("member %d of %d: %s (fold %d of %d, seed %d)", i, len(plan), name, member.fold + 1,
                     cfg.folds, member.seed)
            train_run(member)
        if main:
            refuse_incomplete_members(root, plan)
            pool(root, plan)
    return root


def note_extension(root: Path, cfg: Config) -> None:
    """Say what a re-run of a finished experiment with other ``epochs`` extends (pooled.json, and each
    member's results, stay in place until the new ones are written)."""
    if not (root / runfolder.POOLED).is_file() or not runfolder.is_pooled(root):
        return
    old = runfolder.read_json(root / runfolder.EXPERIMENT).get("config", {}).get("epochs")
    if old is not None and old != cfg.epochs:
        log.info("extending the finished experiment %s from %s to %d epochs per member (%d trainings); its "
                 "%s-epoch pooled results stay in place until every member is extended", root, old, cfg.epochs,
                 cfg.folds * cfg.seeds, old)


def refuse_incomplete_members(root: Path, plan: list[tuple[str, Config]]) -> None:
    """Pooled files come only from complete members: every contract file present and loading."""
    for name, _ in plan:
        problems = runfolder.contract_problems(root / name)
        if problems:
            file, why = next(iter(problems.items()))
            raise runfolder.RunError(f"{root / name / file}: {why}; the pooled files are not written from an "
                                     f"incomplete member: re-run the same command to finish it")


def refuse_useless_folds(cfg: Config) -> None:
    """folds=K pays K trainings for an unseen-speaker answer: refuse before the first one when some fold
    would hold out no speaker, naming the corpus sizes and a setting that would work."""
    if cfg.folds == 1:
        return
    try:
        table = speakers_of(manifest_path(cfg))
    except (OSError, ValueError, KeyError, pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError):
        return  # an unreadable manifest is reported, row by row, by the manifest check that follows
    held = Counter(unseen_folds(table, cfg).values())
    empty = [k for k in range(cfg.folds) if not held[k]]
    if not empty:
        return
    stratum = "birthplace" if "birthplace" in table.columns else None
    sizes = table.groupby(stratum).size().sort_values(ascending=False) if stratum else \
        pd.Series({"(whole corpus)": len(table)})
    shown = ", ".join(f"{name} {n}" for name, n in sizes.head(8).items()) + (
        f" and {len(sizes) - 8} more" if len(sizes) > 8 else "")
    corpus = f"{len(table)} speakers in {len(sizes)} {stratum or 'corpus'} class(es): {shown}"
    need = max(cfg.unseen_min_speakers, 2)
    if cfg.unseen_per_class <= 0:
        fix = "unseen_per_class=0 holds out no speaker; set it to 1"
    elif not held:
        fix = (f"no class has the {need} speakers unseen_min_speakers={cfg.unseen_min_speakers} asks for, so no "
               f"fold can hold out a speaker; " + (
                   f"set unseen_min_speakers={int(sizes.max())}" if sizes.max() >= 2 else
                   "every class has one speaker: use folds=1 (seeds=N repeats the run over seeds)"))
    else:
        fix = (f"only {sum(held.values())} speakers can be held out, so fold(s) {', '.join(map(str, empty))} "
               f"would hold out none; use folds={sum(held.values())} or fewer")
    raise ConfigError(f"parameter 'folds': {cfg.folds} folds would train runs without an unseen-speaker result: "
                      f"{corpus}; {fix}")


def speakers_of(manifest: Path) -> pd.DataFrame:
    """One row per speaker (speaker, birthplace if present, sex) read straight from the manifest CSV."""
    frame = pd.read_csv(manifest, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    frame.columns = [c.strip() for c in frame.columns]
    columns = ["speaker", "sex"] + (["birthplace"] if "birthplace" in frame.columns else [])
    frame = frame[columns].apply(lambda c: c.str.strip())
    return frame[frame["speaker"] != ""].drop_duplicates("speaker").reset_index(drop=True)


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
