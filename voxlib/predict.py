"""Use a trained run: classify new audio, or evaluate a labelled corpus such as converted speech.

Usage::

    python -m voxlib.predict --run-dir R clip.wav more/ --out preds.csv       # files and folders
    python -m voxlib.predict --run-dir R --manifest M.csv --out-dir R/evals/M  # a labelled corpus

A clip goes through exactly what training's evaluation did: decoded and resampled like the corpus,
the run's feature transform (including the float16 rounding of the feature cache), ``eval_crops``
evenly spaced crops whose probabilities are averaged, shorter clips padded with silence. A file that
cannot be used is named with its reason, never dropped silently.

**Scoring voice conversion.** Write a manifest of converted utterances labelled with their *target*
speaker, birthplace and sex, and evaluate it: each head's accuracy is the share of conversions the
discriminator recognises as the target (the objective metric of StarGAN-VC papers). Targets the run
never trained on (a speaker outside its training set, a new birthplace) are counted per head in
``unknown_labels.csv`` and left out of that head's scores.

Python::

    clf = Classifier.from_run("outputs/runs/x")          # best.pt; checkpoint="last" for the last epoch
    clf.predict(["a.wav", "b.flac"])                     # DataFrame: path, {head}_pred/_prob/_top5
    clf.predict_waveform(wave, 22050)                    # {head: {"pred", "prob", "top5", "probs"}}
    clf.embed(["a.wav"])                                 # (N, D) trunk features
"""
from __future__ import annotations

import argparse
import logging
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pandas as pd
import torch

from voxlib import runfolder
from voxlib.config import Config
from voxlib.data import eval_crops_of, encode_targets
from voxlib.distributed import pick_device
from voxlib.inference import crop_averaged
from voxlib.model import load_discriminator
from voxlib.text import percent

log = logging.getLogger("voxlib.predict")  # not __name__: "__main__" under python -m

AUDIO_SUFFIXES = (".wav", ".flac", ".mp3", ".ogg", ".oga", ".opus", ".aif", ".aiff")
EVAL_SPLITS = ("seen_test", "unseen_test")  # evaluated utterances of training / other speakers


class PredictError(ValueError):
    """Inputs or a run folder that predict cannot use; the message names them."""


@dataclass(frozen=True)
class Clip:
    """One input: a file, or a segment of it (seconds; NaN = the file's start/end)."""

    path: str
    start: float = math.nan
    end: float = math.nan


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


class Classifier:
    """A trained run, ready to classify: its discriminator, class names and feature settings."""

    def __init__(self, net: torch.nn.Module, vocab: dict[str, list[str]], cfg: Config, device: torch.device,
                 precision: str, run_dir: Path, checkpoint: dict):
        self.net, self.vocab, self.cfg = net.to(device), vocab, cfg
        self.device, self.precision, self.run_dir, self.checkpoint = device, precision, run_dir, checkpoint
        self.channels_last = cfg.channels_last
        if self.channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)

    @classmethod
    def from_run(cls, run_dir: str | Path, checkpoint: str = "best", device: str = "auto",
                 precision: str | None = None) -> "Classifier":
        """Load ``run_dir`` (no training code, no corpus needed). ``precision`` defaults to the run's."""
        run_dir = Path(run_dir)
        net, record = load_discriminator(run_dir, checkpoint)
        cfg = Config.from_json(run_dir / runfolder.CONFIG)
        vocab = runfolder.read_labels(run_dir)
        return cls(net, vocab, cfg, pick_device(device), precision or record.get("precision") or "fp32",
                   run_dir, record)

    @property
    def heads(self) -> list[str]:
        return list(self.vocab)

    # --- features -------------------------------------------------------------------------------
    def spectrogram(self, wave: np.ndarray, sample_rate: int) -> np.ndarray:
        """The run's feature of a mono (or (samples, channels)) waveform: ``(256, frames)`` float32."""
        import soxr

        from voxlib.features import spectrogram

        wave = np.asarray(wave, dtype=np.float32)
        if wave.ndim == 2:
            wave = wave.mean(axis=1)
        if sample_rate != self.cfg.sample_rate:
            wave = soxr.resample(wave, sample_rate, self.cfg.sample_rate)
        spec = spectrogram(wave, self.cfg)[0].numpy()
        return spec.astype(np.float16).astype(np.float32)  # the feature cache stores float16

    def crops(self, spec: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(eval_crops_of(spec, self.cfg.n_frames, self.cfg.eval_crops))

    def _load(self, clip: Clip) -> tuple[np.ndarray | None, str | None]:
        """The clip's spectrogram, or the reason it cannot be used (the checks training applies)."""
        from voxlib.audio import load_audio
        from voxlib.corpora.manifest import check_clip

        problem = check_clip(clip.path, clip.start, clip.end, self.cfg.sample_rate, self.cfg.n_fft)["problem"]
        if problem:
            return None, problem
        wave = load_audio(clip.path, self.cfg.sample_rate, clip.start, clip.end)
        return self.spectrogram(wave, self.cfg.sample_rate), None

    # --- predictions ----------------------------------------------------------------------------
    def run(self, clips: Sequence[Clip | str], batch_size: int = 16, progress: bool = False,
            features: bool = False) -> tuple[pd.DataFrame, pd.DataFrame, np.ndarray | None]:
        """(predictions, rejected ``path,reason``, trunk features or None) for ``clips``.

        predictions has ``index`` (position in ``clips``), ``path``, and per head the columns of
        predictions.csv except ``_true``.
        """
        from tqdm import tqdm

        clips = [c if isinstance(c, Clip) else Clip(str(c)) for c in clips]
        rejected: list[tuple[str, str]] = []

        def batches():
            xs, kept = [], []
            for i, clip in enumerate(tqdm(clips, desc="predict", unit="clip", disable=not progress)):
                spec, problem = self._load(clip)
                if problem:
                    log.warning("%s: skipped: %s", clip.path, problem)
                    rejected.append((clip.path, problem))
                    continue
                xs.append(self.crops(spec))
                kept.append(i)
                if len(xs) == batch_size:
                    yield torch.stack(xs), kept
                    xs, kept = [], []
            if xs:
                yield torch.stack(xs), kept

        index, probs, trunks = [], {h: [] for h in self.heads}, []
        with torch.inference_mode():
            for kept, p, trunk in crop_averaged(self.net, batches(), self.device, self.precision,
                                                self.channels_last, features=features):
                index += kept
                for h in self.heads:
                    probs[h].append(p[h].numpy())
                if features:
                    trunks.append(trunk.numpy())
        stacked = {h: np.concatenate(v) if v else np.zeros((0, len(self.vocab[h]))) for h, v in probs.items()}
        ids = {"index": np.array(index, dtype=np.int64), "path": [clips[i].path for i in index]}
        frame = runfolder.prediction_frame(ids, self.vocab, stacked).drop(columns=[f"{h}_true" for h in self.heads])
        embedded = (np.concatenate(trunks) if trunks else np.zeros((0, 0), np.float32)) if features else None
        return frame, pd.DataFrame(rejected, columns=["path", "reason"]), embedded

    def predict(self, paths: Sequence[str | Path | Clip], batch_size: int = 16, progress: bool = False) -> pd.DataFrame:
        """One row per usable file: ``path`` and ``{head}_pred``, ``_prob``, ``_top5`` (bad files are
        logged as warnings with their reason and left out; use :meth:`run` to get them as a table)."""
        frame, _, _ = self.run(list(paths), batch_size, progress)
        return frame.drop(columns="index")

    def predict_waveform(self, wave: np.ndarray, sample_rate: int) -> dict[str, dict]:
        """Class probabilities of one waveform: ``{head: {"pred", "prob", "top5", "probs"}}``."""
        x = self.crops(self.spectrogram(wave, sample_rate))[None]
        (_, probs, _), = crop_averaged(self.net, [(x, None)], self.device, self.precision, self.channels_last)
        out = {}
        for h, classes in self.vocab.items():
            p = probs[h][0].numpy()
            order = np.argsort(-p, kind="stable")
            out[h] = {"pred": classes[order[0]], "prob": float(p[order[0]]),
                      "top5": [classes[k] for k in order[: runfolder.TOP_K_STORED]],
                      "probs": dict(zip(classes, p.tolist()))}
        return out

    def embed(self, paths: Sequence[str | Path | Clip], batch_size: int = 16) -> np.ndarray:
        """Crop-averaged trunk features ``(N, C*4*4)`` of the usable files (in input order)."""
        _, _, features = self.run(list(paths), batch_size, features=True)
        return features


# --- evaluating a labelled corpus ----------------------------------------------------------------------
def evaluate_manifest(clf: Classifier, manifest_path: str | Path, out_dir: str | Path, batch_size: int = 16,
                      progress: bool = True, embeddings: bool = False) -> Path:
    """Score a labelled corpus and write an evaluation folder that follows the run-folder contract.

    The folder holds the run's config.json, labels.json and metrics.csv, a splits.csv with the run's
    training rows (so baselines and class sizes are the run's) plus the evaluated utterances (split
    ``seen_test`` for speakers the run trained on, ``unseen_test`` for others; their row ids are the
    manifest rows offset past the run's largest id), predictions.csv, scores.csv (per head and split:
    accuracy, top-3, balanced accuracy, chance, majority), per_class_<head>.csv, confusion_<head>.csv,
    unknown_labels.csv and summary.json (last). ``evaluate.load_run`` and the analysis read it.
    """
    from voxlib import evaluate
    from voxlib.corpora.manifest import read_manifest

    out_dir = Path(out_dir)
    run_splits = runfolder.read_csv(clf.run_dir / runfolder.SPLITS_FILE, ["row", "speaker", "split"])
    train = run_splits[run_splits["split"] == "train"]
    manifest = read_manifest(manifest_path, on_bad_file="skip", allow_outside_paths=clf.cfg.allow_outside_paths,
                             sample_rate=clf.cfg.sample_rate, n_fft=clf.cfg.n_fft, progress=progress)
    table = manifest.table
    missing = [h for h in clf.heads if h not in table.columns]
    if len(missing) == len(clf.heads):
        raise PredictError(f"{manifest_path}: none of the run's heads {clf.heads} is a column of the manifest")
    clips = [Clip(p, s, e) for p, s, e in zip(table["path"], table["start"], table["end"])]
    frame, rejected, features = clf.run(clips, batch_size, progress, features=embeddings)
    done = table.iloc[frame["index"].to_numpy()].reset_index(drop=True)
    offset = int(pd.to_numeric(run_splits["row"]).max())
    row_ids = done["row"].to_numpy() + offset
    split = np.where(done["speaker"].astype(str).isin(set(train["speaker"])), "seen_test", "unseen_test")
    vocab = {h: c for h, c in clf.vocab.items() if h in done.columns}
    targets, _ = encode_targets(done, vocab)
    unknown = [{"head": h, "label": label, "utterances": int(n)}
               for h in vocab for label, n in done.loc[targets[h] < 0, h].astype(str).value_counts().items()]
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
    record = {**runfolder.read_json(clf.run_dir / runfolder.CONFIG), "evaluation": {
        "run_dir": str(clf.run_dir.absolute()), "checkpoint": clf.checkpoint["path"],
        "manifest": str(Path(manifest_path).absolute()), "manifest_digest": manifest.digest,
        "precision": clf.precision, "row_offset": offset}}
    with runfolder.writing(out_dir, "evaluation folder"):
        (out_dir / runfolder.SUMMARY).unlink(missing_ok=True)
        runfolder.write_json(out_dir, runfolder.CONFIG, record)
        runfolder.write_json(out_dir, runfolder.LABELS, clf.vocab)
        runfolder.write_csv(out_dir, runfolder.SPLITS_FILE, splits)
        metrics = clf.run_dir / runfolder.METRICS
        runfolder.write_metrics(out_dir, runfolder.read_metric_rows(metrics) if metrics.is_file() else [])
        runfolder.write_csv(out_dir, runfolder.PREDICTIONS, predictions)
        runfolder.write_csv(out_dir, runfolder.UNKNOWN_LABELS, pd.DataFrame(unknown, columns=["head", "label", "utterances"]))
        # rows the manifest check refused and clips refused at prediction time: all of them listed
        runfolder.write_csv(out_dir, runfolder.REJECTED, pd.concat(
            [manifest.rejected[["path", "reason"]], rejected], ignore_index=True))
        if embeddings and features is not None:
            runfolder.write_embeddings(out_dir, features, row_ids, split)
        run = evaluate.load_run(out_dir)
        scores = evaluate.accuracy_table(run, splits=EVAL_SPLITS)
        runfolder.write_csv(out_dir, runfolder.SCORES, scores)
        for h in scores["head"].unique():
            runfolder.write_csv(out_dir, f"per_class_{h}.csv", evaluate.per_class_metrics(run, h, EVAL_SPLITS))
            runfolder.write_csv(out_dir, f"confusion_{h}.csv", evaluate.confusion(run, h, EVAL_SPLITS).reset_index())
        runfolder.write_json(out_dir, runfolder.SUMMARY, {
            "evaluated": len(predictions), "rejected": len(rejected) + len(manifest.rejected),
            "unknown_labels": {h: int((targets[h] < 0).sum()) for h in vocab}})
    return out_dir


# --- command line --------------------------------------------------------------------------------------
def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m voxlib.predict", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Scoring voice conversion: " + __doc__.split("**Scoring voice conversion.**")[1].split("\n\n")[0])
    p.add_argument("inputs", nargs="*", metavar="PATH", help="audio files or folders (searched recursively)")
    p.add_argument("--run-dir", required=True, help="a finished vox run folder")
    p.add_argument("--out", help="predictions CSV for PATHs (a new file; default: print to stdout)")
    p.add_argument("--manifest", help="a labelled manifest to evaluate instead of PATHs")
    p.add_argument("--out-dir", help="evaluation folder for --manifest (new or empty; default RUN_DIR/evals/<manifest folder>)")
    p.add_argument("--checkpoint", default="best", help="best, last or a .pt path (default: best)")
    p.add_argument("--batch-size", type=int, default=16, help="clips per forward pass (default: 16)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "mps"), help="default: auto")
    p.add_argument("--precision", choices=("fp32", "bf16"), help="default: the precision the run trained in")
    p.add_argument("--embeddings", help="also save trunk features: an .npz path for PATHs; with --manifest, "
                   "any value writes embeddings.npz into the evaluation folder")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from voxlib.cli import log_to

    log_to(sys.stderr)
    args = parser().parse_args(argv)
    if bool(args.inputs) == bool(args.manifest):
        parser().error("give audio PATHs or --manifest, not both and not neither")
    if args.batch_size < 1:
        parser().error("--batch-size must be at least 1")
    clf = Classifier.from_run(args.run_dir, args.checkpoint, args.device, args.precision)
    if args.manifest:
        out_dir = args.out_dir or Path(args.run_dir) / runfolder.EVALS / Path(args.manifest).absolute().parent.name
        folder = evaluate_manifest(clf, args.manifest, out_dir, args.batch_size, embeddings=bool(args.embeddings))
        scores = pd.read_csv(folder / runfolder.SCORES)
        for r in scores.itertuples():
            print(f"{r.head} ({r.split}, {r.n} utterances): accuracy {percent(r.accuracy)} "
                  f"(majority {percent(r.majority)}, chance {percent(r.chance)})")
        print(folder)
        return 0
    for target in (args.out, args.embeddings):
        if target and Path(target).exists():
            raise PredictError(f"{target} exists; vox does not overwrite files it did not create: choose a new name")
    frame, rejected, features = clf.run(find_audio(args.inputs), args.batch_size, progress=sys.stderr.isatty(),
                                        features=bool(args.embeddings))
    frame = frame.drop(columns="index")
    if args.out:
        from voxlib.fileio import write_atomic

        write_atomic(args.out, runfolder.csv_bytes(frame))
        print(f"{len(frame)} clip(s) classified into {args.out}" +
              (f"; {len(rejected)} skipped (see the warnings above)" if len(rejected) else ""))
    else:
        sys.stdout.write(runfolder.csv_bytes(frame).decode())
    if args.embeddings:
        import io

        from voxlib.fileio import write_atomic

        buffer = io.BytesIO()
        np.savez(buffer, features=features, path=np.array(frame["path"], dtype=str))
        write_atomic(args.embeddings, buffer.getvalue())
    return 0 if len(frame) or not len(rejected) else 1


if __name__ == "__main__":
    from voxlib.cli import run_command

    sys.exit(run_command(main))
