"""The bench runs end to end at a tiny size and its record is internally consistent.

No timing is asserted (the machine is shared); what is checked is that every number is derived
correctly from the others: samples/s from step time, FLOP/s from the model's FLOP count, ratios
from the measured peaks, the best row from the rows, and that the cache and the librosa loop
really produce the same features.
"""
from __future__ import annotations

import csv
import json
import math
import re

import pytest
import torch

from voxlib import precision
from voxlib.bench import ceiling, corpus, parity, runner, steps, table
from voxlib.config import Config
from voxlib.model import Discriminator, count_flops

HEADS = {"speaker": 5, "birthplace": 3, "sex": 2}


@pytest.fixture(scope="module")
def record(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("bench")
    plan = runner.Plan(
        gemm_squares=(64, 128), gemm_repeats=2,
        models={"seed": (0.125, dict(HEADS)), "cpu_default": (0.0625, dict(HEADS))},
        batches={"seed": (2, 4), "cpu_default": (2,)}, warmup=1, steps=1, min_time_s=0.0, compile_models=(),
        corpus=dict(birthplaces=2, speakers=2, utterances=3, seconds=2.5), loader_steps=3, memory_steps=2,
        cache_copies=2)
    cfg = Config(width=0.0625, batch_size=4, threads=1, cache_dir=str(out / "unused"))
    path = runner.run_bench(plan, cfg, torch.device("cpu"), epoch_utterances=500, out=out, quick=True)
    assert path.parent == out and path.suffix == ".json"
    return json.loads(path.read_text())


def timed(record: dict) -> list[dict]:
    """The training rows that were timed (a variant far slower than the fastest is not timed at the next batch)."""
    return [r for r in record["training"] if "skipped" not in r]


def test_training_rows_are_derived_from_step_times_and_flop_counts(record):
    rows = timed(record)
    # every variant has a row: timed, or not timed with its reason (checked in the batch-search test)
    variants = {r["variant"] for r in record["training"] if r["model"] == "cpu_default"}
    assert variants == {"fp32", "channels_last", "bf16", "bf16+channels_last"}
    for r in rows:
        width = r["width"]
        flops = count_flops(Discriminator(HEADS, width), r["batch"], training=True)
        assert r["step_flops"] == flops
        assert r["samples_per_s"] == pytest.approx(r["batch"] / r["step_s"])
        assert r["flops_per_s"] == pytest.approx(flops / r["step_s"])
        # training's step: every grad_log_every-th step also measures the heads' gradient norms
        if r["grad_step_s"] is not None and r["plain_step_s"] != r["grad_step_s"]:
            extra = (r["grad_step_s"] - r["plain_step_s"]) / r["grad_log_every"]
            assert r["step_s"] == pytest.approx(r["plain_step_s"] + extra)
        assert r["dtype"] == ("bf16" if "bf16" in r["variant"] else "fp32")
        assert r["channels_last"] == ("channels_last" in r["variant"])
        # each row against the ceiling of the dtype its step runs in, never clipped
        assert r["of_ceiling"] == pytest.approx(r["flops_per_s"] / record["ceiling"][r["dtype"]]["flops"])
    assert record["ceiling_incomplete"] == [
        {k: r[k] for k in ("model", "batch", "variant", "dtype", "flops_per_s", "of_ceiling")}
        for r in rows if r["of_ceiling"] > 1]


def test_batch_search_best_rows_auto_and_targets(record):
    seed_rows = [r for r in timed(record) if r["model"] == "seed"]
    assert {r["batch"] for r in seed_rows} >= {2}
    best = record["best"]["seed"]
    top = max(seed_rows, key=lambda r: r["samples_per_s"])
    assert (best["best"]["variant"], best["best"]["batch"]) == (top["variant"], top["batch"])
    plain = next(r for r in seed_rows if r["variant"] == "fp32" and r["batch"] == 2)
    assert best["best"]["speedup_vs_plain"] == pytest.approx(top["samples_per_s"] / plain["samples_per_s"])
    # auto: the rule of precision.choose on the channels_last pair at each batch (one pair: one round)
    for a in record["auto"]:
        pair = {r["dtype"]: r["samples_per_s"] for r in timed(record) if r["model"] == a["model"]
                and r["batch"] == a["batch"] and r["channels_last"] and not r["compile"]}
        if a["speedup"] is None:  # the other dtype was over SLOW_FACTOR slower at the first batch: not timed here
            assert len(pair) == 1 and a["precision"] in pair
            continue
        ratio = pair["bf16"] / pair["fp32"]  # within 1.1x either way: the CPU's native precision
        native = "bf16" if precision.native_bf16() else "fp32"
        assert a["precision"] == ("bf16" if ratio >= 1.1 else "fp32" if ratio <= 1 / 1.1 else native)
        assert a["speedup"] == pytest.approx(pair["bf16"] / pair["fp32"])
    picked = {(a["model"], a["batch"]): a["precision"] for a in record["auto"]}
    for r in timed(record):
        assert r["auto"] == (picked.get((r["model"], r["batch"])) == r["dtype"])
    auto_top = max((r for r in seed_rows if r["auto"]), key=lambda r: r["samples_per_s"])
    assert best["best_auto"]["samples_per_s"] == auto_top["samples_per_s"]
    targets = record["targets"]
    assert targets["seed_of_ceiling"]["value"] == auto_top["of_ceiling"]
    assert targets["seed_of_ceiling"]["met"] == (auto_top["of_ceiling"] >= 0.70)
    cpu_top = record["best"]["cpu_default"]["best_auto"]
    assert targets["cpu_default_of_ceiling"] == {"value": cpu_top["of_ceiling"], "target": 0.5,
                                                 "met": cpu_top["of_ceiling"] >= 0.5}
    speedup = targets["seed_speedup_vs_plain"]
    assert speedup["value"] == pytest.approx(auto_top["samples_per_s"] / plain["samples_per_s"])
    assert speedup["met"] == ((speedup["value"] >= 2.5) if speedup["applies"] else None)
    # all four eager variants have a row at the batch found best, so the table compares like with like:
    # timed, or (over SLOW_FACTOR slower at the first batch) marked as not timed with the reason
    assert {r["variant"] for r in record["training"] if r["model"] == "seed" and r["batch"] == best["best"]["batch"]} \
        >= {v.name for v in steps.EAGER_VARIANTS}
    for r in (r for r in record["training"] if "skipped" in r):
        if r["skipped"].startswith("its "):  # its dtype's ceiling is below what another variant reached there
            assert re.fullmatch(r"its bf16 GEMM ceiling [\d.]+ GFLOP/s is below the [\d.]+ \S+ reached", r["skipped"])
            reached = max(x["flops_per_s"] for x in timed(record) if (x["model"], x["batch"]) == (r["model"], r["batch"]))
            assert record["ceiling"][r["dtype"]]["passes"][0]["flops"] < reached
        else:  # over SLOW_FACTOR slower at the first batch
            first = next(x for x in timed(record) if (x["model"], x["variant"], x["batch"]) == (r["model"], r["variant"], 2))
            assert first.get("rough") is True and re.fullmatch(r"\d+x slower than \S+ at batch 2", r["skipped"])


def test_ceiling_is_the_best_kernel_of_both_passes(record):
    for dtype in ("fp32", "bf16"):
        best = record["ceiling"][dtype]
        first, second = best["passes"]
        assert best["flops"] == max(first["flops"], second["flops"]) > 0
        for p in (first, second):
            top = max((k for k in p["kernels"] if k["flops"]), key=lambda k: k["flops"])
            assert (p["flops"], p["library"], p["shape"]) == (top["flops"], top["library"], top["shape"])
        # every library on every square and layer shape first; then the best three of them again
        assert {k["library"] for k in first["kernels"]} == set(ceiling.GEMM_LIBRARIES)
        shapes = {tuple(k["shape"]) for k in first["kernels"]}
        assert {(64, 64, 64), (128, 128, 128)} <= shapes
        assert set(ceiling.layer_gemm_shapes(0.125, HEADS, 2)) <= shapes
        ranked = sorted((k for k in first["kernels"] if k["flops"]), key=lambda k: -k["flops"])[:3]
        assert [(k["library"], k["shape"]) for k in second["kernels"]] == [(k["library"], k["shape"]) for k in ranked]


def test_layer_gemm_shapes_of_the_seed_model():
    shapes = ceiling.layer_gemm_shapes(1.0, runner.SEED_HEADS, 10)
    # block 2 (64 -> 128 channels, 64x64 output map): forward, input gradient, weight gradient
    assert {(10 * 64 * 64, 128, 64 * 16), (10 * 64 * 64, 64 * 16, 128), (128, 64 * 16, 10 * 64 * 64)} <= set(shapes)
    assert (160, 2048, 1024 * 16) in shapes  # block 6 (1024 -> 2048, 4x4 map)
    # at batch 32 block 2's forward is 2*131072*128*1024 FLOP, twice the cap: its longest side is halved
    assert (65536, 128, 1024) in ceiling.layer_gemm_shapes(1.0, runner.SEED_HEADS, 32)
    assert all(min(s) >= 64 and 2 * s[0] * s[1] * s[2] <= ceiling.GEMM_FLOP_CAP for s in shapes)
    assert len(shapes) == len(set(shapes))
    # the batch-10 heads (10 x classes) and the first block (K = 16) are too thin to count
    assert not [s for s in shapes if 10 in s or 16 in s]


def test_theoretical_peak_from_flags_and_clock():
    amx = ceiling.peak_from(2, 2.6e9, "/proc/cpuinfo cpu MHz", ["avx512f", "avx512_bf16", "amx_bf16"])
    assert amx["fp32"]["flops"] == pytest.approx(2 * 2.6e9 * 64)
    assert amx["bf16"]["flops"] == pytest.approx(2 * 2.6e9 * 1024)
    avx512 = ceiling.peak_from(4, 3e9, "cpufreq maximum", ["avx512f", "avx512_bf16"])
    assert avx512["bf16"]["flops"] == pytest.approx(4 * 3e9 * 128)
    avx2 = ceiling.peak_from(1, 3e9, "x", ["avx2", "fma"])
    assert avx2["fp32"]["flops"] == pytest.approx(96e9) and avx2["bf16"]["flops"] is None
    unknown = ceiling.peak_from(2, None, None, ["avx512f"])
    assert unknown["fp32"]["flop_per_cycle"] == 64 and unknown["fp32"]["flops"] is None
    record = {"ceiling": {d: {"flops": 1e11, "library": "torch.mm", "shape": [64, 64, 64],
                              "passes": [{"flops": 1e11, "kernels": []}]} for d in ("fp32", "bf16")},
              "theoretical": unknown}
    text = "\n".join(table.ceiling_lines(record))
    assert "clock not reported" in text and "bf16 not reported (no native bf16 reported)" in text


def test_a_variant_far_slower_than_the_fastest_is_timed_once_and_not_again(monkeypatch):
    """bf16 without native support (40x slower at seed width) must not cost the bench minutes per row."""
    calls = []

    def fake(width, heads, batch, variant, device, warmup, steps_, min_time_s, cfg, slow_after_s=None):
        calls.append((batch, variant.name, slow_after_s))
        step_s = (10.0 if variant.bf16 else 1.0) * (batch / 10) ** 0.8  # larger batches a little faster per sample
        row = {"variant": variant.name, "dtype": "bf16" if variant.bf16 else "fp32", "channels_last": variant.channels_last,
               "compile": variant.compile, "batch": batch, "step_s": step_s, "samples_per_s": batch / step_s,
               "flops_per_s": 1e9 * batch / step_s}
        return {**row, "rough": True} if slow_after_s is not None and step_s > slow_after_s else row

    monkeypatch.setattr(runner, "time_training", fake)
    b = runner.Bench.__new__(runner.Bench)
    b.cfg, b.device = Config(), torch.device("cpu")
    b.plan = runner.Plan(models={"seed": (1.0, HEADS)}, batches={"seed": (10, 32)}, compile_models=())
    b.say = lambda text: None
    rows = b.training({})
    # at batch 10 every variant after the first is bounded by steps.SLOW_FACTOR x the fastest so far
    assert calls[:4] == [(10, "fp32", None), (10, "channels_last", steps.SLOW_FACTOR * 1.0),
                         (10, "bf16", steps.SLOW_FACTOR * 1.0), (10, "bf16+channels_last", steps.SLOW_FACTOR * 1.0)]
    assert [r["variant"] for r in rows if r.get("rough")] == ["bf16", "bf16+channels_last"]
    # at the best batch the rough ones are not timed again, and say why
    assert [c[:2] for c in calls[4:]] == [(32, "fp32"), (32, "channels_last")]
    skipped = [r for r in rows if "skipped" in r]
    assert [(r["batch"], r["variant"], r["skipped"]) for r in skipped] == [
        (32, "bf16", "10x slower than fp32 at batch 10"), (32, "bf16+channels_last", "10x slower than fp32 at batch 10")]
    b.record = {"training": rows, "theoretical": {},
                "ceiling": {d: {"flops": 1e12, "library": "torch.mm", "shape": [64, 64, 64], "passes": []}
                            for d in ("fp32", "bf16")}}
    b.add_ratios()
    # auto at batch 32 follows from the untimed bf16 rows: fp32, with no speed-up to quote
    assert {(a["batch"], a["precision"], a["speedup"]) for a in b.record["auto"]} == {(10, "fp32", 0.1), (32, "fp32", None)}
    b.record["machine"] = {"cpu": "x", "threads": 2, "torch": torch.__version__, "device": "cpu"}
    b.record["plan"] = {"batches": {"seed": [10, 32]}}
    text = table.format_table(b.record)
    untimed = [line.split() for line in text.splitlines() if "not timed:" in line]
    assert [words[:5] for words in untimed] == [["seed", "1.0", "32", "bf16", "bf16"],
                                                ["seed", "1.0", "32", "bf16+channels_last", "bf16"]]
    assert all(" ".join(words[5:]) == "not timed: 10x slower than fp32 at batch 10" for words in untimed)
    assert text.count("(one step, not repeated)") == 2
    assert "precision=auto, seed at batch 32: fp32 (the other precision was not timed at this batch: see its row" in text


def test_a_dtype_whose_ceiling_is_below_a_reached_step_is_not_timed(monkeypatch):
    calls = []

    def fake(width, heads, batch, variant, device, warmup, steps_, min_time_s, cfg, slow_after_s=None):
        calls.append(variant.name)
        return {"variant": variant.name, "dtype": "bf16" if variant.bf16 else "fp32", "channels_last": variant.channels_last,
                "compile": False, "batch": batch, "step_s": 1.0, "samples_per_s": batch, "flops_per_s": 5e10}

    monkeypatch.setattr(runner, "time_training", fake)
    b = runner.Bench.__new__(runner.Bench)
    b.cfg, b.device, b.say = Config(), torch.device("cpu"), lambda text: None
    b.plan = runner.Plan(models={"seed": (1.0, HEADS)}, batches={"seed": (10,)}, compile_models=())
    rows = b.training({"fp32": 1e11, "bf16": 2e10})  # bf16 GEMMs cannot reach the 50 GFLOP/s fp32 steps reach
    assert calls == ["fp32", "channels_last"]
    assert [r["skipped"] for r in rows if "skipped" in r] == [
        "its bf16 GEMM ceiling 20.0 GFLOP/s is below the 50.0 fp32 reached"] * 2


def test_rough_rows_are_one_warm_up_step():
    variant = steps.Variant("fp32")
    r = steps.time_training(0.0625, HEADS, 2, variant, torch.device("cpu"), warmup=1, steps=3, slow_after_s=1e-9)
    assert r["rough"] is True and r["step_s"] == r["median_step_s"] and r["samples_per_s"] == pytest.approx(2 / r["step_s"])
    full = steps.time_training(0.0625, HEADS, 2, variant, torch.device("cpu"), warmup=1, steps=3)
    assert "rough" not in full


def test_a_step_above_the_ceiling_is_reported_not_clipped():
    row = {"model": "seed", "width": 1.0, "batch": 10, "variant": "bf16+channels_last", "dtype": "bf16",
           "channels_last": True, "compile": False, "samples_per_s": 30.0, "flops_per_s": 2e12, "step_s": 1 / 3}
    fp32 = {**row, "variant": "channels_last", "dtype": "fp32", "samples_per_s": 10.0, "flops_per_s": 1e11}
    plain = {**fp32, "variant": "fp32", "channels_last": False}
    b = runner.Bench.__new__(runner.Bench)
    b.cfg, b.plan = Config(), runner.Plan(models={"seed": (1.0, HEADS)}, batches={"seed": (10,)})
    b.record = {"training": [plain, fp32, row], "theoretical": ceiling.peak_from(2, 2.6e9, "x", ["avx512f", "amx_bf16"]),
                "ceiling": {d: {"flops": f, "library": "torch.mm", "shape": [64, 64, 64], "passes": []}
                            for d, f in (("fp32", 4e11), ("bf16", 1e12))}}
    b.add_ratios()
    assert row["of_ceiling"] == pytest.approx(2.0)  # kept as measured
    assert b.record["ceiling_incomplete"] == [{"model": "seed", "batch": 10, "variant": "bf16+channels_last",
                                               "dtype": "bf16", "flops_per_s": 2e12, "of_ceiling": 2.0}]
    assert b.record["auto"] == [{"model": "seed", "batch": 10, "precision": "bf16", "speedup": 3.0}]
    assert b.record["targets"]["seed_speedup_vs_plain"]["value"] == pytest.approx(3.0)
    assert b.record["targets"]["seed_speedup_vs_plain"]["met"] is True
    text = "\n".join(table.ceiling_lines(b.record))
    assert "CEILING INCOMPLETE: seed batch 10 bf16+channels_last" in text and "200 %" in text


def test_loader_features_and_memory_sections(record):
    loader = record["loader"]
    assert 0 <= loader["wait_share"] < 1 and loader["steps"] == 3 and loader["batch"] == 4
    assert loader["wait_s"] <= loader["step_s"] * loader["steps"]
    assert record["targets"]["loader_wait_share"]["met"] == (loader["wait_share"] <= 0.05)
    # training's own parts in the precision training resolves (train.choose_precision)
    auto = record["auto_run"]
    assert auto["how"] == "measured" and set(auto["samples_per_s"]) == {"fp32", "bf16"}
    assert loader["precision"] == auto["precision"] and loader["verify"] is True
    assert loader["clips"] < 48 and loader["steps_per_epoch"] == loader["clips"] // 4  # the 4x corpus's train split
    verify = record["verification"]
    assert verify["rows"] == 48 and verify["verify_s"] == min(verify["rounds"]["True"])
    assert verify["per_row_ms"] == pytest.approx(max(verify["verify_s"] - verify["plain_s"], 0) / 48 * 1e3)
    assert verify["share_of_step"] == pytest.approx(verify["per_row_ms"] / 1e3 * 4 / loader["step_s"])
    predict = record["predict"]
    assert predict["clips"] == 12 and predict["precision"] == auto["precision"]
    assert predict["clips_per_s"] == pytest.approx(12 / predict["seconds"]) and predict["seconds"] == min(predict["times"])
    features = record["features"]
    assert record["targets"]["cache_speedup"]["met"] == (features["speedup"] >= 3)
    assert features["clips"] == 2 * 2 * 2 * 3  # the corpus listed cache_copies = 2 times
    assert features["speedup"] == pytest.approx(features["librosa_s"] / features["cache_s"])
    assert features["cache_s"] == min(features["cache_times"]) and len(features["cache_times"]) == 3
    assert features["librosa_s"] == min(features["librosa_times"]) and len(features["librosa_times"]) == 3
    assert features["workers"] >= 1
    # same output: float16 storage differs from librosa's float32 by at most half a float16 step near 1
    assert features["same_shapes"] and features["max_abs_diff"] < 2e-3
    memory = record["memory"]
    assert memory["1x"]["rows"] == 12 and memory["4x"]["rows"] == 48
    assert memory["1x"]["max_rss_mb"] > 50 and memory["4x"]["max_rss_mb"] > 50
    assert memory["ratio_4x_1x"] == pytest.approx(memory["4x"]["max_rss_mb"] / memory["1x"]["max_rss_mb"])


def test_gpu_estimate_follows_from_the_flop_count(record):
    gpu = record["gpu"]
    assert gpu["measured"] is False and gpu["epoch_utterances"] == 500 and gpu["epochs"] == 1000
    forward = count_flops(Discriminator(runner.SEED_HEADS, 1.0), 1)
    assert gpu["forward_flops"] == forward
    assert gpu["total_flops"] == 500 * 3 * forward * 1000
    for row in gpu["rows"]:
        assert row["hours"] == pytest.approx(gpu["total_flops"] / (row["bf16_peak"] * row["efficiency"]) / 3600)
    assert any(row["basis"] == "assumed MFU" and row["efficiency"] == runner.ASSUMED_GPU_MFU for row in gpu["rows"])


def test_table_mentions_every_section(record):
    text = table.format_table(record)
    for needle in ("GEMM ceiling fp32", "GEMM ceiling bf16", "theoretical peak", "of ceiling", "precision=auto",
                   "data-loader wait", "feature cache build", "peak memory", "seed protocol GPU estimate",
                   "target: seed width", "target: CPU default width", "feature-cache verification",
                   "predict (predict.Classifier)", "as training resolves it"):
        assert needle in text
    rows = [line for line in text.splitlines() if re.match(r"(seed|cpu_default) +0\.\d+ +\d+ ", line)]
    assert len(rows) == len(record["training"])


def test_repeated_corpus_names_every_clip_once_per_copy(tmp_path):
    one = corpus.write_corpus(tmp_path / "x1", birthplaces=2, speakers=2, utterances=2, seconds=1.0)
    four = corpus.repeat_corpus(one, 4, tmp_path / "x4")
    rows = list(csv.DictReader(four.open()))
    assert len(rows) == 4 * 8 and len({r["path"] for r in rows}) == 32
    assert all((four.parent / r["path"]).stat().st_size == (one.parent / r["path"].split("/", 1)[1]).stat().st_size
               for r in rows)


def test_demo_heads_follow_the_demo_settings():
    assert runner.demo_heads(Config()) == {"speaker": 8 * 5, "birthplace": 8, "sex": 2}
    cfg = Config(demo_accents="us,gb-rp", demo_speakers_per_accent=2, unseen_per_class=1)
    assert runner.demo_heads(cfg) == {"speaker": 4, "birthplace": 2, "sex": 2}  # too few speakers to hold one out


def test_gpu_measured_hours():
    out = runner.gpu_measured([{"variant": "bf16", "batch": 10, "samples_per_s": 100.0}], 1000, 1000)
    assert out["measured"] and math.isclose(out["rows"][0]["hours"], 1000 * 1000 / 100 / 3600)


def test_parity_summary_flags_a_bf16_drop_beyond_the_seed_spread():
    def run(seed, p, speaker, sex, epoch_s):
        return {"seed": seed, "precision": p, "epoch_s": epoch_s,
                "accuracy": {"seen_test/speaker": speaker, "unseen_test/sex": sex}}

    runs = [run(0, "fp32", 0.90, 1.0, 10.0), run(0, "bf16", 0.88, 1.0, 5.0),
            run(1, "fp32", 0.94, 1.0, 10.0), run(1, "bf16", 0.92, 0.9, 5.0),
            run(2, "fp32", 0.92, 1.0, 10.0), run(2, "bf16", 0.93, 1.0, 5.0)]
    s = parity.parity_summary(runs)
    speaker, sex = s["heads"]["seen_test/speaker"], s["heads"]["unseen_test/sex"]
    assert speaker["values"] == {"fp32": [0.90, 0.94, 0.92], "bf16": [0.88, 0.92, 0.93]}
    assert speaker["spread"] == pytest.approx(0.05) and speaker["bf16_drop"] == pytest.approx(0.01)
    assert not speaker["beyond_spread"]  # 0.01 lower on average, while seeds alone move it by 0.05
    # sex: fp32 is 1.0 on every seed; bf16 loses 0.1 on one seed, which is also its own spread
    assert sex["spread"] == pytest.approx(0.1) and sex["bf16_drop"] == pytest.approx(0.1 / 3)
    assert not sex["beyond_spread"] and not s["bf16_costs_accuracy"]
    assert s["epoch_speedup_bf16"] == pytest.approx(2.0)
    worse = [dict(r, accuracy={"seen_test/speaker": r["accuracy"]["seen_test/speaker"] - 0.1})
             if r["precision"] == "bf16" else r for r in runs]
    assert parity.parity_summary(worse)["heads"]["seen_test/speaker"]["beyond_spread"]
    assert parity.parity_summary(worse)["bf16_costs_accuracy"]
    text = parity.format_parity({"seeds": [0, 1, 2], "settings": {}, "summary": parity.parity_summary(worse)})
    assert "BEYOND SPREAD" in text and "YES" in text
