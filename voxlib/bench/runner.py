"""One bench run: the plan of what to measure, the measurements in order, the JSON record, the command line."""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from voxlib.bench.ceiling import (CEILING_RETIMED, DTYPES, GEMM_LIBRARIES, gemm_ceiling, layer_gemm_shapes,
                                  merge_passes, theoretical_peak)
from voxlib.bench.corpus import repeat_corpus, run_data, write_corpus
from voxlib.bench.parity import format_parity, parity
from voxlib.bench.pipeline import (auto_precision, cache_vs_librosa, loader_wait, memory_probe, predict_throughput,
                                   run_memory_probe, verification_cost)
from voxlib.bench.steps import EAGER_VARIANTS, SLOW_FACTOR, Variant, auto_choices, auto_speedup, time_training
from voxlib.bench.table import format_table
from voxlib.cli import make_parser, parse
from voxlib.config import SEED_PRESET, Config, outputs_dir
from voxlib.corpora.manifest import read_manifest
from voxlib.distributed import pick_device, speed_settings
from voxlib.model import Discriminator, count_flops
from voxlib.precision import PRECISIONS, cpu_model_and_flags

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

@dataclass
class Plan:
    """Sizes and repeats of one bench run; ``quick()`` takes 2-9 minutes on a 2-core CPU (docs/benchmark.md)."""

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


def machine_info(device: torch.device) -> dict:
    info = {"cpu": cpu_model_and_flags()[0], "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "device": str(device)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


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
        with speed_settings(self.cfg, self.device):
            self.record["machine"]["threads"] = torch.get_num_threads()
            first = self.ceilings("before training", {d: self.ceiling_kernels() for d in DTYPES})
            self.record["training"] = self.training({d: c["flops"] for d, c in first.items()})
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

    def measure(self, model: str, batch: int, variant: Variant, fastest_s: float | None = None) -> dict:
        """One row; ``fastest_s`` (the fastest step so far at this model and batch) bounds a slow variant."""
        width, heads = self.plan.models[model]
        try:
            r = time_training(width, heads, batch, variant, self.device, self.plan.warmup, self.plan.steps,
                              self.plan.min_time_s, self.cfg,
                              slow_after_s=SLOW_FACTOR * fastest_s if fastest_s else None)
        except RuntimeError as err:  # out of memory at a large batch, or compile unavailable
            self.say(f"{model} batch {batch} {variant.name}: failed ({str(err).splitlines()[0][:120]})")
            return {"model": model, "width": width, "variant": variant.name, "batch": batch, "error": str(err)[:500]}
        r = {"model": model, "width": width, **r}
        extra = f", compile {r['compile_s']:.0f} s" if "compile_s" in r else ""
        if r.get("rough"):
            extra += f" (one step: over {SLOW_FACTOR:.0f}x the fastest, not repeated)"
        self.say(f"{model} (width {width}) batch {batch} {variant.name}: {r['samples_per_s']:.2f} samples/s, "
                 f"{r['flops_per_s'] / 1e9:.1f} GFLOP/s{extra}")
        return r

    def measure_all(self, model: str, batch: int, variants, rows: list[dict], ceiling: dict[str, float],
                    not_again: dict[str, str] | None = None) -> list[dict]:
        """Each variant at one batch, the fastest step so far bounding the slow ones.

        A variant is not timed, and its row says why, when it cannot be the fastest: it is in
        ``not_again`` (over SLOW_FACTOR slower at the first batch), or its dtype's GEMM ceiling (first
        pass) is below the FLOP/s another variant already reached at this model and batch (bf16
        emulated in software: a 22 GFLOP/s ceiling against fp32 steps at 95, and 95 s for one
        seed-width step).
        """
        out = []
        for variant in variants:
            done = [r for r in rows + out if r["model"] == model and r["batch"] == batch
                    and "step_s" in r and not r.get("rough")]
            dtype = "bf16" if variant.bf16 else "fp32"
            top = max(done, key=lambda r: r["flops_per_s"], default=None)  # same model: the fastest step
            reason = (not_again or {}).get(variant.name)
            if reason is None and top is not None and dtype in ceiling and ceiling[dtype] < top["flops_per_s"]:
                reason = (f"its {dtype} GEMM ceiling {ceiling[dtype] / 1e9:.1f} GFLOP/s is below the "
                          f"{top['flops_per_s'] / 1e9:.1f} {top['variant']} reached")
            if reason is None:
                out.append(self.measure(model, batch, variant, top["step_s"] if top else None))
                continue
            out.append({"model": model, "width": self.plan.models[model][0], "variant": variant.name, "dtype": dtype,
                        "channels_last": variant.channels_last, "compile": variant.compile, "batch": batch,
                        "skipped": reason})
            self.say(f"{model} batch {batch} {variant.name}: not timed ({reason})")
        return out

    def training(self, ceiling: dict[str, float]) -> list[dict]:
        """Training rows of every model; ``ceiling``: the first pass's GEMM ceiling per dtype."""
        rows = []
        for model in self.plan.models:
            batches = self.plan.batches[model]
            at10 = self.measure_all(model, batches[0], EAGER_VARIANTS, rows, ceiling)
            rows += at10
            fastest = max((r for r in at10 if "step_s" in r), key=lambda r: r["samples_per_s"])
            base = next(v for v in EAGER_VARIANTS if v.name == fastest["variant"])
            search = [fastest] + [self.measure(model, b, base) for b in batches[1:]]
            rows += search[1:]
            best = max((r for r in search if "step_s" in r), key=lambda r: r["samples_per_s"])
            if best["batch"] != batches[0]:
                slow = {r["variant"]: f"{fastest['samples_per_s'] / r['samples_per_s']:.0f}x slower than "
                                      f"{fastest['variant']} at batch {batches[0]}" for r in at10 if r.get("rough")}
                rows += self.measure_all(model, best["batch"], [v for v in EAGER_VARIANTS if v is not base],
                                         rows + [best], ceiling, slow)
            if model in self.plan.compile_models:
                ok = [r for r in rows if r["model"] == model and r["batch"] == best["batch"] and "step_s" in r]
                top = max(ok, key=lambda r: r["samples_per_s"])
                base = next(v for v in EAGER_VARIANTS if v.name == top["variant"])
                rows.append(self.measure(model, best["batch"],
                                         replace(base, name=f"compile+{base.name}", compile=True)))
            torch._dynamo.reset()  # compiled graphs of this model are not reused: free them
        return rows

    def add_ratios(self) -> None:
        """Each row against the ceiling of the dtype its GEMMs run in; auto's pick; the targets."""
        ceiling = {d: c["flops"] for d, c in self.record["ceiling"].items()}
        rows = [r for r in self.record["training"] if "step_s" in r]  # not failed, not skipped
        for r in rows:
            r["of_ceiling"] = r["flops_per_s"] / ceiling[r["dtype"]]
        # a step faster than every GEMM measured means a faster kernel exists: say so, never clip
        self.record["ceiling_incomplete"] = [
            {k: r[k] for k in ("model", "batch", "variant", "dtype", "flops_per_s", "of_ceiling")}
            for r in rows if r["of_ceiling"] > 1]
        auto = auto_choices(rows + [r for r in self.record["training"] if "skipped" in r], self.cfg.channels_last)
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
        with speed_settings(cfg, self.device):
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
            seed = [r for r in self.record["training"] if r["model"] == "seed" and "step_s" in r]
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


# --- command line ------------------------------------------------------------------------------
BENCH_FIELDS = ("device", "threads", "width", "batch_size", "epochs")  # Config fields the measurements follow


def parser() -> argparse.ArgumentParser:
    def own(p: argparse.ArgumentParser) -> None:
        p.add_argument("--quick", action="store_true", help="fewer repeats and sizes: 2-9 minutes on 2 CPU cores")
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
