"""Accuracy parity of bf16: the same run in fp32 and bf16 over several seeds, compared with the seed spread."""
from __future__ import annotations

import contextlib
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

from voxlib.config import Config
from voxlib.evaluate import accuracy_table
from voxlib.precision import PRECISIONS
from voxlib.runfolder import load_run
from voxlib.train import train


PARITY_SEEDS = (0, 1, 2)


def parity(cfg: Config, seeds=PARITY_SEEDS, work: Path | None = None) -> dict:
    """Train ``cfg``'s run (the demo corpus by default) in fp32 and in bf16 for each seed; collect
    every held-out accuracy per head and the epoch time.

    The seed also draws the split, so the spread over seeds includes which utterances and speakers
    are held out; fp32 and bf16 of one seed share everything but the precision. Which precision
    trains first alternates by seed, so a drift in the machine's load favours neither.
    """
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
