"""One optimisation step and the parts it is made of: loss, model, optimiser, learning rate, batches.

Training, ``precision=auto`` and the benchmark all take their step from here, built the same way, so
the step that is timed is the step that trains. :func:`build_parts` assembles everything one run
trains with (model, speaker adversary, optimiser, schedule, loader, step) in a fixed order, which is
what makes a resumed run bit-exact: the same seed consumes the random stream in the same places every
launch, and a remedy that is off draws nothing.
"""
from __future__ import annotations

import logging
import math
import multiprocessing.util
import os
import random
import tempfile
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim import lr_scheduler
from torch.utils.data import DataLoader, DistributedSampler

from voxlib.adversary import SpeakerAdversary, adversary_weight, speaker_accents
from voxlib.config import ACCENT_HEAD, N_BLOCKS, Config, ConfigError, usable_cores
from voxlib.data import BalancedSampler, CropDataset, RunData
from voxlib.distributed import Dist, sync_batchnorm
from voxlib.inference import autocast_for
from voxlib.model import INPUT_SIZE, Discriminator, decay_groups, model_options
from voxlib.perturb import VoicePerturbation

log = logging.getLogger(__name__)


# --- batches ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BatchPlan:
    """The global batch and each process's share; ``note`` says why it differs from ``batch_size``."""

    global_batch: int
    local_batch: int
    note: str = ""


def batch_plan(cfg: Config, n_train: int, world: int) -> BatchPlan:
    """The one batch rule: ``batch_size`` is the global batch, split evenly over ``world`` processes.

    A training split smaller than one batch trains on batches as large as it allows (a multiple of
    the process count), so a tiny corpus still takes steps. ``precision=auto`` times this same batch.
    """
    batch, note = cfg.batch_size, ""
    if n_train < batch:
        batch = max(world, n_train // world * world)
        note = (f"training split has {n_train} utterances, fewer than batch_size {cfg.batch_size}; "
                f"using batches of {batch}")
    if batch % world:
        raise ConfigError(f"batch_size {batch} (the global batch) must be divisible by the {world} processes")
    return BatchPlan(batch, batch // world, note)


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
    if workers and not loader_socket_fits():
        log.warning("data-loader workers off: TMPDIR is too deep for the socket they hand batches over by "
                    "(%s); a shorter TMPDIR lets a worker prepare the next batch", tempfile.gettempdir())
        workers = 0
    return workers, device.type == "cuda"


SOCKET_PATH_MAX = 103  # bytes in a Unix socket's path: 107 on Linux, 103 on macOS (the final NUL aside)


def loader_socket_fits() -> bool:
    """Whether a loader worker can hand its batches over. It sends each batch's memory as a file
    descriptor through a Unix socket in multiprocessing's folder under TMPDIR (torch's other way, named
    shared memory, needs a socket there too); where that path is longer than a socket path may be,
    the worker's sending thread dies and the loader waits for the batch forever."""
    socket_path = os.path.join(multiprocessing.util.get_temp_dir(), "listener-" + "x" * 8)
    return len(os.fsencode(socket_path)) <= SOCKET_PATH_MAX


# --- loss ---------------------------------------------------------------------------------------
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


def make_loss(cfg: Config, data: RunData, env: Dist) -> tuple[HeadLoss, dict[str, float]]:
    """The run's loss (class weights from the training rows when ``class_balance="loss"``) and the
    weight of each head in the total."""
    if cfg.class_balance and cfg.balanced_head not in data.vocab:
        raise ConfigError(f"balanced_head {cfg.balanced_head!r} is not a trained head ({data.heads})")
    train_rows = data.rows("train")
    weights = {h: class_weights(data.targets[h][train_rows], len(data.vocab[h]))
               if cfg.class_balance == "loss" and h == cfg.balanced_head else None for h in data.heads}
    head_weight = {h: cfg.head_weight_map().get(h, 1.0) for h in data.heads}
    return HeadLoss(data.heads, weights, cfg.label_smoothing, env), head_weight


# --- one training step ----------------------------------------------------------------------------
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
    adversary: float = 0.0  # the speaker adversary's loss, summed over steps
    adversary_steps: int = 0  # steps that had one (0: the run has no adversary)

    def __post_init__(self):
        for name in ("loss", "denom", "correct", "valid", "grad_sq"):
            setattr(self, name, torch.zeros(self.heads, dtype=torch.float64))

    def summed(self, env: Dist) -> "Tally":
        """The epoch's totals over every process (this one's alone outside torchrun)."""
        for name in ("loss", "denom", "correct", "valid", "grad_sq"):
            setattr(self, name, env.sum(getattr(self, name)))
        self.total, self.adversary = env.sum(torch.tensor([self.total, self.adversary], dtype=torch.float64)).tolist()
        return self


class TrainStep:
    """One optimisation step exactly as training takes it; the benchmark times this very object.

    The weighted sum of per-head means (global denominators) is back-propagated; the step checks the
    loss is finite on every process (a host sync), optionally measures each head's gradient norm where
    the heads' gradients meet (the trunk output; with a birthplace branch, the map it starts from), and adds its losses and accuracies to the epoch's :class:`Tally` (host syncs
    too). A non-finite loss takes no optimiser step; with ``nan_policy="skip"`` the BatchNorm buffers
    are restored as well, and the step reports the heads at fault.

    With a speaker ``adversary`` (adversary.py) the model also hands back what the birthplace head
    reads; the adversary's loss, at the weight ``adversary_weight()`` gives for this step, joins the
    total, and its reversed gradient reaches only those features.
    """

    def __init__(self, model: nn.Module, net: nn.Module, optimizer: torch.optim.Optimizer, loss: HeadLoss,
                 head_weight: dict[str, float], env: Dist, precision: str, channels_last: bool,
                 nan_policy: str = "stop", after_step: Callable[[], None] | None = None,
                 adversary: nn.Module | None = None, adversary_weight: Callable[[], float] = lambda: 0.0):
        self.model, self.net, self.optimizer, self.loss = model, net, optimizer, loss
        self.heads = loss.heads
        self.head_weight, self.env, self.device = head_weight, env, env.device
        self.autocast = autocast_for(precision, env.device)
        self.channels_last, self.nan_policy = channels_last, nan_policy
        self.after_step = after_step or (lambda: None)
        self.adversary, self.adversary_weight = adversary, adversary_weight

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
            if self.adversary is None:
                logits, shared = self.model(x, return_shared=True)
            else:
                logits, accent, shared = self.model(x, return_accent=True, return_shared=True)
                adversary_loss = self.adversary(accent, y["speaker"], y[ACCENT_HEAD], self.adversary_weight())
        sums, means = self.loss(logits, y, denominators)
        total = sum(self.head_weight[h] * means[h] for h in heads)
        if self.adversary is not None:
            total = total + adversary_loss
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
                # a birthplace network of its own shares nothing with the trunk: its gradient there is 0
                (g,) = torch.autograd.grad(self.head_weight[h] * means[h], shared, retain_graph=True,
                                           allow_unused=True)
                tally.grad_sq[k] += 0.0 if g is None else g.float().pow(2).sum().item()
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
            if self.adversary is not None:
                tally.adversary += adversary_loss.item() / env.world
                tally.adversary_steps += 1
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


class EarlyStop:
    """``early_stop=SPLIT:METRIC``: stop when that measure (mean over heads) has not improved for
    ``patience`` epochs. Its state rides in the checkpoint, so a resumed run stops where it would have."""

    def __init__(self, cfg: Config, state: dict | None = None):
        self.split, _, self.metric = cfg.early_stop.partition(":")
        self.patience = cfg.patience
        state = state or {}
        self.best, self.since = state.get("best"), int(state.get("since", 0))

    def update(self, rows: list[tuple]) -> None:
        """Take one epoch's metrics.csv rows into account."""
        if not self.split:
            return
        values = [v for _, s, h, m, v in rows if s == self.split and m == self.metric and h != "all"]
        value = None if not values else float(np.mean(values)) * (1 if self.metric == "acc" else -1)
        if value is not None and (self.best is None or value > self.best):
            self.best, self.since = value, 0
        else:
            self.since += 1

    @property
    def stop(self) -> bool:
        return bool(self.split) and self.since >= self.patience

    def state_dict(self) -> dict:
        return {"best": self.best, "since": self.since}


# --- building the parts ----------------------------------------------------------------------------
def two_views(cfg: Config) -> bool:
    """Training batches carry two channels, the recorded crop and the same crop with a new voice, when
    the birthplace head has a network of its own (only it reads the new voice; the speaker and sex
    heads keep every target of the recorded crop)."""
    return cfg.accent_branch == N_BLOCKS and VoicePerturbation.from_config(cfg).active


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def build_model(cfg: Config, head_sizes: dict[str, int], env: Dist, channels_last: bool) -> nn.Module:
    """The discriminator these settings describe (model.model_options: width and remedies), on the device."""
    net = Discriminator(head_sizes, **model_options(cfg.to_dict()))
    if env.active:
        net = sync_batchnorm(net, env.device)
    net.to(env.device)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    return net


def build_adversary(cfg: Config, net: Discriminator, speaker_accent: list[int] | None,
                    device: torch.device) -> SpeakerAdversary | None:
    """The speaker adversary (``speaker_adversary`` > 0) reading what the birthplace head reads, or None.

    ``speaker_accent``: the birthplace class of each training speaker, in the speaker head's order;
    None when the run lacks a speaker or birthplace head (then there is nothing to adversarially remove).
    """
    if cfg.speaker_adversary <= 0 or speaker_accent is None:
        return None
    return SpeakerAdversary(net.accent_features_dim, speaker_accent, cfg.adversary_scope).to(device)


def make_optimizer(cfg: Config, modules: list[nn.Module]) -> torch.optim.Optimizer:
    """The optimiser over every trained module (the discriminator, and the adversary if any);
    ``weight_decay`` applies to conv and linear weights only (model.decay_groups)."""
    together = nn.ModuleList(modules)
    params = decay_groups(together, cfg.weight_decay) if cfg.weight_decay else together.parameters()
    return torch.optim.RMSprop(params, lr=cfg.lr) if cfg.optimizer == "rmsprop" else torch.optim.Adam(params, lr=cfg.lr)


def compile_trunk(net: nn.Module) -> None:
    """torch.compile the trunk only (the heads are a few small matrix products; a model with a
    birthplace branch runs its shared blocks uncompiled).

    A compiled whole model hands back the trunk output beside the logits, not as their input, so the
    heads' gradients at the trunk (grad_norm) could not be taken. The state dict keeps its keys. On
    CPU this needs the deterministic algorithms of ``distributed.speed_settings``: without them,
    torch 2.13's compiled backward of unfold (conv_as_matmul) writes past its buffer and corrupts the heap.
    """
    net.trunk = torch.compile(net.trunk)


def synthetic_step(cfg: Config, head_sizes: dict[str, int], env: Dist, precision: str, batch: int,
                   loss: HeadLoss | None = None, head_weight: dict[str, float] | None = None,
                   seed: int | None = None) -> tuple[nn.Module, Callable[[bool], list[str]]]:
    """A fresh model and optimiser with this run's :class:`TrainStep` on one random batch in [0, 1].

    ``precision=auto`` and the benchmark time this closure: the step training takes, on throwaway
    parts. ``step(measure_grad)`` takes one step and returns the heads with a non-finite loss.
    """
    if seed is not None:
        torch.manual_seed(seed)
    net = build_model(cfg, head_sizes, env, cfg.channels_last)
    net.train()
    accents = ([i % head_sizes[ACCENT_HEAD] for i in range(head_sizes["speaker"])]
               if {"speaker", ACCENT_HEAD} <= set(head_sizes) else None)  # any assignment costs the same
    adversary = build_adversary(cfg, net, accents, env.device)
    if cfg.compile:
        compile_trunk(net)
    heads = list(head_sizes)
    if loss is None:
        loss = HeadLoss(heads, {h: None for h in heads}, cfg.label_smoothing, env)
    step = TrainStep(net, net, make_optimizer(cfg, [net] + [adversary] * (adversary is not None)), loss,
                     head_weight or {h: 1.0 for h in heads}, env, precision, cfg.channels_last, cfg.nan_policy,
                     adversary=adversary, adversary_weight=lambda: cfg.speaker_adversary)
    generator = torch.Generator().manual_seed(0 if seed is None else seed)
    x = torch.rand(batch, 2 if two_views(cfg) else 1, INPUT_SIZE, INPUT_SIZE, generator=generator)
    y = {h: torch.randint(0, n, (batch,), generator=generator) for h, n in head_sizes.items()}
    tally = Tally(len(heads))
    return net, lambda measure_grad=False: step(x, y, tally, measure_grad=measure_grad)


@dataclass
class Parts:
    """Everything that trains, built once by :func:`build_parts`."""

    net: nn.Module  # the plain model (checkpoints, evaluation)
    model: nn.Module  # what the step calls: the DDP wrapper under torchrun, else ``net``
    adversary: nn.Module | None  # the plain speaker adversary (training only; its own checkpoint entry)
    optimizer: torch.optim.Optimizer
    schedule: LearningRate
    step: TrainStep
    sampler: Any
    train_loader: Any
    loader_args: dict
    plan: BatchPlan  # the global batch and this process's share
    precision: str
    channels_last: bool


def build_parts(cfg: Config, data: RunData, env: Dist, precision: str) -> Parts:
    """The model, optimiser, schedule, training loader and step of a run, in a fixed order (seeded)."""
    seed_everything(cfg.seed)
    net = build_model(cfg, data.head_sizes, env, cfg.channels_last)
    accents = (speaker_accents(data.vocab["speaker"], data.vocab[ACCENT_HEAD], data.table)
               if {"speaker", ACCENT_HEAD} <= set(data.vocab) else None)
    adversary = build_adversary(cfg, net, accents, env.device)
    optimizer = make_optimizer(cfg, [net] + [adversary] * (adversary is not None))
    if cfg.compile:
        compile_trunk(net)
    model, adversary_step = net, adversary
    if env.active:
        ids = [env.device.index] if env.device.type == "cuda" else None
        # BatchNorm buffers are kept identical by the synced statistics: no per-step broadcast
        model = DistributedDataParallel(net, device_ids=ids, forward_sync_buffers=False)
        if adversary is not None:
            adversary_step = DistributedDataParallel(adversary, device_ids=ids)

    train_rows = data.rows("train")
    plan = batch_plan(cfg, len(train_rows), env.world)
    if plan.note:
        warnings.warn(plan.note)
    masks = (cfg.freq_masks, cfg.freq_mask_width, cfg.time_masks, cfg.time_mask_width)
    train_set = CropDataset(data.cache, train_rows, data.targets, cfg.n_frames, train=True, seed=cfg.seed, masks=masks,
                            perturb=VoicePerturbation.from_config(cfg), perturb_view=two_views(cfg))
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
    train_loader = DataLoader(train_set, batch_size=plan.local_batch, sampler=sampler, drop_last=True, **loader_args)
    schedule = LearningRate(cfg, optimizer, len(train_loader))
    loss, head_weight = make_loss(cfg, data, env)
    steps_per_epoch = max(1, len(train_loader))
    step = TrainStep(model, net, optimizer, loss, head_weight, env, precision, cfg.channels_last, cfg.nan_policy,
                     after_step=schedule.after_step, adversary=adversary_step,
                     adversary_weight=lambda: adversary_weight(cfg.speaker_adversary, cfg.adversary_warmup,
                                                               schedule.steps / steps_per_epoch))
    return Parts(net, model, adversary, optimizer, schedule, step, sampler, train_loader, loader_args,
                 plan, precision, cfg.channels_last)
