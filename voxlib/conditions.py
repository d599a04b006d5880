"""Can a label be read from the recording conditions alone? The channel-confound check.

Accent and speaker corpora are often collected class by class: one region's speakers recorded at
8 kHz over the phone, another's as 44.1 kHz studio FLAC. A classifier then learns the channel, and
every accuracy, probe and verdict about the label is really about the channel. This module measures
per clip only what the recording set-up decides — sample rate, container and codec, channel count,
level, noise floor and bandwidth (and duration, for the table) — and asks whether a classifier on those
numbers alone, cross-validated with whole speakers held out, predicts the label. If it clearly does, the
label is confounded with recording conditions and nothing learned from the audio can be trusted to be
about the label.

Measures (all from at most ``MAX_SECONDS`` of the row's audio, native rate, channels averaged):

- ``level_dbfs``: RMS level, ``20 log10(rms)`` (a full-scale sine is -3 dBFS);
- ``noise_floor_dbfs``: the 10th percentile of the RMS levels of 20 ms frames (the pauses);
- ``bandwidth_hz``: the highest frequency whose long-term power stays within ``BANDWIDTH_DROP_DB`` of
  the floor of the 100 Hz-4 kHz band (its 25th-percentile bin: the noise between harmonics). Noise, breath and fricatives keep a full-band recording
  within that range up to Nyquist whatever is said; a low-pass (telephone, low-bitrate codec, an
  upsampled narrow-band file) drops far below it. (A recording with almost no noise floor has no such
  floor to measure against, and its bandwidth follows the speech; real recordings have one.) A
  spectral roll-off ("99 % of the energy lies
  below f") would follow the speech content instead — the very thing an accent changes.

The classifier is a random forest (it needs no scaling and splits a sample rate or codec as readily
as a level), cross-validated with StratifiedGroupKFold so no speaker is on both sides. "Clearly beats
the majority baseline" means: balanced accuracy (mean per-class recall, where
predicting the majority class scores ``1 / classes``) at least ``CONFOUND_MARGIN`` above ``1 / classes``
*and* the lower end of its 95 % interval, resampled over speakers within each class, above it. An
interval wholly above chance that misses the margin is reported as a weak link, never as "no confound".
Duration is shown in the table but not given to the classifier: how long clips are follows speaking
rate and text as much as the set-up, and an accent that speaks slower is not a channel.
"""
from __future__ import annotations

import math
import sys
import warnings
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import soundfile as sf
from scipy.signal import welch
from sklearn.ensemble import RandomForestClassifier
from sklearn.metrics import balanced_accuracy_score
from sklearn.model_selection import StratifiedGroupKFold
from threadpoolctl import threadpool_limits  # a scikit-learn dependency
from tqdm import tqdm

from voxlib.audio import segment_frames
from voxlib.text import percent

MAX_SECONDS = 20.0  # audio read per clip: enough for level, floor and spectrum, cheap on long talks
FRAME_SECONDS = 0.02  # frames for the noise floor
FLOOR_PERCENTILE = 10
BANDWIDTH_DROP_DB = 30.0
BAND_REFERENCE_PERCENTILE = 25  # of the 100 Hz-4 kHz bins: the floor between harmonics, not the voice
SILENCE_DB = -120.0  # level given to digital silence (log of zero)
NUMERIC = ("sample_rate", "channels", "duration", "level_dbfs", "noise_floor_dbfs", "bandwidth_hz")
CATEGORICAL = ("codec",)
CLASSIFIER_MEASURES = ("sample_rate", "channels", "level_dbfs", "noise_floor_dbfs", "bandwidth_hz", "codec")
CONFOUND_MARGIN = 0.15  # balanced accuracy above 1/classes that counts as "clearly"
CV_FOLDS = 5
N_BOOT = 500


def clip_conditions(path: str, start: float = math.nan, end: float = math.nan) -> dict:
    """The recording-condition measures of one row (see the module docstring)."""
    info = sf.info(path)
    s0, s1 = segment_frames(start, end, info.samplerate, info.frames)
    s1 = min(s1, info.frames, s0 + int(MAX_SECONDS * info.samplerate))
    with sf.SoundFile(path) as fh:
        fh.seek(s0)
        wave = fh.read(s1 - s0, dtype="float32", always_2d=True).mean(axis=1)
    sr = info.samplerate
    frame = max(1, int(FRAME_SECONDS * sr))
    frames = wave[: len(wave) // frame * frame].reshape(-1, frame) if len(wave) >= frame else wave[None]
    frame_db = _db(np.sqrt(np.mean(frames.astype(np.float64) ** 2, axis=1)))
    freqs, power = welch(wave, fs=sr, nperseg=min(1024, len(wave)))
    power_db = 10 * np.log10(np.maximum(power, 1e-30))
    band = (freqs >= 100) & (freqs <= 4000)
    reference = np.percentile(power_db[band] if band.any() else power_db, BAND_REFERENCE_PERCENTILE)
    audible = np.flatnonzero(power_db >= reference - BANDWIDTH_DROP_DB)
    end_seconds = (min(segment_frames(start, end, sr, info.frames)[1], info.frames) - s0) / sr
    return {
        "sample_rate": sr, "channels": info.channels, "codec": f"{info.format}/{info.subtype}",
        "duration": end_seconds,
        "level_dbfs": float(_db(np.sqrt(np.mean(wave.astype(np.float64) ** 2)))),
        "noise_floor_dbfs": float(np.percentile(frame_db, FLOOR_PERCENTILE)),
        "bandwidth_hz": float(freqs[audible[-1]]) if len(audible) else 0.0,
    }


def _db(rms):
    return 20 * np.log10(np.maximum(rms, 10 ** (SILENCE_DB / 20)))


def measure_conditions(table: pd.DataFrame, progress: bool = False) -> pd.DataFrame:
    """Per row of a manifest table (or a run's splits.csv): its labels and recording-condition measures.

    Needs ``path`` (absolute, as read_manifest and splits.csv store it) and ``speaker``; ``start`` and
    ``end`` are used when present. The label columns are carried along for :func:`confound_check`.
    """
    starts = pd.to_numeric(table["start"], errors="coerce") if "start" in table.columns else pd.Series(math.nan, table.index)
    ends = pd.to_numeric(table["end"], errors="coerce") if "end" in table.columns else pd.Series(math.nan, table.index)
    rows = []
    for path, start, end in tqdm(zip(table["path"], starts, ends), total=len(table), desc="recording conditions",
                                 unit="clip", disable=not (progress and sys.stderr.isatty())):
        try:
            rows.append(clip_conditions(str(path), float(start), float(end)))
        except (sf.LibsndfileError, RuntimeError, OSError) as err:
            raise ValueError(f"{path}: cannot measure recording conditions ({err})") from err
    measured = pd.DataFrame(rows, index=table.index)
    labels = table.drop(columns=[c for c in ("start", "end", "split", "rel_path", "duration") if c in table.columns])
    return pd.concat([labels, measured], axis=1)


def conditions_by_class(conditions: pd.DataFrame, head: str) -> pd.DataFrame:
    """Per class of ``head``: rows, speakers, the sample rates / codecs / channel counts found (with their
    share of the rows) and the median of each numeric measure."""
    def shares(values: pd.Series) -> str:
        counts = values.value_counts(normalize=True)
        return ", ".join(f"{v} {percent(s)}" for v, s in counts.head(3).items()) + (" ..." if len(counts) > 3 else "")

    grouped = conditions.groupby(conditions[head].astype(str), sort=True)
    table = pd.DataFrame({"rows": grouped.size(), "speakers": grouped["speaker"].nunique()})
    for name in ("sample_rate", "codec", "channels"):
        table[name] = grouped[name].agg(shares)
    for name in ("duration", "level_dbfs", "noise_floor_dbfs", "bandwidth_hz"):
        table[f"{name}_median"] = grouped[name].median()
    table.index.name = head
    return table.reset_index()


@dataclass
class ConfoundCheck:
    """Result of :func:`confound_check`: one summary row per head, the tables, and the flagged heads."""

    summary: pd.DataFrame
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def flagged(self) -> list[str]:
        return self.summary.loc[self.summary["confounded"], "head"].tolist() if len(self.summary) else []

    def for_head(self, head: str) -> dict | None:
        hit = self.summary[self.summary["head"] == head]
        return hit.iloc[0].to_dict() if len(hit) else None


def confound_check(conditions: pd.DataFrame, heads, seed: int = 0) -> ConfoundCheck:
    """For every head (not speaker: identity is what the folds hold out), whether the recording
    conditions alone predict the label across speakers.

    Summary columns: ``head, classes, speakers, rows, accuracy, majority, balanced_accuracy, chance``
    (``1 / classes``, the majority class's balanced accuracy), ``low, high`` (95 % speaker-resampled
    interval of the balanced accuracy), ``confounded`` and ``strongest`` (the measures that differ most
    between classes, with the share of their variance the class explains).
    """
    records, tables, notes = [], {}, []
    for head in [h for h in heads if h != "speaker"]:
        tables[head] = conditions_by_class(conditions, head)
        speakers_per_class = conditions.groupby(head)["speaker"].nunique()
        usable = speakers_per_class.index[speakers_per_class >= 2]
        if len(usable) < len(speakers_per_class):
            notes.append(f"{head}: {len(speakers_per_class) - len(usable)} class(es) with a single speaker left out "
                         "of the conditions classifier (it cannot hold a speaker out)")
        data = conditions[conditions[head].isin(usable)]
        if len(usable) < 2:
            notes.append(f"{head}: fewer than two classes with two speakers; no conditions classifier")
            continue
        records.append(_classify(data, head, seed))
    columns = ["head", "classes", "speakers", "rows", "accuracy", "majority", "balanced_accuracy", "chance",
               "low", "high", "threshold", "finding", "confounded", "strongest"]
    return ConfoundCheck(pd.DataFrame(records, columns=columns), tables, notes)


def _features(data: pd.DataFrame) -> np.ndarray:
    numeric = data[[m for m in CLASSIFIER_MEASURES if m in NUMERIC]].astype(float).copy()
    numeric["sample_rate"] = np.log2(numeric["sample_rate"])
    codecs = pd.get_dummies(data["codec"], dtype=float)
    return np.hstack([numeric.to_numpy(), codecs.to_numpy()])


def _classify(data: pd.DataFrame, head: str, seed: int) -> dict:
    y = data[head].astype(str).to_numpy()
    groups = data["speaker"].astype(str).to_numpy()
    x = _features(data)
    n_splits = max(2, min(CV_FOLDS, int(data.groupby(head)["speaker"].nunique().min())))
    guess = np.empty(len(y), dtype=object)
    with threadpool_limits(1), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # a class missing from one fold's test part
        for train, test in StratifiedGroupKFold(n_splits, shuffle=True, random_state=seed).split(x, y, groups):
            model = RandomForestClassifier(n_estimators=100, min_samples_leaf=2, random_state=seed).fit(x[train], y[train])
            guess[test] = model.predict(x[test])
    classes = np.unique(y)
    chance = 1.0 / len(classes)
    balanced = float(balanced_accuracy_score(y, guess.astype(str)))
    low, high = _speaker_interval(y, guess.astype(str), groups, seed)
    counts = pd.Series(y).value_counts()
    return {"head": head, "classes": len(classes), "speakers": len(set(groups)), "rows": len(y),
            "accuracy": float((guess == y).mean()), "majority": float(counts.iloc[0] / len(y)),
            "balanced_accuracy": balanced, "chance": chance, "low": low, "high": high,
            "threshold": chance + CONFOUND_MARGIN, "finding": finding(balanced, low, chance),
            "confounded": bool(balanced - chance >= CONFOUND_MARGIN and low > chance),
            "strongest": _strongest(data, head)}


CONFOUNDED, WEAK_LINK, NO_LINK = "confounded", "weak link", "no link found"


def finding(balanced: float, low: float, chance: float) -> str:
    """What the conditions classifier's result says, in words that agree with its interval.

    ``confounded``: at least CONFOUND_MARGIN above chance and the whole interval above chance;
    ``weak link``: the whole interval above chance but the accuracy below that threshold (the set-up
    tells the classes apart a little, not enough to call every number about the label a channel effect);
    ``no link found``: the interval reaches chance.
    """
    if low <= chance:
        return NO_LINK
    return CONFOUNDED if balanced - chance >= CONFOUND_MARGIN else WEAK_LINK


def _speaker_interval(y: np.ndarray, guess: np.ndarray, groups: np.ndarray, seed: int) -> tuple[float, float]:
    """95 % percentile interval of balanced accuracy, drawing speakers with replacement within each class."""
    frame = pd.DataFrame({"y": y, "hit": guess == y, "speaker": groups})
    per_speaker = frame.groupby(["y", "speaker"])["hit"].agg(["sum", "count"]).reset_index()
    rng = np.random.default_rng(seed)
    recalls = []
    for _, cls in per_speaker.groupby("y"):
        draws = rng.integers(0, len(cls), size=(N_BOOT, len(cls)))
        recalls.append(cls["sum"].to_numpy()[draws].sum(1) / cls["count"].to_numpy()[draws].sum(1))
    low, high = np.quantile(np.mean(recalls, axis=0), [0.025, 0.975])
    return float(low), float(high)


def _strongest(data: pd.DataFrame, head: str, top: int = 3) -> str:
    """The classifier's measures ranked by the share of their variance explained by the class (eta^2)."""
    strength = {}
    for name in CLASSIFIER_MEASURES:
        values = pd.get_dummies(data[name], dtype=float) if name in CATEGORICAL else data[[name]].astype(float)
        total = ((values - values.mean()) ** 2).to_numpy().sum()
        within = ((values - values.groupby(data[head]).transform("mean")) ** 2).to_numpy().sum()
        strength[name] = 0.0 if total == 0 else 1 - within / total
    ranked = sorted(strength.items(), key=lambda kv: -kv[1])[:top]
    return ", ".join(f"{name} ({eta:.2f})" for name, eta in ranked)


def confound_lines(check: ConfoundCheck) -> list[str]:
    """One sentence per head (confounded first), with the numbers behind it and the threshold they are
    held against, in words that agree with the interval (see :func:`finding`)."""
    lines = []
    for row in sorted(check.summary.to_dict("records"), key=lambda r: not r["confounded"]):
        numbers = (f"a classifier on recording conditions alone reaches balanced accuracy "
                   f"{percent(row['balanced_accuracy'])} [{percent(row['low'])}, {percent(row['high'])}] on held-out "
                   f"speakers vs {percent(row['chance'])} for the majority class")
        rule = (f"a confound needs at least {percent(row['threshold'])} (chance + {CONFOUND_MARGIN * 100:.0f} "
                "percentage points) with the whole interval above chance")
        if row["finding"] == CONFOUNDED:
            lines.append(f"{row['head']} is confounded with recording conditions: {numbers}; {rule}; most tied to the "
                         f"label: {row['strongest']}")
        elif row["finding"] == WEAK_LINK:
            lines.append(f"{row['head']}: a weak link with recording conditions, below the confound threshold: "
                         f"{numbers}, so the set-up tells the classes apart a little; {rule}; most tied to the label: "
                         f"{row['strongest']}")
        else:
            lines.append(f"{row['head']}: no link with recording conditions found: {numbers}, and the interval reaches "
                         f"chance; {rule}")
    return lines
