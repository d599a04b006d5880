"""How fast does vox train on this machine, and how far is that from what the machine can do?

Usage::

    python -m voxlib.bench --quick                  # make bench: about 10 minutes on a 2-core CPU
    python -m voxlib.bench                          # more repeats, batch sizes, compile, bf16 accuracy
    python -m voxlib.bench --device cuda --epoch-utterances 20000

One run measures, side by side on the same machine: its own matmul peak (fp32, bf16); training
throughput of the seed width and the CPU default width in fp32, bf16 autocast, channels_last and
torch.compile at batch 10 and at the best batch found; the data-loader wait from the feature cache;
the feature-cache build against a plain librosa loop; peak memory of short training runs on a corpus
and on the same corpus repeated 4x; and the seed protocol's wall time on a GPU (estimated from FLOPs
on a CPU, measured on CUDA). It prints a table and writes ``outputs/bench/<timestamp>.json``.

Why ratios: on a shared machine absolute samples/s move with the neighbours' load, and so does the
matmul peak measured in the same run, so achieved/peak stays meaningful. Every time is the best of
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
from voxlib.model import Discriminator, count_flops

# The 2019 experiment's heads (CSJ): 1421 speakers, 53 birthplaces, 2 sexes.
SEED_HEADS = {"speaker": 1421, "birthplace": 53, "sex": 2}
# Published dense bf16 tensor-core peaks (no sparsity), FLOP/s, for the GPU estimate.
GPU_BF16_PEAK = {"H100 SXM": 989e12, "A100": 312e12}
ASSUMED_GPU_MFU = 0.2  # conservative: batch 10 of a small conv net rarely fills a large GPU
DEFAULT_EPOCH_UTTERANCES = 10_000  # CSJ-like order of magnitude; pass --epoch-utterances for yours
TARGET_OF_FP32_PEAK = 0.70  # seed width, best batch and variant
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
    """Sizes and repeats of one bench run; ``quick()`` fits 10 minutes on a 2-core CPU."""

    peak_sizes: tuple[int, ...] = (1024, 2048, 4096)
    peak_repeats: int = 10
    models: dict = field(default_factory=dict)  # name -> (width, head_sizes)
    batches: dict = field(default_factory=dict)  # name -> batch sizes searched (the first is batch 10)
    warmup: int = 2
    steps: int = 5  # timed steps per measurement (the best one counts)
    compile_models: tuple[str, ...] = ("seed", "cpu_default")
    corpus: dict = field(default_factory=lambda: dict(birthplaces=4, speakers=6, utterances=10, seconds=3.0))
    loader_steps: int = 30
    memory_steps: int = 8
    accuracy_epochs: int = 0  # > 0: train the generated corpus in fp32 and bf16 and compare
    librosa: bool = True
    cache_copies: int = 10  # the corpus listed this many times for cache vs librosa (fixed costs amortised)

    @classmethod
    def full(cls, cfg: Config) -> "Plan":
        return cls(models=default_models(cfg), batches={"seed": (10, 16, 32, 64), "cpu_default": (10, 32, 64, 128)},
                   accuracy_epochs=12)

    @classmethod
    def quick(cls, cfg: Config) -> "Plan":
        return cls(peak_sizes=(1024, 2048, 4096), peak_repeats=4, models=default_models(cfg),
                   batches={"seed": (10, 32), "cpu_default": (10, 32, 64)}, warmup=1, steps=3,
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


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: torch.device) -> dict:
    info = {"cpu": cpu_name(), "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "device": str(device)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


# --- matmul peak -------------------------------------------------------------------------------
def matmul_peak(dtype: torch.dtype, sizes, repeats: int, device: torch.device) -> dict:
    """Best FLOP/s of square GEMMs: the ceiling a convolution net's FLOP/s is compared with."""
    by_size = {}
    gen = torch.Generator().manual_seed(0)
    for n in sizes:
        a = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
        b = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
        torch.mm(a, b)
        sync(device)
        best = math.inf
        for _ in range(repeats):
            t0 = time.perf_counter()
            torch.mm(a, b)
            sync(device)
            best = min(best, time.perf_counter() - t0)
        by_size[n] = 2 * n**3 / best
        del a, b
    return {"by_size": by_size, "flops": max(by_size.values())}


# --- training steps ----------------------------------------------------------------------------
class TrainStep:
    """One training step as train.py takes it: forward (autocast for bf16), per-head cross-entropy,
    backward, RMSprop update, on synthetic input in [0, 1] with the model in train mode."""

    def __init__(self, width: float, head_sizes: dict[str, int], variant: Variant, device: torch.device,
                 batch: int, seed: int = 0, lr: float = 1e-5):
        torch.manual_seed(seed)
        self.variant, self.device = variant, device
        self.net = Discriminator(head_sizes, width).to(device)
        if variant.channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
        self.net.train()
        if variant.compile:  # the trunk, as train.py compiles it
            self.net.trunk = torch.compile(self.net.trunk)
        self.optimizer = torch.optim.RMSprop(self.net.parameters(), lr=lr)
        self.flops = count_flops(self.net, batch, training=True)
        gen = torch.Generator().manual_seed(seed)
        self.x = torch.rand(batch, 1, 256, 256, generator=gen)
        self.y = {h: torch.randint(0, n, (batch,), generator=gen) for h, n in head_sizes.items()}
        self.x, self.y = self.to_device(self.x, self.y)

    def to_device(self, x: torch.Tensor, y: dict) -> tuple[torch.Tensor, dict]:
        x = x.to(self.device, non_blocking=True)
        if self.variant.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, {h: t.to(self.device, non_blocking=True) for h, t in y.items()}

    def autocast(self):
        if self.variant.bf16:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def __call__(self, x: torch.Tensor | None = None, y: dict | None = None) -> float:
        x, y = (self.x, self.y) if x is None else (x, y)
        with self.autocast():
            logits = self.net(x)
        loss = sum(F.cross_entropy(logits[h].float(), y[h]) for h in y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss


def time_training(width: float, head_sizes: dict, batch: int, variant: Variant, device: torch.device,
                  warmup: int, steps: int) -> dict:
    """Samples/s of the best of ``steps`` timed steps after ``warmup`` (compile time reported apart)."""
    step = TrainStep(width, head_sizes, variant, device, batch)
    first = None
    for i in range(warmup):
        t0 = time.perf_counter()
        step()
        sync(device)
        if i == 0:
            first = time.perf_counter() - t0
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t0)
    best = min(times)
    result = {"variant": variant.name, "batch": batch, "step_s": best, "median_step_s": float(np.median(times)),
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


def open_corpus(manifest_path: Path, cfg: Config):
    """(manifest, feature cache, targets per head over all rows, head sizes)."""
    from voxlib.corpora.manifest import read_manifest
    from voxlib.features import FeatureCache

    manifest = read_manifest(manifest_path, sample_rate=cfg.sample_rate, n_fft=cfg.n_fft, progress=False,
                             cache_dir=cfg.cache_dir)
    cache = FeatureCache.build_or_open(manifest, cfg, progress=False)
    targets, sizes = {}, {}
    for head in cfg.head_names():
        codes, classes = np.unique(manifest.table[head].astype(str), return_inverse=True)
        targets[head], sizes[head] = classes.astype(np.int64), len(codes)
    return manifest, cache, targets, sizes


def train_loader(cache, targets: dict, cfg: Config, device: torch.device, seed: int = 0):
    """The training DataLoader as train.py builds it for one process on ``device``."""
    from torch.utils.data import DataLoader

    from voxlib.data import CropDataset

    rows = np.arange(len(cache))
    data = CropDataset(cache, rows, targets, cfg.n_frames, train=True, seed=seed)
    workers, pin = loader_settings(cfg, device)
    gen = torch.Generator().manual_seed(seed)
    loader = DataLoader(data, batch_size=cfg.batch_size, shuffle=True, drop_last=True, generator=gen,
                        num_workers=workers, pin_memory=pin, persistent_workers=False)
    return data, loader


def loader_settings(cfg: Config, device: torch.device) -> tuple[int, bool]:
    """(workers, pin_memory) that train.py uses for ``cfg`` on ``device`` in a single process."""
    from voxlib.train import loader_settings as train_loader_settings

    return train_loader_settings(cfg, device, world=1)


def training_variant(cfg: Config, device: torch.device) -> Variant:
    """The variant train.py runs for ``cfg`` on ``device``."""
    from voxlib.train import uses_bf16, uses_channels_last

    return Variant("train.py default", bf16=uses_bf16(cfg, device), channels_last=uses_channels_last(cfg, device),
                   compile=cfg.compile)


# --- data-loader wait --------------------------------------------------------------------------
def loader_wait(cache, targets: dict, head_sizes: dict, cfg: Config, device: torch.device, steps: int) -> dict:
    """Share of step time spent blocked in next(loader) while training from the feature cache."""
    variant = training_variant(cfg, device)
    step = TrainStep(cfg.width, head_sizes, variant, device, cfg.batch_size, seed=cfg.seed)
    data, loader = train_loader(cache, targets, cfg, device, seed=cfg.seed)
    if len(loader) == 0:
        raise ValueError(f"corpus of {len(data)} clips is smaller than one batch of {cfg.batch_size}")
    waits, totals, epoch = [], [], 0
    while len(totals) < steps + 1:
        data.set_epoch(epoch)
        it = iter(loader)
        while len(totals) < steps + 1:
            t0 = time.perf_counter()
            try:
                x, y, _ = next(it)
            except StopIteration:
                break
            t1 = time.perf_counter()
            step(*step.to_device(x, y))
            sync(device)
            waits.append(t1 - t0)
            totals.append(time.perf_counter() - t0)
        epoch += 1
    # the first step also starts workers and warms the model up: reported, not averaged in
    wait, total = sum(waits[1:]), sum(totals[1:])
    workers, pin = loader_settings(cfg, device)
    return {"steps": steps, "batch": cfg.batch_size, "width": cfg.width, "variant": variant.name,
            "bf16": variant.bf16, "channels_last": variant.channels_last, "num_workers": workers,
            "pin_memory": pin, "wait_s": wait, "step_s": total / steps, "wait_share": wait / total,
            "first_wait_s": waits[0], "clips": len(data)}


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
def memory_probe(manifest_path: str, cfg: Config, device: torch.device, steps: int) -> dict:
    """Run in a fresh process: a short training run from the cache; report this process's peak RSS."""
    import resource

    _, cache, targets, sizes = open_corpus(Path(manifest_path), cfg)
    variant = training_variant(cfg, device)
    with training_settings(cfg, device):
        step = TrainStep(cfg.width, sizes, variant, device, cfg.batch_size, seed=cfg.seed)
        data, loader = train_loader(cache, targets, cfg, device, seed=cfg.seed)
        done = 0
        while done < steps:
            for x, y, _ in loader:
                step(*step.to_device(x, y))
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
    out = {"rows": len(cache), "steps": steps, "max_rss_mb": peak_mb,
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


def run_memory_probe(manifest: Path, cfg: Config, device: torch.device, steps: int) -> dict:
    cmd = [sys.executable, "-m", "voxlib.bench", "--probe-memory", str(manifest), "--cache-dir", cfg.cache_dir,
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


# --- bf16 accuracy -----------------------------------------------------------------------------
def precision_accuracy(manifest: Path, cfg: Config, epochs: int, work: Path) -> dict:
    """Train the same generated corpus in fp32 and in bf16 autocast; compare held-out accuracies."""
    import pandas as pd

    from voxlib.train import train

    out = {}
    for precision in ("fp32", "bf16"):
        run = replace(cfg, manifest=str(manifest), precision=precision, epochs=epochs,
                      run_dir=str(work / f"run-{precision}"))
        t0 = time.perf_counter()
        run_dir = train(run)
        seconds = time.perf_counter() - t0
        metrics = pd.read_csv(run_dir / "metrics.csv")
        last = metrics[(metrics["epoch"] == epochs) & (metrics["metric"] == "acc")]
        out[precision] = {"seconds": seconds, **{f"{r.split}/{r.head}": float(r.value) for r in last.itertuples()}}
    return out


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
            peaks = [self.peaks("before")]
            self.record["training"] = self.training()
            peaks.append(self.peaks("after"))
        self.record["peak"] = {d: {"flops": max(p[d]["flops"] for p in peaks), "passes": [p[d] for p in peaks]}
                               for d in ("fp32", "bf16")}
        self.add_ratios()
        self.data_sections()
        self.record["gpu"] = self.gpu()
        self.record["seconds"] = time.perf_counter() - self.t0
        self.record["machine"]["load_after"] = _load()
        return self.record

    def peaks(self, when: str) -> dict:
        out = {}
        for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            out[name] = matmul_peak(dtype, self.plan.peak_sizes, self.plan.peak_repeats, self.device)
            self.say(f"matmul peak {name} ({when}): {out[name]['flops'] / 1e9:.1f} GFLOP/s")
        return out

    def measure(self, model: str, batch: int, variant: Variant) -> dict:
        width, heads = self.plan.models[model]
        try:
            r = time_training(width, heads, batch, variant, self.device, self.plan.warmup, self.plan.steps)
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
        fp32, bf16 = self.record["peak"]["fp32"]["flops"], self.record["peak"]["bf16"]["flops"]
        for r in self.record["training"]:
            if "error" in r:
                continue
            r["of_fp32_peak"] = r["flops_per_s"] / fp32
            r["of_bf16_peak"] = r["flops_per_s"] / bf16 if "bf16" in r["variant"] else None
        best = {}
        for model in self.plan.models:
            ok = [r for r in self.record["training"] if r["model"] == model and "error" not in r]
            if ok:
                top = max(ok, key=lambda r: r["samples_per_s"])
                at10 = [r for r in ok if r["batch"] == self.plan.batches[model][0]]
                fp32_10 = next((r for r in at10 if r["variant"] == "fp32"), None)
                best[model] = {"variant": top["variant"], "batch": top["batch"], "samples_per_s": top["samples_per_s"],
                               "of_fp32_peak": top["of_fp32_peak"], "of_bf16_peak": top["of_bf16_peak"],
                               "speedup_vs_fp32_batch10": top["samples_per_s"] / fp32_10["samples_per_s"]
                               if fp32_10 else None}
        self.record["best"] = best
        seed = best.get("seed")
        if seed:
            self.record["targets"] = {"seed_of_fp32_peak": {
                "value": seed["of_fp32_peak"], "target": TARGET_OF_FP32_PEAK,
                "met": seed["of_fp32_peak"] >= TARGET_OF_FP32_PEAK}}

    def data_sections(self) -> None:
        plan, corpus = self.plan, self.work / "corpus"
        cfg = replace(self.cfg, cache_dir=str(self.work / "cache"))
        self.say(f"writing a generated corpus ({plan.corpus})")
        one = write_corpus(corpus / "x1", **plan.corpus, sr=cfg.sample_rate)
        four = repeat_corpus(one, 4, corpus / "x4")
        _, cache, targets, sizes = open_corpus(one, cfg)
        with training_settings(cfg, self.device):
            loader = loader_wait(cache, targets, sizes, cfg, self.device, plan.loader_steps)
        self.record["loader"] = loader
        self.record.setdefault("targets", {})["loader_wait_share"] = {
            "value": loader["wait_share"], "target": TARGET_LOADER_WAIT, "met": loader["wait_share"] <= TARGET_LOADER_WAIT}
        self.say(f"data-loader wait: {100 * loader['wait_share']:.2f} % of step time "
                 f"({loader['num_workers']} workers, batch {loader['batch']}, {loader['step_s']:.3f} s/step)")
        open_corpus(four, cfg)  # builds its cache here, so the memory probe below measures training only
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
            memory[name] = run_memory_probe(manifest, cfg, self.device, plan.memory_steps)
            self.say(f"peak memory, {name} corpus ({memory[name]['rows']} clips): "
                     f"{memory[name]['max_rss_mb']:.0f} MB RSS")
        memory["ratio_4x_1x"] = memory["4x"]["max_rss_mb"] / memory["1x"]["max_rss_mb"]
        self.record["memory"] = memory
        if plan.accuracy_epochs:
            acc_cfg = replace(cfg, batch_size=min(cfg.batch_size, 16), num_workers=0)
            self.record["bf16_accuracy"] = precision_accuracy(one, acc_cfg, plan.accuracy_epochs, self.work)
            self.say(f"bf16 vs fp32 accuracy: {self.record['bf16_accuracy']}")

    def gpu(self) -> dict:
        epochs = SEED_PRESET["epochs"]
        if self.device.type == "cuda":
            seed = [r for r in self.record["training"] if r["model"] == "seed" and "error" not in r]
            return gpu_measured(seed, self.epoch_utterances, epochs)
        best = self.record.get("best", {}).get("seed")
        frac = None
        if best:
            frac = best["of_bf16_peak"] or best["of_fp32_peak"]
        return gpu_estimate(self.epoch_utterances, epochs, frac)


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
def format_table(record: dict) -> str:
    lines = []
    m = record["machine"]
    lines.append(f"machine: {m['cpu']}, {m['threads']} threads, torch {m['torch']}, device {m['device']}"
                 + (f" ({m['gpu']})" if "gpu" in m else ""))
    if m.get("load_before") is not None:
        lines.append(f"load average (1 min) before/after: {m['load_before']:.1f} / {m.get('load_after') or 0:.1f} "
                     f"on {m['cores']} cores (other processes slow every measurement; compare runs at low load)")
    p = record["peak"]
    passes = lambda d: " / ".join(f"{x['flops'] / 1e9:.0f}" for x in p[d]["passes"])
    lines.append(f"matmul peak: fp32 {p['fp32']['flops'] / 1e9:.1f} GFLOP/s, bf16 {p['bf16']['flops'] / 1e9:.1f} "
                 f"GFLOP/s (best of passes before/after training: fp32 {passes('fp32')}, bf16 {passes('bf16')})")
    lines.append("")
    lines.append(f"{'model':<12} {'width':>5} {'batch':>5} {'variant':<26} {'samples/s':>9} {'GFLOP/s':>8} "
                 f"{'of fp32 peak':>12} {'of bf16 peak':>12} {'compile s':>9}")
    for r in record["training"]:
        if "error" in r:
            lines.append(f"{r['model']:<12} {r['width']:>5} {r['batch']:>5} {r['variant']:<26} failed")
            continue
        bf = f"{100 * r['of_bf16_peak']:.0f} %" if r.get("of_bf16_peak") is not None else "-"
        comp = f"{r['compile_s']:.0f}" if "compile_s" in r else "-"
        lines.append(f"{r['model']:<12} {r['width']:>5} {r['batch']:>5} {r['variant']:<26} "
                     f"{r['samples_per_s']:>9.2f} {r['flops_per_s'] / 1e9:>8.1f} {100 * r['of_fp32_peak']:>10.0f} % "
                     f"{bf:>12} {comp:>9}")
    lines.append("")
    for model, b in record.get("best", {}).items():
        lines.append(f"best {model}: {b['variant']} at batch {b['batch']}: {b['samples_per_s']:.2f} samples/s, "
                     f"{100 * b['of_fp32_peak']:.0f} % of fp32 peak"
                     + (f", {100 * b['of_bf16_peak']:.0f} % of bf16 peak" if b["of_bf16_peak"] else "")
                     + (f", {b['speedup_vs_fp32_batch10']:.2f}x fp32 at batch 10" if b["speedup_vs_fp32_batch10"] else ""))
    targets = record.get("targets", {})
    if "seed_of_fp32_peak" in targets:
        t = targets["seed_of_fp32_peak"]
        lines.append(f"target: seed width >= {100 * t['target']:.0f} % of the fp32 matmul peak: "
                     f"{100 * t['value']:.0f} % -> {'met' if t['met'] else 'NOT met'}")
    if "loader" in record:
        ld = record["loader"]
        lines.append(f"data-loader wait: {100 * ld['wait_share']:.2f} % of step time (width {ld['width']}, batch "
                     f"{ld['batch']}, {ld['variant']}: bf16={ld['bf16']}, channels_last={ld['channels_last']}, "
                     f"{ld['num_workers']} workers, {ld['step_s']:.3f} s/step) -> "
                     f"{'met' if targets['loader_wait_share']['met'] else 'NOT met'} (target <= 5 %)")
    if "features" in record:
        fe = record["features"]
        lines.append(f"feature cache build ({fe['workers']} workers): {fe['cache_s']:.2f} s vs librosa.load+stft loop "
                     f"{fe['librosa_s']:.2f} s on {fe['clips']} clips ({fe['audio_s']:.0f} s of audio), best of "
                     f"{len(fe['cache_times'])} alternating rounds: {fe['speedup']:.1f}x faster "
                     f"-> {'met' if targets['cache_speedup']['met'] else 'NOT met'} (target >= 3x; "
                     f"max |difference| {fe['max_abs_diff']:.4f})")
    if "memory" in record:
        mem = record["memory"]
        cuda = lambda k: f", CUDA {mem[k]['cuda_max_allocated_mb']:.0f} MB" if "cuda_max_allocated_mb" in mem[k] else ""
        lines.append(f"peak memory of a {mem['1x']['steps']}-step training run: 1x corpus ({mem['1x']['rows']} clips) "
                     f"{mem['1x']['max_rss_mb']:.0f} MB RSS{cuda('1x')}; 4x corpus ({mem['4x']['rows']} clips) "
                     f"{mem['4x']['max_rss_mb']:.0f} MB{cuda('4x')}; ratio {mem['ratio_4x_1x']:.3f}")
    if "bf16_accuracy" in record:
        acc = record["bf16_accuracy"]
        keys = [k for k in acc["fp32"] if k != "seconds"]
        lines.append("accuracy after the same epochs, fp32 vs bf16: " + ", ".join(
            f"{k} {acc['fp32'][k]:.2f}/{acc['bf16'].get(k, float('nan')):.2f}" for k in keys))
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
BENCH_FIELDS = ("device", "threads", "width", "batch_size")  # Config fields the measurements follow


def parser() -> argparse.ArgumentParser:
    from voxlib.cli import make_parser

    def own(p: argparse.ArgumentParser) -> None:
        p.add_argument("--quick", action="store_true", help="fewer repeats and sizes: about 10 minutes on 2 CPU cores")
        p.add_argument("--out", default="", help="folder for <timestamp>.json (default OUTPUTS/bench)")
        p.add_argument("--epoch-utterances", type=int, default=DEFAULT_EPOCH_UTTERANCES,
                       help="utterances per epoch for the seed protocol's wall-time estimate")
        p.add_argument("--probe-memory", default="", help=argparse.SUPPRESS)
        p.add_argument("--cache-dir", dest="cache_dir", default=None, help=argparse.SUPPRESS)
        p.add_argument("--steps", type=int, default=4, help=argparse.SUPPRESS)

    return make_parser("python -m voxlib.bench", "Measure vox training speed on this machine (see docs/benchmark.md).",
                       config_fields=BENCH_FIELDS, extra=own)


def main(argv: list[str] | None = None) -> int:
    from voxlib.cli import parse
    from voxlib.train import pick_device

    args, cfg = parse(parser(), argv)
    device = pick_device(cfg.device)
    if args.probe_memory:
        print(json.dumps(memory_probe(args.probe_memory, cfg, device, args.steps)))
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
