"""Processes and devices: the torchrun process group, device choice, process-wide speed settings,
BatchNorm across processes.

Under torchrun every process runs the same code; ``Dist`` says which one this is and sums values
across all of them. Outside torchrun it is a single process and every operation is the identity.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.utils.deterministic as deterministic
from torch import nn

from voxlib.config import Config, ConfigError
from voxlib.heap import keep_freed_memory


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

    def in_turn(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on rank 0 first, then on the others (which reuse what rank 0 built or checked)."""
        if self.main:
            result = fn()
            self.barrier()
        else:
            self.barrier()
            result = fn()
        return result

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


@contextlib.contextmanager
def speed_settings(cfg: Config, device: torch.device):
    """The process-wide settings of a run (the benchmark applies the same), restored afterwards.

    On CPU, deterministic algorithms make a resumed run bit-exact. With them torch would also fill
    every new tensor with NaN to expose reads of uninitialised memory: ~12 % of a CPU training step
    for no change in any result, so that is switched off. Denormals are flushed to zero (tiny
    RMSprop averages would otherwise take the slow path), and freed activations stay in the heap
    (see ``heap.keep_freed_memory``). On CUDA, cuDNN picks its fastest kernels.
    """
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


# --- BatchNorm across processes ---------------------------------------------------------------------
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
