"""Train the multi-head discriminator and write a run folder (see ARCHITECTURE.md).

Usage::

    python -m voxlib.train                                  # built-in demo corpus, CPU defaults
    python -m voxlib.train --manifest data/vctk/manifest.csv --width 0.5 --epochs 40
    python -m voxlib.train --preset seed --manifest ...     # the 2019 protocol (GPU)

    # one machine, 4 GPUs (batch_size stays the GLOBAL batch, split across the processes):
    torchrun --standalone --nproc-per-node=4 -m voxlib.train --manifest ... --batch-size 64

    # two machines with 8 GPUs each: run on both, --node-rank 0 on the first, 1 on the second;
    # the run folder and the corpus must be on storage both machines see
    torchrun --nnodes=2 --node-rank=0 --nproc-per-node=8 --master-addr=10.0.0.1 --master-port=29500 \\
        -m voxlib.train --manifest ... --run-dir /shared/runs/vctk

    # CPU only, 2 processes (gloo); matches one process with the same --batch-size up to float rounding
    torchrun --standalone --nproc-per-node=2 -m voxlib.train --threads 1

Re-running the same command on an existing run folder resumes from ``checkpoints/last.pt`` and
ends with exactly the weights and metrics of an uninterrupted run (bit for bit on CPU); ``--epochs``
may be raised to train on. The checkpoint carries the settings that shaped its weights; a changed
corpus or training setting is refused with what changed. Runs under DDP use gloo on CPU and nccl on
CUDA; only rank 0 writes the run folder, and a checkpoint holds the unwrapped model, so a run may
resume with a different number of processes.

This file is the loop. Its parts: data.py builds the corpus, cache, splits and targets
(``load_run_data``); step.py the model, optimiser, schedule, loader and the training step
(``build_parts``); precision.py picks fp32 or bf16; record.py is what each epoch writes and what a
resume reads back; experiment.py runs folds and seeds as members of a pooled folder.
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.distributed
from torch.utils.data import DataLoader
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from voxlib import record, runfolder
from voxlib.checkpoint import load_checkpoint
from voxlib.cli import log_to, parse_config, run_command
from voxlib.config import Config
from voxlib.corpora.source import default_run_dir
from voxlib.data import CropDataset, RunData, load_run_data
from voxlib.distributed import Dist, init_distributed, speed_settings
from voxlib.evaluate import training_summary
from voxlib.experiment import run_experiment
from voxlib.inference import crop_averaged
from voxlib.precision import choose_for_run
from voxlib.record import TrainingError, fault_point
from voxlib.step import EarlyStop, Parts, Tally, build_parts

log = logging.getLogger("voxlib.train")  # not __name__: that is "__main__" under python -m

EMBED_TRAIN_MAX = 2000  # train utterances sampled into embeddings.npz


def train(cfg: Config) -> Path:
    """Train (or resume, or find finished) the run described by ``cfg``; return the run folder.

    With ``folds`` or ``seeds`` above 1 that is a pooled folder of K x N runs (experiment.py), each
    trained by :func:`train_run`.
    """
    if cfg.folds > 1 or cfg.seeds > 1:
        return run_experiment(cfg, train_run)
    return train_run(cfg)


def train_run(cfg: Config) -> Path:
    """Train (or resume, or find finished) the one run folder ``cfg`` describes (a fold's member too)."""
    env = init_distributed(cfg)
    try:
        with speed_settings(cfg, env.device):
            return run_training(cfg, env)
    finally:
        if env.owns_group:
            torch.distributed.destroy_process_group()


def run_training(cfg: Config, env: Dist) -> Path:
    for note in cfg.preset_notes:
        log.info("%s", note)
    data = load_run_data(cfg, in_turn=env.in_turn, progress=env.main)
    run_dir = Path(cfg.run_dir) if cfg.run_dir else default_run_dir(cfg)
    if runfolder.is_pooled(run_dir):
        raise TrainingError(f"{run_dir} is a pooled folder (folds/seeds); give its folds and seeds, or a new --run-dir")
    with runfolder.writing(run_dir) if env.main else contextlib.nullcontext(run_dir):
        last = run_dir / runfolder.CHECKPOINTS / runfolder.LAST
        ckpt = load_checkpoint(last) if last.exists() else None  # read once: a seed-width one is ~1 GB
        record.refuse_changed_settings(ckpt, cfg, data, run_dir)
        if ckpt and ckpt.get("precision"):
            choice = {"precision": ckpt["precision"], "how": "resumed: the precision the run started with"}
        else:
            choice = choose_for_run(cfg, data, env)
        parts = build_parts(cfg, data, env, choice["precision"])
        progress = {"epoch": 0, "best": None, "skipped_batches": 0, "early_stop": None}
        if ckpt is not None:
            progress = record.restore(ckpt, last, parts, data)
            del ckpt
            if progress["epoch"] > cfg.epochs:
                raise TrainingError(f"{run_dir} already holds {progress['epoch']} epochs; --epochs {cfg.epochs} "
                                    f"would go back (raise --epochs to train on, or use a new --run-dir)")
        if runfolder.is_complete(run_dir, cfg.epochs, progress["epoch"], (progress["best"] or {}).get("epoch")):
            log.info("%s is complete (%d epochs); nothing to do", run_dir, progress["epoch"])
            return run_dir
        if env.main:
            start_writing(run_dir, cfg, data, choice, progress["epoch"])
        env.barrier()
        writer = record.tensorboard_writer(run_dir, progress["epoch"]) if env.main else None
        try:
            train_epochs(cfg, env, data, parts, run_dir, progress, writer)
            if env.main:
                finish(run_dir, parts, data, cfg, env, progress, writer)
            env.barrier()
        finally:
            if writer is not None:
                writer.close()
    return run_dir


def start_writing(run_dir: Path, cfg: Config, data: RunData, choice: dict, resumed_after: int) -> None:
    """(Re)write the run's records before the first epoch of this launch. The earlier results of a run
    whose ``epochs`` is raised stay until the new ones replace them (the run reads as unfinished
    meanwhile: its summary no longer describes metrics.csv)."""
    if resumed_after:
        log.info("%s", runfolder.resume_note(run_dir, cfg.epochs, resumed_after))
    record.write_run_files(run_dir, cfg, data, choice)
    runfolder.write_metrics(run_dir, [], keep_until=resumed_after)
    for stale in (run_dir / runfolder.CHECKPOINTS).glob(".*.tmp*"):  # left by a crash mid-save
        stale.unlink()


# --- the loop ------------------------------------------------------------------------------------
def train_epochs(cfg: Config, env: Dist, data: RunData, parts: Parts, run_dir: Path, progress: dict,
                 writer: SummaryWriter | None) -> None:
    """Train an epoch, validate, commit it; stop at ``epochs`` or when early stopping says so."""
    early = EarlyStop(cfg, progress.get("early_stop"))
    for epoch in range(progress["epoch"] + 1, cfg.epochs + 1):
        t0 = time.perf_counter()
        tally = train_epoch(epoch, parts, data, cfg, env, run_dir)
        seconds = time.perf_counter() - t0
        val = {split: evaluate(parts, data, cfg, env, data.rows(split))
               for split in ("seen_val", "unseen_val") if len(data.rows(split))}
        rows = record.epoch_rows(epoch, tally, seconds, val, data.heads, env.world)
        score = record.validation_score(val)
        parts.schedule.after_epoch(-score[1] if score else rows[0][4])
        improved = score is None or progress["best"] is None or score > tuple(progress["best"]["score"])
        if improved:
            progress["best"] = {"epoch": epoch, "score": list(score or (0.0, 0.0))}
        early.update(rows)
        progress.update(epoch=epoch, skipped_batches=progress["skipped_batches"] + tally.skipped,
                        early_stop=early.state_dict())
        if env.main:
            state = record.checkpoint_state(epoch, parts, cfg, data,
                                            {k: progress[k] for k in ("best", "skipped_batches", "early_stop")})
            record.commit_epoch(run_dir, epoch, rows, writer, state, improved, val, data.vocab)
            log.info("%s", record.epoch_line(epoch, cfg.epochs, rows, data.heads, seconds))
        env.barrier()
        if early.stop:
            log.info("early stop after epoch %d: %s has not improved for %d epochs", epoch, cfg.early_stop, cfg.patience)
            break


def train_epoch(epoch: int, parts: Parts, data: RunData, cfg: Config, env: Dist, run_dir: Path) -> Tally:
    parts.model.train()
    parts.sampler.set_epoch(epoch)
    parts.train_loader.dataset.set_epoch(epoch)
    tally = Tally(len(data.heads))
    step_base = (epoch - 1) * len(parts.train_loader)
    # per-batch bars only on a terminal: in notebooks and logs every refresh would become a line
    bar = tqdm(parts.train_loader, desc=f"epoch {epoch}", leave=False, disable=not (env.main and sys.stderr.isatty()))
    for i, (x, y, rows) in enumerate(bar):
        fault_point("step", step_base + i)
        bad = parts.step(x, y, tally, measure_grad=bool(cfg.grad_log_every) and i % cfg.grad_log_every == 0)
        if bad:
            paths = [data.table.at[int(r), "path"] for r in rows]
            where = f"epoch {epoch}, step {step_base + i + 1}: non-finite loss in head(s) {bad}; batch files: {paths}"
            if cfg.nan_policy == "stop":
                raise TrainingError(f"{where}. Stopped; the last good checkpoint "
                                    f"{run_dir / runfolder.CHECKPOINTS / runfolder.LAST} is kept. Lower --lr, "
                                    f"check these files, or use --nan-policy skip.")
            warnings.warn(f"{where}; batch skipped (no optimiser step)")
    tally.summed(env)
    if tally.skipped:
        warnings.warn(f"epoch {epoch}: {tally.skipped} batch(es) skipped for non-finite loss")
    return tally


def evaluate(parts: Parts, data: RunData, cfg: Config, env: Dist, rows: np.ndarray, shard: bool = True,
             collect: bool = False) -> dict:
    """Loss/accuracy per head on ``rows`` with crop-averaged probabilities (optionally kept)."""
    if shard:
        rows = rows[env.rank :: env.world]
    dataset = CropDataset(data.cache, rows, data.targets, cfg.n_frames, train=False, eval_crops=cfg.eval_crops,
                          seed=cfg.seed)
    loader = DataLoader(dataset, batch_size=max(1, parts.plan.local_batch), shuffle=False, **parts.loader_args)
    H = len(data.heads)
    loss_sum, correct, valid = (torch.zeros(H, dtype=torch.float64) for _ in range(3))
    # counts of (true, predicted) for TensorBoard's confusion figures; a large head has none
    sizes = {h: len(data.vocab[h]) for h in data.heads if len(data.vocab[h]) <= record.TB_CONFUSION_MAX}
    confusion = {h: torch.zeros(n * n, dtype=torch.int64) for h, n in sizes.items()}
    kept = {"row": [], "probs": {h: [] for h in data.heads}, "features": []}
    batches = ((x, (y, r)) for x, y, r in loader)
    for (y, r), probs, trunk in crop_averaged(parts.net, batches, env.device, parts.precision, parts.channels_last,
                                              features=collect):
        for k, h in enumerate(data.heads):
            t = y[h]
            ok = t >= 0
            loss_sum[k] += -probs[h][ok, t[ok]].clamp(min=1e-12).log().sum().item()
            predicted = probs[h][ok].argmax(1)
            correct[k] += (predicted == t[ok]).sum().item()
            valid[k] += ok.sum().item()
            if h in confusion:
                confusion[h] += torch.bincount(t[ok] * sizes[h] + predicted, minlength=sizes[h] ** 2)
            if collect:
                kept["probs"][h].append(probs[h])
        if collect:
            kept["row"].append(r)
            kept["features"].append(trunk)
    if shard:
        loss_sum, correct, valid = (env.sum(t) for t in (loss_sum, correct, valid))
        confusion = {h: env.sum(c) for h, c in confusion.items()}
    out = dict(loss=loss_sum / valid.clamp(min=1), acc=correct / valid.clamp(min=1), valid=valid,
               confusion={h: c.reshape(sizes[h], sizes[h]).numpy() for h, c in confusion.items()})
    if collect:
        out["row"] = torch.cat(kept["row"]).numpy() if kept["row"] else np.zeros(0, np.int64)
        out["probs"] = {h: torch.cat(p).numpy() for h, p in kept["probs"].items() if p}
        out["features"] = torch.cat(kept["features"]).numpy() if kept["features"] else np.zeros((0, 0))
    return out


# --- the end of a run -------------------------------------------------------------------------------
def finish(run_dir: Path, parts: Parts, data: RunData, cfg: Config, env: Dist, progress: dict,
           writer: SummaryWriter) -> None:
    """predictions.csv and embeddings.npz from the best checkpoint's weights, hparams, then summary.json."""
    try:
        write_outputs(run_dir, parts, data, cfg, env, progress)
        record.tensorboard_hparams(writer, cfg, run_dir, progress)
    except OSError as err:
        raise TrainingError(f"{err}. Training is complete and checkpointed; free space and re-run the same "
                            f"command to write the predictions.") from err


def write_outputs(run_dir: Path, parts: Parts, data: RunData, cfg: Config, env: Dist, progress: dict) -> None:
    best = run_dir / runfolder.CHECKPOINTS / runfolder.BEST
    if best.exists():
        parts.net.load_state_dict(load_checkpoint(best)["model"])
    frames, features, feature_rows, feature_splits = [], [], [], []
    for split in runfolder.HELD_OUT_SPLITS:
        rows = data.rows(split)
        if not len(rows):
            continue
        result = evaluate(parts, data, cfg, env, rows, shard=False, collect=True)
        idx = result["row"]
        ids = {"row": data.row_ids[idx], "path": data.table["path"].to_numpy()[idx],
               "speaker": data.table["speaker"].to_numpy()[idx], "split": split}
        frames.append(runfolder.prediction_frame(ids, data.vocab, result["probs"],
                                                 {h: t[idx] for h, t in data.targets.items()}))
        if split.endswith("test"):
            features.append(result["features"])
            feature_rows.append(idx)
            feature_splits += [split] * len(idx)
    train_rows = data.rows("train")
    if len(train_rows) > EMBED_TRAIN_MAX:
        pick = np.random.default_rng([cfg.seed, 7]).choice(len(train_rows), EMBED_TRAIN_MAX, replace=False)
        train_rows = np.sort(train_rows[pick])
    result = evaluate(parts, data, cfg, env, train_rows, shard=False, collect=True)
    features.append(result["features"])
    feature_rows.append(result["row"])
    feature_splits += ["train"] * len(result["row"])
    table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    fault_point("write", runfolder.PREDICTIONS)
    runfolder.write_csv(run_dir, runfolder.PREDICTIONS, table)
    fault_point("write", runfolder.EMBEDDINGS)
    runfolder.write_embeddings(run_dir, np.concatenate(features), data.row_ids[np.concatenate(feature_rows)],
                               feature_splits)
    summary = {"epochs": cfg.epochs, "epochs_trained": progress["epoch"],
               "stopped_early": progress["epoch"] < cfg.epochs,
               "best_epoch": (progress["best"] or {}).get("epoch"),
               "predictions_from": "best.pt" if best.exists() else "last weights",
               "skipped_batches": progress["skipped_batches"], "train_batch": parts.plan.global_batch,
               "world_size": env.world, "device": str(env.device), "precision": parts.precision}
    fault_point("write", runfolder.SUMMARY)
    runfolder.write_json(run_dir, runfolder.SUMMARY, summary)


def main(argv: list[str] | None = None) -> int:
    log_to(sys.stderr)
    run_dir = train(parse_config(argv, description=__doc__.split("\n\n")[0]))
    if int(os.environ.get("RANK", "0")) == 0:
        print(training_summary(run_dir), file=sys.stderr)
        print(run_dir)
    return 0


if __name__ == "__main__":
    sys.exit(run_command(main))
