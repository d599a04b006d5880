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

The parts, in the order :func:`train` uses them: :func:`load_run_data` (data.py) builds the corpus,
cache, splits and targets; :func:`build_parts` the model, optimiser, learning-rate schedule and the
:class:`TrainStep` (which the benchmark times as is); the loop runs epochs and commits each one to
the run folder (runfolder.py) in an order that survives a failure at any write.
"""
from __future__ import annotations

import contextlib
import logging
import math
import random
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from voxlib import __version__, runfolder, text
from voxlib.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from voxlib.config import FEATURES, LEARNING, Config, ConfigError, usable_cores
from voxlib.data import BalancedSampler, CropDataset, RunData, load_run_data
from voxlib.distributed import Dist, init_distributed, pick_device, sync_batchnorm  # noqa: F401 (pick_device re-exported)
from voxlib.heap import keep_freed_memory
from voxlib.inference import autocast_for, crop_averaged
from voxlib.model import Discriminator

log = logging.getLogger("voxlib.train")  # not __name__: that is "__main__" under python -m

EMBED_TRAIN_MAX = 2000  # train utterances sampled into embeddings.npz
TB_CONFUSION_MAX = 60  # heads with more classes get no confusion figure in TensorBoard (accuracy curves only)
RECORD_FIELDS = ("manifest_digest", "cache_key")

# Test-only fault points: tests append callables here; production code never reads the environment
# for them. Each is called with (point, detail): point "step" (detail: global step index) before every
# training step, "write" (detail: the run-folder file about to be written) before every write.
FAULT_HOOKS: list[Callable[[str, Any], None]] = []


def _fault_point(point: str, detail: Any) -> None:
    for hook in FAULT_HOOKS:
        hook(point, detail)


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite loss, a run folder that does not match, a failed write)."""


# --- process-wide settings ---------------------------------------------------------------------
def resolve_precision(cfg: Config, device: torch.device) -> str:
    """The precision rule without measuring: asked for; bf16 on CUDA; fp32 elsewhere."""
    if cfg.precision != "auto":
        return cfg.precision
    return "bf16" if device.type == "cuda" else "fp32"


def choose_precision(cfg: Config, data: RunData, env: Dist) -> dict:
    """A new run's precision: on CPU ``auto`` times this run's own TrainStep in fp32 and bf16
    (voxlib.precision, cached per machine and model shape). Returns the choice as a plain record."""
    from dataclasses import asdict

    from voxlib import precision as precision_module

    if env.active and cfg.precision == "auto" and env.device.type == "cpu":
        # every process must train in one precision: no per-rank measurement under torchrun on CPU
        return {"precision": "fp32", "how": "device (torchrun on CPU: not measured)"}
    local_batch = max(1, cfg.batch_size // env.world)

    def make_step(precision: str) -> Callable[[], None]:
        net = build_model(cfg, data.head_sizes, Dist(device=env.device), cfg.channels_last)
        loss, head_weight = make_loss(cfg, data, Dist(device=env.device))
        step = TrainStep(net, net, make_optimizer(cfg, net), loss, head_weight, Dist(device=env.device), precision,
                         cfg.channels_last, cfg.nan_policy)
        x = torch.rand(local_batch, 1, cfg.n_frames, cfg.n_frames)
        y = {h: torch.randint(0, n, (local_batch,)) for h, n in data.head_sizes.items()}
        net.train()
        return lambda: step(x, y, Tally(len(data.heads)), measure_grad=bool(cfg.grad_log_every))

    shape = {"width": cfg.width, "heads": data.head_sizes, "batch": local_batch, "channels_last": cfg.channels_last,
             "compile": cfg.compile}
    choice = precision_module.resolve_precision(cfg, env.device, make_step, shape)
    return asdict(choice)


def uses_bf16(cfg: Config, device: torch.device) -> bool:
    return resolve_precision(cfg, device) == "bf16"


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


# --- loss --------------------------------------------------------------------------------------
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
        for h in self.heads:
            w = self.weights[h]
            ce = F.cross_entropy(logits[h].float(), y[h], weight=None if w is None else w.to(logits[h].device),
                                 ignore_index=-1, reduction="none", label_smoothing=self.smoothing)
            sums[h] = ce.sum()
        means = {h: sums[h] * (self.dist.world / max(float(denominators[i]), 1e-12)) for i, h in enumerate(self.heads)}
        return sums, means


# --- one training step ---------------------------------------------------------------------------
@dataclass
class Tally:
    """Per-head sums over the steps of an epoch (this process's share; summed across processes later)."""

    heads: int
    loss: torch.Tensor = None
    denom: torch.Tensor = None
    correct: torch.Tensor = None
    valid: torch.Tensor = None
    grad_sq: torch.Tensor = None
    total: float = 0.0
    grad_n: int = 0
    steps: int = 0
    skipped: int = 0

    def __post_init__(self):
        for name in ("loss", "denom", "correct", "valid", "grad_sq"):
            setattr(self, name, torch.zeros(self.heads, dtype=torch.float64))


class TrainStep:
    """One optimisation step exactly as training takes it; the benchmark times this very object.

    The weighted sum of per-head means (global denominators) is back-propagated; the step checks the
    loss is finite on every process (a host sync), optionally measures each head's gradient norm at
    the trunk output, and adds its losses and accuracies to the epoch's :class:`Tally` (host syncs
    too). A non-finite loss takes no optimiser step; with ``nan_policy="skip"`` the BatchNorm buffers
    are restored as well, and the step reports the heads at fault.
    """

    def __init__(self, model: nn.Module, net: nn.Module, optimizer: torch.optim.Optimizer, loss: HeadLoss,
                 head_weight: dict[str, float], env: Dist, precision: str, channels_last: bool,
                 nan_policy: str = "stop", after_step: Callable[[], None] | None = None):
        self.model, self.net, self.optimizer, self.loss = model, net, optimizer, loss
        self.heads = loss.heads
        self.head_weight, self.env, self.device = head_weight, env, env.device
        self.autocast = autocast_for(precision, env.device)
        self.channels_last, self.nan_policy = channels_last, nan_policy
        self.after_step = after_step or (lambda: None)

    def __call__(self, x: torch.Tensor, y: dict[str, torch.Tensor], tally: Tally,
                 measure_grad: bool = False) -> list[str]:
        """Train on one batch; return the heads with a non-finite loss ([] when the step was taken)."""
        env, heads = self.env, self.heads
        x = x.to(self.device, non_blocking=True)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        y = {h: t.to(self.device, non_blocking=True) for h, t in y.items()}
        denominators = self.loss.denominators(y)
        buffers = [b.clone() for b in self.net.buffers()] if self.nan_policy == "skip" else None
        with self.autocast():
            logits, trunk = self.model(x, return_trunk=True)
        sums, means = self.loss(logits, y, denominators)
        total = sum(self.head_weight[h] * means[h] for h in heads)
        bad = [h for h in heads if not torch.isfinite(means[h])]
        if env.sum(torch.tensor([float(len(bad))])).item() > 0:
            if buffers is not None:
                with torch.no_grad():
                    for b, old in zip(self.net.buffers(), buffers):
                        b.copy_(old)
            self.optimizer.zero_grad(set_to_none=True)
            tally.skipped += 1
            return bad or ["(another process)"]
        if measure_grad:
            for k, h in enumerate(heads):
                (g,) = torch.autograd.grad(self.head_weight[h] * means[h], trunk, retain_graph=True)
                tally.grad_sq[k] += g.float().pow(2).sum().item()
            tally.grad_n += 1
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        self.optimizer.step()
        self.after_step()
        with torch.no_grad():
            for k, h in enumerate(heads):
                ok = y[h] >= 0
                tally.loss[k] += sums[h].item()
                tally.denom[k] += denominators[k].item() / env.world  # re-summed over processes later
                tally.correct[k] += (logits[h].argmax(1)[ok] == y[h][ok]).sum().item()
                tally.valid[k] += ok.sum().item()
            tally.total += total.item() / env.world
        tally.steps += 1
        return []


# --- learning-rate schedule and early stopping -----------------------------------------------------
class LearningRate:
    """The learning-rate schedule (``lr_schedule``, ``warmup_epochs``), stepped per batch and per epoch.

    Per batch: linear warm-up from lr/steps to lr, then cosine decay to 0 (``cosine``) or torch's
    one-cycle policy (``onecycle``; warm-up sets its rising share, 30 % by default). Per epoch:
    ``plateau`` halves the learning rate when the seen-speaker validation loss has not improved for
    two epochs. The horizon is ``epochs`` as given at launch: raising it later stretches the schedule.
    """

    def __init__(self, cfg: Config, optimizer: torch.optim.Optimizer, steps_per_epoch: int):
        from torch.optim import lr_scheduler

        self.cfg, total = cfg, max(1, steps_per_epoch * cfg.epochs)
        self.warmup = min(total, cfg.warmup_epochs * steps_per_epoch)
        self.per_step = self.per_epoch = None
        if cfg.lr_schedule == "onecycle":
            pct = self.warmup / total if self.warmup else 0.3
            self.per_step = lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.lr, total_steps=total,
                                                    pct_start=min(max(pct, 1e-3), 0.999), cycle_momentum=False)
        elif cfg.lr_schedule == "cosine" or self.warmup:
            warm, cosine = self.warmup, cfg.lr_schedule == "cosine"

            def factor(step: int) -> float:
                if step < warm:
                    return (step + 1) / warm
                if not cosine:
                    return 1.0
                return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))

            self.per_step = lr_scheduler.LambdaLR(optimizer, factor)
        if cfg.lr_schedule == "plateau":
            self.per_epoch = lr_scheduler.ReduceLROnPlateau(optimizer, factor=0.5, patience=2)
        self.steps = 0

    def after_step(self) -> None:
        self.steps += 1
        if self.per_step is not None and (self.cfg.lr_schedule != "plateau" or self.steps <= self.warmup):
            self.per_step.step()

    def after_epoch(self, val_loss: float | None) -> None:
        if self.per_epoch is not None and val_loss is not None:
            self.per_epoch.step(val_loss)

    def state_dict(self) -> dict:
        return {"steps": self.steps,
                "per_step": self.per_step.state_dict() if self.per_step is not None else None,
                "per_epoch": self.per_epoch.state_dict() if self.per_epoch is not None else None}

    def load_state_dict(self, state: dict) -> None:
        self.steps = int(state.get("steps", 0))
        for name in ("per_step", "per_epoch"):
            if getattr(self, name) is not None and state.get(name) is not None:
                getattr(self, name).load_state_dict(state[name])


def early_stop_value(cfg: Config, rows: list[tuple]) -> float | None:
    """The epoch's ``early_stop`` measure (mean over heads, higher is better), or None if absent."""
    split, _, metric = cfg.early_stop.partition(":")
    values = [v for _, s, h, m, v in rows if s == split and m == metric and h != "all"]
    if not values:
        return None
    mean = float(np.mean(values))
    return mean if metric == "acc" else -mean


# --- building the parts ----------------------------------------------------------------------------
@dataclass
class Parts:
    """Everything that trains, built once by :func:`build_parts`."""

    net: nn.Module  # the plain model (checkpoints, evaluation)
    model: nn.Module  # what the step calls: the DDP wrapper under torchrun, else ``net``
    optimizer: torch.optim.Optimizer
    schedule: LearningRate
    step: TrainStep
    sampler: Any
    train_loader: Any
    loader_args: dict
    local_batch: int
    precision: str
    channels_last: bool


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def build_model(cfg: Config, head_sizes: dict[str, int], env: Dist, channels_last: bool) -> nn.Module:
    net = Discriminator(head_sizes, cfg.width)
    if env.active:
        net = sync_batchnorm(net, env.device)
    net.to(env.device)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    return net


def make_optimizer(cfg: Config, net: nn.Module) -> torch.optim.Optimizer:
    params = net.parameters()
    return torch.optim.RMSprop(params, lr=cfg.lr) if cfg.optimizer == "rmsprop" else torch.optim.Adam(params, lr=cfg.lr)


def make_loss(cfg: Config, data: RunData, env: Dist) -> tuple[HeadLoss, dict[str, float]]:
    if cfg.class_balance and cfg.balanced_head not in data.vocab:
        raise ConfigError(f"balanced_head {cfg.balanced_head!r} is not a trained head ({data.heads})")
    train_rows = data.rows("train")
    weights = {h: class_weights(data.targets[h][train_rows], len(data.vocab[h]))
               if cfg.class_balance == "loss" and h == cfg.balanced_head else None for h in data.heads}
    head_weight = {h: cfg.head_weight_map().get(h, 1.0) for h in data.heads}
    return HeadLoss(data.heads, weights, cfg.label_smoothing, env), head_weight


def build_parts(cfg: Config, data: RunData, env: Dist, precision: str) -> Parts:
    from torch.utils.data import DataLoader, DistributedSampler

    seed_everything(cfg.seed)
    channels_last = uses_channels_last(cfg, env.device)
    net = build_model(cfg, data.head_sizes, env, channels_last)
    optimizer = make_optimizer(cfg, net)
    if cfg.compile:
        # The trunk only (the heads are a few small matrix products): a compiled whole model hands
        # back the trunk output beside the logits, not as their input, so the heads' gradients at
        # the trunk (grad_norm) could not be taken. The state dict keeps its keys. On CPU this needs
        # the deterministic algorithms of speed_settings: without them, torch 2.13's compiled
        # backward of unfold (conv_as_matmul) writes past its buffer and corrupts the heap.
        net.trunk = torch.compile(net.trunk)
    model = net
    if env.active:
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [env.device.index] if env.device.type == "cuda" else None
        # BatchNorm buffers are kept identical by the synced statistics: no per-step broadcast
        model = DDP(net, device_ids=ids, forward_sync_buffers=False)

    train_rows = data.rows("train")
    batch = cfg.batch_size
    if len(train_rows) < batch:
        batch = max(env.world, len(train_rows) // env.world * env.world)
        warnings.warn(f"training split has {len(train_rows)} utterances, fewer than batch_size "
                      f"{cfg.batch_size}; using batches of {batch}")
    if batch % env.world:
        raise ConfigError(f"batch_size {batch} (the global batch) must be divisible by the {env.world} processes")
    masks = (cfg.freq_masks, cfg.freq_mask_width, cfg.time_masks, cfg.time_mask_width)
    train_set = CropDataset(data.cache, train_rows, data.targets, cfg.n_frames, train=True, seed=cfg.seed, masks=masks)
    if cfg.class_balance == "sampler":
        sampler = BalancedSampler(data.targets[cfg.balanced_head][train_rows], cfg.seed, env.world, env.rank)
    else:
        sampler = DistributedSampler(train_set, num_replicas=env.world, rank=env.rank, shuffle=True,
                                     seed=cfg.seed, drop_last=True)
    workers, pin = loader_settings(cfg, env.device, env.world)
    # not persistent: workers hold a copy of the dataset, and its epoch (the crop seed) is set each
    # epoch; a persistent worker would crop every epoch like the first it saw
    loader_args = dict(num_workers=workers, pin_memory=pin, persistent_workers=False)
    # drop_last: every step sees a full global batch, so 1 and N processes take identical steps
    train_loader = DataLoader(train_set, batch_size=batch // env.world, sampler=sampler, drop_last=True,
                              **loader_args)
    schedule = LearningRate(cfg, optimizer, len(train_loader))
    loss, head_weight = make_loss(cfg, data, env)
    step = TrainStep(model, net, optimizer, loss, head_weight, env, precision, channels_last, cfg.nan_policy,
                     after_step=schedule.after_step)
    return Parts(net, model, optimizer, schedule, step, sampler, train_loader, loader_args, batch // env.world,
                 precision, channels_last)


# --- checkpoints -------------------------------------------------------------------------------------
def settings_record(cfg: Config, data: RunData) -> dict:
    """What shaped the weights: every feature and learning setting, the corpus digest and cache key."""
    return {**cfg.values(FEATURES), **cfg.values(LEARNING), "manifest_digest": data.manifest.digest,
            "cache_key": data.cache.key}


def settings_changes(old: dict, new: dict) -> list[str]:
    changed = []
    for key in sorted(set(old) | set(new)):
        if key in old and key in new and old[key] != new[key]:
            what = {"manifest_digest": "the corpus (manifest or audio files) changed",
                    "cache_key": "the feature settings or the rows changed"}.get(key, f"{old[key]!r} -> {new[key]!r}")
            changed.append(f"{key}: {what}")
    return changed


def checkpoint_state(epoch: int, parts: Parts, cfg: Config, data: RunData, progress: dict) -> dict:
    rng = {"torch": torch.get_rng_state(), "python": random.getstate(),
           "numpy": _numpy_state_to_plain(np.random.get_state())}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return {"epoch": epoch, "model": parts.net.state_dict(), "optimizer": parts.optimizer.state_dict(),
            "schedule": parts.schedule.state_dict(), "rng": rng, **progress,
            "settings": settings_record(cfg, data), "precision": parts.precision,
            "head_sizes": data.head_sizes, "width": cfg.width, "voxlib_version": __version__}


def restore(ckpt: dict, path: Path, parts: Parts, data: RunData) -> dict:
    """Load checkpoint ``ckpt`` (read from ``path``) into the parts and the RNGs; return the loop's
    progress (epoch, best, ...)."""
    if ckpt.get("head_sizes") != data.head_sizes:
        raise TrainingError(f"{path} has heads {ckpt.get('head_sizes')}, this run has {data.head_sizes}")
    parts.net.load_state_dict(ckpt["model"])
    parts.optimizer.load_state_dict(ckpt["optimizer"])
    parts.schedule.load_state_dict(ckpt.get("schedule", {}))
    torch.set_rng_state(ckpt["rng"]["torch"])
    random.setstate(_to_tuple(ckpt["rng"]["python"]))
    np.random.set_state(_numpy_state_from_plain(ckpt["rng"]["numpy"]))
    if "cuda" in ckpt["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
    return {"epoch": int(ckpt["epoch"]), "best": ckpt.get("best"), "skipped_batches": int(ckpt.get("skipped_batches", 0)),
            "early_stop": ckpt.get("early_stop")}


# --- evaluation ---------------------------------------------------------------------------------------
def evaluate(parts: Parts, data: RunData, cfg: Config, env: Dist, rows: np.ndarray, shard: bool = True,
             collect: bool = False) -> dict:
    """Loss/accuracy per head on ``rows`` with crop-averaged probabilities (optionally kept)."""
    from torch.utils.data import DataLoader

    if shard:
        rows = rows[env.rank :: env.world]
    dataset = CropDataset(data.cache, rows, data.targets, cfg.n_frames, train=False, eval_crops=cfg.eval_crops,
                          seed=cfg.seed)
    loader = DataLoader(dataset, batch_size=max(1, parts.local_batch), shuffle=False, **parts.loader_args)
    H = len(data.heads)
    loss_sum, correct, valid = (torch.zeros(H, dtype=torch.float64) for _ in range(3))
    # counts of (true, predicted) for TensorBoard's confusion figures; a large head has none
    sizes = {h: len(data.vocab[h]) for h in data.heads if len(data.vocab[h]) <= TB_CONFUSION_MAX}
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


# --- one epoch ----------------------------------------------------------------------------------------
def train_epoch(epoch: int, parts: Parts, data: RunData, cfg: Config, env: Dist, run_dir: Path) -> Tally:
    parts.model.train()
    parts.sampler.set_epoch(epoch)
    parts.train_loader.dataset.set_epoch(epoch)
    tally = Tally(len(data.heads))
    step_base = (epoch - 1) * len(parts.train_loader)
    # per-batch bars only on a terminal: in notebooks and logs every refresh would become a line
    bar = tqdm(parts.train_loader, desc=f"epoch {epoch}", leave=False, disable=not (env.main and sys.stderr.isatty()))
    for i, (x, y, rows) in enumerate(bar):
        _fault_point("step", step_base + i)
        bad = parts.step(x, y, tally, measure_grad=bool(cfg.grad_log_every) and i % cfg.grad_log_every == 0)
        if bad:
            paths = [data.table.at[int(r), "path"] for r in rows]
            where = f"epoch {epoch}, step {step_base + i + 1}: non-finite loss in head(s) {bad}; batch files: {paths}"
            if cfg.nan_policy == "stop":
                raise TrainingError(f"{where}. Stopped; the last good checkpoint "
                                    f"{run_dir / runfolder.CHECKPOINTS / runfolder.LAST} is kept. Lower --lr, "
                                    f"check these files, or use --nan-policy skip.")
            warnings.warn(f"{where}; batch skipped (no optimiser step)")
    for name in ("loss", "denom", "correct", "valid", "grad_sq"):
        setattr(tally, name, env.sum(getattr(tally, name)))
    tally.total = float(env.sum(torch.tensor([tally.total], dtype=torch.float64)).item())
    if tally.skipped:
        warnings.warn(f"epoch {epoch}: {tally.skipped} batch(es) skipped for non-finite loss")
    return tally


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
    parts = ", ".join(f"{h} {text.percent(acc[(split, h)])}" for h in heads if (split, h) in acc)
    loss = next(v for _, s, h, m, v in rows if (s, h, m) == ("train", "all", "loss"))
    return f"epoch {epoch}/{epochs} ({seconds:.0f} s): train loss {loss:.3f}; {split} accuracy: {parts}"


# --- outputs -------------------------------------------------------------------------------------------
def write_outputs(run_dir: Path, parts: Parts, data: RunData, cfg: Config, env: Dist, progress: dict) -> None:
    """predictions.csv and embeddings.npz from the best checkpoint's weights, then summary.json."""
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
    import pandas as pd

    table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    _fault_point("write", runfolder.PREDICTIONS)
    runfolder.write_csv(run_dir, runfolder.PREDICTIONS, table)
    _fault_point("write", runfolder.EMBEDDINGS)
    runfolder.write_embeddings(run_dir, np.concatenate(features), data.row_ids[np.concatenate(feature_rows)],
                               feature_splits)
    summary = {"epochs": cfg.epochs, "epochs_trained": progress["epoch"],
               "stopped_early": progress["epoch"] < cfg.epochs,
               "best_epoch": (progress["best"] or {}).get("epoch"),
               "predictions_from": "best.pt" if best.exists() else "last weights",
               "skipped_batches": progress["skipped_batches"], "train_batch": parts.local_batch * env.world,
               "world_size": env.world, "device": str(env.device), "precision": parts.precision}
    _fault_point("write", runfolder.SUMMARY)
    runfolder.write_json(run_dir, runfolder.SUMMARY, summary)


def write_run_files(run_dir: Path, cfg: Config, data: RunData, choice: dict) -> None:
    """config.json (the record of this launch), labels.json, splits.csv and the rejected clips."""
    from voxlib.config import git_commit

    record = {**cfg.to_dict(), "voxlib_version": __version__, "git_commit": git_commit(),
              "manifest_digest": data.manifest.digest, "cache_key": data.cache.key, "precision_used": choice["precision"], "precision_choice": choice}
    (run_dir / runfolder.CHECKPOINTS).mkdir(exist_ok=True)
    runfolder.write_json(run_dir, runfolder.CONFIG, record)
    runfolder.write_json(run_dir, runfolder.LABELS, data.vocab)
    runfolder.write_csv(run_dir, runfolder.SPLITS_FILE, data.split_table())
    rejected = data.manifest.rejected
    if rejected is not None and len(rejected):
        log.warning("%d clip(s) skipped as unusable; listed with reasons in %s", len(rejected),
                    run_dir / runfolder.REJECTED)
        runfolder.write_csv(run_dir, runfolder.REJECTED, rejected)


def commit_epoch(run_dir: Path, epoch: int, rows: list[tuple], writer, state: dict, improved: bool) -> None:
    """Make epoch ``epoch`` durable, in an order where a failure at any write resumes exactly.

    metrics.csv and TensorBoard first (a resume drops their rows past the checkpoint's epoch), then
    best.pt, then last.pt: last.pt is the commit point. A crash before it redoes the epoch, which is
    deterministic and so rewrites best.pt with the same bytes; best.pt can never lag behind last.pt.
    """
    ckpt = run_dir / runfolder.CHECKPOINTS
    last_good = (f"The checkpoint {ckpt / runfolder.LAST} (epoch {epoch - 1}) is intact" if epoch > 1
                 else "No epoch had been checkpointed yet")
    try:
        _fault_point("write", runfolder.METRICS)
        runfolder.write_metrics(run_dir, rows, keep_until=epoch - 1)
        _fault_point("write", runfolder.TENSORBOARD)
        for _, split, head, metric, value in rows:
            writer.add_scalar(f"{metric}/{split}/{text.tag(head)}", value, epoch)
        writer.flush()
        if improved:
            _fault_point("write", runfolder.BEST)
            save_checkpoint(state, ckpt / runfolder.BEST)
        _fault_point("write", runfolder.LAST)
        save_checkpoint(state, ckpt / runfolder.LAST)
    except (OSError, CheckpointError) as err:
        raise TrainingError(f"epoch {epoch}: {err}. {last_good}; free space and re-run the same command "
                            f"to resume.") from err


def tensorboard_confusion(writer, epoch: int, val: dict[str, dict], vocab: dict[str, list[str]]) -> None:
    """Per head, this epoch's seen-speaker validation confusion matrix as a TensorBoard image."""
    import matplotlib
    import pandas as pd

    from voxlib.plots import confusion_heatmap

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


def tensorboard_hparams(writer, cfg: Config, run_dir: Path, progress: dict) -> None:
    """Every scalar setting beside the run's results, for TensorBoard's HPARAMS tab.

    The results are the best epoch's validation accuracies (the weights predictions.csv comes from),
    under ``hparam/`` so they never collide with the per-epoch scalars.
    """
    from torch.utils.tensorboard.summary import hparams

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


# --- the run -------------------------------------------------------------------------------------------
def train(cfg: Config) -> Path:
    """Train (or resume, or find finished) the run described by ``cfg``; return the run folder.

    With ``folds`` or ``seeds`` above 1 that is a pooled folder of K x N runs (experiment.py).
    """
    if cfg.folds > 1 or cfg.seeds > 1:
        from voxlib.experiment import run_experiment

        return run_experiment(cfg)
    return train_run(cfg)


def train_run(cfg: Config) -> Path:
    """Train (or resume, or find finished) the one run folder ``cfg`` describes (a fold's member too)."""
    env = init_distributed(cfg)
    try:
        with speed_settings(cfg, env.device):
            return run_training(cfg, env)
    finally:
        if env.owns_group:
            import torch.distributed as dist

            dist.destroy_process_group()


def run_training(cfg: Config, env: Dist) -> Path:
    for note in cfg.preset_notes:
        log.info("%s", note)
    data = load_run_data(cfg, in_turn=env.in_turn, progress=env.main)
    run_dir = Path(cfg.run_dir) if cfg.run_dir else runfolder.default_run_dir(cfg)
    if runfolder.is_pooled(run_dir):
        raise TrainingError(f"{run_dir} is a pooled folder (folds/seeds); give its folds and seeds, or a new --run-dir")
    owner = runfolder.writing(run_dir) if env.main else contextlib.nullcontext(run_dir)
    with owner:
        last = run_dir / runfolder.CHECKPOINTS / runfolder.LAST
        ckpt = load_checkpoint(last) if last.exists() else None  # read once: a seed-width one is ~1 GB
        old, precision = (ckpt.get("settings"), ckpt.get("precision")) if ckpt else (None, None)
        if old is not None:
            changed = settings_changes(old, settings_record(cfg, data))
            if changed:
                raise TrainingError(f"run folder {run_dir} was trained with different settings; refusing to "
                                    f"resume: " + "; ".join(changed) + ". Use a new --run-dir, or restore the "
                                    f"settings to continue that run.")
        choice = {"precision": precision, "how": "resumed: the precision the run started with"} if precision \
            else choose_precision(cfg, data, env)
        precision = choice["precision"]
        parts = build_parts(cfg, data, env, precision)
        progress = {"epoch": 0, "best": None, "skipped_batches": 0, "early_stop": None}
        if ckpt is not None:
            progress = restore(ckpt, last, parts, data)
            del ckpt
            if progress["epoch"] > cfg.epochs:
                raise TrainingError(f"{run_dir} already holds {progress['epoch']} epochs; --epochs {cfg.epochs} "
                                    f"would go back (raise --epochs to train on, or use a new --run-dir)")
        if is_complete(run_dir, cfg, progress):
            log.info("%s is complete (%d epochs); nothing to do", run_dir, progress["epoch"])
            return run_dir
        if env.main:
            if progress["epoch"]:
                log.info("%s", runfolder.resume_note(run_dir, cfg.epochs, progress["epoch"]))
            write_run_files(run_dir, cfg, data, choice)
            runfolder.write_metrics(run_dir, [], keep_until=progress["epoch"])
            for stale in (run_dir / runfolder.CHECKPOINTS).glob(".*.tmp*"):  # left by a crash mid-save
                stale.unlink()
        env.barrier()
        writer = None
        if env.main:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(run_dir / runfolder.TENSORBOARD,
                                   purge_step=progress["epoch"] + 1 if progress["epoch"] else None)
        try:
            train_epochs(cfg, env, data, parts, run_dir, progress, writer)
            if env.main:
                try:
                    write_outputs(run_dir, parts, data, cfg, env, progress)
                    tensorboard_hparams(writer, cfg, run_dir, progress)
                except OSError as err:
                    raise TrainingError(f"{err}. Training is complete and checkpointed; free space and re-run "
                                        f"the same command to write the predictions.") from err
            env.barrier()
        finally:
            if writer is not None:
                writer.close()
    return run_dir


def is_complete(run_dir: Path, cfg: Config, progress: dict) -> bool:
    return runfolder.is_complete(run_dir, cfg.epochs, progress["epoch"], (progress["best"] or {}).get("epoch"))


def train_epochs(cfg: Config, env: Dist, data: RunData, parts: Parts, run_dir: Path, progress: dict, writer) -> None:
    """The loop: train an epoch, validate, commit it; stop at ``epochs`` or when early stopping says so."""
    stop = progress.get("early_stop") or {"best": None, "since": 0}
    for epoch in range(progress["epoch"] + 1, cfg.epochs + 1):
        t0 = time.perf_counter()
        tally = train_epoch(epoch, parts, data, cfg, env, run_dir)
        seconds = time.perf_counter() - t0
        val = {split: evaluate(parts, data, cfg, env, data.rows(split))
               for split in ("seen_val", "unseen_val") if len(data.rows(split))}
        rows = epoch_rows(epoch, tally, seconds, val, data.heads, env.world)
        score = validation_score(val)
        seen_loss = -score[1] if score else None
        parts.schedule.after_epoch(seen_loss if seen_loss is not None else rows[0][4])
        improved = score is None or progress["best"] is None or score > tuple(progress["best"]["score"])
        if improved:
            progress["best"] = {"epoch": epoch, "score": list(score or (0.0, 0.0))}
        progress["skipped_batches"] += tally.skipped
        progress["epoch"] = epoch
        if cfg.early_stop:
            value = early_stop_value(cfg, rows)
            if value is not None and (stop["best"] is None or value > stop["best"]):
                stop = {"best": value, "since": 0}
            else:
                stop = {"best": stop["best"], "since": stop["since"] + 1}
        progress["early_stop"] = stop
        if env.main:
            state = checkpoint_state(epoch, parts, cfg, data, {k: progress[k] for k in ("best", "skipped_batches", "early_stop")})
            tensorboard_confusion(writer, epoch, val, data.vocab)
            commit_epoch(run_dir, epoch, rows, writer, state, improved)
            log.info("%s", epoch_line(epoch, cfg.epochs, rows, data.heads, seconds))
        env.barrier()
        if cfg.early_stop and stop["since"] >= cfg.patience:
            log.info("early stop after epoch %d: %s has not improved for %d epochs", epoch, cfg.early_stop, cfg.patience)
            break


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
    import os

    from voxlib.cli import log_to, parse_config, training_summary

    log_to(sys.stderr)
    run_dir = train(parse_config(argv, description=__doc__.split("\n\n")[0]))
    if int(os.environ.get("RANK", "0")) == 0:
        print(training_summary(run_dir), file=sys.stderr)
        print(run_dir)
    return 0


if __name__ == "__main__":
    from voxlib.cli import run_command

    sys.exit(run_command(main))
