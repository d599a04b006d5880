"""What surrounds the step: precision=auto as training resolves it, the data-loader wait, the
feature-cache checksum cost, predict throughput, the cache build against a librosa loop, and
peak memory of a short training run (in a fresh process).
"""
from __future__ import annotations

import json
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from voxlib.bench.corpus import run_data
from voxlib.bench.steps import sync
from voxlib.config import Config
from voxlib.distributed import Dist, speed_settings
from voxlib.features import FeatureCache
from voxlib.model import Discriminator
from voxlib.precision import choose_for_run
from voxlib.predict import Classifier
from voxlib.step import Tally, build_parts


def auto_precision(data, cfg: Config, device: torch.device) -> dict:
    """What ``precision=auto`` picks for a run of ``cfg`` on ``data``: training's own choice
    (``precision.choose_for_run``), measured here afresh (the bench's cache folder starts empty)."""
    return choose_for_run(replace(cfg, precision="auto"), data, Dist(device=device))


# --- data-loader wait --------------------------------------------------------------------------
def loader_wait(data, cfg: Config, device: torch.device, precision: str, steps: int) -> dict:
    """Share of step time spent blocked in next(loader) while training's parts (``step.build_parts``:
    its loader, sampler, workers and step) train from the feature cache, each row's checksum checked
    on its first read in a worker, as in training."""
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
    return {"steps": steps, "batch": parts.plan.local_batch, "width": cfg.width, "precision": precision,
            "channels_last": parts.channels_last, "num_workers": parts.loader_args["num_workers"],
            "pin_memory": parts.loader_args["pin_memory"], "verify": data.cache.verify, "epochs": epoch,
            "steps_per_epoch": len(loader), "wait_s": wait, "step_s": total / steps, "wait_share": wait / total,
            "first_wait_s": waits[0], "clips": len(loader.dataset)}


def verification_cost(manifest, cfg: Config, repeats: int = 3) -> dict:
    """Seconds to read every row of the cache once with its checksum checked and without.

    Each round opens the cache afresh (a new process checks each row again, and training's loader
    workers are new every epoch); the two alternate and each keeps its best round.
    """
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
    import librosa  # deferred: its first import and numba JIT cost ~28 s, and only this comparison needs it

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
    import librosa  # deferred: its first import and numba JIT cost ~28 s, and only this comparison needs it

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
    data = run_data(Path(manifest_path), cfg)
    cache = data.cache
    with speed_settings(cfg, device):
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
