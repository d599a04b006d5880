"""``precision="auto"``: fp32 or bf16 autocast, whichever trains this model faster on this machine.

No fixed rule is right on every CPU: without AMX, oneDNN's bf16 GEMMs run at about half the fp32
rate and bf16 training was 0.65x fp32; with AMX (or a Zen 5 core) it was 1.7-3x faster; without any
bf16 instructions (Zen 3) 0.04x. So on CPU ``auto`` times the run's own training step in both
precisions; on CUDA it is bf16 without measuring, on MPS fp32. Accuracy parity of bf16 was measured
separately (``python -m voxlib.bench --parity``, docs/benchmark.md).

A shared machine is noisy, and one burst of load during a single timed step once flipped the choice
for a 30-minute run. So the two precisions alternate over several rounds (fp32 first in one round,
bf16 first in the next), each round gives its own bf16/fp32 speed ratio, and the choice needs the
median ratio beyond ``MARGIN`` with two thirds of the rounds on the same side of 1. A measurement that does not
clear that bar is within noise, and the precision the CPU runs natively wins (bf16 where it has
AMX or AVX512-BF16 instructions, else fp32). The load average before and after is recorded beside
the rounds in the run's config.json.

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
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import filelock
import torch

from voxlib.config import Config, outputs_dir, usable_cores
from voxlib.data import RunData
from voxlib.distributed import Dist
from voxlib.record import rng_state, set_rng_state
from voxlib.step import batch_plan, make_loss, synthetic_step

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "bf16")
MARGIN = 1.1  # bf16 must be this much faster (median over rounds); a smaller gain is within noise here
CACHE_FILE = "precision.json"
CACHE_VERSION = 2  # 2: per-round ratios, load and the native-precision rule
WARMUP_STEPS = 1
TIMED_ROUNDS = 5  # fp32 and bf16 alternate, each round in the other order: a burst of load slows one round
DECIDED = 3.0  # after a round in which one precision is this much slower, the rounds stop
AGREE = 2 / 3  # share of rounds that must lie on the winner's side of 1
NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16", "bf16")  # x86 /proc/cpuinfo flags; "bf16" on aarch64


@dataclass
class PrecisionChoice:
    """What ``auto`` (or the config) settled on, and the evidence; training writes it to the run folder."""

    precision: str  # "fp32" or "bf16"
    how: str  # "asked" (set explicitly), "device" (CUDA/MPS rule), "measured" or "cached"
    samples_per_s: dict[str, float] = field(default_factory=dict)  # per precision (median round); empty unless measured
    key: str = ""  # hash of key_fields; the entry in precision.json
    key_fields: dict = field(default_factory=dict)
    margin: float = MARGIN
    measure_s: float = 0.0  # wall time the measurement took (0 when cached)
    rounds: list[float] = field(default_factory=list)  # bf16/fp32 speed ratio of each timed round
    reason: str = ""  # why this precision: "faster" or "within noise: ..."
    load: dict = field(default_factory=dict)  # 1-minute load average before and after, usable cores

    @property
    def speedup(self) -> float | None:
        """bf16 samples/s over fp32 samples/s, when both were measured."""
        s = self.samples_per_s
        return s["bf16"] / s["fp32"] if s.get("fp32") and s.get("bf16") else None

    def as_dict(self) -> dict:
        return {**asdict(self), "speedup": self.speedup}


def native_bf16() -> bool:
    """Whether this CPU computes in bf16 in hardware (AMX, AVX512-BF16, Arm's BF16 extension)."""
    _, flags = cpu_model_and_flags()
    return any(flag in flags for flag in NATIVE_BF16_FLAGS)


def decide(ratios: list[float], native: bool, margin: float = MARGIN) -> tuple[str, str]:
    """(precision, reason) from each round's bf16/fp32 speed ratio.

    A side wins when the median ratio is beyond ``margin`` and at least ``AGREE`` of the rounds lie on
    its side of 1, so one round slowed by a burst of load can neither win nor veto. Anything less is
    noise, and the CPU's native precision (``native``: it has bf16 instructions) is kept.
    """
    median = statistics.median(ratios)
    above = sum(r > 1 for r in ratios) / len(ratios)
    if median >= margin and above >= AGREE:
        return "bf16", "faster"
    if median <= 1 / margin and 1 - above >= AGREE:
        return "fp32", "faster"
    kept = "bf16" if native else "fp32"
    return kept, (f"within noise (bf16/fp32 {median:.2f}x, rounds {min(ratios):.2f}-{max(ratios):.2f}x): "
                  f"{kept}, the CPU's native precision")


def choose(samples_per_s: dict[str, float], margin: float = MARGIN, native: bool = False) -> str:
    """The rule of :func:`decide` for one pair of speeds (the benchmark's best rows)."""
    return decide([samples_per_s["bf16"] / samples_per_s["fp32"]], native, margin)[0]


def choose_for_run(cfg: Config, data: RunData, env: Dist) -> dict:
    """A new run's precision as a plain record (config.json): on CPU ``auto`` times this run's own
    training step (step.synthetic_step at the run's batch plan) in fp32 and bf16."""
    if env.active and cfg.precision == "auto" and env.device.type == "cpu":
        # every process must train in one precision: no per-rank measurement under torchrun on CPU
        return {"precision": "fp32", "how": "device (torchrun on CPU: not measured)"}
    local_batch = batch_plan(cfg, len(data.rows("train")), env.world).local_batch
    alone = Dist(device=env.device)

    def make_step(precision: str) -> Callable[[], None]:
        loss, head_weight = make_loss(cfg, data, alone)
        _, step = synthetic_step(cfg, data.head_sizes, alone, precision, local_batch, loss, head_weight)
        return lambda: step(bool(cfg.grad_log_every))

    shape = {"width": cfg.width, "heads": data.head_sizes, "batch": local_batch, "channels_last": cfg.channels_last,
             "compile": cfg.compile}
    return resolve_precision(cfg, env.device, make_step, shape).as_dict()


def resolve_precision(cfg: Config, device: torch.device, make_step: Callable[[str], Callable[[], None]],
                      shape_key: dict, cache_path: Path | None = None) -> PrecisionChoice:
    """The precision the run trains in.

    ``make_step("fp32" | "bf16")`` returns a closure that takes one full training step (with the
    host syncs training pays) on throwaway copies of the model and optimizer; it is only called
    when the CPU decision is not cached. ``shape_key`` names what the speed depends on besides the
    machine: width, head sizes, batch (per process, which converts steps to samples/s) and channels_last.
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
                               cached.get("margin", MARGIN), rounds=list(cached.get("rounds", [])),
                               reason=cached.get("reason", ""), load=dict(cached.get("load", {})))
    load_before = _load_average()
    t0 = time.perf_counter()
    times = measure(make_step)
    seconds = time.perf_counter() - t0
    ratios = [f / b for f, b in zip(times["fp32"], times["bf16"])]
    precision, reason = decide(ratios, native_bf16())
    speeds = {p: shape_key["batch"] / statistics.median(times[p]) for p in PRECISIONS}
    load = {"before": load_before, "after": _load_average(), "cores": usable_cores()}
    choice = PrecisionChoice(precision, "measured", speeds, key, fields, MARGIN, seconds, ratios, reason, load)
    log.info("precision auto: fp32 %.1f, bf16 %.1f samples/s (%.2fx over %d rounds, load %s -> %s on %d cores) "
             "-> %s (%s); cached in %s", speeds["fp32"], speeds["bf16"], choice.speedup, len(ratios),
             load["before"], load["after"], load["cores"], precision, reason, path)
    store(path, key, {"precision": precision, "samples_per_s": speeds, "margin": MARGIN, "rounds": ratios,
                      "reason": reason, "load": load, "fields": fields,
                      "measured": time.strftime("%Y-%m-%dT%H:%M:%S")})
    return choice


def measure(make_step: Callable[[str], Callable[[], None]], rounds: int = TIMED_ROUNDS) -> dict[str, list[float]]:
    """Seconds per step of each precision in each round: warm-up, then rounds that alternate which
    precision goes first (so a slow drift in load weighs on both alike).

    Every RNG is restored afterwards, so the run that follows draws the same numbers as without it.
    """
    state = rng_state()
    try:
        steps = {p: make_step(p) for p in PRECISIONS}
        for step in steps.values():
            for _ in range(WARMUP_STEPS):
                step()
        times: dict[str, list[float]] = {p: [] for p in PRECISIONS}
        for i in range(rounds):
            for p in PRECISIONS if i % 2 == 0 else PRECISIONS[::-1]:
                t0 = time.perf_counter()
                steps[p]()
                times[p].append(time.perf_counter() - t0)
            best = [min(times[p]) for p in PRECISIONS]
            if max(best) > DECIDED * min(best):
                break  # no later round can change the choice (bf16 emulated in software: 40x slower)
        del steps
    finally:
        set_rng_state(state)
    return times


def _load_average() -> float | None:
    """The 1-minute load average (None where the platform has none)."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


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
    if isinstance(data, dict) and isinstance(data.get("version"), int) and 0 < data["version"] < CACHE_VERSION:
        log.info("precision cache %s holds decisions of an earlier rule; measuring again", path)
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


def _plain(value):
    """JSON-stable form of a key value (dicts sorted, tuples as lists)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in sorted(value.items())}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
