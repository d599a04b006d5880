"""The ceiling a training step is held to: the best dense GEMM FLOP/s any of torch's kernel libraries
reaches for a dtype (on squares and on the GEMM shapes of the model's layers), and the theoretical
peak (cores x clock x FLOP/cycle) where the CPU reports what it needs.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from voxlib.bench.steps import sync
from voxlib.config import usable_cores
from voxlib.model import INPUT_SIZE, trunk_channels
from voxlib.precision import cpu_model_and_flags


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
# a warm-up call this long is timed no further (one-time costs are then a small part of it); emulated
# bf16 GEMMs of the 4096 square took 7 s a call, and 90 kernels x 4 calls took 4 minutes
GEMM_SLOW_S = 2.0
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
    t0 = time.perf_counter()
    run()
    sync(device)
    warmup_s = time.perf_counter() - t0
    if warmup_s > GEMM_SLOW_S:  # a slow kernel (bf16 without native support): its one call is its number
        return 2 * m * n * k / warmup_s
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


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def merge_passes(passes: list[dict]) -> dict:
    """The ceiling of one dtype over its passes: the best kernel of any pass."""
    top = max(passes, key=lambda p: p["flops"])
    return {"flops": top["flops"], "library": top["library"], "shape": top["shape"], "passes": passes}
