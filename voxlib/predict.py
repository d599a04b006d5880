"""Use a trained run: classify new audio, or evaluate a labelled corpus such as converted speech.

Usage::

    python -m voxlib.predict --run-dir R clip.wav more/ --out preds.csv       # files and folders
    python -m voxlib.predict --run-dir R --manifest M.csv --out-dir R/evals/M  # a labelled corpus
    python -m voxlib.predict --run-dir POOLED clip.wav                        # every member, averaged
    python -m voxlib.predict --run-dir POOLED --member fold0 clip.wav         # one member of it

**Which run.** Only a finished run folder is used (runfolder.require_finished, the rule every vox
reader follows: no process writing it, summary.json written, nothing trained since). A run still
training, or stopped before its end, is refused with the reason; ``--allow-unfinished`` uses its
latest checkpoint (last.pt) instead. A pooled folder (``folds`` or ``seeds`` > 1) is an ensemble:
every member scores each clip and the class probabilities are averaged, a class a member never
trained on (a speaker its fold held out) counting as probability 0 for that member; ``--member``
names one member instead. A missing folder, an unfinished run and a damaged file are told apart.

**Which audio.** A clip goes through exactly what training's evaluation did: decoded and resampled
like the corpus, the run's feature transform (including the float16 rounding of the feature cache),
``eval_crops`` evenly spaced crops whose probabilities are averaged, shorter clips padded with
silence. Only the crops it scores are read from a file (a window per crop, with a margin for
resampling), so memory does not grow with a clip's length; the validity scan that training applies
to every clip streams the file in blocks. Every input passes one gate: a file the checks of a
manifest row (readable, finite samples, long enough, not silent), an array the layout rule of
``audio.as_mono`` (time is the longer axis; a square array is refused) and then the same checks, in
the same words. Nothing is dropped: ``predict`` returns one row per input with a ``problem``
column, ``embed`` raises naming each unusable input (or returns NaN rows), ``predict_waveform``
raises.

**Scoring voice conversion.** Write a manifest of converted utterances labelled with their *target*
speaker, birthplace and sex, and evaluate it: each head's accuracy is the
share of conversions the discriminator recognises as the target (the objective metric of StarGAN-VC
papers). Targets the run never trained on (a speaker outside its training set, a new birthplace) are
counted per head in ``unknown_labels.csv`` and left out of that head's scores.

**Another corpus, same speaker names.** A manifest speaker who shares a name with a training
speaker is scored as that (seen) speaker, since that is what a converted utterance labelled with its
target is; but the run also checks the voice: its speaker head should name them on at least half as
many of their utterances as it does on the training speaker's own held-out utterances
(predictions.csv). Speakers below that are named in a warning, because a low "speaker accuracy" of
another corpus that reuses names (two demo corpora with other seeds) says nothing about the run.
``--speakers voice`` scores them as unseen speakers instead (birthplace and sex only). A run that
does not recognise the training speaker's own clips (on fewer than half of at least 3) cannot judge,
and keeps the name (a note says so).

Python::

    clf = Classifier.from_run("outputs/runs/x")          # best.pt; checkpoint="last" for the last epoch
    clf.predict(["a.wav", "b.flac"])                     # DataFrame: path, {head}_pred/_prob/_top5, problem
    clf.predict_waveform(wave, 22050)                    # {head: {"pred", "prob", "top5", "probs"}}
    clf.embed(["a.wav"])                                 # (N, D) trunk features, one row per input
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import difflib
import io
import logging
import math
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import pandas as pd
import soundfile as sf
import soxr
import torch
from tqdm import tqdm

from voxlib import evaluate, runfolder
from voxlib.audio import AudioError, as_mono, read_window, resampled_length, segment_frames, wave_problem
from voxlib.cli import log_to, make_parser, parse
from voxlib.config import FEATURES, Config
from voxlib.corpora.manifest import check_clip, read_manifest
from voxlib.data import crop_starts, encode_targets, fit_crop
from voxlib.distributed import pick_device
from voxlib.features import crop_samples, spectrogram, spectrogram_crop
from voxlib.fileio import file_kind, write_atomic
from voxlib.inference import crop_averaged
from voxlib.model import load_discriminator
from voxlib.text import one_line, percent

log = logging.getLogger("voxlib.predict")  # not __name__: "__main__" under python -m

AUDIO_SUFFIXES = (".wav", ".flac", ".mp3", ".ogg", ".oga", ".opus", ".aif", ".aiff")
EVAL_SPLITS = ("seen_test", "unseen_test")  # evaluated utterances of training / other speakers
VOICE_MATCH = 0.5  # a reused name is the same voice if recognised at least this share as often as its own clips
# a speaker is judged by voice only if the run recognises at least half of at least 3 of its own held-out clips
VOICE_REFERENCE_ROWS, VOICE_REFERENCE_SHARE = 3, 0.5
SHOWN_PROBLEMS = 5  # an error about several inputs names this many, then counts the rest
SPEAKER_RULES = ("voice", "name")


class PredictError(ValueError):
    """Inputs or a run folder that predict cannot use; the message names them."""


@dataclass(frozen=True)
class Clip:
    """One input file, or a segment of it (seconds; NaN = the file's start/end)."""

    path: str
    start: float = math.nan
    end: float = math.nan

    @property
    def name(self) -> str:
        return self.path


@dataclass(frozen=True, eq=False)
class Wave:
    """One input waveform in memory: samples (see ``audio.as_mono`` for the layout rule) and their rate."""

    samples: np.ndarray
    sample_rate: int
    name: str = "waveform"


def as_input(item, position: int) -> Clip | Wave:
    """A file path, Clip, Wave or ``(samples, sample_rate)`` pair as one input."""
    if isinstance(item, (Clip, Wave)):
        return item
    if isinstance(item, tuple) and len(item) == 2 and not isinstance(item[0], (str, Path)):
        return Wave(item[0], item[1], f"waveform {position}")
    if isinstance(item, (str, Path)):
        return Clip(str(item))
    raise PredictError(f"input {position}: expected a file path, a Clip, a Wave or (samples, sample_rate), "
                       f"got {type(item).__name__}")


def find_audio(inputs: Iterable[str | Path]) -> list[Clip]:
    """Files as given, and the audio files under folders (recursively, sorted); missing inputs raise."""
    clips: list[Clip] = []
    for item in map(Path, inputs):
        if item.is_dir():
            clips += [Clip(str(p)) for p in sorted(item.rglob("*")) if p.suffix.lower() in AUDIO_SUFFIXES and p.is_file()]
        elif item.exists():
            clips.append(Clip(str(item)))
        else:
            raise PredictError(f"{item}: no such file or folder")
    return clips


def problem_list(rejected: pd.DataFrame) -> str:
    """Several unusable inputs on one line: the first few with their reasons, then a count."""
    shown = [f"{one_line(p)}: {r}" for p, r in zip(rejected["path"][:SHOWN_PROBLEMS], rejected["reason"])]
    more = len(rejected) - len(shown)
    return "; ".join(shown) + (f"; and {more} more" if more > 0 else "")


@dataclass
class Member:
    """One trained network of a Classifier: a run folder's discriminator and its class names."""

    name: str
    path: Path
    net: torch.nn.Module
    vocab: dict[str, list[str]]
    precision: str
    checkpoint: dict


class Classifier:
    """A trained run (or every member of a pooled folder), ready to classify: discriminators, class
    names and the run's feature settings."""

    def __init__(self, net: torch.nn.Module, vocab: dict[str, list[str]], cfg: Config, device: torch.device,
                 precision: str, run_dir: Path, checkpoint: dict):
        self.cfg, self.device, self.run_dir = cfg, device, Path(run_dir)
        self.channels_last = cfg.channels_last
        self.members = [self._placed(Member(Path(run_dir).name, Path(run_dir), net, vocab, precision, checkpoint))]
        self.vocab = {h: list(c) for h, c in vocab.items()}

    def _placed(self, member: Member) -> Member:
        net = member.net.to(self.device)
        if self.channels_last:
            net = net.to(memory_format=torch.channels_last)
        return dataclasses.replace(member, net=net)

    @classmethod
    def ensemble(cls, members: list[Member], cfg: Config, device: torch.device, run_dir: Path) -> "Classifier":
        """Members that score every clip together; each head's classes are the union of theirs."""
        first = members[0]
        clf = cls(first.net, first.vocab, cfg, device, first.precision, run_dir, first.checkpoint)
        clf.members = [clf._placed(m) for m in members]
        clf.vocab = {h: list(dict.fromkeys(c for m in members for c in m.vocab[h])) for h in first.vocab}
        return clf

    @classmethod
    def from_run(cls, run_dir: str | Path, checkpoint: str = "best", device: str = "auto",
                 precision: str | None = None, member: str | None = None,
                 allow_unfinished: bool = False) -> "Classifier":
        """Load a finished run folder, or every member of a pooled one (no training code, no corpus).

        ``member`` picks one member of a pooled folder; ``precision`` defaults to the run's;
        ``allow_unfinished`` uses the latest checkpoint of a run that is not finished.
        """
        run_dir = Path(run_dir)
        runfolder.check_folder(run_dir)
        target = pick_device(device)
        if runfolder.is_pooled(run_dir):
            names = [p.name for p in runfolder.pooled_members(run_dir)]
            if member:
                if member not in names:
                    close = difflib.get_close_matches(member, names, n=1)
                    raise PredictError(f"{run_dir}: no member {member!r}" + (f" (did you mean {close[0]}?)" if close
                                       else "") + f"; its members are {', '.join(names)}")
                return cls.from_run(run_dir / member, checkpoint, device, precision, allow_unfinished=allow_unfinished)
            if checkpoint not in ("best", "last"):
                raise PredictError(f"checkpoint {checkpoint}: a .pt file is one network; name its member too "
                                   f"(--member), or give its run folder")
            runfolder.require_finished(run_dir, allow_unfinished)
            members = []
            for name in names:
                try:
                    members.append(_load_member(run_dir / name, name, checkpoint, precision, allow_unfinished))
                except (runfolder.RunError, OSError) as err:  # only reached with allow_unfinished
                    if not allow_unfinished:
                        raise
                    log.warning("%s: left out of the ensemble: %s", run_dir / name, err)
            if not members:
                raise PredictError(f"{run_dir}: no member has a checkpoint yet")
            cfgs = [Config.from_json(m.path / runfolder.CONFIG) for m in members]
            settings = [{**c.values(FEATURES), "n_frames": c.n_frames, "eval_crops": c.eval_crops} for c in cfgs]
            differ = sorted(k for k in settings[0] if any(s[k] != settings[0][k] for s in settings))
            if differ:
                raise PredictError(f"{run_dir}: its members were trained on different features ({', '.join(differ)}); "
                                   f"name one with --member")
            heads = [list(m.vocab) for m in members]
            if any(h != heads[0] for h in heads):
                raise PredictError(f"{run_dir}: its members have different heads ({heads}); name one with --member")
            return cls.ensemble(members, cfgs[0], target, run_dir)
        if member:
            raise PredictError(f"{run_dir}: --member names a member of a pooled folder (folds or seeds); "
                               f"{run_dir} is a single run")
        one = _load_member(run_dir, run_dir.name, checkpoint, precision, allow_unfinished)
        return cls(one.net, one.vocab, Config.from_json(run_dir / runfolder.CONFIG), target, one.precision, run_dir,
                   one.checkpoint)

    @property
    def heads(self) -> list[str]:
        return list(self.vocab)

    @property
    def net(self) -> torch.nn.Module:
        if len(self.members) > 1:
            raise PredictError(f"{self.run_dir}: an ensemble of {len(self.members)} networks has no single net")
        return self.members[0].net

    @property
    def precision(self) -> str:
        return self.members[0].precision

    @property
    def checkpoint(self) -> dict:
        """The checkpoint record of a single run; for an ensemble, every member's path."""
        if len(self.members) == 1:
            return self.members[0].checkpoint
        return {"path": [m.checkpoint["path"] for m in self.members], "epoch": [m.checkpoint["epoch"] for m in self.members]}

    # --- the input gate and features ----------------------------------------------------------------
    def _load(self, item: Clip | Wave) -> tuple[torch.Tensor | None, str | None]:
        """The input's eval crops ``(eval_crops, 1, bins, n_frames)``, or the reason it cannot be used."""
        cfg = self.cfg
        if isinstance(item, Wave):
            try:
                wave, rate = as_mono(item.samples, item.sample_rate, item.name)
            except AudioError as err:
                return None, str(err).removeprefix(f"{item.name}: ")
            problem = wave_problem(wave, rate, cfg.sample_rate, cfg.n_fft)
            if problem:
                return None, problem
            if rate != cfg.sample_rate:
                wave = soxr.resample(wave, rate, cfg.sample_rate)
            return self._crops(len(wave), lambda lo, hi: wave[lo:hi]), None
        problem = check_clip(item.path, item.start, item.end, cfg.sample_rate, cfg.n_fft)["problem"]
        if problem:
            return None, problem
        try:
            with sf.SoundFile(item.path) as fh:
                first, stop = segment_frames(item.start, item.end, fh.samplerate, fh.frames)
                native = min(stop, fh.frames) - first
                samples = resampled_length(native, fh.samplerate, cfg.sample_rate)
                return self._crops(samples, lambda lo, hi: read_window(fh, first, native, cfg.sample_rate, lo, hi)), None
        except (sf.LibsndfileError, RuntimeError, OSError, AudioError) as err:
            return None, f"cannot decode audio ({str(err).removeprefix(f'{item.path}: ')})"

    def _crops(self, samples: int, window: Callable[[int, int], np.ndarray]) -> torch.Tensor:
        """The eval crops of a ``samples``-long wave, reading only the windows they cover.

        Crop starts come from the clip's frame count (data.crop_starts, as training's evaluation), each
        crop's frames from its own window (features.spectrogram_crop: the same values as the whole
        spectrogram), rounded to float16 like the feature cache, padded with silence when short.
        """
        cfg = self.cfg
        total = 1 + samples // cfg.hop_length
        done: dict[int, np.ndarray] = {}
        for first in crop_starts(total, cfg.n_frames, cfg.eval_crops):
            if first not in done:
                frames = min(cfg.n_frames, total - first)
                lo, hi = crop_samples(first, frames, samples, cfg)
                spec = spectrogram_crop(window(lo, hi), lo, first, frames, samples, cfg).numpy()
                done[first] = fit_crop(spec.astype(np.float16).astype(np.float32), 0, cfg.n_frames)[None]
        return torch.from_numpy(np.stack([done[s] for s in crop_starts(total, cfg.n_frames, cfg.eval_crops)]))

    def spectrogram(self, wave: np.ndarray, sample_rate: int) -> np.ndarray:
        """The run's feature of a whole waveform (layout rule of ``audio.as_mono``): ``(bins, frames)``,
        rounded to float16 like the feature cache. For looking at; scoring reads only its crops."""
        wave, rate = as_mono(wave, sample_rate)
        if rate != self.cfg.sample_rate:
            wave = soxr.resample(wave, rate, self.cfg.sample_rate)
        return spectrogram(wave, self.cfg)[0].numpy().astype(np.float16).astype(np.float32)

    # --- predictions ----------------------------------------------------------------------------------
    def run(self, inputs: Sequence, batch_size: int = 16, progress: bool = False,
            features: bool = False) -> tuple[pd.DataFrame, pd.DataFrame, np.ndarray | None]:
        """(predictions, rejected, trunk features or None) for ``inputs`` (paths, Clips, Waves or
        ``(samples, sample_rate)`` pairs).

        predictions: one row per usable input, ``index`` (its position in ``inputs``), ``path`` (a
        waveform's name) and per head the columns of predictions.csv except ``_true``. rejected:
        ``index, path, reason`` for every other input. Together they hold every input once.
        """
        items = [as_input(x, i) for i, x in enumerate(inputs)]
        if features and len(self.members) > 1:
            raise PredictError(f"{self.run_dir}: trunk features belong to one network, and this is an ensemble of "
                               f"{len(self.members)}: name a member (--member, or its run folder)")
        rejected: list[tuple[int, str, str]] = []

        def batches():
            xs, kept = [], []
            for i, item in enumerate(tqdm(items, desc="predict", unit="clip", disable=not progress)):
                crops, problem = self._load(item)
                if problem:
                    log.warning("%s: skipped: %s", item.name, problem)
                    rejected.append((i, item.name, problem))
                    continue
                xs.append(crops)
                kept.append(i)
                if len(xs) == batch_size:
                    yield torch.stack(xs), kept
                    xs, kept = [], []
            if xs:
                yield torch.stack(xs), kept

        index, probs, trunks = [], {h: [] for h in self.heads}, []
        with torch.inference_mode():
            for x, kept in batches():
                p, trunk = self._forward(x, features)
                index += kept
                for h in self.heads:
                    probs[h].append(p[h].numpy())
                if features:
                    trunks.append(trunk.numpy())
        stacked = {h: np.concatenate(v) if v else np.zeros((0, len(self.vocab[h]))) for h, v in probs.items()}
        ids = {"index": np.array(index, dtype=np.int64), "path": [items[i].name for i in index]}
        frame = runfolder.prediction_frame(ids, self.vocab, stacked).drop(columns=[f"{h}_true" for h in self.heads])
        embedded = (np.concatenate(trunks) if trunks else np.zeros((0, self.members[0].net.out_channels * 16),
                                                                   np.float32)) if features else None
        return frame, pd.DataFrame(rejected, columns=["index", "path", "reason"]), embedded

    def _forward(self, x: torch.Tensor, features: bool) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        """Crop-averaged probabilities over the union of classes, averaged over members (one: as is)."""
        if len(self.members) == 1:
            m = self.members[0]
            (_, probs, trunk), = crop_averaged(m.net, [(x, None)], self.device, m.precision, self.channels_last,
                                               features=features)
            return probs, trunk
        total = {h: torch.zeros(len(x), len(self.vocab[h])) for h in self.heads}
        for m in self.members:
            (_, probs, _), = crop_averaged(m.net, [(x, None)], self.device, m.precision, self.channels_last)
            for h in self.heads:
                place = {c: k for k, c in enumerate(self.vocab[h])}
                total[h][:, [place[c] for c in m.vocab[h]]] += probs[h]
        return {h: v / len(self.members) for h, v in total.items()}, None

    def predict(self, inputs: Sequence, batch_size: int = 16, progress: bool = False) -> pd.DataFrame:
        """One row per input, in input order: ``path`` (a waveform's name), per head ``_pred``,
        ``_prob`` and ``_top5``, and ``problem``: "" when scored, else why the input cannot be used
        (its head columns are then empty, its probabilities NaN). Nothing is left out."""
        items = list(inputs)
        frame, rejected, _ = self.run(items, batch_size, progress)
        return aligned(frame, rejected, len(items), self.heads)

    def predict_waveform(self, wave: np.ndarray, sample_rate: int, name: str = "waveform") -> dict[str, dict]:
        """Class probabilities of one waveform: ``{head: {"pred", "prob", "top5", "probs"}}``; a waveform
        the gate refuses raises PredictError naming the reason (the same reasons as for a file)."""
        crops, problem = self._load(Wave(wave, sample_rate, name))  # the gate every input passes
        if problem:
            raise PredictError(f"{name}: {problem}")
        with torch.inference_mode():
            probs, _ = self._forward(crops[None], False)
        out = {}
        for h, classes in self.vocab.items():
            p = probs[h][0].numpy()
            order = np.argsort(-p, kind="stable")
            out[h] = {"pred": classes[order[0]], "prob": float(p[order[0]]),
                      "top5": [classes[k] for k in order[: runfolder.TOP_K_STORED]],
                      "probs": dict(zip(classes, p.tolist()))}
        return out

    def embed(self, inputs: Sequence, batch_size: int = 16, on_bad: str = "raise") -> np.ndarray:
        """Crop-averaged trunk features ``(N, C*4*4)``, row i for input i. An unusable input raises
        PredictError naming every such input and its reason; with ``on_bad="nan"`` its row is NaN."""
        if on_bad not in ("raise", "nan"):
            raise ValueError(f"on_bad must be 'raise' or 'nan', got {on_bad!r}")
        items = list(inputs)
        frame, rejected, features = self.run(items, batch_size, features=True)
        if len(rejected) and on_bad == "raise":
            raise PredictError(f"{len(rejected)} of {len(items)} input(s) cannot be used: {problem_list(rejected)}")
        out = np.full((len(items), features.shape[1]), np.nan, dtype=np.float32)
        out[frame["index"].to_numpy()] = features
        return out


def _load_member(path: Path, name: str, checkpoint: str, precision: str | None, allow_unfinished: bool) -> Member:
    net, record = load_discriminator(path, checkpoint, allow_unfinished)
    return Member(name, path, net, runfolder.read_labels(path), precision or record.get("precision") or "fp32", record)


def aligned(frame: pd.DataFrame, rejected: pd.DataFrame, n: int, heads: Sequence[str]) -> pd.DataFrame:
    """run()'s two tables as one row per input: scored rows as they are, unusable ones with ``problem``."""
    out = frame.set_index("index").reindex(range(n))
    paths = pd.Series("", index=range(n), dtype=object)
    paths[frame["index"].to_numpy()] = frame["path"].to_numpy()
    paths[rejected["index"].to_numpy()] = rejected["path"].to_numpy()
    out["path"] = paths
    for h in heads:
        for part in ("pred", "top5"):
            column = out[f"{h}_{part}"].astype(object)
            out[f"{h}_{part}"] = column.where(column.notna(), "")
        out[f"{h}_prob"] = out[f"{h}_prob"].astype(float)
    problems = pd.Series("", index=range(n), dtype=object)
    problems[rejected["index"].to_numpy()] = rejected["reason"].to_numpy()
    out["problem"] = problems
    return out.reset_index(drop=True)


# --- evaluating a labelled corpus ----------------------------------------------------------------------
def evaluate_manifest(clf: Classifier, manifest_path: str | Path, out_dir: str | Path, batch_size: int = 16,
                      progress: bool = True, embeddings: bool = False, speakers: str = "name") -> Path:
    """Score a labelled corpus and write an evaluation folder that follows the run-folder contract.

    The folder holds the run's config.json, labels.json and metrics.csv (none for an ensemble), a
    splits.csv with the run's training rows (so baselines and class sizes are the run's; an
    ensemble's: every member's) plus the evaluated utterances (split ``seen_test`` for speakers the
    run trained on, ``unseen_test`` for others, decided by ``speakers``: see the module docstring;
    their row ids are the manifest rows offset past the run's largest id), predictions.csv,
    scores.csv (per head and split: accuracy, top-3, balanced accuracy, chance, majority),
    per_class_<head>.csv, confusion_<head>.csv, unknown_labels.csv and summary.json (last).
    ``runfolder.load_run`` and the analysis read it.
    """
    if speakers not in SPEAKER_RULES:
        raise PredictError(f"speakers must be one of {SPEAKER_RULES}, got {speakers!r}")
    out_dir = Path(out_dir)
    run_splits = pd.concat([runfolder.read_csv(m.path / runfolder.SPLITS_FILE, ["row", "speaker", "split"])
                            for m in clf.members], ignore_index=True)
    train = run_splits[run_splits["split"] == "train"].drop_duplicates("row")
    manifest = read_manifest(manifest_path, on_bad_file="skip", allow_outside_paths=clf.cfg.allow_outside_paths,
                             sample_rate=clf.cfg.sample_rate, n_fft=clf.cfg.n_fft, progress=progress)
    table = manifest.table
    missing = [h for h in clf.heads if h not in table.columns]
    if len(missing) == len(clf.heads):
        raise PredictError(f"{manifest_path}: none of the run's heads {clf.heads} is a column of the manifest")
    clips = [Clip(p, s, e) for p, s, e in zip(table["path"], table["start"], table["end"])]
    frame, rejected, features = clf.run(clips, batch_size, progress, features=embeddings)
    if not len(frame):
        refused = pd.concat([manifest.rejected[["path", "reason"]], rejected[["path", "reason"]]], ignore_index=True)
        raise PredictError(f"{manifest_path}: none of its {len(refused)} clip(s) could be read: {problem_list(refused)}")
    done = table.iloc[frame["index"].to_numpy()].reset_index(drop=True)
    offset = int(pd.to_numeric(run_splits["row"]).max())
    row_ids = done["row"].to_numpy() + offset
    named = done["speaker"].astype(str).isin(set(train["speaker"]))
    others = other_voices(clf, done, frame, named) if "speaker" in clf.heads else []
    if others:
        shown = ", ".join(one_line(s) for s in others[:SHOWN_PROBLEMS]) + (
            f" and {len(others) - SHOWN_PROBLEMS} more" if len(others) > SHOWN_PROBLEMS else "")
        verdict = ("scored as unseen speakers (by voice, as --speakers voice asks)" if speakers == "voice" else
                   "scored as the training speakers by name, as converted speech labelled with its target is; if "
                   "these are other people under the same names, pass --speakers voice")
        log.warning("%s: %d speaker(s) share a name with a training speaker but the run does not recognise their "
                    "voice: %s; %s", manifest_path, len(others), shown, verdict)
    impostor = done["speaker"].astype(str).isin(others).to_numpy() if speakers == "voice" else np.zeros(len(done), bool)
    split = np.where(named.to_numpy() & ~impostor, "seen_test", "unseen_test")
    vocab = {h: c for h, c in clf.vocab.items() if h in done.columns}
    targets, _ = encode_targets(done, vocab)
    if "speaker" in targets:
        targets["speaker"] = np.where(impostor, -1, targets["speaker"])  # another voice: no speaker target
    unknown = [{"head": h, "label": label, "utterances": int(n)}
               for h in vocab for label, n in done.loc[(targets[h] < 0) & ~(impostor & (h == "speaker")), h]
               .astype(str).value_counts().items()]
    predictions = frame.drop(columns="index")
    predictions.insert(0, "row", row_ids)
    predictions.insert(2, "speaker", done["speaker"].to_numpy())
    predictions.insert(3, "split", split)
    for h in clf.heads:
        names = np.array(clf.vocab[h], dtype=object)
        t = targets.get(h, np.full(len(done), -1))
        predictions.insert(predictions.columns.get_loc(f"{h}_pred"), f"{h}_true",
                           np.where(t >= 0, names[np.clip(t, 0, None)], ""))
    rows = done[[c for c in ["path", *clf.heads, "start", "end"] if c in done.columns]].copy()
    for h in clf.heads:
        if h not in rows.columns:
            rows[h] = ""
    rows.insert(0, "row", row_ids)
    rows["split"] = split
    rows["manifest_row"] = done["row"].to_numpy()
    splits = pd.concat([train, rows.astype({c: str for c in rows.columns if c not in ("row",)})], ignore_index=True)
    record = {**runfolder.read_json(clf.members[0].path / runfolder.CONFIG), "evaluation": {
        "run_dir": str(clf.run_dir.absolute()), "members": [m.name for m in clf.members],
        "checkpoint": clf.checkpoint["path"], "manifest": str(Path(manifest_path).absolute()),
        "manifest_digest": manifest.digest, "precision": clf.precision, "row_offset": offset, "speakers": speakers,
        "other_voices": others}}
    with runfolder.writing(out_dir, "evaluation folder"):
        (out_dir / runfolder.SUMMARY).unlink(missing_ok=True)
        runfolder.write_json(out_dir, runfolder.CONFIG, record)
        runfolder.write_json(out_dir, runfolder.LABELS, clf.vocab)
        runfolder.write_csv(out_dir, runfolder.SPLITS_FILE, splits)
        metrics = clf.run_dir / runfolder.METRICS
        runfolder.write_metrics(out_dir, runfolder.read_metric_rows(metrics)
                                if len(clf.members) == 1 and metrics.is_file() else [])
        runfolder.write_csv(out_dir, runfolder.PREDICTIONS, predictions)
        runfolder.write_csv(out_dir, runfolder.UNKNOWN_LABELS, pd.DataFrame(unknown, columns=["head", "label", "utterances"]))
        # rows the manifest check refused and clips refused at prediction time: all of them listed
        runfolder.write_csv(out_dir, runfolder.REJECTED, pd.concat(
            [manifest.rejected[["path", "reason"]], rejected[["path", "reason"]]], ignore_index=True))
        if embeddings and features is not None:
            runfolder.write_embeddings(out_dir, features, row_ids, split)
        run = runfolder.read_run(out_dir)  # the folder this process is writing
        scores = evaluate.accuracy_table(run, splits=EVAL_SPLITS)
        runfolder.write_csv(out_dir, runfolder.SCORES, scores)
        for h in scores["head"].unique():
            runfolder.write_csv(out_dir, f"per_class_{h}.csv", evaluate.per_class_metrics(run, h, EVAL_SPLITS))
            runfolder.write_csv(out_dir, f"confusion_{h}.csv", evaluate.confusion(run, h, EVAL_SPLITS).reset_index())
        runfolder.write_json(out_dir, runfolder.SUMMARY, {
            "evaluated": len(predictions), "rejected": len(rejected) + len(manifest.rejected),
            "unknown_labels": {h: int(((targets[h] < 0) & ~(impostor & (h == "speaker"))).sum()) for h in vocab},
            "other_voices": others})
    return out_dir


def other_voices(clf: Classifier, done: pd.DataFrame, frame: pd.DataFrame, named: pd.Series) -> list[str]:
    """Manifest speakers named like a training speaker whose voice the run does not recognise.

    The reference is the run's own: the share of the training speaker's held-out utterances
    (predictions.csv, every member's for an ensemble) its speaker head names correctly. A speaker
    the run recognises there (at least ``VOICE_REFERENCE_SHARE`` of at least ``VOICE_REFERENCE_ROWS``
    utterances) is the same voice when the head names them on at least ``VOICE_MATCH`` times that
    share of their utterances here, and another voice below it. Where the reference is too weak to
    judge (an undertrained run), the name is kept, and a note says so.
    """
    own = pd.concat([runfolder.read_csv(m.path / runfolder.PREDICTIONS, ["speaker", "split", "speaker_pred"])
                     for m in clf.members], ignore_index=True)
    own = own[own["split"].isin(runfolder.SEEN_SPLITS)]
    recognised = (own["speaker_pred"] == own["speaker"]).groupby(own["speaker"]).agg(["mean", "size"])
    speaker = done["speaker"].astype(str)
    hits = frame["speaker_pred"].to_numpy() == speaker.to_numpy()
    share = pd.Series(hits[named.to_numpy()]).groupby(speaker[named].to_numpy()).mean()
    judged = recognised[(recognised["size"] >= VOICE_REFERENCE_ROWS) & (recognised["mean"] >= VOICE_REFERENCE_SHARE)]
    unjudged = sorted(set(share.index) - set(judged.index))
    if unjudged:
        log.info("%d speaker name(s) shared with the run could not be checked by voice (the run recognises too few "
                 "of their own held-out utterances): %s; kept by name", len(unjudged),
                 ", ".join(one_line(s) for s in unjudged[:SHOWN_PROBLEMS]))
    return sorted(s for s, got in share.items() if s in judged.index and got < VOICE_MATCH * judged.at[s, "mean"])


# --- files predict writes ------------------------------------------------------------------------------
def written_by_predict(path: Path) -> bool:
    """Whether ``path`` is a file this command wrote: a predictions CSV (path, head columns, problem) or an
    embeddings .npz (features, path, problem). Only such a file is replaced, and only with --overwrite."""
    if file_kind(path) is not None:
        return False
    if path.suffix.lower() == ".npz":
        try:
            with zipfile.ZipFile(path) as archive:
                return sorted(archive.namelist()) == ["features.npy", "path.npy", "problem.npy"]
        except (zipfile.BadZipFile, OSError):
            return False
    try:
        with open(path, encoding="utf-8", newline="") as fh:
            header = next(csv.reader(io.StringIO(fh.readline())), [])
    except (OSError, UnicodeDecodeError):
        return False
    middle = header[1:-1]
    return len(header) >= 3 and header[0] == "path" and header[-1] == "problem" and all(
        c.rsplit("_", 1)[-1] in ("pred", "prob", "top5") for c in middle)


def check_target(target: str | None, overwrite: bool) -> None:
    """A new file, or one predict wrote itself when ``overwrite`` is given; anything else is refused."""
    if not target or not Path(target).exists():
        return
    if not overwrite:
        raise PredictError(f"{target} exists; pass --overwrite to replace a file predict wrote, or choose a new name")
    if not written_by_predict(Path(target)):
        raise PredictError(f"{target} exists and is not a file predict wrote; vox does not overwrite other files: "
                           f"choose a new name")


# --- command line --------------------------------------------------------------------------------------
def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be int, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="*", metavar="PATH", help="audio files or folders (searched recursively)")
    run = p.add_argument_group("the run")
    run.add_argument("--run-dir", required=True, metavar="DIR",
                     help="a finished vox run folder, or a pooled one (folds/seeds: every member, averaged)")
    run.add_argument("--member", metavar="NAME", help="one member of a pooled folder, e.g. fold0 (default: all)")
    run.add_argument("--checkpoint", default="best", metavar="best|last|FILE.pt", help="default: best")
    run.add_argument("--allow-unfinished", action="store_true",
                     help="use the latest checkpoint of a run that is still training or stopped before its end")
    run.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "mps"), help="default: auto")
    run.add_argument("--precision", choices=("fp32", "bf16"), help="default: the precision the run trained in")
    run.add_argument("--batch-size", type=_positive, default=16, metavar="INT",
                     help="clips per forward pass (default: 16)")
    files = p.add_argument_group("classifying files (PATH ...)")
    files.add_argument("--out", metavar="CSV", help="predictions, one row per input with a problem column "
                                                    "(a new file; default: print to stdout)")
    files.add_argument("--embeddings", metavar="NPZ", help="also save trunk features (one member); with --manifest, "
                       "any value writes embeddings.npz into the evaluation folder")
    files.add_argument("--overwrite", action="store_true", help="replace --out / --embeddings if predict wrote them")
    corpus = p.add_argument_group("evaluating a labelled corpus (--manifest)")
    corpus.add_argument("--manifest", metavar="CSV", help="a labelled manifest to evaluate instead of PATHs")
    corpus.add_argument("--out-dir", metavar="DIR", help="evaluation folder (new or empty; default "
                                                        "RUN_DIR/evals/<manifest folder>)")
    corpus.add_argument("--speakers", choices=SPEAKER_RULES, default="name",
                        help="a manifest speaker named like a training speaker is that speaker (default: converted "
                             "speech labelled with its target), with a warning when the run does not recognise the "
                             "voice; 'voice': such speakers are scored as unseen speakers")


def parser() -> argparse.ArgumentParser:
    doc = __doc__.split("\n\n")  # the title and the usage examples
    return make_parser("python -m voxlib.predict", doc[0] + "\n\n" + doc[2], config_fields=False, extra=_arguments)


def main(argv: Sequence[str] | None = None) -> int:
    command = parser()
    args, _ = parse(command, argv)
    log_to(sys.stderr)
    if bool(args.inputs) == bool(args.manifest):
        command.error("give audio PATHs or --manifest, not both and not neither")
    clf = Classifier.from_run(args.run_dir, args.checkpoint, args.device, args.precision, args.member,
                              args.allow_unfinished)
    if args.manifest:
        out_dir = args.out_dir or Path(args.run_dir) / runfolder.EVALS / Path(args.manifest).absolute().parent.name
        folder = evaluate_manifest(clf, args.manifest, out_dir, args.batch_size, embeddings=bool(args.embeddings),
                                   speakers=args.speakers)
        scores = pd.read_csv(folder / runfolder.SCORES)
        for r in scores.itertuples():
            print(f"{r.head} ({r.split}, {r.n} utterances): accuracy {percent(r.accuracy)} "
                  f"(majority {percent(r.majority)}, chance {percent(r.chance)})")
        print(folder)
        return 0
    for target in (args.out, args.embeddings):
        check_target(target, args.overwrite)
    clips = find_audio(args.inputs)
    if not clips:
        raise PredictError(f"no audio files ({', '.join(AUDIO_SUFFIXES)}) in {', '.join(args.inputs)}")
    frame, rejected, features = clf.run(clips, args.batch_size, progress=sys.stderr.isatty(),
                                        features=bool(args.embeddings))
    if not len(frame):
        raise PredictError(f"none of the {len(clips)} input(s) could be read: {problem_list(rejected)}")
    table = aligned(frame, rejected, len(clips), clf.heads)
    if args.out:
        write_atomic(args.out, runfolder.csv_bytes(table))
        print(f"{len(frame)} clip(s) classified into {args.out}" +
              (f"; {len(rejected)} could not be used (their rows say why)" if len(rejected) else ""))
    else:
        sys.stdout.write(runfolder.csv_bytes(table).decode())
    if args.embeddings:
        rows = np.full((len(clips), features.shape[1]), np.nan, dtype=np.float32)
        rows[frame["index"].to_numpy()] = features
        buffer = io.BytesIO()
        np.savez(buffer, features=rows, path=np.array(table["path"], dtype=str),
                 problem=np.array(table["problem"], dtype=str))
        write_atomic(args.embeddings, buffer.getvalue())
    return 0


if __name__ == "__main__":
    from voxlib.cli import run_command

    sys.exit(run_command(main))
