"""How fast does vox train on this machine, and how far is that from what the machine can do?

Usage::

    python -m voxlib.bench --quick                  # make bench: about 4 minutes on a 2-core CPU
    python -m voxlib.bench                          # more repeats, batch sizes, compile for both widths
    python -m voxlib.bench --parity                 # bf16 vs fp32 accuracy on the demo corpus, seeds 0, 1, 2
    python -m voxlib.bench --device cuda --epoch-utterances 20000

One run measures, side by side on the same machine: the GEMM ceiling per dtype (the best FLOP/s of
any kernel library torch uses, on squares and on the GEMM shapes of the models' layers) and the
theoretical peak where the CPU reports what it needs; training throughput of the seed width and the
CPU default width in fp32, bf16 autocast, channels_last and torch.compile at batch 10 and at the
best batch found, each against the ceiling of its dtype, and what precision=auto picks; the
data-loader wait from the feature cache; the feature-cache build against a plain librosa loop;
peak memory of short training runs on a corpus and on the same corpus repeated 4x; and the seed
protocol's wall time on a GPU (estimated from FLOPs on a CPU, measured on CUDA). It prints a table
and writes ``outputs/bench/<timestamp>.json``.

Why ratios: on a shared machine absolute samples/s move with the neighbours' load, and so does the
ceiling measured in the same run, so achieved/ceiling stays meaningful. Every time is the best of
several repeats, because noise only ever adds time. See docs/benchmark.md for the method.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import gc
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torch.nn.functional as F

from voxlib.config import SEED_PRESET, Config, outputs_dir
from voxlib.model import INPUT_SIZE, Discriminator, count_flops, trunk_channels
from voxlib.precision import MARGIN, PRECISIONS, choose as choose_precision, cpu_model_and_flags

# The 2019 experiment's heads (CSJ): 1421 speakers, 53 birthplaces, 2 sexes.
SEED_HEADS = {"speaker": 1421, "birthplace": 53, "sex": 2}
# Published dense bf16 tensor-core peaks (no sparsity), FLOP/s, for the GPU estimate.
GPU_BF16_PEAK = {"H100 SXM": 989e12, "A100": 312e12}
ASSUMED_GPU_MFU = 0.2  # conservative: batch 10 of a small conv net rarely fills a large GPU
DEFAULT_EPOCH_UTTERANCES = 10_000  # CSJ-like order of magnitude; pass --epoch-utterances for yours
# Targets, each in the precision precision=auto picks (issue 13)
TARGET_SEED_OF_CEILING = 0.70  # seed width, best batch and variant, of the GEMM ceiling of its dtype
TARGET_CPU_DEFAULT_OF_CEILING = 0.50  # the CPU default width, likewise
TARGET_SPEEDUP_NATIVE_BF16 = 2.5  # seed width, best against the seed's loop (fp32, NCHW, batch 10)
TARGET_LOADER_WAIT = 0.05  # share of a training step spent waiting for the next batch
TARGET_CACHE_SPEEDUP = 3.0  # feature-cache build against the plain librosa loop


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


@dataclass
class Plan:
    """Sizes and repeats of one bench run; ``quick()`` fits about 4 minutes on a 2-core CPU."""

    gemm_squares: tuple[int, ...] = (1024, 2048, 4096)  # plus the GEMM shapes of each model's layers
    gemm_repeats: int = 5
    models: dict = field(default_factory=dict)  # name -> (width, head_sizes)
    batches: dict = field(default_factory=dict)  # name -> batch sizes searched (the first is batch 10)
    warmup: int = 2
    steps: int = 5  # timed steps per measurement (the best one counts) ...
    min_time_s: float = 2.0  # ... and more until they took this long: a short burst of load cannot cover all
    compile_models: tuple[str, ...] = ("seed", "cpu_default")
    corpus: dict = field(default_factory=lambda: dict(birthplaces=4, speakers=6, utterances=10, seconds=3.0))
    loader_steps: int = 30
    memory_steps: int = 8
    librosa: bool = True
    cache_copies: int = 10  # the corpus listed this many times for cache vs librosa (fixed costs amortised)

    @classmethod
    def full(cls, cfg: Config) -> "Plan":
        return cls(models=default_models(cfg), batches={"seed": (10, 16, 32, 64), "cpu_default": (10, 32, 64, 128)})

    @classmethod
    def quick(cls, cfg: Config) -> "Plan":
        return cls(gemm_squares=(1024, 2048, 4096), gemm_repeats=3, models=default_models(cfg),
                   batches={"seed": (10, 32), "cpu_default": (10, 32, 64)}, warmup=1, steps=3, min_time_s=1.0,
                   compile_models=("cpu_default",), corpus=dict(birthplaces=3, speakers=4, utterances=8, seconds=3.0),
                   loader_steps=12, memory_steps=4)


def default_models(cfg: Config) -> dict:
    """The seed (width 1.0, CSJ heads) and the CPU default width with the demo corpus's heads."""
    return {"seed": (SEED_PRESET["width"], dict(SEED_HEADS)), "cpu_default": (cfg.width, demo_heads(cfg))}


def demo_heads(cfg: Config) -> dict[str, int]:
    """Head sizes of a run on the built-in demo corpus with ``cfg``'s settings.

    Every accent with enough speakers gives ``unseen_per_class`` of them to the unseen splits, so
    the speaker head knows the rest.
    """
    accents = len(cfg.demo_accent_list()) or 8
    per_accent = cfg.demo_speakers_per_accent
    unseen = min(cfg.unseen_per_class, per_accent - 1) if per_accent >= max(cfg.unseen_min_speakers, 2) else 0
    return {"speaker": accents * (per_accent - unseen), "birthplace": accents, "sex": 2}


# --- device helpers ----------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def training_settings(cfg: Config, device: torch.device):
    """The process-wide settings train.train applies, so bench steps run as training steps do."""
    from voxlib.train import speed_settings

    return speed_settings(cfg, device)


def machine_info(device: torch.device) -> dict:
    info = {"cpu": cpu_model_and_flags()[0], "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "device": str(device)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


# --- the ceiling: the best dense GEMM any of torch's kernel libraries reaches -------------------
# Each takes (a: M x K, b: N x K) and returns a callable computing a @ b.T once. torch.mm is MKL's
# sgemm for fp32 and oneDNN for bf16 (torch routes bf16 matmuls there on CPUs that have bf16);
# oneDNN's own inner product and a channels_last 1x1 convolution reach it on paths torch.mm does
# not take, and on a Zen 5 CPU the convolution's fp32 kernel reached 302 GFLOP/s where sgemm stopped at 189.
def _mm(a: torch.Tensor, b: torch.Tensor):
    bt = b.t()
    return lambda: torch.mm(a, bt)


def _onednn_linear(a: torch.Tensor, b: torch.Tensor):
    a_, b_ = a.to_mkldnn(), b.to_mkldnn()
    return lambda: torch._C._nn.mkldnn_linear(a_, b_, None)


def _conv1x1(a: torch.Tensor, b: torch.Tensor):
    m, k = a.shape
    x = a.view(1, m, 1, k).permute(0, 3, 1, 2)  # (1, K, M, 1) in channels_last: the same memory as a
    w = b.view(len(b), k, 1, 1)
    return lambda: F.conv2d(x, w)


GEMM_LIBRARIES = {"torch.mm": _mm, "oneDNN linear": _onednn_linear, "oneDNN 1x1 conv, channels_last": _conv1x1}
GEMM_FLOP_CAP = 2 * 2048**3  # a layer's GEMM is scaled down along its longest side to at most this much work
CEILING_RETIMED = 3  # the after-training pass times again the best kernels of the first pass


def layer_gemm_shapes(width: float, head_sizes: dict, batch: int) -> list[tuple[int, int, int]]:
    """(M, N, K) of the GEMMs a training step of this model runs: per convolution the forward
    (positions x out-channels x patch), the input gradient and the weight gradient.

    Shapes with a side under 64 are left out (too small to reach any ceiling); the longest side is
    shortened until one GEMM is at most ``GEMM_FLOP_CAP``, which keeps its aspect class.
    """
    shapes, size, cin = [], INPUT_SIZE, 1
    convs = [(c, 2) for c in trunk_channels(width)] + [(n, 0) for n in head_sizes.values()]
    for cout, halve in convs:
        size = size // 2 if halve else 1
        positions, patch = batch * size * size, cin * 16
        for m, n, k in ((positions, cout, patch), (positions, patch, cout), (cout, patch, positions)):
            if min(m, n, k) < 64:
                continue
            while 2 * m * n * k > GEMM_FLOP_CAP:
                longest = max(m, n, k)
                m, n, k = (s // 2 if s == longest else s for s in (m, n, k))
            shapes.append((m, n, k))
        if halve:
            cin = cout
    return list(dict.fromkeys(shapes))


def time_gemm(library: str, shape: tuple[int, int, int], dtype: torch.dtype, repeats: int,
              device: torch.device) -> float:
    """FLOP/s of the best of ``repeats`` timed calls after one warm-up call."""
    m, n, k = shape
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(m, k, generator=gen).to(device=device, dtype=dtype)
    b = torch.randn(n, k, generator=gen).to(device=device, dtype=dtype)
    run = GEMM_LIBRARIES[library](a, b)
    run()
    sync(device)
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * m * n * k / best


def gemm_ceiling(dtype: torch.dtype, kernels: list[tuple[str, tuple]], repeats: int, device: torch.device) -> dict:
    """Every (library, shape) timed; the best is the ceiling a training step of this dtype is held to.

    A library that is missing from this torch build or this device is listed with its error and skipped.
    """
    rows = []
    for library, shape in kernels:
        if device.type != "cpu" and library != "torch.mm":
            continue  # the oneDNN paths are CPU kernels
        try:
            flops = time_gemm(library, tuple(shape), dtype, repeats, device)
        except (RuntimeError, AttributeError) as err:
            rows.append({"library": library, "shape": list(shape), "flops": None, "error": str(err).splitlines()[0]})
            continue
        rows.append({"library": library, "shape": list(shape), "flops": flops})
    ok = [r for r in rows if r["flops"]]
    if not ok:
        raise RuntimeError(f"no GEMM kernel of {dtype} ran on {device}: {rows[0].get('error') if rows else 'none'}")
    best = max(ok, key=lambda r: r["flops"])
    return {"kernels": rows, "flops": best["flops"], "library": best["library"], "shape": best["shape"]}


def theoretical_peak(threads: int) -> dict:
    """cores x clock x FLOP/cycle for this CPU, where it reports what is needed (``peak_from``)."""
    from voxlib.config import usable_cores

    clock, source = cpu_clock()
    return peak_from(min(threads, usable_cores()), clock, source, cpu_model_and_flags()[1])


def cpu_clock() -> tuple[float | None, str | None]:
    """(Hz, where it came from): cpufreq's maximum (turbo) if the kernel exposes it, else /proc/cpuinfo's
    "cpu MHz", which under a hypervisor is the nominal clock; (None, None) when neither is there."""
    try:
        return int(Path("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq").read_text()) * 1e3, "cpufreq maximum"
    except (OSError, ValueError):
        pass
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("cpu MHz"):
                return float(line.split(":", 1)[1]) * 1e6, "/proc/cpuinfo cpu MHz"
    except (OSError, ValueError):
        pass
    return None, None


def peak_from(cores: int, clock_hz: float | None, clock_source: str | None, flags) -> dict:
    """Theoretical FLOP/s per dtype from the CPU's feature flags.

    FLOP/cycle per core assumes two FMA units (true of server Xeons and Zen 4/5; some parts have
    one): AVX-512 fp32 2 x 16 lanes x 2 = 64, AVX2 32; AVX512-BF16 (vdpbf16ps) 2 x 32 products x 2 =
    128; AMX-BF16 one 16x16x32 tile product (16384 FLOP) per 16 cycles = 1024. A core running above
    the reported clock (turbo; under a hypervisor only the nominal clock is reported) beats this line.
    """
    flags = set(flags)
    if "avx512f" in flags:
        fp32 = (64, "AVX-512, 2 FMA units assumed")
    elif {"avx2", "fma"} <= flags:
        fp32 = (32, "AVX2, 2 FMA units assumed")
    else:
        fp32 = (None, "vector units not reported")
    if "amx_bf16" in flags:
        bf16 = (1024, "AMX-BF16 tiles")
    elif "avx512_bf16" in flags:
        bf16 = (128, "AVX512-BF16, 2 FMA units assumed")
    else:
        bf16 = (None, "no native bf16 reported")
    out = {"cores": cores, "clock_hz": clock_hz, "clock_source": clock_source}
    for name, (per_cycle, basis) in (("fp32", fp32), ("bf16", bf16)):
        out[name] = {"flop_per_cycle": per_cycle, "basis": basis,
                     "flops": cores * clock_hz * per_cycle if clock_hz and per_cycle else None}
    return out


MAX_TIMED_STEPS = 100
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def merge_passes(passes: list[dict]) -> dict:
    """The ceiling of one dtype over its passes: the best kernel of any pass."""
    top = max(passes, key=lambda p: p["flops"])
    return {"flops": top["flops"], "library": top["library"], "shape": top["shape"], "passes": passes}


def auto_choices(rows: list[dict], channels_last: bool) -> dict[tuple[str, int], str]:
    """{(model, batch): what precision=auto picks}, from the eager fp32 and bf16 rows in the
    configured memory format, by the rule training uses (``precision.choose``)."""
    out = {}
    for model, batch in dict.fromkeys((r["model"], r["batch"]) for r in rows):
        speeds = _auto_pair(rows, model, batch, channels_last)
        if speeds:
            out[(model, batch)] = choose_precision(speeds)
    return out


def auto_speedup(rows: list[dict], model: str, batch: int, channels_last: bool) -> float | None:
    speeds = _auto_pair(rows, model, batch, channels_last)
    return speeds["bf16"] / speeds["fp32"] if speeds else None


def _auto_pair(rows, model, batch, channels_last) -> dict | None:
    pair = {r["dtype"]: r["samples_per_s"] for r in rows if r["model"] == model and r["batch"] == batch
            and r["channels_last"] == channels_last and not r["compile"]}
    return pair if len(pair) == 2 else None


# --- training steps ----------------------------------------------------------------------------
class BenchStep:
    """training's own ``train.TrainStep``, built as ``train.build_parts`` builds it (model, optimizer,
    per-head loss with global denominators, autocast, channels_last, compiled trunk), on one
    synthetic batch in [0, 1] with the model in train mode. Every ``grad_log_every``-th call also
    measures the per-head gradient norms, as training does; each call pays training's host syncs.
    """

    def __init__(self, width: float, head_sizes: dict[str, int], variant: Variant, device: torch.device,
                 batch: int, cfg: Config | None = None, seed: int = 0):
        from voxlib.distributed import Dist
        from voxlib.train import HeadLoss, Tally, TrainStep, build_model, make_optimizer

        cfg = replace(cfg or Config(), width=width)
        env = Dist(device=device)
        torch.manual_seed(seed)
        self.net = build_model(cfg, head_sizes, env, variant.channels_last)
        self.net.train()
        if variant.compile:  # the trunk, as build_parts compiles it
            self.net.trunk = torch.compile(self.net.trunk)
        heads = list(head_sizes)
        loss = HeadLoss(heads, {h: None for h in heads}, cfg.label_smoothing, env)
        self.step = TrainStep(self.net, self.net, make_optimizer(cfg, self.net), loss, {h: 1.0 for h in heads}, env,
                              "bf16" if variant.bf16 else "fp32", variant.channels_last, cfg.nan_policy)
        self.tally, self.grad_every, self.calls = Tally(len(heads)), cfg.grad_log_every, 0
        self.flops = count_flops(self.net, batch, training=True)
        gen = torch.Generator().manual_seed(seed)
        self.x = torch.rand(batch, 1, INPUT_SIZE, INPUT_SIZE, generator=gen)
        self.y = {h: torch.randint(0, n, (batch,), generator=gen) for h, n in head_sizes.items()}

    def measures_grad(self) -> bool:
        """Whether the next call is one of training's gradient-norm steps."""
        return bool(self.grad_every) and self.calls % self.grad_every == 0

    def __call__(self) -> None:
        bad = self.step(self.x, self.y, self.tally, measure_grad=self.measures_grad())
        self.calls += 1
        if bad:
            raise RuntimeError(f"non-finite loss in head(s) {bad} on the synthetic batch")


def time_training(width: float, head_sizes: dict, batch: int, variant: Variant, device: torch.device,
                  warmup: int, steps: int, min_time_s: float = 0.0, cfg: Config | None = None) -> dict:
    """Samples/s of training's step after ``warmup`` (compile time reported apart).

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
    result = {"variant": variant.name, "dtype": "bf16" if variant.bf16 else "fp32",
              "channels_last": variant.channels_last, "compile": variant.compile, "batch": batch,
              "step_s": best, "plain_step_s": best_plain, "grad_step_s": min(grad) if grad else None,
              "grad_log_every": step.grad_every, "median_step_s": float(np.median(plain or grad)),
              "samples_per_s": batch / best, "flops_per_s": step.flops / best, "step_flops": step.flops}
    if variant.compile and first is not None:
        result["compile_s"] = max(first - best, 0.0)
    if device.type == "cuda":
        result["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    del step
    gc.collect()
    return result


# --- a generated corpus ------------------------------------------------------------------------
def voice(f0: float, brightness: float, seconds: float, sr: int, rng: np.random.Generator) -> np.ndarray:
    """A voiced sound with syllable-rate loudness: pitch marks the speaker, brightness the place."""
    n = int(seconds * sr)
    t = np.arange(n) / sr
    pitch = f0 * (1 + 0.03 * np.sin(2 * np.pi * rng.uniform(3, 6) * t))
    phase = 2 * np.pi * np.cumsum(pitch) / sr
    harmonics = np.arange(1, 25)[:, None]
    gains = np.exp(-harmonics / (3.0 + 6.0 * brightness))
    wave = (gains * np.sin(harmonics * phase)).sum(0)
    syllables = 0.5 + 0.5 * np.sin(2 * np.pi * rng.uniform(3, 5) * t + rng.uniform(0, np.pi)) ** 2
    wave = wave * syllables * np.hanning(n) + rng.normal(0, 0.005, n)
    return (0.5 * wave / np.abs(wave).max()).astype(np.float32)


def write_corpus(root: Path, birthplaces: int = 3, speakers: int = 4, utterances: int = 8,
                 seconds: float = 3.0, sr: int = 16000, seed: int = 0) -> Path:
    """Generated wav clips and their manifest.csv under ``root``; returns the manifest path."""
    rng = np.random.default_rng(seed)
    rows = []
    for b in range(birthplaces):
        for s in range(speakers):
            speaker = f"p{b}s{s}"
            sex = "female" if s % 2 == 0 else "male"
            f0 = (210.0 if sex == "female" else 115.0) * (1 + 0.06 * s)
            (root / speaker).mkdir(parents=True, exist_ok=True)
            for u in range(utterances):
                rel = f"{speaker}/{u:03d}.wav"
                length = seconds * rng.uniform(0.8, 1.2)
                sf.write(root / rel, voice(f0, b / max(birthplaces - 1, 1), length, sr, rng), sr)
                rows.append((rel, speaker, f"place{b}", sex))
    return _write_manifest(root / "manifest.csv", rows)


def repeat_corpus(manifest: Path, copies: int, root: Path) -> Path:
    """The same clips ``copies`` times under distinct names (hard links where possible)."""
    with manifest.open(newline="") as fh:
        original = list(csv.DictReader(fh))
    rows = []
    for k in range(copies):
        for r in original:
            rel = f"copy{k}/{r['path']}"
            target = root / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            if not target.exists():
                try:
                    os.link(manifest.parent / r["path"], target)
                except OSError:
                    shutil.copy2(manifest.parent / r["path"], target)
            rows.append((rel, r["speaker"], r["birthplace"], r["sex"]))
    return _write_manifest(root / "manifest.csv", rows)


def _write_manifest(path: Path, rows: list[tuple]) -> Path:
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "speaker", "birthplace", "sex"])
        writer.writerows(rows)
    return path


def run_data(manifest_path: Path, cfg: Config):
    """The corpus as training sees it (``data.load_run_data``: cache, splits, vocabularies, targets)."""
    from voxlib.data import load_run_data

    return load_run_data(replace(cfg, manifest=str(manifest_path)), progress=False)


def auto_precision(data, cfg: Config, device: torch.device) -> dict:
    """What ``precision=auto`` picks for a run of ``cfg`` on ``data``: training's own choice
    (``train.choose_precision``), measured here afresh (the bench's cache folder starts empty)."""
    from voxlib.distributed import Dist
    from voxlib.train import choose_precision

    return choose_precision(replace(cfg, precision="auto"), data, Dist(device=device))


# --- data-loader wait --------------------------------------------------------------------------
def loader_wait(data, cfg: Config, device: torch.device, precision: str, steps: int) -> dict:
    """Share of step time spent blocked in next(loader) while training's parts (``train.build_parts``:
    its loader, sampler, workers and step) train from the feature cache, each row's checksum checked
    on its first read in a worker, as in training."""
    from voxlib.distributed import Dist
    from voxlib.train import Tally, build_parts

    parts = build_parts(cfg, data, Dist(device=device), precision)
    loader = parts.train_loader
    if len(loader) == 0:
        raise ValueError(f"training split of {len(loader.dataset)} clips is smaller than one batch of {cfg.batch_size}")
    parts.model.train()
    tally = Tally(len(data.heads))
    waits, totals, epoch = [], [], 0
    while len(totals) < steps + 1:
        epoch += 1
        parts.sampler.set_epoch(epoch)
        loader.dataset.set_epoch(epoch)
        it = iter(loader)
        for i in range(len(loader)):
            if len(totals) >= steps + 1:
                break
            t0 = time.perf_counter()
            x, y, _ = next(it)
            t1 = time.perf_counter()
            parts.step(x, y, tally, measure_grad=bool(cfg.grad_log_every) and i % cfg.grad_log_every == 0)
            sync(device)
            waits.append(t1 - t0)
            totals.append(time.perf_counter() - t0)
        del it
    # the first step also starts workers and warms the model up: reported, not averaged in
    wait, total = sum(waits[1:]), sum(totals[1:])
    return {"steps": steps, "batch": parts.local_batch, "width": cfg.width, "precision": precision,
            "channels_last": parts.channels_last, "num_workers": parts.loader_args["num_workers"],
            "pin_memory": parts.loader_args["pin_memory"], "verify": data.cache.verify, "epochs": epoch,
            "steps_per_epoch": len(loader), "wait_s": wait, "step_s": total / steps, "wait_share": wait / total,
            "first_wait_s": waits[0], "clips": len(loader.dataset)}


def verification_cost(manifest, cfg: Config, repeats: int = 3) -> dict:
    """Seconds to read every row of the cache once with its checksum checked and without.

    Each round opens the cache afresh (a new process checks each row again, and training's loader
    workers are new every epoch); the two alternate and each keeps its best round.
    """
    from voxlib.features import FeatureCache

    times = {True: [], False: []}
    for _ in range(repeats):
        for verify in (True, False):
            cache = FeatureCache.build_or_open(manifest, cfg, progress=False, verify=verify)
            t0 = time.perf_counter()
            for i in range(len(cache)):
                cache.get(i)
            times[verify].append(time.perf_counter() - t0)
    checked, plain = min(times[True]), min(times[False])
    return {"rows": len(cache), "verify_s": checked, "plain_s": plain,
            "per_row_ms": max(checked - plain, 0.0) / len(cache) * 1e3, "rounds": {str(k): v for k, v in times.items()}}


# --- predict -----------------------------------------------------------------------------------
def predict_throughput(data, cfg: Config, device: torch.device, precision: str, work: Path,
                       repeats: int = 2, batch_size: int = 16) -> dict:
    """Clips/s of ``predict.Classifier.predict`` over the corpus's files: decode, checks, spectrogram,
    ``eval_crops`` crops, crop-averaged forward. The weights are untrained (speed does not depend on them)."""
    from voxlib.predict import Classifier

    torch.manual_seed(0)
    net = Discriminator(data.head_sizes, cfg.width)
    clf = Classifier(net, data.vocab, cfg, device, precision, work, {})
    paths = list(data.table["path"])
    clf.predict(paths[:2], batch_size=batch_size)  # warm-up: imports, first kernels
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        frame = clf.predict(paths, batch_size=batch_size)
        times.append(time.perf_counter() - t0)
    if len(frame) != len(paths):
        raise RuntimeError(f"predict returned {len(frame)} rows for {len(paths)} clips")
    best = min(times)
    return {"clips": len(paths), "seconds": best, "times": times, "clips_per_s": len(paths) / best,
            "audio_s": float(data.table["duration"].sum()), "precision": precision, "width": cfg.width,
            "eval_crops": cfg.eval_crops, "batch_size": batch_size}


# --- feature cache vs librosa ------------------------------------------------------------------
def librosa_features(paths: list[str], cfg: Config) -> list[np.ndarray]:
    """The plain loop the cache replaces: librosa.load + librosa.stft per file, same [0, 1] scale."""
    import librosa

    out = []
    ref = cfg.n_fft / 4  # sum of the periodic Hann window / 2: a full-scale sine reads 0 dB
    for path in paths:
        wave, _ = librosa.load(path, sr=cfg.sample_rate, mono=True)
        mag = np.abs(librosa.stft(wave, n_fft=cfg.n_fft, hop_length=cfg.hop_length, window="hann",
                                  center=True, pad_mode="reflect"))
        db = 20 * np.log10(np.maximum(mag, 1e-15) / ref)
        out.append(np.clip((db + cfg.top_db) / cfg.top_db, 0, 1).astype(np.float16))
    return out


def cache_vs_librosa(manifest, cfg: Config, repeats: int = 3) -> dict:
    """Feature-cache build time against the librosa loop on the same files, outputs compared.

    The two alternate ``repeats`` times and each keeps its best time, so a burst of load on the
    machine slows one round, not the ratio. Every cache build starts from an empty folder.
    """
    import librosa

    from voxlib.features import FeatureCache

    paths = list(manifest.table["path"])
    t0 = time.perf_counter()
    librosa_features(paths[:1], cfg)  # imports and numba JIT, outside the timed region
    librosa_warm = time.perf_counter() - t0
    librosa_times, cache_times = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        reference = librosa_features(paths, cfg)
        librosa_times.append(time.perf_counter() - t0)
        with tempfile.TemporaryDirectory(prefix="vox-bench-cache-") as tmp:
            fresh = replace(cfg, cache_dir=tmp)
            t0 = time.perf_counter()
            cache = FeatureCache.build_or_open(manifest, fresh, progress=False)
            cache_times.append(time.perf_counter() - t0)
            diff = max(float(np.abs(cache.get(i) - reference[i].astype(np.float32)).max()) for i in range(len(cache)))
            frames_equal = all(cache.get(i).shape == reference[i].shape for i in range(len(cache)))
    librosa_s, cache_s = min(librosa_times), min(cache_times)
    return {"clips": len(paths), "audio_s": float(manifest.table["duration"].sum()), "cache_s": cache_s,
            "librosa_s": librosa_s, "speedup": librosa_s / cache_s, "cache_times": cache_times,
            "librosa_times": librosa_times, "workers": cache.meta.get("build_workers"), "librosa_warmup_s": librosa_warm,
            "max_abs_diff": diff, "same_shapes": frames_equal, "librosa": librosa.__version__}


# --- peak memory -------------------------------------------------------------------------------
def memory_probe(manifest_path: str, cfg: Config, device: torch.device, steps: int, precision: str) -> dict:
    """Run in a fresh process: a short training run from the cache with training's parts; report
    this process's peak RSS."""
    import resource

    from voxlib.distributed import Dist
    from voxlib.train import Tally, build_parts

    data = run_data(Path(manifest_path), cfg)
    cache = data.cache
    with training_settings(cfg, device):
        parts = build_parts(cfg, data, Dist(device=device), precision)
        parts.model.train()
        tally, done, epoch = Tally(len(data.heads)), 0, 0
        while done < steps:
            epoch += 1
            parts.sampler.set_epoch(epoch)
            parts.train_loader.dataset.set_epoch(epoch)
            for x, y, _ in parts.train_loader:
                parts.step(x, y, tally, measure_grad=bool(cfg.grad_log_every) and done % cfg.grad_log_every == 0)
                done += 1
                if done >= steps:
                    break
        sync(device)
    status = _proc_status()
    # VmHWM is this process's own peak; ru_maxrss on Linux also carries the parent's size across exec
    peak_mb = status.get("VmHWM")
    if peak_mb is None:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peak_mb = peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, else KiB
    out = {"rows": len(cache), "steps": steps, "precision": precision, "max_rss_mb": peak_mb,
           "rss_anon_mb": status.get("RssAnon"), "rss_file_mb": status.get("RssFile")}
    if device.type == "cuda":
        out["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


def _proc_status() -> dict:
    try:
        lines = Path("/proc/self/status").read_text().splitlines()
    except OSError:
        return {}
    out = {}
    for line in lines:
        key, _, value = line.partition(":")
        if value.strip().endswith("kB"):
            out[key] = int(value.split()[0]) / 1024
    return out


def run_memory_probe(manifest: Path, cfg: Config, device: torch.device, steps: int, precision: str) -> dict:
    cmd = [sys.executable, "-m", "voxlib.bench", "--probe-memory", str(manifest), "--cache-dir", cfg.cache_dir,
           "--probe-precision", precision,
           "--device", device.type, "--steps", str(steps), "--width", repr(cfg.width),
           "--batch-size", str(cfg.batch_size), "--threads", str(cfg.threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"memory probe on {manifest} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --- the seed protocol on a GPU ----------------------------------------------------------------
def gpu_estimate(epoch_utterances: int, epochs: int, cpu_fraction: float | None) -> dict:
    """Hours for the seed protocol from its FLOP count and a stated efficiency (CPU-only run)."""
    net = Discriminator(SEED_HEADS, SEED_PRESET["width"])
    forward = count_flops(net, 1)
    work = epoch_utterances * 3 * forward * epochs
    rows = []
    for gpu, peak in GPU_BF16_PEAK.items():
        rows.append({"gpu": gpu, "bf16_peak": peak, "efficiency": ASSUMED_GPU_MFU, "basis": "assumed MFU",
                     "hours": work / (peak * ASSUMED_GPU_MFU) / 3600})
        if cpu_fraction:
            rows.append({"gpu": gpu, "bf16_peak": peak, "efficiency": cpu_fraction,
                         "basis": "this CPU's measured fraction of peak", "hours": work / (peak * cpu_fraction) / 3600})
    return {"measured": False, "forward_flops": forward, "epoch_utterances": epoch_utterances, "epochs": epochs,
            "total_flops": work, "rows": rows,
            "assumptions": (f"training step = 3x forward FLOPs; {epoch_utterances} utterances per epoch x {epochs} "
                            f"epochs; published dense bf16 peaks; efficiency = fraction of that peak reached")}


def gpu_measured(seed_rows: list[dict], epoch_utterances: int, epochs: int) -> dict:
    """Hours for the seed protocol from the samples/s measured on this GPU (batch 10 and best)."""
    rows = []
    for r in seed_rows:
        rows.append({"variant": r["variant"], "batch": r["batch"], "samples_per_s": r["samples_per_s"],
                     "hours": epoch_utterances * epochs / r["samples_per_s"] / 3600})
    return {"measured": True, "epoch_utterances": epoch_utterances, "epochs": epochs, "rows": rows,
            "assumptions": "measured synthetic training steps; data loading and evaluation not included"}


# --- accuracy parity of bf16 -------------------------------------------------------------------
PARITY_SEEDS = (0, 1, 2)


def parity(cfg: Config, seeds=PARITY_SEEDS, work: Path | None = None) -> dict:
    """Train ``cfg``'s run (the demo corpus by default) in fp32 and in bf16 for each seed; collect
    every held-out accuracy per head and the epoch time.

    The seed also draws the split, so the spread over seeds includes which utterances and speakers
    are held out; fp32 and bf16 of one seed share everything but the precision. Which precision
    trains first alternates by seed, so a drift in the machine's load favours neither.
    """
    import pandas as pd

    from voxlib.evaluate import accuracy_table, load_run
    from voxlib.train import train

    runs = []
    with contextlib.ExitStack() as stack:
        work = work or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="vox-parity-")))
        for i, seed in enumerate(seeds):
            for p in PRECISIONS if i % 2 == 0 else PRECISIONS[::-1]:
                run_dir = work / f"seed{seed}-{p}"
                t0 = time.perf_counter()
                train(replace(cfg, seed=seed, precision=p, run_dir=str(run_dir)))
                wall = time.perf_counter() - t0
                metrics = pd.read_csv(run_dir / "metrics.csv")
                epoch_s = metrics[(metrics["metric"] == "seconds")]["value"]
                table = accuracy_table(load_run(run_dir))
                runs.append({"seed": seed, "precision": p, "wall_s": wall, "epoch_s": float(epoch_s.median()),
                             "accuracy": {f"{r.split}/{r.head}": float(r.accuracy) for r in table.itertuples()},
                             "n": {f"{r.split}/{r.head}": int(r.n) for r in table.itertuples()}})
                print(f"parity: seed {seed} {p}: {wall:.0f} s, {runs[-1]['epoch_s']:.1f} s/epoch", flush=True)
    return {"seeds": list(seeds), "settings": {k: getattr(cfg, k) for k in
                                               ("width", "batch_size", "epochs", "lr", "channels_last", "manifest")},
            "runs": runs, "summary": parity_summary(runs)}


def parity_summary(runs: list[dict]) -> dict:
    """Per split/head: both precisions' accuracy per seed, their means, and the seed spread.

    bf16 costs accuracy beyond the seed spread when its mean is below fp32's by more than the
    larger max-min range over seeds of the two precisions (how far seeds alone move the result).
    """
    keys = list(dict.fromkeys(k for r in runs for k in r["accuracy"]))
    seeds = sorted({r["seed"] for r in runs})
    acc = {(r["seed"], r["precision"]): r["accuracy"] for r in runs}
    heads = {}
    for key in keys:
        values = {p: [acc[(s, p)].get(key, float("nan")) for s in seeds] for p in PRECISIONS}
        spread = max(max(v) - min(v) for v in values.values())
        mean = {p: float(np.mean(v)) for p, v in values.items()}
        drop = mean["fp32"] - mean["bf16"]
        heads[key] = {"values": values, "mean": mean, "spread": spread, "bf16_drop": drop,
                      "max_paired_diff": max(abs(a - b) for a, b in zip(values["fp32"], values["bf16"])),
                      "beyond_spread": bool(drop > spread + 1e-12)}
    # the median run: one run slowed by a neighbour's load must not decide the speed-up
    epoch = {p: float(np.median([r["epoch_s"] for r in runs if r["precision"] == p])) for p in PRECISIONS}
    return {"heads": heads, "epoch_s": epoch, "epoch_speedup_bf16": epoch["fp32"] / epoch["bf16"],
            "bf16_costs_accuracy": any(h["beyond_spread"] for h in heads.values())}


def format_parity(result: dict) -> str:
    s = result["summary"]
    seeds = ", ".join(map(str, result["seeds"]))
    lines = [f"accuracy parity, fp32 vs bf16 autocast, seeds {seeds} ({result['settings']}):",
             f"{'split/head':<24} {'fp32 per seed':<20} {'bf16 per seed':<20} {'fp32 mean':>9} {'bf16 mean':>9} "
             f"{'spread':>6} {'bf16 drop':>9}"]
    for key, h in s["heads"].items():
        per = lambda p: " ".join(f"{v:.3f}" for v in h["values"][p])
        lines.append(f"{key:<24} {per('fp32'):<20} {per('bf16'):<20} {h['mean']['fp32']:>9.3f} {h['mean']['bf16']:>9.3f} "
                     f"{h['spread']:>6.3f} {h['bf16_drop']:>+9.3f}" + ("  BEYOND SPREAD" if h["beyond_spread"] else ""))
    lines.append(f"epoch time (median run): fp32 {s['epoch_s']['fp32']:.1f} s, bf16 {s['epoch_s']['bf16']:.1f} s "
                 f"({s['epoch_speedup_bf16']:.2f}x)")
    lines.append("bf16 costs accuracy beyond the seed spread: " + ("YES (auto must not pick bf16)"
                                                                if s["bf16_costs_accuracy"] else "no"))
    return "\n".join(lines)


# --- the run -----------------------------------------------------------------------------------
class Bench:
    """One bench run: measures in order, prints a line per measurement, collects the JSON record."""

    def __init__(self, plan: Plan, cfg: Config, device: torch.device, epoch_utterances: int, work: Path):
        self.plan, self.cfg, self.device, self.work = plan, cfg, device, work
        self.epoch_utterances = epoch_utterances
        self.t0 = time.perf_counter()
        self.record: dict = {"created": time.strftime("%Y-%m-%dT%H:%M:%S"), "plan": _plain(asdict(plan)),
                             "machine": machine_info(device)}

    def say(self, text: str) -> None:
        print(f"[{time.perf_counter() - self.t0:6.0f} s] {text}", flush=True)

    def run(self) -> dict:
        self.record["machine"]["load_before"] = _load()
        with training_settings(self.cfg, self.device):
            self.record["machine"]["threads"] = torch.get_num_threads()
            first = self.ceilings("before training", {d: self.ceiling_kernels() for d in DTYPES})
            self.record["training"] = self.training()
            # a burst of load during the first pass must not lower the ceiling: its best kernels again
            again = {d: [(k["library"], k["shape"]) for k in sorted(
                (k for k in first[d]["kernels"] if k["flops"]), key=lambda k: -k["flops"])[:CEILING_RETIMED]]
                for d in DTYPES}
            second = self.ceilings("after training", again)
        self.record["ceiling"] = {d: merge_passes([first[d], second[d]]) for d in DTYPES}
        if self.device.type == "cpu":
            self.record["theoretical"] = theoretical_peak(self.record["machine"]["threads"])
        self.add_ratios()
        self.data_sections()
        self.record["gpu"] = self.gpu()
        self.record["seconds"] = time.perf_counter() - self.t0
        self.record["machine"]["load_after"] = _load()
        return self.record

    def ceiling_kernels(self) -> list[tuple[str, tuple]]:
        """Every library on the squares and on the GEMM shapes of each model's layers (at its first batch)."""
        shapes = [(n, n, n) for n in self.plan.gemm_squares]
        for model, (width, heads) in self.plan.models.items():
            shapes += layer_gemm_shapes(width, heads, self.plan.batches[model][0])
        return [(lib, shape) for shape in dict.fromkeys(shapes) for lib in GEMM_LIBRARIES]

    def ceilings(self, when: str, kernels: dict[str, list]) -> dict:
        out = {}
        for name, kinds in kernels.items():
            out[name] = gemm_ceiling(DTYPES[name], kinds, self.plan.gemm_repeats, self.device)
            c = out[name]
            self.say(f"GEMM ceiling {name} ({when}, {len(kinds)} kernels): {c['flops'] / 1e9:.1f} GFLOP/s "
                     f"({c['library']}, {'x'.join(map(str, c['shape']))})")
        return out

    def measure(self, model: str, batch: int, variant: Variant) -> dict:
        width, heads = self.plan.models[model]
        try:
            r = time_training(width, heads, batch, variant, self.device, self.plan.warmup, self.plan.steps,
                              self.plan.min_time_s, self.cfg)
        except RuntimeError as err:  # out of memory at a large batch, or compile unavailable
            self.say(f"{model} batch {batch} {variant.name}: failed ({str(err).splitlines()[0][:120]})")
            return {"model": model, "width": width, "variant": variant.name, "batch": batch, "error": str(err)[:500]}
        r = {"model": model, "width": width, **r}
        extra = f", compile {r['compile_s']:.0f} s" if "compile_s" in r else ""
        self.say(f"{model} (width {width}) batch {batch} {variant.name}: {r['samples_per_s']:.2f} samples/s, "
                 f"{r['flops_per_s'] / 1e9:.1f} GFLOP/s{extra}")
        return r

    def training(self) -> list[dict]:
        rows = []
        for model in self.plan.models:
            batches = self.plan.batches[model]
            at10 = [self.measure(model, batches[0], v) for v in EAGER_VARIANTS]
            rows += at10
            fastest = max((r for r in at10 if "error" not in r), key=lambda r: r["samples_per_s"])
            base = next(v for v in EAGER_VARIANTS if v.name == fastest["variant"])
            search = [fastest] + [self.measure(model, b, base) for b in batches[1:]]
            rows += search[1:]
            best = max((r for r in search if "error" not in r), key=lambda r: r["samples_per_s"])
            if best["batch"] != batches[0]:
                rows += [self.measure(model, best["batch"], v) for v in EAGER_VARIANTS if v is not base]
            if model in self.plan.compile_models:
                ok = [r for r in rows if r["model"] == model and r["batch"] == best["batch"] and "error" not in r]
                top = max(ok, key=lambda r: r["samples_per_s"])
                base = next(v for v in EAGER_VARIANTS if v.name == top["variant"])
                rows.append(self.measure(model, best["batch"],
                                         replace(base, name=f"compile+{base.name}", compile=True)))
            torch._dynamo.reset()  # compiled graphs of this model are not reused: free them
        return rows

    def add_ratios(self) -> None:
        """Each row against the ceiling of the dtype its GEMMs run in; auto's pick; the targets."""
        ceiling = {d: c["flops"] for d, c in self.record["ceiling"].items()}
        rows = [r for r in self.record["training"] if "error" not in r]
        for r in rows:
            r["of_ceiling"] = r["flops_per_s"] / ceiling[r["dtype"]]
        # a step faster than every GEMM measured means a faster kernel exists: say so, never clip
        self.record["ceiling_incomplete"] = [
            {k: r[k] for k in ("model", "batch", "variant", "dtype", "flops_per_s", "of_ceiling")}
            for r in rows if r["of_ceiling"] > 1]
        auto = auto_choices(rows, self.cfg.channels_last)
        for r in rows:
            r["auto"] = auto.get((r["model"], r["batch"])) == r["dtype"]
        self.record["auto"] = [{"model": m, "batch": b, "precision": p, "speedup": auto_speedup(rows, m, b,
                                self.cfg.channels_last)} for (m, b), p in auto.items()]
        best = {}
        for model in self.plan.models:
            ok = [r for r in rows if r["model"] == model]
            if not ok:
                continue
            plain = next((r for r in ok if r["batch"] == self.plan.batches[model][0] and r["variant"] == "fp32"), None)
            for label, pool in (("best", ok), ("best_auto", [r for r in ok if r["auto"]])):
                if pool:
                    top = max(pool, key=lambda r: r["samples_per_s"])
                    best.setdefault(model, {})[label] = {
                        k: top[k] for k in ("variant", "dtype", "batch", "samples_per_s", "flops_per_s", "of_ceiling")}
                    best[model][label]["speedup_vs_plain"] = top["samples_per_s"] / plain["samples_per_s"] if plain else None
        self.record["best"] = best
        targets = self.record.setdefault("targets", {})
        for model, target, key in (("seed", TARGET_SEED_OF_CEILING, "seed_of_ceiling"),
                                   ("cpu_default", TARGET_CPU_DEFAULT_OF_CEILING, "cpu_default_of_ceiling")):
            top = best.get(model, {}).get("best_auto")
            if top:
                targets[key] = {"value": top["of_ceiling"], "target": target, "met": top["of_ceiling"] >= target}
        top = best.get("seed", {}).get("best_auto")
        if top and top["speedup_vs_plain"] is not None:
            native = self.record.get("theoretical", {}).get("bf16", {}).get("flop_per_cycle") is not None
            targets["seed_speedup_vs_plain"] = {
                "value": top["speedup_vs_plain"], "target": TARGET_SPEEDUP_NATIVE_BF16, "applies": native,
                "met": top["speedup_vs_plain"] >= TARGET_SPEEDUP_NATIVE_BF16 if native else None}

    def data_sections(self) -> None:
        plan, corpus = self.plan, self.work / "corpus"
        cfg = replace(self.cfg, cache_dir=str(self.work / "cache"))
        self.say(f"writing a generated corpus ({plan.corpus})")
        one = write_corpus(corpus / "x1", **plan.corpus, sr=cfg.sample_rate)
        four = repeat_corpus(one, 4, corpus / "x4")
        # both caches are built here, so the loader and memory probes below measure training only
        small, large = run_data(one, cfg), run_data(four, cfg)
        with training_settings(cfg, self.device):
            choice = auto_precision(large, cfg, self.device)
            precision = choice["precision"]
            self.record["auto_run"] = choice
            speeds = choice.get("samples_per_s") or {}
            self.say(f"precision=auto for a run of width {cfg.width}, batch {cfg.batch_size} on the generated corpus: "
                     f"{precision} ({choice['how']}" + (f"; fp32 {speeds['fp32']:.1f}, bf16 {speeds['bf16']:.1f} samples/s"
                                                         if speeds else "") + ")")
            loader = loader_wait(large, cfg, self.device, precision, plan.loader_steps)
            verify = verification_cost(large.manifest, cfg)
            predict = predict_throughput(small, cfg, self.device, precision, self.work)
        verify["share_of_step"] = verify["per_row_ms"] / 1e3 * loader["batch"] / loader["step_s"]
        self.record.update(loader=loader, verification=verify, predict=predict)
        self.record.setdefault("targets", {})["loader_wait_share"] = {
            "value": loader["wait_share"], "target": TARGET_LOADER_WAIT, "met": loader["wait_share"] <= TARGET_LOADER_WAIT}
        self.say(f"data-loader wait: {100 * loader['wait_share']:.2f} % of step time ({precision}, "
                 f"{loader['num_workers']} workers, batch {loader['batch']}, {loader['step_s']:.3f} s/step)")
        self.say(f"cache verification: {verify['per_row_ms']:.3f} ms per row ({100 * verify['share_of_step']:.2f} % "
                 f"of a step's time, in the loader worker)")
        self.say(f"predict: {predict['clips_per_s']:.1f} clips/s ({predict['clips']} clips, {precision})")
        if plan.librosa:
            from voxlib.corpora.manifest import read_manifest

            many = repeat_corpus(one, plan.cache_copies, corpus / f"x{plan.cache_copies}")
            feats = cache_vs_librosa(read_manifest(many, sample_rate=cfg.sample_rate, n_fft=cfg.n_fft,
                                                   progress=False, cache_dir=cfg.cache_dir), cfg)
            self.record["features"] = feats
            self.record["targets"]["cache_speedup"] = {
                "value": feats["speedup"], "target": TARGET_CACHE_SPEEDUP, "met": feats["speedup"] >= TARGET_CACHE_SPEEDUP}
            self.say(f"feature cache: {feats['cache_s']:.2f} s vs librosa loop {feats['librosa_s']:.2f} s for "
                     f"{feats['clips']} clips = {feats['speedup']:.1f}x (max |diff| {feats['max_abs_diff']:.4f})")
        memory = {}
        for name, manifest in (("1x", one), ("4x", four)):
            memory[name] = run_memory_probe(manifest, cfg, self.device, plan.memory_steps, precision)
            self.say(f"peak memory, {name} corpus ({memory[name]['rows']} clips): "
                     f"{memory[name]['max_rss_mb']:.0f} MB RSS")
        memory["ratio_4x_1x"] = memory["4x"]["max_rss_mb"] / memory["1x"]["max_rss_mb"]
        self.record["memory"] = memory

    def gpu(self) -> dict:
        epochs = SEED_PRESET["epochs"]
        if self.device.type == "cuda":
            seed = [r for r in self.record["training"] if r["model"] == "seed" and "error" not in r]
            return gpu_measured(seed, self.epoch_utterances, epochs)
        best = self.record.get("best", {}).get("seed", {}).get("best_auto")
        return gpu_estimate(self.epoch_utterances, epochs, best["of_ceiling"] if best else None)


def _load() -> float | None:
    """1-minute load average: other processes on the cores show up here, and in every timing."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def _plain(value):
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


# --- the printed table -------------------------------------------------------------------------
def _met(t: dict) -> str:
    if t.get("met") is None:
        return "does not apply (no native bf16)"
    return "met" if t["met"] else "NOT met"


def _gflops(x) -> str:
    return f"{x / 1e9:.0f}" if x else "-"


def ceiling_lines(record: dict) -> list[str]:
    lines = []
    for d, c in record["ceiling"].items():
        per_library = {}
        for p in c["passes"]:
            for k in p["kernels"]:
                if k["flops"]:
                    per_library[k["library"]] = max(per_library.get(k["library"], 0), k["flops"])
        passes = " / ".join(_gflops(p["flops"]) for p in c["passes"])
        lines.append(f"GEMM ceiling {d}: {c['flops'] / 1e9:.0f} GFLOP/s ({c['library']}, "
                     f"{'x'.join(map(str, c['shape']))}; passes before/after training {passes}; best per library: "
                     + ", ".join(f"{lib} {_gflops(f)}" for lib, f in per_library.items()) + ")")
    th = record.get("theoretical")
    if th:
        clock = f"{th['clock_hz'] / 1e9:.2f} GHz ({th['clock_source']})" if th["clock_hz"] else "clock not reported"
        parts = []
        for d in ("fp32", "bf16"):
            t = th[d]
            if t["flops"]:
                measured = record["ceiling"][d]["flops"]
                if measured > t["flops"]:  # the cores ran above the reported clock
                    note = (f"the measured ceiling is above it: {measured / (th['cores'] * t['flop_per_cycle']) / 1e9:.2f}"
                            f" GHz or more, so the clock reported is not the one the cores ran at")
                else:
                    note = f"the measured ceiling is {100 * measured / t['flops']:.0f} % of it"
                parts.append(f"{d} {t['flops'] / 1e9:.0f} GFLOP/s ({t['flop_per_cycle']} FLOP/cycle/core, {t['basis']}; "
                             f"{note})")
            else:
                parts.append(f"{d} not reported ({t['basis'] if t['flop_per_cycle'] is None else clock})")
        lines.append(f"theoretical peak, {th['cores']} cores x {clock} x FLOP/cycle: " + "; ".join(parts))
    for r in record.get("ceiling_incomplete", []):
        lines.append(f"CEILING INCOMPLETE: {r['model']} batch {r['batch']} {r['variant']} ran at "
                     f"{r['flops_per_s'] / 1e9:.0f} GFLOP/s, {100 * r['of_ceiling']:.0f} % of the {r['dtype']} ceiling: "
                     f"a faster GEMM kernel exists that the ceiling does not measure")
    return lines


def format_table(record: dict) -> str:
    lines = []
    m = record["machine"]
    lines.append(f"machine: {m['cpu']}, {m['threads']} threads, torch {m['torch']}, device {m['device']}"
                 + (f" ({m['gpu']})" if "gpu" in m else ""))
    if m.get("load_before") is not None:
        lines.append(f"load average (1 min) before/after: {m['load_before']:.1f} / {m.get('load_after') or 0:.1f} "
                     f"on {m['cores']} cores (other processes slow every measurement; compare runs at low load)")
    lines += ceiling_lines(record)
    lines.append("")
    lines.append(f"{'model':<12} {'width':>5} {'batch':>5} {'variant':<26} {'dtype':>5} {'samples/s':>9} "
                 f"{'GFLOP/s':>8} {'of ceiling':>10} {'auto':>4} {'compile s':>9}")
    for r in record["training"]:
        if "error" in r:
            lines.append(f"{r['model']:<12} {r['width']:>5} {r['batch']:>5} {r['variant']:<26} failed")
            continue
        comp = f"{r['compile_s']:.0f}" if "compile_s" in r else "-"
        lines.append(f"{r['model']:<12} {r['width']:>5} {r['batch']:>5} {r['variant']:<26} {r['dtype']:>5} "
                     f"{r['samples_per_s']:>9.2f} {r['flops_per_s'] / 1e9:>8.1f} {100 * r['of_ceiling']:>8.0f} % "
                     f"{'<-' if r['auto'] else '':>4} {comp:>9}")
    lines.append("(of ceiling: against the GEMM ceiling of the row's dtype; auto <-: the precision precision=auto "
                 "picks at that batch)")
    lines.append("")
    for a in record.get("auto", []):
        lines.append(f"precision=auto, {a['model']} at batch {a['batch']}: {a['precision']} "
                     f"(bf16 {a['speedup']:.2f}x fp32; bf16 needs >= {MARGIN:.2f}x)")
    for model, b in record.get("best", {}).items():
        for label in ("best", "best_auto"):
            if label in b:
                x = b[label]
                lines.append(f"best {model}{' in the auto precision' if label == 'best_auto' else ''}: "
                             f"{x['variant']} at batch {x['batch']}: {x['samples_per_s']:.2f} samples/s, "
                             f"{100 * x['of_ceiling']:.0f} % of the {x['dtype']} ceiling"
                             + (f", {x['speedup_vs_plain']:.2f}x fp32 NCHW at batch {record['plan']['batches'][model][0]}"
                                if x["speedup_vs_plain"] else ""))
    targets = record.get("targets", {})
    for key, what in (("seed_of_ceiling", "seed width"), ("cpu_default_of_ceiling", "CPU default width")):
        if key in targets:
            t = targets[key]
            lines.append(f"target: {what} >= {100 * t['target']:.0f} % of the ceiling (auto's precision): "
                         f"{100 * t['value']:.0f} % -> {_met(t)}")
    if "seed_speedup_vs_plain" in targets:
        t = targets["seed_speedup_vs_plain"]
        lines.append(f"target: seed width best (auto's precision) >= {t['target']:.1f}x the seed's loop (fp32, NCHW, "
                     f"batch 10) on a CPU with native bf16: {t['value']:.2f}x -> {_met(t)}")
    if "loader" in record:
        ld = record["loader"]
        lines.append(f"data-loader wait: {100 * ld['wait_share']:.2f} % of step time (training's loader and step, "
                     f"width {ld['width']}, batch {ld['batch']}, {ld['precision']}, channels_last={ld['channels_last']}, "
                     f"{ld['num_workers']} workers, cache rows checksum-verified={ld['verify']}, {ld['step_s']:.3f} s/step) "
                     f"-> {'met' if targets['loader_wait_share']['met'] else 'NOT met'} (target <= 5 %)")
    if "verification" in record:
        v = record["verification"]
        lines.append(f"feature-cache verification: {v['per_row_ms']:.3f} ms per row read ({v['rows']} rows: "
                     f"{v['verify_s']:.3f} s checked vs {v['plain_s']:.3f} s unchecked) = "
                     f"{100 * v['share_of_step']:.2f} % of a training step's time, paid in the loader worker")
    if "predict" in record:
        pr = record["predict"]
        lines.append(f"predict (predict.Classifier): {pr['clips_per_s']:.1f} clips/s ({pr['clips']} clips, "
                     f"{pr['audio_s'] / pr['clips']:.1f} s each, {pr['eval_crops']} crops, batch {pr['batch_size']}, "
                     f"{pr['precision']}, width {pr['width']}; decode and spectrogram included)")
    if "auto_run" in record:
        a = record["auto_run"]
        sp = a.get("samples_per_s") or {}
        lines.append(f"precision=auto as training resolves it (train.choose_precision, width {record['loader']['width']},"
                     f" batch {record['loader']['batch']}): {a['precision']} ({a['how']}"
                     + (f"; fp32 {sp['fp32']:.1f}, bf16 {sp['bf16']:.1f} samples/s, {sp['bf16'] / sp['fp32']:.2f}x"
                        if sp else "") + ")")
    if "features" in record:
        fe = record["features"]
        lines.append(f"feature cache build ({fe['workers']} workers): {fe['cache_s']:.2f} s vs librosa.load+stft loop "
                     f"{fe['librosa_s']:.2f} s on {fe['clips']} clips ({fe['audio_s']:.0f} s of audio), best of "
                     f"{len(fe['cache_times'])} alternating rounds: {fe['speedup']:.2f}x faster "
                     f"-> {'met' if targets['cache_speedup']['met'] else 'NOT met'} (target >= 3x; "
                     f"max |difference| {fe['max_abs_diff']:.4f})")
    if "memory" in record:
        mem = record["memory"]
        cuda = lambda k: f", CUDA {mem[k]['cuda_max_allocated_mb']:.0f} MB" if "cuda_max_allocated_mb" in mem[k] else ""
        lines.append(f"peak memory of a {mem['1x']['steps']}-step training run: 1x corpus ({mem['1x']['rows']} clips) "
                     f"{mem['1x']['max_rss_mb']:.0f} MB RSS{cuda('1x')}; 4x corpus ({mem['4x']['rows']} clips) "
                     f"{mem['4x']['max_rss_mb']:.0f} MB{cuda('4x')}; ratio {mem['ratio_4x_1x']:.3f}")
    g = record.get("gpu")
    if g:
        if g["measured"]:
            for r in g["rows"]:
                lines.append(f"seed protocol on this GPU ({g['epoch_utterances']} utterances x {g['epochs']} epochs): "
                             f"{r['hours']:.1f} h at batch {r['batch']} {r['variant']} (measured)")
        else:
            lines.append(f"seed protocol GPU estimate ({g['forward_flops'] / 1e9:.2f} GFLOP forward per utterance, "
                         f"{g['epoch_utterances']} utterances x {g['epochs']} epochs = {g['total_flops'] / 1e15:.0f} "
                         f"PFLOP; {g['assumptions']}):")
            for r in g["rows"]:
                lines.append(f"  {r['gpu']:<9} at {100 * r['efficiency']:.0f} % of {r['bf16_peak'] / 1e12:.0f} "
                             f"TFLOP/s ({r['basis']}): {r['hours']:.1f} h")
    return "\n".join(lines)


# --- command line ------------------------------------------------------------------------------
BENCH_FIELDS = ("device", "threads", "width", "batch_size", "epochs")  # Config fields the measurements follow


def parser() -> argparse.ArgumentParser:
    from voxlib.cli import make_parser

    def own(p: argparse.ArgumentParser) -> None:
        p.add_argument("--quick", action="store_true", help="fewer repeats and sizes: about 3-4 minutes on 2 CPU cores")
        p.add_argument("--out", default="", help="folder for <timestamp>.json (default OUTPUTS/bench)")
        p.add_argument("--epoch-utterances", type=int, default=DEFAULT_EPOCH_UTTERANCES,
                       help="utterances per epoch for the seed protocol's wall-time estimate")
        p.add_argument("--parity", action="store_true",
                       help="instead: train the demo corpus in fp32 and bf16 over seeds 0, 1, 2 and compare accuracies")
        p.add_argument("--probe-memory", default="", help=argparse.SUPPRESS)
        p.add_argument("--cache-dir", dest="cache_dir", default=None, help=argparse.SUPPRESS)
        p.add_argument("--steps", type=int, default=4, help=argparse.SUPPRESS)
        p.add_argument("--probe-precision", default="fp32", choices=PRECISIONS, help=argparse.SUPPRESS)

    return make_parser("python -m voxlib.bench", "Measure vox training speed on this machine (see docs/benchmark.md).",
                       config_fields=BENCH_FIELDS, extra=own)


def main(argv: list[str] | None = None) -> int:
    from voxlib.cli import parse
    from voxlib.train import pick_device

    args, cfg = parse(parser(), argv)
    device = pick_device(cfg.device)
    if args.probe_memory:
        print(json.dumps(memory_probe(args.probe_memory, cfg, device, args.steps, args.probe_precision)))
        return 0
    if args.parity:
        result = parity(cfg)
        out = Path(args.out) if args.out else outputs_dir() / "bench"
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"parity-{time.strftime('%Y%m%d-%H%M%S')}.json"
        path.write_text(json.dumps(_plain(result), indent=1))
        print(format_parity(result))
        print(f"\nwritten {path}")
        return 0
    plan = Plan.quick(cfg) if args.quick else Plan.full(cfg)
    run_bench(plan, cfg, device, args.epoch_utterances, Path(args.out) if args.out else None, quick=args.quick)
    return 0


def run_bench(plan: Plan, cfg: Config, device: torch.device, epoch_utterances: int = DEFAULT_EPOCH_UTTERANCES,
              out: Path | None = None, quick: bool = False) -> Path:
    """Measure everything in ``plan``, print the table, write ``<out>/<timestamp>.json``; return its path."""
    out = out or outputs_dir() / "bench"
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="vox-bench-") as tmp:
        record = Bench(plan, cfg, device, epoch_utterances, Path(tmp)).run()
    record["quick"] = quick
    path = out / f"{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(record, indent=1))
    print()
    print(format_table(record))
    print(f"\nwritten {path}")
    return path


if __name__ == "__main__":
    from voxlib.cli import run_command

    sys.exit(run_command(main))
