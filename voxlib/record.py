"""What a run writes as it trains, and reads back to resume: settings, checkpoints, RNG, metrics, TensorBoard.

A resumed run must end bit-identical to an uninterrupted one, so everything that shapes the next
epoch is in the checkpoint: weights, optimiser and schedule state, every random generator, the best
epoch so far, early stopping. The checkpoint also carries the settings that shaped its weights, and a
resume compares against those (never against an editable config.json). :func:`commit_epoch` makes
an epoch durable in an order that survives a failure at any write. The file names and formats are
runfolder.py's; this module decides what goes into them during training.
"""
from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any, Callable

import matplotlib
import numpy as np
import pandas as pd
import torch
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams

from voxlib import __version__, runfolder, text
from voxlib.checkpoint import CheckpointError, save_checkpoint
from voxlib.config import FEATURES, LEARNING, Config, git_commit
from voxlib.data import RunData
from voxlib.plots import confusion_heatmap
from voxlib.step import Parts, Tally

log = logging.getLogger("voxlib.train")  # the trainer's log: one stream for the whole run

TB_CONFUSION_MAX = 60  # heads with more classes get no confusion figure in TensorBoard (accuracy curves only)

# Test-only fault points: tests append callables here; production code never reads the environment
# for them. Each is called with (point, detail): point "step" (detail: global step index) before every
# training step, "write" (detail: the run-folder file about to be written) before every write.
FAULT_HOOKS: list[Callable[[str, Any], None]] = []


def fault_point(point: str, detail: Any) -> None:
    for hook in FAULT_HOOKS:
        hook(point, detail)


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite loss, a run folder that does not match, a failed write)."""


# --- the settings that shaped the weights ----------------------------------------------------------
def settings_record(cfg: Config, data: RunData) -> dict:
    """What shaped the weights: every feature and learning setting, the corpus digest and cache key."""
    return {**cfg.values(FEATURES), **cfg.values(LEARNING), "manifest_digest": data.manifest.digest,
            "cache_key": data.cache.key}


def settings_changes(old: dict, new: dict) -> list[str]:
    """One line per setting that differs between a checkpoint's record and this launch."""
    changed = []
    for key in sorted(set(old) | set(new)):
        if key in old and key in new and old[key] != new[key]:
            what = {"manifest_digest": "the corpus (manifest or audio files) changed",
                    "cache_key": "the feature settings or the rows changed"}.get(key, f"{old[key]!r} -> {new[key]!r}")
            changed.append(f"{key}: {what}")
    return changed


def refuse_changed_settings(ckpt: dict | None, cfg: Config, data: RunData, run_dir: Path) -> None:
    """A resume must train what the checkpoint trained: refuse any change, listing it."""
    old = ckpt.get("settings") if ckpt else None
    if old is None:
        return
    changed = settings_changes(old, settings_record(cfg, data))
    if changed:
        raise TrainingError(f"run folder {run_dir} was trained with different settings; refusing to resume: "
                            + "; ".join(changed) + ". Use a new --run-dir, or restore the settings to continue "
                            "that run.")


# --- random generators ------------------------------------------------------------------------------
def rng_state() -> dict:
    """Every random generator training draws from (torch, CUDA, numpy, Python), as they are now."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Put back what :func:`rng_state` (or a checkpoint's ``rng``) holds."""
    torch.set_rng_state(state["torch"])
    numpy_state = state["numpy"]
    np.random.set_state(_numpy_from_plain(numpy_state) if isinstance(numpy_state, dict) else numpy_state)
    random.setstate(_to_tuple(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def plain_rng_state() -> dict:
    """:func:`rng_state` as tensors and plain values, for a ``weights_only`` checkpoint."""
    state = rng_state()
    name, keys, pos, has_gauss, cached = state["numpy"]
    state["numpy"] = {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}
    if torch.cuda.is_available() and "cuda" not in state:
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _numpy_from_plain(plain: dict):
    return (plain["name"], plain["keys"].numpy().astype(np.uint32), plain["pos"], plain["has_gauss"],
            plain["cached_gaussian"])


def _to_tuple(value):
    return tuple(_to_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


# --- checkpoints ----------------------------------------------------------------------------------
def checkpoint_state(epoch: int, parts: Parts, cfg: Config, data: RunData, progress: dict) -> dict:
    """Everything the next epoch depends on, plus what predict needs to rebuild the model."""
    state = {"epoch": epoch, "model": parts.net.state_dict(), "optimizer": parts.optimizer.state_dict(),
             "schedule": parts.schedule.state_dict(), "rng": plain_rng_state(), **progress,
             "settings": settings_record(cfg, data), "precision": parts.precision,
             "head_sizes": data.head_sizes, "width": cfg.width, "voxlib_version": __version__}
    if parts.adversary is not None:  # training only: predict rebuilds the model without it
        state["adversary"] = parts.adversary.state_dict()
    return state


def restore(ckpt: dict, path: Path, parts: Parts, data: RunData) -> dict:
    """Load checkpoint ``ckpt`` (read from ``path``) into the parts and the RNGs; return the loop's
    progress (epoch, best, ...)."""
    if ckpt.get("head_sizes") != data.head_sizes:
        raise TrainingError(f"{path} has heads {ckpt.get('head_sizes')}, this run has {data.head_sizes}")
    parts.net.load_state_dict(ckpt["model"])
    if parts.adversary is not None:
        parts.adversary.load_state_dict(ckpt["adversary"])
    parts.optimizer.load_state_dict(ckpt["optimizer"])
    parts.schedule.load_state_dict(ckpt.get("schedule", {}))
    set_rng_state(ckpt["rng"])
    return {"epoch": int(ckpt["epoch"]), "best": ckpt.get("best"), "skipped_batches": int(ckpt.get("skipped_batches", 0)),
            "early_stop": ckpt.get("early_stop")}


# --- the run's files -----------------------------------------------------------------------------
def write_run_files(run_dir: Path, cfg: Config, data: RunData, choice: dict) -> None:
    """config.json (the record of this launch), labels.json, splits.csv and the rejected clips."""
    record = {**cfg.to_dict(), "voxlib_version": __version__, "git_commit": git_commit(),
              "manifest_digest": data.manifest.digest, "cache_key": data.cache.key,
              "precision_used": choice["precision"], "precision_choice": choice}
    (run_dir / runfolder.CHECKPOINTS).mkdir(exist_ok=True)
    runfolder.write_json(run_dir, runfolder.CONFIG, record)
    runfolder.write_json(run_dir, runfolder.LABELS, data.vocab)
    runfolder.write_csv(run_dir, runfolder.SPLITS_FILE, data.split_table())
    rejected = data.manifest.rejected
    if rejected is not None and len(rejected):
        log.warning("%d clip(s) skipped as unusable; listed with reasons in %s", len(rejected),
                    run_dir / runfolder.REJECTED)
        runfolder.write_csv(run_dir, runfolder.REJECTED, rejected)


def epoch_rows(epoch: int, tally: Tally, seconds: float, val: dict[str, dict], heads: list[str], world: int) -> list[tuple]:
    """metrics.csv rows of one epoch: train loss/acc/grad_norm per head, totals, validation per split."""
    loss = tally.loss / tally.denom.clamp(min=1e-12)
    acc = tally.correct / tally.valid.clamp(min=1)
    # a process's slice of the trunk gradient is 1/world of the global-loss gradient
    grad = (tally.grad_sq / world**2).sqrt() if tally.grad_n else None
    rows = []
    for k, h in enumerate(heads):
        rows += [(epoch, "train", h, "loss", float(loss[k])), (epoch, "train", h, "acc", float(acc[k]))]
        if grad is not None:
            rows.append((epoch, "train", h, "grad_norm", float(grad[k])))
    rows += [(epoch, "train", "all", "loss", tally.total / max(tally.steps, 1)),
             (epoch, "train", "all", "skipped_batches", float(tally.skipped)),
             (epoch, "train", "all", "seconds", round(seconds, 3))]
    if tally.adversary_steps:  # the speaker adversary's own loss (near log(speakers per accent): no voice left)
        rows.append((epoch, "train", "all", "adversary_loss", tally.adversary / tally.adversary_steps))
    for split, result in val.items():
        for k, h in enumerate(heads):
            if result["valid"][k] > 0:
                rows += [(epoch, split, h, "loss", float(result["loss"][k])), (epoch, split, h, "acc", float(result["acc"][k]))]
    return rows


def validation_score(val: dict[str, dict]) -> tuple[float, float] | None:
    """best.pt's criterion: mean seen_val accuracy over heads, ties broken by lower mean seen_val loss."""
    result = val.get("seen_val")
    if result is None:
        return None
    scored = result["valid"] > 0
    return float(result["acc"][scored].mean()), -float(result["loss"][scored].mean())


def epoch_line(epoch: int, epochs: int, rows: list[tuple], heads: list[str], seconds: float) -> str:
    """One labelled progress line: full head names, seen-speaker validation accuracy (else train)."""
    acc = {(s, h): v for _, s, h, m, v in rows if m == "acc"}
    split = "seen_val" if any(s == "seen_val" for s, _ in acc) else "train"
    shown = ", ".join(f"{h} {text.percent(acc[(split, h)])}" for h in heads if (split, h) in acc)
    loss = next(v for _, s, h, m, v in rows if (s, h, m) == ("train", "all", "loss"))
    return f"epoch {epoch}/{epochs} ({seconds:.0f} s): train loss {loss:.3f}; {split} accuracy: {shown}"


def commit_epoch(run_dir: Path, epoch: int, rows: list[tuple], writer: SummaryWriter, state: dict,
                 improved: bool, val: dict[str, dict], vocab: dict[str, list[str]]) -> None:
    """Make epoch ``epoch`` durable, in an order where a failure at any write resumes exactly.

    metrics.csv and TensorBoard (scalars and the seen-speaker confusion figures) first (a resume drops their rows past the checkpoint's epoch), then
    best.pt, then last.pt: last.pt is the commit point. A crash before it redoes the epoch, which is
    deterministic and so rewrites best.pt with the same bytes; best.pt can never lag behind last.pt.
    """
    ckpt = run_dir / runfolder.CHECKPOINTS
    last_good = (f"The checkpoint {ckpt / runfolder.LAST} (epoch {epoch - 1}) is intact" if epoch > 1
                 else "No epoch had been checkpointed yet")
    try:
        fault_point("write", runfolder.METRICS)
        runfolder.write_metrics(run_dir, rows, keep_until=epoch - 1)
        fault_point("write", runfolder.TENSORBOARD)
        for _, split, head, metric, value in rows:
            writer.add_scalar(f"{metric}/{split}/{text.tag(head)}", value, epoch)
        tensorboard_confusion(writer, epoch, val, vocab)
        writer.flush()
        if improved:
            fault_point("write", runfolder.BEST)
            save_checkpoint(state, ckpt / runfolder.BEST)
        fault_point("write", runfolder.LAST)
        save_checkpoint(state, ckpt / runfolder.LAST)
    except (OSError, CheckpointError) as err:
        raise TrainingError(f"epoch {epoch}: {err}. {last_good}; free space and re-run the same command "
                            f"to resume.") from err


# --- TensorBoard ---------------------------------------------------------------------------------
def tensorboard_writer(run_dir: Path, resumed_after: int) -> SummaryWriter:
    """The run's event writer; a resumed run drops the events logged after its checkpoint's epoch."""
    return SummaryWriter(run_dir / runfolder.TENSORBOARD, purge_step=resumed_after + 1 if resumed_after else None)


def tensorboard_confusion(writer: SummaryWriter, epoch: int, val: dict[str, dict], vocab: dict[str, list[str]]) -> None:
    """Per head, this epoch's seen-speaker validation confusion matrix as a TensorBoard image."""
    result = val.get("seen_val")
    if result is None:
        return
    # class names are corpus text: a '$' in a label must print as '$', not start mathtext
    with matplotlib.rc_context({"text.parse_math": False}):
        for head, counts in result["confusion"].items():
            shares = counts / np.maximum(counts.sum(1, keepdims=True), 1)
            table = pd.DataFrame(shares, index=vocab[head], columns=vocab[head])
            figure = confusion_heatmap(table, f"{head}: seen-speaker validation, epoch {epoch}")
            writer.add_figure(f"confusion/seen_val/{head}", figure, epoch)


def tensorboard_hparams(writer: SummaryWriter, cfg: Config, run_dir: Path, progress: dict) -> None:
    """Every scalar setting beside the run's results, for TensorBoard's HPARAMS tab.

    The results are the best epoch's validation accuracies (the weights predictions.csv comes from),
    under ``hparam/`` so they never collide with the per-epoch scalars.
    """
    settings = {k: v for k, v in cfg.to_dict().items() if isinstance(v, (bool, int, float, str))}
    best = (progress["best"] or {}).get("epoch") or progress["epoch"]
    results = {f"hparam/{split}/{head}/acc": value
               for epoch, split, head, metric, value in runfolder.read_metric_rows(run_dir / runfolder.METRICS)
               if epoch == best and metric == "acc" and split != "train"}
    results.update({"hparam/best_epoch": float(best), "hparam/epochs_trained": float(progress["epoch"])})
    for summary in hparams(settings, results):
        writer.file_writer.add_summary(summary, progress["epoch"])
    for tag, value in results.items():
        writer.add_scalar(tag, value, progress["epoch"])
    writer.flush()
