"""Training steps as the bench times them: training's own TrainStep on a synthetic batch, per variant.

A variant is a way to run the same step (fp32 or bf16 autocast, NCHW or channels_last, eager or
compiled); ``time_training`` gives its samples/s and FLOP/s, and ``auto_choices`` says which
precision ``precision=auto`` picks from the fp32 and bf16 rows, by the rule training uses.
"""
from __future__ import annotations

import gc
import time
from dataclasses import dataclass, replace

import numpy as np
import torch

from voxlib.config import Config
from voxlib.distributed import Dist
from voxlib.model import count_flops
from voxlib.precision import choose as choose_precision
from voxlib.precision import native_bf16
from voxlib.step import synthetic_step


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


MAX_TIMED_STEPS = 100
# A variant whose warm-up step takes this many times the fastest step measured so far at the same model
# and batch cannot be the fastest: it is reported from that one step and not repeated (bf16 without
# native support ran 40x slower than fp32 at seed width, 80 s a step, on a CPU without AVX512-BF16).
SLOW_FACTOR = 5.0



# --- what to measure ---------------------------------------------------------------------------
@dataclass
class Variant:
    """A way to run the same training step; names are the table's row labels."""

    name: str
    bf16: bool = False
    channels_last: bool = False
    compile: bool = False


EAGER_VARIANTS = (
    Variant("fp32"),
    Variant("channels_last", channels_last=True),
    Variant("bf16", bf16=True),
    Variant("bf16+channels_last", bf16=True, channels_last=True),
)




def auto_choices(rows: list[dict], channels_last: bool) -> dict[tuple[str, int], str]:
    """{(model, batch): what precision=auto picks}, from the eager fp32 and bf16 rows in the
    configured memory format, by the rule training uses (``precision.choose``: within noise, the CPU's
    native precision). Where one dtype was
    not timed at that batch because it could not be the faster (a ``skipped`` row: ``SLOW_FACTOR``
    slower at the first batch, or a GEMM ceiling below what the other reached), auto picks the other."""
    out = {}
    for model, batch in dict.fromkeys((r["model"], r["batch"]) for r in rows):
        speeds = _auto_pair(rows, model, batch, channels_last)
        if speeds:
            out[(model, batch)] = choose_precision(speeds, native=native_bf16())
            continue
        mine = [r for r in rows if r["model"] == model and r["batch"] == batch
                and r["channels_last"] == channels_last and not r["compile"]]
        timed = {r["dtype"] for r in mine if "skipped" not in r and "error" not in r}
        if len(timed) == 1 and any("skipped" in r for r in mine):
            out[(model, batch)] = timed.pop()
    return out


def auto_speedup(rows: list[dict], model: str, batch: int, channels_last: bool) -> float | None:
    speeds = _auto_pair(rows, model, batch, channels_last)
    return speeds["bf16"] / speeds["fp32"] if speeds else None


def _auto_pair(rows, model, batch, channels_last) -> dict | None:
    pair = {r["dtype"]: r["samples_per_s"] for r in rows if r["model"] == model and r["batch"] == batch
            and r["channels_last"] == channels_last and not r["compile"] and "skipped" not in r and "error" not in r}
    return pair if len(pair) == 2 else None


def _row(variant: Variant, batch: int, step: "BenchStep", best: float, best_plain: float, grad: float | None,
         times: list[float], rough: bool = False) -> dict:
    row = {"variant": variant.name, "dtype": "bf16" if variant.bf16 else "fp32",
           "channels_last": variant.channels_last, "compile": variant.compile, "batch": batch,
           "step_s": best, "plain_step_s": best_plain, "grad_step_s": grad,
           "grad_log_every": step.grad_every, "median_step_s": float(np.median(times)),
           "samples_per_s": batch / best, "flops_per_s": step.flops / best, "step_flops": step.flops}
    if rough:
        row["rough"] = True
    return row


# --- training steps ----------------------------------------------------------------------------
class BenchStep:
    """training's own step (``step.synthetic_step``: the model, optimizer, per-head loss with global
    denominators, autocast, channels_last and compiled trunk that training builds) on one synthetic
    batch in [0, 1] with the model in train mode. Every ``grad_log_every``-th call also measures the
    per-head gradient norms, as training does; each call pays training's host syncs.
    """

    def __init__(self, width: float, head_sizes: dict[str, int], variant: Variant, device: torch.device,
                 batch: int, cfg: Config | None = None, seed: int = 0):
        cfg = replace(cfg or Config(), width=width, channels_last=variant.channels_last, compile=variant.compile)
        self.net, self.step = synthetic_step(cfg, head_sizes, Dist(device=device), "bf16" if variant.bf16 else "fp32",
                                             batch, seed=seed)
        self.grad_every, self.calls = cfg.grad_log_every, 0
        self.flops = count_flops(self.net, batch, training=True)

    def measures_grad(self) -> bool:
        """Whether the next call is one of training's gradient-norm steps."""
        return bool(self.grad_every) and self.calls % self.grad_every == 0

    def __call__(self) -> None:
        bad = self.step(self.measures_grad())
        self.calls += 1
        if bad:
            raise RuntimeError(f"non-finite loss in head(s) {bad} on the synthetic batch")


def time_training(width: float, head_sizes: dict, batch: int, variant: Variant, device: torch.device,
                  warmup: int, steps: int, min_time_s: float = 0.0, cfg: Config | None = None,
                  slow_after_s: float | None = None) -> dict:
    """Samples/s of training's step after ``warmup`` (compile time reported apart).

    When the first warm-up step already took longer than ``slow_after_s`` (``SLOW_FACTOR`` times the
    fastest step the caller has seen), the row is that one step, marked ``rough``: one-time costs
    included, so its speed is if anything too low, and it is far from the fastest either way.

    At least ``steps`` steps are timed, and more until they add up to ``min_time_s`` (at most
    ``MAX_TIMED_STEPS``): a small model's step takes 50 ms, and a burst of load from a neighbour
    lasting half a second would otherwise slow every one of its steps. The first timed step is a
    gradient-norm step; the step time is the best plain step plus 1/``grad_log_every`` of the extra
    time of the best gradient-norm step, which is what an epoch pays per step.
    """
    step = BenchStep(width, head_sizes, variant, device, batch, cfg)
    first = None
    for i in range(warmup):
        t0 = time.perf_counter()
        step()
        sync(device)
        if i == 0:
            first = time.perf_counter() - t0
            if slow_after_s is not None and first > slow_after_s and not variant.compile:
                return _row(variant, batch, step, first, first, None, [first], rough=True)
    step.calls = 0
    plain, grad = [], []
    while len(plain) + len(grad) < steps or (sum(plain) + sum(grad) < min_time_s
                                             and len(plain) + len(grad) < MAX_TIMED_STEPS):
        kind = grad if step.measures_grad() else plain
        t0 = time.perf_counter()
        step()
        sync(device)
        kind.append(time.perf_counter() - t0)
    best_plain = min(plain) if plain else min(grad)
    best = best_plain + (min(grad) - best_plain) / step.grad_every if grad and plain else best_plain
    result = _row(variant, batch, step, best, best_plain, min(grad) if grad else None, plain or grad)
    if variant.compile and first is not None:
        result["compile_s"] = max(first - best, 0.0)
    if device.type == "cuda":
        result["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    del step
    gc.collect()
    return result
