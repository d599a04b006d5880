"""Splits, label vocabularies and the crop dataset between the feature cache and the model.

Two held-out questions need two kinds of split: *seen* speakers (some of each speaker's utterances
held out) measure how well a known voice is recognised; *unseen* speakers (whole speakers held out)
measure whether birthplace and sex generalise beyond the voices the model memorised. Every random
choice is derived from ``cfg.seed`` and a stable name or index, so a split or a crop never depends
on iteration order, worker count or how often the process was restarted.
"""
from __future__ import annotations

import logging
import math
import sys
import zlib
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset, Sampler

from voxlib.corpora.manifest import read_manifest
from voxlib.corpora.source import manifest_path
from voxlib.features import FeatureCache
from voxlib.perturb import VOICE_HEADS, VoicePerturbation
from voxlib.runfolder import HELD_OUT_SPLITS, SPLITS

log = logging.getLogger(__name__)

HELD_OUT = HELD_OUT_SPLITS


def _rng(seed: int, *keys: str | int) -> np.random.Generator:
    """A generator keyed by the seed and stable names (crc32, not Python's salted hash)."""
    parts = [seed] + [zlib.crc32(k.encode()) if isinstance(k, str) else int(k) for k in keys]
    return np.random.default_rng(parts)


# --- splits ------------------------------------------------------------------------------------
def make_splits(table: pd.DataFrame, cfg) -> pd.Series:
    """Split name per manifest row (index aligned with ``table``).

    A non-empty ``split`` column in the manifest wins (every row must then name a valid split).
    Otherwise: ``unseen_per_class`` whole speakers of each birthplace with at least
    ``unseen_min_speakers`` speakers (with ``folds > 1``: fold ``fold``'s share of them, see
    :func:`unseen_folds`) go to unseen_val/unseen_test (half each, by recording); of every
    other speaker, ``val_fraction``/``test_fraction`` of the utterances go to seen_val/seen_test, whole
    recordings at a time so segments of one file never straddle train and test, and at least one
    recording always stays in train.
    """
    if "split" in table.columns and table["split"].fillna("").astype(str).str.strip().ne("").any():
        return _manifest_splits(table)
    splits = pd.Series("train", index=table.index, dtype=object)
    unseen = _choose_unseen(table, cfg)
    for speaker, group in table.groupby("speaker", sort=True):
        if speaker in unseen:
            n_val = len(group) // 2  # the odd utterance, if any, goes to test
            got = 0
            for idx in _recordings(group, _rng(cfg.seed, "unseen", speaker), cfg.split_by == "recording"):
                fits = got + len(idx) <= n_val
                splits[idx] = "unseen_val" if fits else "unseen_test"
                got += len(idx) if fits else 0
        else:
            _split_seen_speaker(group, splits, cfg)
    return splits


def _manifest_splits(table: pd.DataFrame) -> pd.Series:
    values = table["split"].fillna("").astype(str).str.strip()
    bad = values[~values.isin(SPLITS)]
    if len(bad):
        rows = table.loc[bad.index, "row"] if "row" in table.columns else bad.index + 1
        lines = [f"row {r} ({table.at[i, 'path']}): split {v!r} is not one of {SPLITS}"
                 for i, r, v in zip(bad.index, rows, bad)]
        raise ValueError("manifest 'split' column has invalid values:\n" + "\n".join(lines[:50]))
    if not values.eq("train").any():
        raise ValueError("manifest 'split' column assigns no row to 'train'")
    return values.astype(object)


def _choose_unseen(table: pd.DataFrame, cfg) -> set[str]:
    """The whole speakers held out in this run: those of fold ``cfg.fold``."""
    return {speaker for speaker, fold in unseen_folds(table, cfg).items() if fold == cfg.fold}


def unseen_folds(table: pd.DataFrame, cfg) -> dict[str, int]:
    """The fold in which each held-out speaker is unseen; speakers never held out are absent.

    Per birthplace class with at least ``max(unseen_min_speakers, 2)`` speakers, the speakers are put in
    a seeded order that alternates sexes (a class starts with a different sex than its neighbour, so
    one speaker per class still mixes sexes across classes).

    - ``folds=1``: the first ``min(unseen_per_class, n - 1)`` speakers of that order are unseen (the
      single split; a class always keeps a seen speaker).
    - ``folds=K >= 2``: *every* speaker of the class is unseen in exactly one fold. Speakers are dealt
      to folds in turn, one sex of a class after the other, the turn carrying on from class to class:
      so within a class the folds' shares differ by at most one speaker and each sex is spread over the
      folds, and across classes the folds' totals differ by at most one. A class with fewer speakers
      than folds is absent from some folds. A fold holds out at most ``ceil(n / K) <= n - 1`` speakers
      of a class, so every class keeps a seen speaker in every fold; ``unseen_per_class`` only
      switches the unseen split off when 0.
    """
    folds: dict[str, int] = {}
    turn = 0  # the next fold to deal a speaker to (folds >= 2)
    if cfg.unseen_per_class <= 0:
        return folds
    # without a birthplace column (JVS) the held-out speakers are drawn from the whole corpus
    stratum = "birthplace" if "birthplace" in table.columns else None
    speakers = table.drop_duplicates("speaker").assign(_all="all")[["speaker", stratum or "_all", "sex"]]
    for k, (place, group) in enumerate(speakers.groupby(stratum or "_all", sort=True)):
        if len(group) < max(cfg.unseen_min_speakers, 2):
            continue
        rng = _rng(cfg.seed, "unseen-class", place)
        by_sex = {sex: list(rng.permutation(sorted(g["speaker"]))) for sex, g in group.groupby("sex", sort=True)}
        sexes = sorted(by_sex)
        # start with a different sex in alternate classes, so one-per-class still mixes sexes
        order = sexes[k % len(sexes):] + sexes[: k % len(sexes)]
        if cfg.folds == 1:
            sequence = []
            while any(by_sex.values()):
                sequence += [by_sex[sex].pop(0) for sex in order if by_sex[sex]]
            folds |= dict.fromkeys(sequence[: min(cfg.unseen_per_class, len(group) - 1)], 0)
            continue
        for speaker in [s for sex in order for s in by_sex[sex]]:
            folds[speaker] = turn % cfg.folds
            turn += 1
    return folds


def _recordings(group: pd.DataFrame, rng: np.random.Generator, by_recording: bool = True) -> list[pd.Index]:
    """The speaker's rows grouped by source file (or one row per unit), in a seeded order.

    Grouping by file keeps windows cut from one recording (Speech Accent Archive) on one side of the
    split; ``split_by="utterance"`` treats segments of a long talk (CSJ IPUs) as separate utterances.
    """
    if by_recording:
        units = [g.index for _, g in group.groupby("path", sort=True)]
    else:
        units = [group.index[[i]] for i in range(len(group))]
    return [units[i] for i in rng.permutation(len(units))]


def _split_seen_speaker(group: pd.DataFrame, splits: pd.Series, cfg) -> None:
    units = _recordings(group, _rng(cfg.seed, "seen", group["speaker"].iloc[0]), cfg.split_by == "recording")
    n = len(group)
    want = {"seen_test": math.floor(cfg.test_fraction * n + 0.5), "seen_val": math.floor(cfg.val_fraction * n + 0.5)}
    got = {"seen_test": 0, "seen_val": 0}
    trained = False
    for i, idx in enumerate(units):
        if i == len(units) - 1 and not trained:
            target = "train"  # at least one recording of every seen speaker is trained on
        else:
            target = next((s for s in ("seen_test", "seen_val") if got[s] + len(idx) <= want[s]), "train")
        splits[idx] = target
        if target == "train":
            trained = True
        else:
            got[target] += len(idx)


# --- labels ------------------------------------------------------------------------------------
def build_vocabularies(table: pd.DataFrame, splits: pd.Series, heads: Sequence[str]) -> dict[str, list[str]]:
    """Class names per head, in logit order, from the training rows only.

    The speaker head knows only training speakers; other heads know the classes seen in training.
    A head with fewer than two classes cannot be trained and is left out with a notice.
    """
    if "birthplace" in heads and "birthplace" not in table.columns:  # JVS: the head is simply absent
        log.warning("head 'birthplace' skipped: the manifest has no birthplace column")
        heads = [h for h in heads if h != "birthplace"]
    missing = [h for h in heads if h not in table.columns]
    if missing:
        raise ValueError(f"label column(s) {missing} not in the manifest (columns: {list(table.columns)})")
    train = table[splits == "train"]
    vocab: dict[str, list[str]] = {}
    for head in heads:
        classes = sorted(train[head].dropna().astype(str).unique())
        classes = [c for c in classes if c != ""]
        if len(classes) < 2:
            log.warning("head %r skipped: %d class(es) in the training split (%s)", head, len(classes), classes)
            continue
        vocab[head] = classes
    if not vocab:
        raise ValueError(f"no head has at least 2 classes in the training split (asked for {list(heads)})")
    return vocab


def encode_targets(table: pd.DataFrame, vocab: dict[str, list[str]]) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """Class index per row and head; -1 where the class is not in the vocabulary.

    Returns the targets and, per head, how many rows got -1 (unseen speakers on the speaker head,
    or a held-out class never seen in training); those rows are ignored by loss and accuracy.
    """
    targets, unknown = {}, {}
    for head, classes in vocab.items():
        lookup = {c: i for i, c in enumerate(classes)}
        codes = table[head].astype(str).map(lookup).fillna(-1).astype(np.int64).to_numpy()
        targets[head] = codes
        unknown[head] = int((codes < 0).sum())
    return targets, unknown


# --- crops -------------------------------------------------------------------------------------
def crop_starts(n_frames_clip: int, n_frames: int, count: int) -> list[int]:
    """Evenly spaced crop starts covering the clip (all 0 for a clip shorter than a crop)."""
    span = max(n_frames_clip - n_frames, 0)
    return [int(round(s)) for s in np.linspace(0, span, count)]


def fit_crop(spec: np.ndarray, start: int, n_frames: int) -> np.ndarray:
    """(256, n_frames) window from ``start``; a short clip is padded with 0, the silence value."""
    window = spec[:, start : start + n_frames]
    if window.shape[1] < n_frames:
        window = np.pad(window, ((0, 0), (0, n_frames - window.shape[1])))
    return window


def eval_crops_of(spec: np.ndarray, n_frames: int, count: int) -> np.ndarray:
    """``count`` evenly spaced crops of a ``(bins, frames)`` spectrogram, ``(count, 1, bins, n_frames)``."""
    starts = crop_starts(spec.shape[1], n_frames, count)
    return np.stack([fit_crop(spec, s, n_frames)[None] for s in starts])


def spec_augment(crop: np.ndarray, rng: np.random.Generator, freq_masks: int, freq_width: int,
                 time_masks: int, time_width: int) -> np.ndarray:
    """SpecAugment-style masks (Park et al. 2019) on a ``(bins, frames)`` crop, set to 0 (silence).

    Each mask's width is drawn uniformly from 0..width and its position uniformly within the crop.
    """
    crop = crop.copy()
    bins, frames = crop.shape
    for size, count, width, axis in ((bins, freq_masks, freq_width, 0), (frames, time_masks, time_width, 1)):
        for _ in range(count):
            w = int(rng.integers(0, min(width, size) + 1))
            start = int(rng.integers(0, size - w + 1))
            if axis == 0:
                crop[start:start + w, :] = 0
            else:
                crop[:, start:start + w] = 0
    return crop


class CropDataset(Dataset):
    """Items ``(x, {head: target}, row)`` for the given manifest rows.

    ``targets`` are full-length arrays indexed by manifest row (from :func:`encode_targets`).
    Training: one random ``n_frames`` crop, x of shape (1, 256, n_frames), the start (and any
    SpecAugment masks) drawn from (seed, epoch, row) so a resumed run sees exactly the crops an
    uninterrupted one would; call :meth:`set_epoch` each epoch. Evaluation: ``eval_crops`` fixed evenly
    spaced crops stacked to (eval_crops, 1, 256, n_frames); the caller averages their predictions.
    ``masks`` = (freq_masks, freq_mask_width, time_masks, time_mask_width), training only.
    ``perturb`` gives a share of the training crops a new voice (perturb.py), drawn from (seed, epoch,
    row); such a crop has no speaker or sex target (-1). With ``perturb_view`` (for a birthplace
    network of its own) the recorded crop stays and the perturbed one (or, when none is drawn, the
    same crop) follows it as a second channel, x of shape (2, 256, n_frames), every target kept: the
    model's own birthplace network reads the new voice, the speaker trunk the recorded one. Off (None
    or all zero), no number is drawn and the crops are those of a run without it.
    """

    def __init__(self, cache, rows: Sequence[int], targets: dict[str, np.ndarray], n_frames: int = 256,
                 train: bool = True, eval_crops: int = 3, seed: int = 0, masks: tuple[int, int, int, int] = (0, 0, 0, 0),
                 perturb: VoicePerturbation | None = None, perturb_view: bool = False):
        self.cache = cache
        self.rows = np.asarray(rows, dtype=np.int64)
        self.targets = targets
        self.n_frames = n_frames
        self.train = train
        self.eval_crops = eval_crops
        self.seed = seed
        self.masks = masks
        self.perturb = perturb if perturb is not None and perturb.active else None
        self.perturb_view = perturb_view and self.perturb is not None
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        row = int(self.rows[i])
        spec = self.cache.get(row)
        factors = None
        if self.train:
            length = self.n_frames
            if self.perturb is not None:
                factors = self.perturb.draw(_rng(self.seed, "perturb", self.epoch, row))
                if factors is not None:
                    length = self.perturb.window_frames(factors, self.n_frames)
            # with a view the recorded crop is placed as without perturbation; the new voice reads from there
            span = max(spec.shape[1] - (self.n_frames if self.perturb_view else length), 0)
            start = int(_rng(self.seed, "crop", self.epoch, row).integers(0, span + 1))
            crop = fit_crop(spec, start, length)
            if factors is not None:
                voiced = self.perturb.apply(crop, factors, self.n_frames)
                crop = fit_crop(spec, start, self.n_frames) if self.perturb_view else voiced
            if self.masks[0] or self.masks[2]:
                crop = spec_augment(crop, _rng(self.seed, "mask", self.epoch, row), *self.masks)
            if self.perturb_view:
                x = np.stack([crop, voiced if factors is not None else crop])
            else:
                x = crop[None]
        else:
            x = eval_crops_of(spec, self.n_frames, self.eval_crops)
        y = {head: torch.tensor(t[row], dtype=torch.int64) for head, t in self.targets.items()}
        if factors is not None and not self.perturb_view:  # somebody else speaking: not the recorded speaker or sex
            y.update({head: torch.tensor(-1) for head in VOICE_HEADS if head in y})
        return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)), y, row


class BalancedSampler(Sampler[int]):
    """Draws training items with probability inversely proportional to their class frequency.

    Seeded by (seed, epoch) like DistributedSampler, so resume and world size do not change the
    draw: the same global sequence is generated on every rank and rank r takes items r, r+W, ...
    """

    def __init__(self, labels: np.ndarray, seed: int = 0, num_replicas: int = 1, rank: int = 0):
        labels = np.asarray(labels)
        valid = labels >= 0
        counts = np.bincount(labels[valid]) if valid.any() else np.zeros(1)
        weights = np.where(valid, 1.0 / np.maximum(counts[np.clip(labels, 0, None)], 1), 0.0)
        self.weights = torch.as_tensor(weights, dtype=torch.float64)
        self.seed, self.num_replicas, self.rank, self.epoch = seed, num_replicas, rank, 0
        self.total = (len(labels) // num_replicas) * num_replicas

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.total // self.num_replicas

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        draw = torch.multinomial(self.weights, self.total, replacement=True, generator=g).tolist()
        return iter(draw[self.rank : self.total : self.num_replicas])


# --- the run's data as one value -------------------------------------------------------------------
@dataclass(frozen=True)
class RunData:
    """What a run knows about its corpus: rows, features, splits, classes and targets.

    Built once by :func:`load_run_data`, the same way for training, the benchmark and exploration,
    so none of them can disagree about which rows are trained on or what class index a label has.
    """

    manifest: Any  # corpora.manifest.Manifest
    cache: Any  # features.FeatureCache
    splits: pd.Series  # split name per table row
    vocab: dict[str, list[str]]  # class names per head, in logit order
    targets: dict[str, np.ndarray]  # class index per table row and head (-1 = no target)

    @property
    def table(self) -> pd.DataFrame:
        return self.manifest.table

    @property
    def heads(self) -> list[str]:
        return list(self.vocab)

    @property
    def head_sizes(self) -> dict[str, int]:
        return {h: len(c) for h, c in self.vocab.items()}

    @cached_property
    def row_ids(self) -> np.ndarray:
        """The manifest's 1-based data-row number of every table row (the id in every output file)."""
        table = self.table
        return table["row"].to_numpy() if "row" in table.columns else table.index.to_numpy() + 1

    def rows(self, split: str) -> np.ndarray:
        return np.flatnonzero((self.splits == split).to_numpy())

    def split_table(self) -> pd.DataFrame:
        """splits.csv: row id, path, label columns, segment bounds and the split of every utterance."""
        table = self.table
        labels = [c for c in self.manifest.label_columns if c in table.columns]
        frame = table[["path"] + labels + [c for c in ("start", "end") if c in table.columns]].copy()
        frame.insert(0, "row", self.row_ids)
        frame["split"] = self.splits.to_numpy()
        return frame


def load_run_data(cfg, *, in_turn: Callable[[Callable[[], Any]], Any] | None = None, progress: bool = True,
                  workers: int | None = None) -> RunData:
    """Read and validate the corpus, open (or build) its feature cache, split it, encode the labels.

    ``in_turn(fn)`` runs ``fn`` on the main process first and on the others afterwards (DDP: rank 0
    validates and builds, the others then reuse its results); by default ``fn`` just runs.
    """
    run = in_turn or (lambda fn: fn())
    bars = progress and sys.stderr.isatty()  # in notebooks and logs a bar's every refresh becomes a line
    path = run(lambda: manifest_path(cfg))
    manifest = run(lambda: read_manifest(
        path, on_bad_file=cfg.on_bad_file, allow_outside_paths=cfg.allow_outside_paths,
        sample_rate=cfg.sample_rate, n_fft=cfg.n_fft, progress=bars, cache_dir=cfg.cache_dir or None,
        speaker_labels=cfg.speaker_label_names(), label_conflicts=cfg.label_conflicts))
    if progress:
        for note in manifest.notices:
            log.info("%s", note)
    cache = run(lambda: FeatureCache.build_or_open(manifest, cfg, progress=bars, workers=workers))
    table = manifest.table
    splits = make_splits(table, cfg)
    vocab = build_vocabularies(table, splits, cfg.head_names() or list(manifest.label_columns))
    targets, _ = encode_targets(table, vocab)
    data = RunData(manifest, cache, splits, vocab, targets)
    if progress:
        for split in HELD_OUT_SPLITS:
            rows = data.rows(split)
            for h in data.heads:
                n = int((targets[h][rows] < 0).sum())
                if n and not (h == "speaker" and split.startswith("unseen")):
                    log.warning("%s: %d of %d rows have a %s class unseen in training; not scored on that head",
                                split, n, len(rows), h)
    return data
