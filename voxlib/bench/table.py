"""The bench record as the printed table: ceilings, one row per measured step, targets met or not."""
from __future__ import annotations

from voxlib.precision import MARGIN


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
        if "skipped" in r:
            lines.append(f"{r['model']:<12} {r['width']:>5} {r['batch']:>5} {r['variant']:<26} {r['dtype']:>5} "
                         f"not timed: {r['skipped']}")
            continue
        comp = f"{r['compile_s']:.0f}" if "compile_s" in r else "-"
        lines.append(f"{r['model']:<12} {r['width']:>5} {r['batch']:>5} {r['variant']:<26} {r['dtype']:>5} "
                     f"{r['samples_per_s']:>9.2f} {r['flops_per_s'] / 1e9:>8.1f} {100 * r['of_ceiling']:>8.0f} % "
                     f"{'<-' if r['auto'] else '':>4} {comp:>9}" + ("  (one step, not repeated)" if r.get("rough") else ""))
    lines.append("(of ceiling: against the GEMM ceiling of the row's dtype; auto <-: the precision precision=auto "
                 "picks at that batch)")
    lines.append("")
    for a in record.get("auto", []):
        evidence = (f"bf16 {a['speedup']:.2f}x fp32" if a["speedup"] is not None
                    else "the other precision was not timed at this batch: see its row")
        lines.append(f"precision=auto, {a['model']} at batch {a['batch']}: {a['precision']} "
                     f"({evidence}; bf16 needs >= {MARGIN:.2f}x)")
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
