"""``precision="auto"``: fp32 or bf16 autocast, whichever trains this model faster on this machine.

No fixed rule is right on every CPU: without AMX, oneDNN's bf16 GEMMs run at about half the fp32
rate and bf16 training was 0.65x fp32; with AMX (or a Zen 5 core) it was 1.7-3x faster. So on CPU
``auto`` times a few steps of the run's own training step in both precisions and takes bf16 only
when it is clearly faster (``MARGIN``); on CUDA it is bf16 without measuring, on MPS fp32. Accuracy
parity of bf16 was measured separately (``python -m voxlib.bench --parity``, docs/benchmark.md).

The decision is kept in ``<cache root>/precision.json``, keyed by the CPU (model name and a hash of
its flags), torch version, thread count, device, and the model's shape and batch, so only the first
run of a kind pays for the measurement. The measurement must not change the run: the step closures
work on throwaway copies of the model and optimizer, and every RNG (torch, CUDA, numpy, Python) is
put back as it was, so a run with ``auto`` ends bit-identical to one given the chosen precision.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import random
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import filelock
import numpy as np
import torch

from voxlib.config import Config, outputs_dir

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "bf16")
MARGIN = 1.1  # bf16 must be this much faster; a smaller gain is within run-to-run noise here
CACHE_FILE = "precision.json"
CACHE_VERSION = 1
WARMUP_STEPS = 1
TIMED_ROUNDS = 3  # fp32 and bf16 steps alternate, best of each: a burst of load slows one round, not the choice
DECIDED = 3.0  # after a round in which one precision is this much slower, the rounds stop


@dataclass
class PrecisionChoice:
    """What ``auto`` (or the config) settled on, and the evidence; training writes it to the run folder."""

    precision: str  # "fp32" or "bf16"
    how: str  # "asked" (set explicitly), "device" (CUDA/MPS rule), "measured" or "cached"
    samples_per_s: dict[str, float] = field(default_factory=dict)  # per precision; empty unless measured
    key: str = ""  # hash of key_fields; the entry in precision.json
    key_fields: dict = field(default_factory=dict)
    margin: float = MARGIN
    measure_s: float = 0.0  # wall time the measurement took (0 when cached)

    @property
    def speedup(self) -> float | None:
        """bf16 samples/s over fp32 samples/s, when both were measured."""
        s = self.samples_per_s
        return s["bf16"] / s["fp32"] if s.get("fp32") and s.get("bf16") else None

    def as_dict(self) -> dict:
        return {**asdict(self), "speedup": self.speedup}


def choose(samples_per_s: dict[str, float], margin: float = MARGIN) -> str:
    """bf16 when it is at least ``margin`` times as fast as fp32, else fp32 (the safer default)."""
    return "bf16" if samples_per_s["bf16"] >= margin * samples_per_s["fp32"] else "fp32"


def resolve_precision(cfg: Config, device: torch.device, make_step: Callable[[str], Callable[[], None]],
                      shape_key: dict, cache_path: Path | None = None) -> PrecisionChoice:
    """The precision the run trains in.

    ``make_step("fp32" | "bf16")`` returns a closure that takes one full training step (with the
    host syncs training pays) on throwaway copies of the model and optimizer; it is only called
    when the CPU decision is not cached. ``shape_key`` names what the speed depends on besides the
    machine: at least width, head sizes, batch (per process) and channels_last.
    """
    if cfg.precision in PRECISIONS:
        return PrecisionChoice(cfg.precision, "asked")
    if device.type == "cuda":
        return PrecisionChoice("bf16", "device")  # tensor cores; bf16 needs no loss scaling
    if device.type != "cpu":
        return PrecisionChoice("fp32", "device")  # MPS autocast to bf16 is not worth it on today's chips
    fields = {**machine_key(device), **{k: _plain(v) for k, v in sorted(shape_key.items())}}
    key = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]
    path = cache_path or default_cache_path(cfg)
    cached = read_cache(path).get(key)
    if cached and cached.get("precision") in PRECISIONS:
        return PrecisionChoice(cached["precision"], "cached", dict(cached.get("samples_per_s", {})), key, fields,
                               cached.get("margin", MARGIN))
    batch = int(shape_key.get("batch", cfg.batch_size))
    t0 = time.perf_counter()
    speeds = measure(make_step, batch)
    choice = PrecisionChoice(choose(speeds), "measured", speeds, key, fields, MARGIN, time.perf_counter() - t0)
    log.info("precision auto: fp32 %.1f, bf16 %.1f samples/s (%.2fx) -> %s; cached in %s", speeds["fp32"],
             speeds["bf16"], choice.speedup, choice.precision, path)
    store(path, key, {"precision": choice.precision, "samples_per_s": speeds, "margin": MARGIN,
                      "fields": fields, "measured": time.strftime("%Y-%m-%dT%H:%M:%S")})
    return choice


def measure(make_step: Callable[[str], Callable[[], None]], batch: int, rounds: int = TIMED_ROUNDS) -> dict:
    """Samples/s of each precision's step: warm-up, then alternating timed rounds, best of each.

    Every RNG is restored afterwards, so the run that follows draws the same numbers as without it.
    """
    state = rng_state()
    try:
        steps = {p: make_step(p) for p in PRECISIONS}
        for step in steps.values():
            for _ in range(WARMUP_STEPS):
                step()
        best = {p: float("inf") for p in PRECISIONS}
        for _ in range(rounds):
            for p, step in steps.items():
                t0 = time.perf_counter()
                step()
                best[p] = min(best[p], time.perf_counter() - t0)
            if max(best.values()) > DECIDED * min(best.values()):
                break  # no later round can change the choice (bf16 emulated in software: 40x slower)
        del steps
    finally:
        set_rng_state(state)
    return {p: batch / best[p] for p in PRECISIONS}


# --- the machine and the cache -----------------------------------------------------------------
def machine_key(device: torch.device) -> dict:
    """What the fp32/bf16 speed ratio depends on besides the model: CPU, its features, torch, threads."""
    model, flags = cpu_model_and_flags()
    return {"cpu": model, "cpu_flags": hashlib.sha256(" ".join(sorted(flags)).encode()).hexdigest()[:16],
            "torch": torch.__version__, "threads": torch.get_num_threads(), "device": device.type}


def cpu_model_and_flags() -> tuple[str, list[str]]:
    """(model name, feature flags) from /proc/cpuinfo; elsewhere the platform's processor string."""
    model, flags = "", []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            name, _, value = line.partition(":")
            name = name.strip()
            if name == "model name" and not model:
                model = value.strip()
            elif name in ("flags", "Features") and not flags:
                flags = value.split()
    except OSError:
        pass
    return model or platform.processor() or platform.machine(), flags


def default_cache_path(cfg: Config) -> Path:
    return Path(cfg.cache_dir or outputs_dir() / "cache") / CACHE_FILE


def read_cache(path: Path) -> dict:
    """The stored decisions; an unreadable or corrupt file counts as empty (it is rewritten on store)."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as err:
        log.warning("ignoring unreadable precision cache %s (%s); it will be rewritten", path, err)
        return {}
    if not isinstance(data, dict) or data.get("version") != CACHE_VERSION or not isinstance(data.get("decisions"), dict):
        log.warning("ignoring precision cache %s of an unknown layout; it will be rewritten", path)
        return {}
    return data["decisions"]


def store(path: Path, key: str, entry: dict) -> None:
    """Add one decision; read-modify-write under a file lock, replaced atomically (readers never see half)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with filelock.FileLock(f"{path}.lock", timeout=60):
        decisions = read_cache(path)
        decisions[key] = entry
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        try:
            with os.fdopen(fd, "w") as fh:
                json.dump({"version": CACHE_VERSION, "decisions": decisions}, fh, indent=1)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


# --- RNG state ---------------------------------------------------------------------------------
def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


def _plain(value):
    """JSON-stable form of a key value (dicts sorted, tuples as lists)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in sorted(value.items())}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
