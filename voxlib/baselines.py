"""Reference baselines on the run's own split: what a simple or a pretrained representation reaches.

"Is the discriminator's representation good enough?" has no answer without a yardstick. These
baselines fit a logistic regression per head on a fixed representation of each utterance, trained on
exactly the run's ``train`` rows and scored on its seen-speaker and unseen-speaker rows (splits.csv),
so their numbers sit beside the discriminator's on the same utterances:

- ``mfcc``: mean and standard deviation over time of 20 MFCCs and their deltas (80 numbers), always;
- ``encoder``: the 256-d utterance embedding of Resemblyzer's pretrained speaker encoder, when the
  optional extra is installed (``pip install -e .[encoder]``; its weights ship inside the wheel, so
  nothing is downloaded at run time). Without it that row is skipped with a note.

Each accuracy is reported with the majority baseline (the most frequent training class, applied to
the scored rows), as everywhere in vox. The speaker head is scored on seen speakers only: an unseen
speaker is not a class.
"""
from __future__ import annotations

import importlib.util
import math
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import soxr
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from tqdm import tqdm

from voxlib.audio import load_audio
from voxlib.runfolder import SEEN_SPLITS, UNSEEN_SPLITS, Run, load_run

N_MFCC = 20
ENCODER_RATE = 16000  # Resemblyzer's encoder takes 16 kHz audio
GROUPS = {"seen": SEEN_SPLITS, "unseen": UNSEEN_SPLITS}
COLUMNS = ["representation", "head", "split", "n", "accuracy", "majority"]
# each representation as a reader names it (tables, verdict, index.html)
REPRESENTATIONS = {"mfcc": "MFCC statistics + logistic regression",
                   "encoder": "pretrained speaker encoder + logistic regression"}


@dataclass
class ReferenceBaselines:
    """Tidy results (``representation, head, split, n, accuracy, majority``) and what was skipped."""

    table: pd.DataFrame
    notes: list[str] = field(default_factory=list)


def mfcc_statistics(wave: np.ndarray, sample_rate: int) -> np.ndarray:
    """Mean and standard deviation over time of MFCCs and their deltas: a voice's average timbre."""
    import librosa  # imported here: its start-up is slow and most of vox never needs it

    n_fft = 1 << math.ceil(math.log2(0.025 * sample_rate))  # 25 ms windows, 10 ms hop: the speech habit
    mfcc = librosa.feature.mfcc(y=wave, sr=sample_rate, n_mfcc=N_MFCC, n_fft=n_fft, hop_length=sample_rate // 100)
    width = min(9, mfcc.shape[1] if mfcc.shape[1] % 2 else mfcc.shape[1] - 1)  # odd, at most the frames
    delta = librosa.feature.delta(mfcc, width=width) if width >= 3 else np.zeros_like(mfcc)
    both = np.vstack([mfcc, delta])
    return np.concatenate([both.mean(axis=1), both.std(axis=1)]).astype(np.float32)


def encoder_available() -> bool:
    return importlib.util.find_spec("resemblyzer") is not None


def _representations(encoder: bool) -> tuple[dict, list[str]]:
    notes = []
    found = {"mfcc": mfcc_statistics}
    if encoder and encoder_available():
        try:
            from resemblyzer import VoiceEncoder  # the optional extra; its weights are part of the wheel
        except ImportError as err:  # installed but broken (e.g. webrtcvad without pkg_resources)
            notes.append(f"pretrained speaker encoder skipped: Resemblyzer is installed but cannot be imported ({err})")
            return found, notes
        model = VoiceEncoder(device="cpu", verbose=False)
        found["encoder"] = lambda wave, sr: model.embed_utterance(wave if sr == ENCODER_RATE else
                                                                  load_resampled(wave, sr))
    elif encoder:
        notes.append("pretrained speaker encoder skipped: the optional extra is not installed "
                     "(pip install -e .[encoder] installs Resemblyzer, whose weights ship in its wheel)")
    return found, notes


def load_resampled(wave: np.ndarray, sample_rate: int) -> np.ndarray:
    return soxr.resample(wave, sample_rate, ENCODER_RATE).astype(np.float32)


def utterance_features(run: Run, encoder: bool = True, progress: bool = False) -> tuple[dict[str, np.ndarray], list[str]]:
    """Per representation, one feature row per splits.csv row (audio read from its ``path``)."""
    functions, notes = _representations(encoder)
    rate = int(run.config.get("sample_rate", 16000))
    splits = run.splits
    starts = pd.to_numeric(splits["start"], errors="coerce") if "start" in splits.columns else [math.nan] * len(splits)
    ends = pd.to_numeric(splits["end"], errors="coerce") if "end" in splits.columns else [math.nan] * len(splits)
    features: dict[str, list[np.ndarray]] = {name: [] for name in functions}
    for path, start, end in tqdm(zip(splits["path"], starts, ends), total=len(splits), desc="reference features",
                                 unit="clip", disable=not (progress and sys.stderr.isatty())):
        wave = load_audio(path, rate, start, end)
        for name, function in functions.items():
            features[name].append(function(wave, rate))
    return {name: np.stack(rows) for name, rows in features.items()}, notes


def reference_baselines(run: Run | str | Path, encoder: bool = True, progress: bool = False,
                        C: float = 1.0) -> ReferenceBaselines:
    """Logistic regression per head and representation, trained on the run's train rows."""
    run = run if isinstance(run, Run) else load_run(run)
    features, notes = _features_of(run, encoder, progress)
    return ReferenceBaselines(_scores(run, features, C), notes)


def pooled_reference_baselines(runs: list[Run], encoder: bool = True, progress: bool = False,
                               C: float = 1.0) -> ReferenceBaselines:
    """The same over the member runs of a folds/seeds experiment: fitted on each member's own split
    and pooled by counting, so ``unseen`` scores every eligible speaker once per seed (as the
    discriminator's pooled number does) and ``seen`` every member's seen-speaker rows. The audio
    features are computed once: every member's splits.csv lists the same rows."""
    features, notes = _features_of(runs[0], encoder, progress)
    table = pd.concat([_scores(run, features, C) for run in runs], ignore_index=True)
    table = table.assign(hits=table["accuracy"] * table["n"], base=table["majority"] * table["n"])
    pooled = table.groupby(["representation", "head", "split"], sort=False)[["n", "hits", "base"]].sum().reset_index()
    pooled["accuracy"], pooled["majority"] = pooled["hits"] / pooled["n"], pooled["base"] / pooled["n"]
    return ReferenceBaselines(pooled[COLUMNS], notes + [f"pooled over {len(runs)} runs, each fitted on its own split"])


def _features_of(run: Run, encoder: bool, progress: bool) -> tuple[dict[str, np.ndarray], list[str]]:
    if "path" not in run.splits.columns:
        raise ValueError(f"{run.path / 'splits.csv'}: no 'path' column, so the audio cannot be found")
    return utterance_features(run, encoder, progress)


def _scores(run: Run, features: dict[str, np.ndarray], C: float) -> pd.DataFrame:
    split = run.splits["split"].to_numpy()
    records = []
    for name, x in features.items():
        for head, classes in run.labels.items():
            y = run.splits[head].astype(str).to_numpy()
            train = (split == "train") & np.isin(y, classes)
            model = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=2000))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                model.fit(x[train], y[train])
            counts = pd.Series(y[train]).value_counts()
            majority = sorted(counts.index[counts == counts.max()])[0]
            for group, group_splits in GROUPS.items():
                scored = np.isin(split, group_splits) & np.isin(y, classes)
                if head == "speaker" and group == "unseen" or not scored.any():
                    continue
                guess = model.predict(x[scored])
                records.append({"representation": name, "head": head, "split": group, "n": int(scored.sum()),
                                "accuracy": float((guess == y[scored]).mean()),
                                "majority": float((y[scored] == majority).mean())})
    return pd.DataFrame(records, columns=COLUMNS)
