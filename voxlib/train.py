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
may be raised to train on. A changed corpus or training setting is refused with what changed. Runs
under DDP use gloo on CPU and nccl on CUDA; only rank 0 writes the run folder, and a checkpoint
holds the unwrapped model, so a run may resume with a different number of processes
(``summary.json`` gives the world size of the launch that finished the run).
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import os
import random
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from voxlib import __version__
from voxlib.checkpoint import CheckpointError, load_checkpoint, save_checkpoint, write_atomic
from voxlib.config import Config, ConfigError, project_root, usable_cores
from voxlib.runfolder import default_run_dir
from voxlib.data import (HELD_OUT, BalancedSampler, CropDataset, build_vocabularies, encode_targets,
                         make_splits)
from voxlib.heap import keep_freed_memory
from voxlib.model import Discriminator

log = logging.getLogger(__name__)

# Settings that change what is learned; a resumed run must match them (epochs may grow).
TRAINING_FIELDS = tuple(Config().values("features")) + tuple(Config().values("learning"))
RECORD_FIELDS = ("manifest_digest", "cache_key")
EMBED_TRAIN_MAX = 2000  # train utterances sampled into embeddings.npz
METRIC_COLUMNS = ["epoch", "split", "head", "metric", "value"]


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite loss, a run folder that does not match, a failed write)."""


# --- processes and devices ---------------------------------------------------------------------
@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    owns_group: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """Element-wise sum over processes (a copy on the CPU; identity in a single process)."""
        if not self.active:
            return values
        out = values.to(self.device).clone()
        dist.all_reduce(out)
        return out.cpu()


def pick_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' asked for, but torch sees no CUDA device")
    return torch.device(name)


def uses_bf16(cfg: Config, device: torch.device) -> bool:
    """bf16 autocast: asked for, or automatic on CUDA (on CPU it is slower than fp32 here)."""
    return cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")


def uses_channels_last(cfg: Config, device: torch.device) -> bool:
    """NHWC memory format for model and batches (the benchmark asks this to mirror training)."""
    return cfg.channels_last


def loader_settings(cfg: Config, device: torch.device, world: int = 1) -> tuple[int, bool]:
    """(data-loader workers, pin_memory) for one of ``world`` processes on ``device``."""
    workers = cfg.num_workers
    if workers < 0:
        # CPU: a crop from the memmap is cheap, but collating a batch in this process runs on the
        # training threads, and on a busy machine each of its parallel copies waited for a core:
        # 14 % of the step (bench). One worker prepares the next batch meanwhile: under 1 %.
        # Accelerators: the cores this process may use (a batch job's share, not the whole node), split
        # among the processes, one kept for the training loop.
        workers = 1 if device.type == "cpu" else min(8, max(1, usable_cores() // world - 1))
    return workers, device.type == "cuda"


def init_distributed(cfg: Config) -> Dist:
    """Join the torchrun process group when launched by torchrun; otherwise a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = pick_device(cfg.device)
    if world <= 1:
        return Dist(device=device)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(rank=dist.get_rank(), world=dist.get_world_size(), device=device, owns_group=owns)


class _SumAcrossProcesses(torch.autograd.Function):
    """all_reduce(SUM) with a gradient: every process's output depends on every process's input."""

    @staticmethod
    def forward(ctx, x):
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class CpuSyncBatchNorm(nn.BatchNorm2d):
    """BatchNorm whose training statistics span all processes, for CPU (gloo) runs.

    torch.nn.SyncBatchNorm only runs on accelerators; without syncing, each process would normalise
    with statistics of its half of the batch and a 2-process run would differ from a 1-process one.
    Two all-reduces (sum, then centred sum of squares) keep the variance as accurate as BatchNorm's.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        channels = x.shape[1]
        count_local = torch.tensor([x.numel() / channels], dtype=x.dtype)
        totals = _SumAcrossProcesses.apply(torch.cat([x.sum((0, 2, 3)), count_local]))
        count = totals[-1].detach()
        mean = totals[:channels] / count
        centred = x - mean.view(1, -1, 1, 1)
        var = _SumAcrossProcesses.apply((centred * centred).sum((0, 2, 3))) / count
        with torch.no_grad():
            self.num_batches_tracked.add_(1)
            m = self.momentum
            self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
            self.running_var.mul_(1 - m).add_(var.detach() * count / (count - 1), alpha=m)
        scale = (self.weight * torch.rsqrt(var + self.eps)).view(1, -1, 1, 1)
        return centred * scale + self.bias.view(1, -1, 1, 1)


def sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    if device.type != "cpu":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for name, child in model.named_children():
        if type(child) is nn.BatchNorm2d:
            synced = CpuSyncBatchNorm(child.num_features, child.eps, child.momentum)
            synced.load_state_dict(child.state_dict())
            setattr(model, name, synced)
        else:
            sync_batchnorm(child, device)
    return model


# --- run folder --------------------------------------------------------------------------------
def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=project_root(), capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def check_resumable(run_dir: Path, record: dict) -> dict | None:
    """The stored config.json if the run folder may be resumed with ``record``; raise if not."""
    path = run_dir / "config.json"
    if not path.exists():
        return None
    try:
        old = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise TrainingError(f"cannot read {path} of the existing run: {err}") from err
    changed = []
    for key in TRAINING_FIELDS + RECORD_FIELDS:
        if key in old and old[key] != record.get(key):
            what = {"manifest_digest": "the corpus (manifest or audio files) changed",
                    "cache_key": "the feature settings changed"}.get(key, f"{old[key]!r} -> {record.get(key)!r}")
            changed.append(f"  {key}: {what}")
    if changed:
        raise TrainingError(
            f"run folder {run_dir} was trained with different settings; refusing to resume:\n"
            + "\n".join(changed) + "\nUse a new --run-dir, or restore the settings to continue that run."
        )
    return old


def write_metrics(path: Path, rows: list[tuple], last_good: str) -> None:
    """Append one epoch's rows and force them to disk; a failure says what to do."""
    try:
        new = not path.exists()
        with open(path, "a", newline="") as fh:
            writer = csv.writer(fh)
            if new:
                writer.writerow(METRIC_COLUMNS)
            writer.writerows(rows)
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as err:
        raise TrainingError(
            f"could not append metrics to {path}: {os.strerror(err.errno) if err.errno else err}. "
            f"{last_good}; free space and re-run the same command to resume."
        ) from err


def truncate_metrics(path: Path, epoch: int) -> None:
    """Drop rows after ``epoch`` (written before a crash, but not covered by a checkpoint)."""
    if not path.exists():
        return
    with path.open(newline="") as fh:
        rows = list(csv.reader(fh))
    keep = [rows[0]] + [r for r in rows[1:] if len(r) == 5 and r[0].isdigit() and int(r[0]) <= epoch]
    if len(keep) != len(rows):
        buffer = io.StringIO()
        csv.writer(buffer).writerows(keep)
        write_atomic(path, buffer.getvalue().encode())


# --- loss and metrics --------------------------------------------------------------------------
def class_weights(targets: np.ndarray, n_classes: int) -> torch.Tensor:
    """Inverse-frequency weights (mean 1 over classes present) for ``class_balance="loss"``."""
    counts = np.bincount(targets[targets >= 0], minlength=n_classes).astype(np.float64)
    weights = np.where(counts > 0, counts.sum() / np.maximum(counts, 1) / max((counts > 0).sum(), 1), 0.0)
    return torch.tensor(weights, dtype=torch.float32)


class HeadLoss:
    """Per-head cross-entropy sums with a denominator shared by all processes.

    Each process divides its sum by the *global* (weighted) count, times the world size: DDP then
    averages gradients to exactly the gradient of the global-batch mean, whatever the split.
    """

    def __init__(self, heads: list[str], weights: dict[str, torch.Tensor | None], smoothing: float, dist_: Dist):
        self.heads, self.weights, self.smoothing, self.dist = heads, weights, smoothing, dist_

    def denominators(self, y: dict[str, torch.Tensor]) -> torch.Tensor:
        local = []
        for h in self.heads:
            valid = y[h] >= 0
            w = self.weights[h]
            local.append(w[y[h][valid].cpu()].sum() if w is not None else valid.sum().float())
        return self.dist.sum(torch.stack(local).double())

    def __call__(self, logits, y, denominators):
        sums = {}
        for i, h in enumerate(self.heads):
            w = self.weights[h]
            ce = F.cross_entropy(logits[h].float(), y[h], weight=None if w is None else w.to(logits[h].device),
                                 ignore_index=-1, reduction="none", label_smoothing=self.smoothing)
            sums[h] = ce.sum()
        means = {h: sums[h] * (self.dist.world / max(float(denominators[i]), 1e-12)) for i, h in enumerate(self.heads)}
        return sums, means


# --- the run -----------------------------------------------------------------------------------
def train(cfg: Config) -> Path:
    """Train (or resume, or find finished) the run described by ``cfg``; return the run folder."""
    env = init_distributed(cfg)
    try:
        with speed_settings(cfg, env.device):
            return Trainer(cfg, env).run()
    finally:
        if env.owns_group:
            dist.destroy_process_group()


@contextlib.contextmanager
def speed_settings(cfg: Config, device: torch.device):
    """The process-wide settings of a run (the benchmark applies the same), restored afterwards.

    On CPU, deterministic algorithms make a resumed run bit-exact. With them torch would also fill
    every new tensor with NaN to expose reads of uninitialised memory: ~12 % of a CPU training step
    for no change in any result, so that is switched off. Denormals are flushed to zero (tiny
    RMSprop averages would otherwise take the slow path), and freed activations stay in the heap
    (see ``heap.keep_freed_memory``). On CUDA, cuDNN picks its fastest kernels.
    """
    import torch.utils.deterministic as deterministic

    saved = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(),
             deterministic.fill_uninitialized_memory, torch.backends.cudnn.benchmark)
    try:
        if cfg.threads > 0:
            torch.set_num_threads(cfg.threads)
        if device.type == "cpu":
            torch.use_deterministic_algorithms(True)
            deterministic.fill_uninitialized_memory = False
            torch.set_flush_denormal(True)
            keep_freed_memory(True)
        elif device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        yield
    finally:
        torch.set_num_threads(saved[0])
        torch.use_deterministic_algorithms(saved[1])
        deterministic.fill_uninitialized_memory = saved[2]
        torch.backends.cudnn.benchmark = saved[3]
        if device.type == "cpu":
            torch.set_flush_denormal(False)
            keep_freed_memory(False)


class Trainer:
    """One run: data, model, loop, outputs. Split into steps so each reads top to bottom."""

    def __init__(self, cfg: Config, env: Dist):
        self.cfg, self.env, self.device = cfg, env, env.device
        self.fault = os.environ.get("VOX_FAULT_PAUSE", "")  # resilience tests: "step:N" or "save:EPOCH"

    # --- setup ---------------------------------------------------------------------------------
    def prepare_data(self) -> None:
        from voxlib.corpora.manifest import read_manifest
        from voxlib.features import FeatureCache

        cfg, env = self.cfg, self.env
        if cfg.manifest:
            manifest_path = Path(cfg.manifest)
        else:
            from voxlib.demo import ensure_demo_corpus

            if env.main:
                manifest_path = ensure_demo_corpus(cfg)
            env.barrier()
            if not env.main:
                manifest_path = ensure_demo_corpus(cfg)
        # rank 0 validates the clips first; the others then reuse its stored validation results
        for turn in (True, False):
            if env.main == turn:
                self.manifest = read_manifest(
                    manifest_path, on_bad_file=cfg.on_bad_file, allow_outside_paths=cfg.allow_outside_paths,
                    sample_rate=cfg.sample_rate, n_fft=cfg.n_fft, progress=env.main,
                    cache_dir=cfg.cache_dir or None)
            env.barrier()
        self.run_dir = Path(cfg.run_dir) if cfg.run_dir else default_run_dir(cfg)
        if env.main:
            for note in getattr(self.manifest, "notices", []):
                log.info("%s", note)
            n_rejected = len(getattr(self.manifest, "rejected", ()))
            if n_rejected:
                log.warning("%d clip(s) skipped as unusable; listed with reasons in %s", n_rejected,
                            self.run_dir / "rejected.csv")
        if env.main:
            self.cache = FeatureCache.build_or_open(self.manifest, cfg, progress=True)
        env.barrier()
        if not env.main:
            self.cache = FeatureCache.build_or_open(self.manifest, cfg, progress=False)
        table = self.manifest.table
        self.table = table
        self.row_ids = table["row"].to_numpy() if "row" in table.columns else table.index.to_numpy() + 1
        self.splits = make_splits(table, cfg)
        heads = cfg.head_names() or list(self.manifest.label_columns)
        self.vocab = build_vocabularies(table, self.splits, heads)
        self.heads = list(self.vocab)
        self.targets, _ = encode_targets(table, self.vocab)
        for split in HELD_OUT:
            rows = self.rows(split)
            for h in self.heads:
                n = int((self.targets[h][rows] < 0).sum())
                if n and not (h == "speaker" and split.startswith("unseen")):
                    log.warning("%s: %d of %d rows have a %s class unseen in training; not scored on that head",
                                split, n, len(rows), h)

    def rows(self, split: str) -> np.ndarray:
        return np.flatnonzero((self.splits == split).to_numpy())

    def build_model(self) -> None:
        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        self.net = Discriminator({h: len(c) for h, c in self.vocab.items()}, cfg.width)
        if self.env.active:
            self.net = sync_batchnorm(self.net, self.device)
        self.net.to(self.device)
        self.channels_last = uses_channels_last(cfg, self.device)
        if self.channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
        params = self.net.parameters()
        self.optimizer = (torch.optim.RMSprop(params, lr=cfg.lr) if cfg.optimizer == "rmsprop"
                          else torch.optim.Adam(params, lr=cfg.lr))
        if cfg.compile:
            # The trunk only (the heads are a few small matrix products): a compiled whole model hands
            # back the trunk output beside the logits, not as their input, so the heads' gradients at
            # the trunk (grad_norm) could not be taken. The state dict keeps its keys. On CPU this needs
            # the deterministic algorithms of speed_settings: without them, torch 2.13's compiled
            # backward of unfold (conv_as_matmul) writes past its buffer and corrupts the heap.
            self.net.trunk = torch.compile(self.net.trunk)
        if self.env.active:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.device.index] if self.device.type == "cuda" else None
            # BatchNorm buffers are kept identical by the synced statistics: no per-step broadcast
            self.model = DDP(self.net, device_ids=ids, forward_sync_buffers=False)
        else:
            self.model = self.net
        if uses_bf16(cfg, self.device):
            self.autocast = lambda: torch.autocast(self.device.type, dtype=torch.bfloat16)
        else:
            self.autocast = contextlib.nullcontext
        if cfg.class_balance and cfg.balanced_head not in self.vocab:
            raise ConfigError(f"balanced_head {cfg.balanced_head!r} is not a trained head ({self.heads})")
        weights = {}
        for h in self.heads:
            balanced = cfg.class_balance == "loss" and h == cfg.balanced_head
            weights[h] = class_weights(self.targets[h][self.rows("train")], len(self.vocab[h])) if balanced else None
        self.loss = HeadLoss(self.heads, weights, cfg.label_smoothing, self.env)
        self.head_weight = {h: cfg.head_weight_map().get(h, 1.0) for h in self.heads}

    def loaders(self) -> None:
        cfg, env = self.cfg, self.env
        train_rows = self.rows("train")
        batch = cfg.batch_size
        if len(train_rows) < batch:
            batch = max(env.world, len(train_rows) // env.world * env.world)
            warnings.warn(f"training split has {len(train_rows)} utterances, fewer than batch_size "
                          f"{cfg.batch_size}; using batches of {batch}")
        if batch % env.world:
            raise ConfigError(f"batch_size {batch} (the global batch) must be divisible by the "
                              f"{env.world} processes")
        self.local_batch = batch // env.world
        self.train_set = CropDataset(self.cache, train_rows, self.targets, cfg.n_frames, train=True, seed=cfg.seed)
        if cfg.class_balance == "sampler":
            labels = self.targets[cfg.balanced_head][train_rows]
            self.sampler = BalancedSampler(labels, cfg.seed, env.world, env.rank)
        else:
            from torch.utils.data import DistributedSampler

            self.sampler = DistributedSampler(self.train_set, num_replicas=env.world, rank=env.rank,
                                              shuffle=True, seed=cfg.seed, drop_last=True)
        workers, pin = loader_settings(cfg, self.device, env.world)
        # not persistent: workers hold a copy of the dataset, and its epoch (the crop seed) is set here
        # each epoch; a persistent worker would crop every epoch like the first it saw
        self.loader_args = dict(num_workers=workers, pin_memory=pin, persistent_workers=False)
        from torch.utils.data import DataLoader

        # drop_last: every step sees a full global batch, so 1 and N processes take identical steps
        self.train_loader = DataLoader(self.train_set, batch_size=self.local_batch, sampler=self.sampler,
                                       drop_last=True, **self.loader_args)

    def eval_loader(self, rows: np.ndarray, shard: bool):
        from torch.utils.data import DataLoader

        if shard:
            rows = rows[self.env.rank :: self.env.world]
        data = CropDataset(self.cache, rows, self.targets, self.cfg.n_frames, train=False,
                           eval_crops=self.cfg.eval_crops, seed=self.cfg.seed)
        return DataLoader(data, batch_size=max(1, self.local_batch), shuffle=False, **self.loader_args)

    # --- records -------------------------------------------------------------------------------
    def record(self) -> dict:
        return {**self.cfg.to_dict(), "voxlib_version": __version__, "git_commit": git_commit(),
                "manifest_digest": self.manifest.digest, "cache_key": self.cache.key}

    def write_run_files(self, record: dict) -> None:
        run = self.run_dir
        (run / "checkpoints").mkdir(parents=True, exist_ok=True)
        write_atomic(run / "config.json", json.dumps(record, indent=2).encode())
        write_atomic(run / "labels.json", json.dumps(self.vocab, indent=2, ensure_ascii=False).encode())
        label_cols = [c for c in self.manifest.label_columns if c in self.table.columns]
        cols = ["path"] + label_cols + [c for c in ("start", "end") if c in self.table.columns]
        frame = self.table[cols].copy()
        frame.insert(0, "row", self.row_ids)
        frame["split"] = self.splits.to_numpy()
        write_atomic(run / "splits.csv", frame.to_csv(index=False).encode())
        rejected = getattr(self.manifest, "rejected", None)
        if rejected is not None and len(rejected):
            self.manifest.write_rejected(run / "rejected.csv")

    # --- the loop ------------------------------------------------------------------------------
    def run(self) -> Path:
        cfg, env = self.cfg, self.env
        self.prepare_data()
        record = self.record()
        old = check_resumable(self.run_dir, record)
        last = self.run_dir / "checkpoints" / "last.pt"
        self.build_model()
        start, self.best, self.skipped_total = 0, None, 0
        if last.exists():
            start = self.load(last)
            if start > cfg.epochs:
                raise TrainingError(f"{self.run_dir} already holds {start} epochs; --epochs {cfg.epochs} "
                                    f"would go back (raise --epochs to train on, or use a new --run-dir)")
        finished = start == cfg.epochs and (self.run_dir / "predictions.csv").exists() \
            and (self.run_dir / "embeddings.npz").exists()
        if finished:
            log.info("%s is complete (%d epochs); nothing to do", self.run_dir, start)
            return self.run_dir
        if env.main:
            if old is not None:
                log.info("resuming %s after epoch %d", self.run_dir, start)
            self.write_run_files(record)
            truncate_metrics(self.run_dir / "metrics.csv", start)
            for stale in (self.run_dir / "checkpoints").glob(".*.tmp*"):  # left by a crash mid-save
                stale.unlink()
        env.barrier()
        self.loaders()
        writer = None
        if env.main:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(self.run_dir / "tb", purge_step=start + 1 if start else None)
        try:
            epochs = tqdm(range(start + 1, cfg.epochs + 1), desc="epochs", disable=not env.main,
                          initial=start, total=cfg.epochs)
            for epoch in epochs:
                t0 = time.perf_counter()
                stats = self.train_epoch(epoch)
                seconds = time.perf_counter() - t0
                rows = self.epoch_rows(epoch, stats, seconds)
                if env.main:
                    self.log_epoch(epoch, rows, writer)
                    epochs.set_postfix_str(self.summary(rows))
                env.barrier()
            if env.main:
                self.write_predictions()
            env.barrier()
        finally:
            if writer is not None:
                writer.close()
        return self.run_dir

    def train_epoch(self, epoch: int) -> dict:
        cfg, env, heads = self.cfg, self.env, self.heads
        self.model.train()
        self.sampler.set_epoch(epoch)
        self.train_set.set_epoch(epoch)
        H = len(heads)
        loss_sum, denom, correct, valid = (torch.zeros(H, dtype=torch.float64) for _ in range(4))
        total_sum = torch.zeros(1, dtype=torch.float64)
        grad_sq, grad_n, skipped = torch.zeros(H, dtype=torch.float64), 0, 0
        step_base = (epoch - 1) * len(self.train_loader)
        # per-batch bars only on a terminal: in notebooks and logs every refresh would become a line
        bar = tqdm(self.train_loader, desc=f"epoch {epoch}", leave=False,
                   disable=not (env.main and sys.stderr.isatty()))
        for i, (x, y, rows) in enumerate(bar):
            self.maybe_pause("step", step_base + i)
            x = x.to(self.device, non_blocking=True)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            y = {h: t.to(self.device, non_blocking=True) for h, t in y.items()}
            denominators = self.loss.denominators(y)
            buffers = [b.clone() for b in self.net.buffers()] if cfg.nan_policy == "skip" else None
            with self.autocast():
                logits, trunk = self.model(x, return_trunk=True)
            sums, means = self.loss(logits, y, denominators)
            total = sum(self.head_weight[h] * means[h] for h in heads)
            bad = [h for h in heads if not torch.isfinite(means[h])]
            flag = env.sum(torch.tensor([float(len(bad))]))
            if flag.item() > 0:
                paths = [self.table.at[int(r), "path"] for r in rows]
                where = (f"epoch {epoch}, step {step_base + i + 1}: non-finite loss in head(s) "
                         f"{bad or '(another process)'}; batch files: {paths}")
                if cfg.nan_policy == "stop":
                    raise TrainingError(f"{where}. Stopped; the last good checkpoint "
                                        f"{self.run_dir / 'checkpoints' / 'last.pt'} is kept. Lower --lr, "
                                        f"check these files, or use --nan-policy skip.")
                warnings.warn(f"{where}; batch skipped (no optimiser step)")
                with torch.no_grad():
                    for b, old in zip(self.net.buffers(), buffers):
                        b.copy_(old)
                self.optimizer.zero_grad(set_to_none=True)
                skipped += 1
                continue
            if cfg.grad_log_every and i % cfg.grad_log_every == 0:
                for k, h in enumerate(heads):
                    (g,) = torch.autograd.grad(self.head_weight[h] * means[h], trunk, retain_graph=True)
                    grad_sq[k] += g.float().pow(2).sum().item()
                grad_n += 1
            self.optimizer.zero_grad(set_to_none=True)
            total.backward()
            self.optimizer.step()
            with torch.no_grad():
                for k, h in enumerate(heads):
                    ok = y[h] >= 0
                    loss_sum[k] += sums[h].item()
                    denom[k] += denominators[k].item() / env.world  # re-summed over processes below
                    correct[k] += (logits[h].argmax(1)[ok] == y[h][ok]).sum().item()
                    valid[k] += ok.sum().item()
                total_sum += total.item() / env.world
        loss_sum, denom, correct, valid, total_sum, grad_sq = (
            env.sum(t) for t in (loss_sum, denom, correct, valid, total_sum, grad_sq))
        steps = len(self.train_loader) - skipped
        # a process's slice of the trunk gradient is 1/world of the global-loss gradient
        grad = (grad_sq / env.world**2).sqrt() if grad_n else None
        return dict(loss=loss_sum / denom.clamp(min=1e-12), acc=correct / valid.clamp(min=1),
                    total=total_sum.item() / max(steps, 1), grad=grad, grad_n=grad_n, skipped=skipped)

    @torch.no_grad()
    def evaluate(self, rows: np.ndarray, shard: bool = True, collect: bool = False) -> dict:
        """Loss/accuracy per head on ``rows`` with crop-averaged probabilities (optionally kept)."""
        self.net.eval()
        H = len(self.heads)
        loss_sum, correct, valid = (torch.zeros(H, dtype=torch.float64) for _ in range(3))
        kept = {"row": [], "probs": {h: [] for h in self.heads}, "features": []}
        for x, y, r in self.eval_loader(rows, shard):
            n, crops = x.shape[:2]
            x = x.flatten(0, 1).to(self.device, non_blocking=True)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with self.autocast():
                logits, trunk = self.net(x, return_trunk=True)
            for k, h in enumerate(self.heads):
                probs = logits[h].float().softmax(1).reshape(n, crops, -1).mean(1).cpu()
                t = y[h]
                ok = t >= 0
                picked = probs[ok, t[ok]]
                loss_sum[k] += -picked.clamp(min=1e-12).log().sum().item()
                correct[k] += (probs[ok].argmax(1) == t[ok]).sum().item()
                valid[k] += ok.sum().item()
                if collect:
                    kept["probs"][h].append(probs)
            if collect:
                kept["row"].append(r)
                kept["features"].append(trunk.float().reshape(n, crops, -1).mean(1).cpu())
        if shard:
            loss_sum, correct, valid = (self.env.sum(t) for t in (loss_sum, correct, valid))
        out = dict(loss=loss_sum / valid.clamp(min=1), acc=correct / valid.clamp(min=1), valid=valid)
        if collect:
            out["row"] = torch.cat(kept["row"]).numpy() if kept["row"] else np.zeros(0, np.int64)
            out["probs"] = {h: torch.cat(p) for h, p in kept["probs"].items() if p}
            out["features"] = torch.cat(kept["features"]) if kept["features"] else torch.zeros(0)
        return out

    def epoch_rows(self, epoch: int, stats: dict, seconds: float) -> list[tuple]:
        rows = []
        for k, h in enumerate(self.heads):
            rows += [(epoch, "train", h, "loss", float(stats["loss"][k])),
                     (epoch, "train", h, "acc", float(stats["acc"][k]))]
            if stats["grad"] is not None:
                rows.append((epoch, "train", h, "grad_norm", float(stats["grad"][k])))
        rows += [(epoch, "train", "all", "loss", stats["total"]),
                 (epoch, "train", "all", "skipped_batches", float(stats["skipped"])),
                 (epoch, "train", "all", "seconds", round(seconds, 3))]
        self.val_score = None
        for split in ("seen_val", "unseen_val"):
            split_rows = self.rows(split)
            if not len(split_rows):
                continue
            result = self.evaluate(split_rows)
            for k, h in enumerate(self.heads):
                if result["valid"][k] > 0:
                    rows += [(epoch, split, h, "loss", float(result["loss"][k])),
                             (epoch, split, h, "acc", float(result["acc"][k]))]
            if split == "seen_val":
                scored = result["valid"] > 0
                self.val_score = (float(result["acc"][scored].mean()), -float(result["loss"][scored].mean()))
        self.skipped_total += stats["skipped"]
        if stats["skipped"]:
            warnings.warn(f"epoch {epoch}: {stats['skipped']} batch(es) skipped for non-finite loss")
        return rows

    def summary(self, rows: list[tuple]) -> str:
        acc = {(s, h): v for _, s, h, m, v in rows if m == "acc"}
        return " ".join(f"{h[:4]} {acc.get(('seen_val', h), acc.get(('train', h), 0)):.2f}" for h in self.heads)

    def log_epoch(self, epoch: int, rows: list[tuple], writer) -> None:
        ckpt = self.run_dir / "checkpoints"
        last_good = (f"The checkpoint {ckpt / 'last.pt'} (epoch {epoch - 1}) is intact" if epoch > 1
                     else "No epoch was completed before")
        write_metrics(self.run_dir / "metrics.csv", [(e, s, h, m, repr(float(v))) for e, s, h, m, v in rows],
                      last_good)
        for _, split, head, metric, value in rows:
            writer.add_scalar(f"{metric}/{split}/{head}", value, epoch)
        writer.flush()
        # "best" = highest mean seen_val accuracy over heads, ties broken by lower mean seen_val loss;
        # without a seen_val split the latest epoch counts as best
        improved = self.val_score is None or self.best is None or self.val_score > tuple(self.best["score"])
        if improved:
            self.best = {"epoch": epoch, "score": list(self.val_score or (0.0, 0.0))}
        state = self.state(epoch)
        try:
            save_checkpoint(state, ckpt / "last.pt", self.pause_hook(epoch))
            if improved:
                save_checkpoint(state, ckpt / "best.pt")
        except CheckpointError as err:
            raise TrainingError(f"epoch {epoch}: {err}. {last_good}; free space and re-run the same "
                                f"command to resume.") from err

    # --- checkpoints ---------------------------------------------------------------------------
    def state(self, epoch: int) -> dict:
        rng = {"torch": torch.get_rng_state(), "python": random.getstate(),
               "numpy": _numpy_state_to_plain(np.random.get_state())}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        return {"epoch": epoch, "model": self.net.state_dict(), "optimizer": self.optimizer.state_dict(),
                "rng": rng, "best": self.best, "skipped_batches": self.skipped_total,
                "head_sizes": {h: len(c) for h, c in self.vocab.items()}, "width": self.cfg.width,
                "voxlib_version": __version__}

    def load(self, path: Path) -> int:
        ckpt = load_checkpoint(path)
        sizes = {h: len(c) for h, c in self.vocab.items()}
        if ckpt.get("head_sizes") != sizes:
            raise TrainingError(f"{path} has heads {ckpt.get('head_sizes')}, this run has {sizes}")
        self.net.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        random.setstate(_to_tuple(ckpt["rng"]["python"]))
        np.random.set_state(_numpy_state_from_plain(ckpt["rng"]["numpy"]))
        if "cuda" in ckpt["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
        self.best, self.skipped_total = ckpt.get("best"), int(ckpt.get("skipped_batches", 0))
        return int(ckpt["epoch"])

    def pause_hook(self, epoch: int):
        if self.fault != f"save:{epoch}":
            return None
        return lambda tmp: self.pause(f"checkpoint of epoch {epoch} written to {tmp}, not yet renamed")

    def maybe_pause(self, kind: str, index: int) -> None:
        if self.fault == f"{kind}:{index}":
            self.pause(f"before {kind} {index}")

    def pause(self, where: str) -> None:
        """Fault injection for the resilience tests: announce the point, then wait to be killed."""
        marker = os.environ.get("VOX_FAULT_MARKER")
        if marker:
            Path(marker).write_text(where)
        time.sleep(float(os.environ.get("VOX_FAULT_SECONDS", "120")))

    # --- outputs -------------------------------------------------------------------------------
    def write_predictions(self) -> None:
        """predictions.csv and embeddings.npz from the best checkpoint's weights (rank 0 only)."""
        best = self.run_dir / "checkpoints" / "best.pt"
        if best.exists():
            self.net.load_state_dict(load_checkpoint(best)["model"])
        frames, features, feature_rows, feature_splits = [], [], [], []
        for split in HELD_OUT:
            rows = self.rows(split)
            if not len(rows):
                continue
            result = self.evaluate(rows, shard=False, collect=True)
            frames.append(self.prediction_frame(split, result))
            if split.endswith("test"):
                features.append(result["features"])
                feature_rows.append(result["row"])
                feature_splits += [split] * len(result["row"])
        train_rows = self.rows("train")
        if len(train_rows) > EMBED_TRAIN_MAX:
            pick = np.random.default_rng([self.cfg.seed, 7]).choice(len(train_rows), EMBED_TRAIN_MAX, replace=False)
            train_rows = np.sort(train_rows[pick])
        result = self.evaluate(train_rows, shard=False, collect=True)
        features.append(result["features"])
        feature_rows.append(result["row"])
        feature_splits += ["train"] * len(result["row"])
        table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
        write_atomic(self.run_dir / "predictions.csv", table.to_csv(index=False).encode())
        buffer = io.BytesIO()
        np.savez(buffer, features=torch.cat(features).numpy().astype(np.float16),
                 row=self.row_ids[np.concatenate(feature_rows)].astype(np.int64),
                 split=np.array(feature_splits, dtype=str))
        write_atomic(self.run_dir / "embeddings.npz", buffer.getvalue())
        summary = {"epochs": self.cfg.epochs, "best_epoch": (self.best or {}).get("epoch"),
                   "predictions_from": "best.pt" if best.exists() else "last weights",
                   "skipped_batches": self.skipped_total, "train_batch": self.local_batch * self.env.world,
                   "world_size": self.env.world, "device": str(self.device)}
        write_atomic(self.run_dir / "summary.json", json.dumps(summary, indent=2).encode())

    def prediction_frame(self, split: str, result: dict) -> pd.DataFrame:
        idx = result["row"]
        frame = pd.DataFrame({"row": self.row_ids[idx], "path": self.table["path"].to_numpy()[idx],
                              "speaker": self.table["speaker"].to_numpy()[idx], "split": split})
        for h in self.heads:
            names = np.array(self.vocab[h], dtype=object)
            probs = result["probs"][h].numpy()
            t = self.targets[h][idx]
            top = np.argsort(-probs, axis=1, kind="stable")[:, :5]
            frame[f"{h}_true"] = np.where(t >= 0, names[np.clip(t, 0, None)], "")
            frame[f"{h}_pred"] = names[top[:, 0]]
            frame[f"{h}_prob"] = probs[np.arange(len(idx)), top[:, 0]]
            frame[f"{h}_top5"] = ["|".join(names[r]) for r in top]
        return frame


def _numpy_state_to_plain(state) -> dict:
    name, keys, pos, has_gauss, cached = state
    return {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}


def _numpy_state_from_plain(plain: dict):
    return (plain["name"], plain["keys"].numpy().astype(np.uint32), plain["pos"], plain["has_gauss"],
            plain["cached_gaussian"])


def _to_tuple(value):
    return tuple(_to_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from voxlib.cli import parse_config

    cfg = parse_config(argv)
    try:
        run_dir = train(cfg)
    except (TrainingError, CheckpointError, ConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if int(os.environ.get("RANK", "0")) == 0:
        print(run_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
