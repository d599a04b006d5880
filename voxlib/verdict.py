"""From the evidence to what notebook 03 and index.html say: the measures, the verdict, the headline.

voxlib.analysis computes the evidence for each explanation of a weak head; this module puts its numbers
into one flat dict (:func:`measures`: pooled over the folds of a pooled folder where the pooled numbers
exist, the reference baselines beside them), turns them into sentences by rules with named thresholds
(:func:`verdict_from_measures`; the constants below, fractions of 1: a rule fires only when its number
crosses its threshold), builds the headline table of the discriminator beside the reference baselines
(:func:`headline`), and assembles everything notebook 03 shows (:func:`birthplace_report`). Every
sentence of a pooled folder's verdict says whether its numbers are pooled or one fold's (:func:`scope`).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from voxlib.analysis import (
    GROUPS,
    ProbeUnavailable,
    as_run,
    baselines,
    class_size_table,
    clustered_se,
    confused_pairs,
    gradient_share,
    has_head,
    linear_probe,
    loss_trend,
    mean_gradient_share,
    project_embeddings,
    rollup,
    seen_unseen,
    small_classes,
    speaker_accuracy,
    through_speaker,
)
from voxlib.baselines import REPRESENTATIONS
from voxlib.config import ACCENT_HEAD, N_BLOCKS, Config, field_names
from voxlib.corpora.labels import too_few_speakers
from voxlib.evaluate import accuracy_table, balanced_accuracy, confusion, scored, scores
from voxlib.runfolder import SEEN_SPLITS, Run, load_run
from voxlib.text import percent, points

# --- verdict thresholds (fractions of 1; a rule fires only when its number crosses its threshold) ---
IDENTITY_GAP = 0.15  # speaker->birthplace beats the head on seen speakers by at least this
MEMORISATION_GAP = 0.20  # seen-speaker minus unseen-speaker accuracy
SIGNAL_MARGIN = 0.10  # unseen accuracy must beat max(chance, majority) by this to count as signal
SMALL_CLASS_SHARE = 0.25  # share of classes with too few training speakers that makes size a cause
IMBALANCE_GAP = 0.10  # plain minus balanced accuracy on unseen speakers
PROBE_MARGIN = 0.10  # linear probe minus head on the same unseen-speaker utterances
REFERENCE_MARGIN = 0.10  # a reference baseline (MFCC + logistic regression ...) minus head on unseen speakers
STILL_FALLING = 0.05  # relative loss drop over the final window that counts as "still falling"
LOW_GRADIENT_SHARE = 0.5  # below this fraction of an equal share, a head is starved of gradient
ROLLUP_GAIN = 0.15  # share of errors inside the true region beyond what random errors would give
MIN_UTTERANCES = 30  # fewer scored utterances than this and the percentages are flagged as rough
MIN_SPEAKERS = 5  # fewer unseen speakers than this and the percentages are flagged as rough
EVIDENCE_Z = 2.0  # a difference must also exceed this many speaker-clustered standard errors


def measures(run: Run | str | Path, head: str = "birthplace", min_speakers: int = 5, probe: bool = True,
             last_fraction: float = 0.2, probe_result: dict | None = None, confound=None, pooled=None,
             reference=None) -> dict:
    """Every headline number of the investigation as one flat dict (NaN / None where unavailable).

    ``pooled``: a ``runfolder.Pooled`` experiment whose member ``run`` is; the seen and unseen accuracy,
    majority, balanced accuracy, speaker->class baseline, sizes and standard errors then come from the
    pooled numbers (every eligible speaker unseen once, seen accuracy averaged over seeds), with the
    interval as ``unseen_low``/``unseen_high``. ``scope`` names that pooling and ``member`` the run the
    remaining numbers (class sizes, confusions, probe, loss, gradient) come from, so the verdict can say
    which is which.

    ``reference``: the ``baselines.ReferenceBaselines`` of the same split (pooled over the same members
    for a pooled folder); each representation's accuracy becomes ``reference_<name>_<seen|unseen>``.

    ``probe_result``: an already fitted ``linear_probe`` result, so a report does not fit it twice.
    ``confound``: a ``conditions.confound_check`` result for this run's corpus (it reads the audio, so
    it is computed by the caller); its row for ``head`` becomes the ``confound_*`` keys.
    """
    run = as_run(run)
    nan = float("nan")
    out: dict = {"run": run.name, "head": head, "has_head": has_head(run, head),
                 "has_speaker_head": has_head(run, "speaker"), "pooled": False, "scope": "", "member": run.name}
    if not out["has_head"]:
        return out
    found = confound.for_head(head) if confound is not None else None
    out["confounded"] = bool(found["confounded"]) if found else None
    if found:
        out |= {f"confound_{key}": found[key]
                for key in ("balanced_accuracy", "chance", "low", "high", "strongest", "speakers")}
    out["unseen_min_speakers"] = int(run.config.get("unseen_min_speakers", 3))
    # with accent_branch 6 the birthplace head reads a network of its own: the trunk's probe and gradient
    # shares describe what the speaker and sex heads read, not what this head reads
    out["own_network"] = head == ACCENT_HEAD and int(run.config.get("accent_branch", 0) or 0) == N_BLOCKS
    small = too_few_speakers(run.splits, head, out["unseen_min_speakers"])
    out["too_few_for_unseen"] = [f"{c} ({n})" for c, n in zip(small["class"], small["speakers"])]
    base = baselines(run, head).set_index("set")
    for group in GROUPS:
        row = base.loc[group] if group in base.index else None
        for key in ("accuracy", "balanced_accuracy", "top3", "majority", "n"):
            out[f"{key}_{group}"] = float(row[key]) if row is not None else nan
        has_through = row is not None and "through_speaker" in row
        out[f"through_speaker_{group}"] = float(row["through_speaker"]) if has_through else nan
    out["chance"] = 1.0 / len(run.labels[head])
    out["gap"] = out["accuracy_seen"] - out["accuracy_unseen"]
    per_seen, per_unseen = (speaker_accuracy(run, head, GROUPS[g]) for g in ("seen", "unseen"))
    out["speakers_unseen"] = len(per_unseen)
    out["se_unseen"] = clustered_se(per_unseen) if len(per_unseen) else nan
    out["gap_se"] = float(np.hypot(clustered_se(per_seen), clustered_se(per_unseen))) if len(per_unseen) else nan
    small = small_classes(run, head, min_speakers)
    out |= {"n_classes": small["n_classes"], "n_small_classes": small["n_small"], "min_speakers": min_speakers}
    roll = rollup(run, head)
    out["coarse"] = roll["coarse"].iloc[0] if roll is not None and len(roll) else None
    for group in GROUPS:
        hit = roll[roll["set"] == group] if roll is not None else pd.DataFrame()
        for key in ("coarse_accuracy", "coarse_majority", "errors_within", "errors_within_expected"):
            out[f"{key}_{group}"] = float(hit[key].iloc[0]) if len(hit) else nan
    out["probe_accuracy"] = out["probe_head_accuracy"] = out["probe_majority"] = out["probe_difference_se"] = nan
    result = probe_result
    if result is None and probe and run.has_embeddings:
        try:
            result = linear_probe(run, head)
        except ProbeUnavailable:
            result = None
    if result is not None:
        out |= {"probe_accuracy": result["probe_accuracy"], "probe_head_accuracy": result["head_accuracy"],
                "probe_majority": result["majority"], "probe_difference_se": result["difference_se"]}
    train_trend = loss_trend(run, head, "train", last_fraction)
    val_trend = loss_trend(run, head, "unseen_val", last_fraction)
    out |= {"loss_relative_change": train_trend["relative_change"], "loss_window": train_trend["window"],
            "unseen_val_loss_relative_change": val_trend["relative_change"]}
    if pooled is not None and head in pooled.summary and "low" in pooled.summary[head].get("unseen", {}):
        out |= _pooled_keys(pooled, head, per_seen)
    if reference is not None:
        table = reference.table if hasattr(reference, "table") else reference
        for r in table[table["head"] == head].itertuples(index=False):
            out[f"reference_{r.representation}_{r.split}"] = float(r.accuracy)
    share = mean_gradient_share(run)
    out["n_heads"] = len(run.heads)
    out["gradient_share"] = float(share.get(head, nan))
    out["gradient_share_speaker"] = float(share.get("speaker", nan))
    return out


def _pooled_keys(pooled, head: str, per_seen: pd.Series) -> dict:
    """The measures a folds/seeds experiment replaces: pooled unseen, seen over seeds, their errors."""
    entry = pooled.summary[head]
    seen, unseen = entry["seen"], entry["unseen"]
    rows = pooled.predictions[pooled.predictions[f"{head}_true"] != ""]
    per_speaker = (rows[f"{head}_true"] == rows[f"{head}_pred"]).groupby(rows["speaker"]).mean()
    se_unseen = clustered_se(per_speaker)
    nan = float("nan")
    return {"pooled": True, "folds": int(pooled.experiment["config"]["folds"]),
            "seeds": int(pooled.experiment["config"]["seeds"]), "scope": scope(pooled),
            "through_speaker_seen": _pooled_through_speaker(pooled, head),
            "balanced_accuracy_unseen": float(np.mean([balanced_accuracy(group, head) for _, group in
                                                       rows.groupby("seed")])),
            "accuracy_seen": seen["accuracy"], "majority_seen": seen["majority"], "n_seen": seen["n"],
            "seen_std": seen["std"] if seen["std"] is not None else nan,
            "accuracy_unseen": unseen["accuracy"], "majority_unseen": unseen["majority"], "n_unseen": unseen["n"],
            "unseen_low": unseen["low"], "unseen_high": unseen["high"], "unseen_level": unseen["level"],
            "fold_std": unseen["fold_std"] if unseen["fold_std"] is not None else nan,
            "speakers_unseen": unseen["speakers"], "se_unseen": se_unseen,
            "gap": seen["accuracy"] - unseen["accuracy"],
            "gap_se": float(np.hypot(clustered_se(per_seen), se_unseen))}


def scope(pooled=None) -> str:
    """Where the numbers of a table or sentence come from, as the verdict and the tables say it: ``pooled
    over 3 folds`` (``x 2 seeds``) for a ``runfolder.Pooled``, ``one run`` for None."""
    if pooled is None:
        return "one run"
    folds, seeds = int(pooled.experiment["config"]["folds"]), int(pooled.experiment["config"]["seeds"])
    return f"pooled over {folds} folds" + (f" x {seeds} seeds" if seeds > 1 else "")


def _pooled_through_speaker(pooled, head: str) -> float:
    """speaker->class accuracy on seen speakers over every member, pooled as the seen accuracy is: the
    members of a seed counted together, then the mean over seeds. NaN without a speaker head."""
    hits: dict[int, list[int]] = {}
    for info, path in zip(pooled.experiment["members"], pooled.members):
        run = load_run(path)
        if not has_head(run, "speaker") or not has_head(run, head):
            return float("nan")
        rows = scored(run, head, SEEN_SPLITS)
        right = int((through_speaker(run, head, SEEN_SPLITS) == rows[f"{head}_true"]).sum())
        tally = hits.setdefault(int(info["seed"]), [0, 0])
        tally[0], tally[1] = tally[0] + right, tally[1] + len(rows)
    per_seed = [right / n for right, n in hits.values() if n]
    return float(np.mean(per_seed)) if per_seed else float("nan")


def _beyond_noise(difference: float, se: float | None) -> bool:
    """True when a difference exceeds EVIDENCE_Z speaker-clustered standard errors."""
    return se is not None and not math.isnan(se) and difference >= EVIDENCE_Z * se


def _spread(se: float | None) -> str:
    if se is None or math.isnan(se) or math.isinf(se):
        return "(a single speaker)"
    return f"(±{percent(EVIDENCE_Z * se)})"


def verdict_from_measures(m: dict) -> list[str]:
    """Sentences stating which explanations the numbers support; each rule has a named threshold.

    For a pooled folder every sentence says where its numbers come from: pooled over the folds (and
    seeds), or one member run only (class sizes, confusions, probe, loss and gradient are per run).
    """
    head = m["head"]
    if not m.get("has_head"):
        return [f"this run has no {head} head: nothing to explain"]
    lines: list[str] = []
    causes = 0  # rules that point to a cause; none firing means the evidence is mixed
    pooled = f" ({m['scope']})" if m.get("pooled") else ""  # numbers pooled over the members
    one_run = f" ({m['member']} only)" if m.get("pooled") else ""  # numbers of the member shown
    in_run = f"; {m['member']} only" if m.get("pooled") else ""  # the same inside parentheses
    ok = lambda *keys: all(k in m and m[k] is not None and not (isinstance(m[k], float) and math.isnan(m[k]))
                           for k in keys)  # noqa: E731
    if m.get("confounded"):  # before any other explanation: every number below may be about the channel
        causes += 1
        lines.append(f"{head} is confounded with recording conditions: a classifier on recording conditions alone "
                     f"(no speech content) reaches balanced accuracy {percent(m['confound_balanced_accuracy'])} "
                     f"[{percent(m['confound_low'])}, {percent(m['confound_high'])}] on held-out speakers (each of the "
                     f"{m['confound_speakers']} speakers of the corpus held out in turn) vs "
                     f"{percent(m['confound_chance'])} for the majority class (most tied: {m['confound_strongest']}); "
                     f"what the model learned about {head} may be the recording set-up, so read what follows with "
                     "that confound in mind")
    references = {name: m[f"reference_{name}_unseen"] for name in REPRESENTATIONS if ok(f"reference_{name}_unseen")}
    if references and ok("accuracy_unseen"):
        name, best = max(references.items(), key=lambda kv: kv[1])
        u = m["accuracy_unseen"]
        interval = f" [{percent(m['unseen_low'])}, {percent(m['unseen_high'])}]" if m.get("pooled") else ""
        said = (f"on unseen speakers{pooled}, {REPRESENTATIONS[name]} reaches {percent(best)} against the {head} "
                f"head's {percent(u)}{interval}")
        if best - u >= REFERENCE_MARGIN:
            causes += 1
            lines.append(f"{said}: {head} can be heard in new voices from this audio with a plain representation, and "
                         "the discriminator does not learn it")
        elif u - best >= REFERENCE_MARGIN:
            lines.append(f"{said}: the head transfers to new voices better than the reference baseline")
        else:
            lines.append(f"{said}: the head and the reference baseline are level (within "
                         f"{points(REFERENCE_MARGIN)})")
    if m.get("pooled"):
        seen_spread = (f" ± {percent(m['seen_std'])} over {m['seeds']} seeds" if m["seeds"] > 1 and
                       not math.isnan(m["seen_std"]) else "")
        fold_spread = f", per-fold spread ±{percent(m['fold_std'])}" if not math.isnan(m["fold_std"]) else ""
        lines.append(f"unseen-speaker {head} is pooled over {m['folds']} folds x {m['seeds']} seed(s), every "
                     f"eligible speaker unseen once: {percent(m['accuracy_unseen'])} [{percent(m['unseen_low'])}, "
                     f"{percent(m['unseen_high'])}] ({m['unseen_level']:.0%} interval resampled over "
                     f"{m['speakers_unseen']} speakers{fold_spread}); seen speakers "
                     f"{percent(m['accuracy_seen'])}{seen_spread}; where a sentence below gives numbers of one "
                     f"run, it says so ({m['member']})")
    if m.get("too_few_for_unseen"):
        lines.append(f"{len(m['too_few_for_unseen'])} {head} class(es) have fewer than {m['unseen_min_speakers']} "
                     f"speakers and are never among the unseen speakers, so the unseen-speaker numbers say nothing "
                     f"about them: {', '.join(m['too_few_for_unseen'])}")

    if m.get("speakers_unseen") == 0:
        lines.append(f"no unseen speakers in this run: whether {head} generalises to new voices cannot be judged")
    elif ok("n_unseen", "speakers_unseen") and (m["n_unseen"] < MIN_UTTERANCES or m["speakers_unseen"] < MIN_SPEAKERS):
        lines.append(f"only {int(m['n_unseen'])} unseen-speaker utterances from {m['speakers_unseen']} speakers are "
                     f"scored{pooled}: treat the unseen-speaker percentages as rough")
    if not m["has_speaker_head"]:
        lines.append(f"no speaker head: the speaker→{head} comparison is not available")
    elif ok("accuracy_seen", "through_speaker_seen"):
        h, t = m["accuracy_seen"], m["through_speaker_seen"]
        floor = max(m["majority_seen"], m["chance"])
        # what speaker->head means, and for a pooled folder that both numbers are pooled
        mapped = f"speaker→{head} ({m['scope'] + '; ' if m.get('pooled') else ''}the speaker head's guess mapped to " \
                 f"that speaker's {head})"
        if t - floor < SIGNAL_MARGIN:
            lines.append(f"{mapped} gives only {percent(t)} on seen speakers (baseline {percent(floor)}): the "
                         f"speaker head has not learned identity well enough to tell whether the {head} head uses it")
        elif t - h >= IDENTITY_GAP:
            causes += 1
            lines.append(f"{head} head reaches {percent(h)} on seen speakers while {mapped} gives {percent(t)}, "
                         f"{points(t - h)} more: the head under-uses identity")
        else:
            lines.append(f"{head} head reaches {percent(h)} on seen speakers against {percent(t)} for {mapped}, "
                         f"{points(max(t - h, 0.0))} lower; less than {points(IDENTITY_GAP)} lower counts as using "
                         "what identity tells it, as it does here")
    if ok("accuracy_seen", "accuracy_unseen") and m["gap"] >= MEMORISATION_GAP:
        said = (f"{head} reaches {percent(m['accuracy_seen'])} on held-out utterances of training speakers but "
                f"{percent(m['accuracy_unseen'])} on unseen speakers{pooled}")
        if _beyond_noise(m["gap"], m.get("gap_se")):
            causes += 1
            lines.append(f"{said}: the head memorises speakers rather than hearing {head}")
        else:
            lines.append(f"{said}, yet the gap is within the speaker-to-speaker spread {_spread(m.get('gap_se'))}: "
                         "the evidence for memorisation is mixed")
    if ok("accuracy_unseen", "majority_unseen"):
        u = m["accuracy_unseen"]
        name, base = max(("majority", m["majority_unseen"]), ("chance", m["chance"]), key=lambda nb: nb[1])
        interval = f" [{percent(m['unseen_low'])}, {percent(m['unseen_high'])}]" if m.get("pooled") else ""
        said = f"on unseen speakers{pooled} {percent(u)}{interval} vs {name} {percent(base)}"
        if u - base < SIGNAL_MARGIN:
            causes += 1
            lines.append(f"{said}: little {head} signal generalises")
        elif m.get("pooled") and m["unseen_low"] > base:
            lines.append(f"{said}: the whole interval is above {name}, so some {head} signal generalises to new speakers")
        elif m.get("pooled"):
            lines.append(f"{said}, but the interval reaches {name}: the evidence is mixed")
        elif _beyond_noise(u - base, m.get("se_unseen")):
            lines.append(f"{said}: some {head} signal generalises to new speakers")
        else:
            lines.append(f"{said}, but unseen speakers differ too much {_spread(m.get('se_unseen'))} to call it signal: "
                         "the evidence is mixed")
    if m["n_classes"] and m["n_small_classes"] / m["n_classes"] >= SMALL_CLASS_SHARE:
        causes += 1
        lines.append(f"{m['n_small_classes']} of {m['n_classes']} classes have fewer than {m['min_speakers']} "
                     f"training speakers{one_run}: too few voices per class to separate it from identity")
    if ok("accuracy_unseen", "balanced_accuracy_unseen") and \
            m["accuracy_unseen"] - m["balanced_accuracy_unseen"] >= IMBALANCE_GAP:
        causes += 1
        lines.append(f"plain accuracy {percent(m['accuracy_unseen'])} vs balanced {percent(m['balanced_accuracy_unseen'])} "
                     f"on unseen speakers{pooled}: the head leans on the large classes")
    if ok("coarse", "errors_within_unseen", "errors_within_expected_unseen") and \
            m["errors_within_unseen"] - m["errors_within_expected_unseen"] >= ROLLUP_GAIN:
        c = m["coarse"]
        lines.append(f"{percent(m['errors_within_unseen'])} of the errors on unseen speakers{one_run} stay within the "
                     f"true {c} vs {percent(m['errors_within_expected_unseen'])} if errors were random (at {c} level "
                     f"{percent(m['coarse_accuracy_unseen'])}, majority {percent(m['coarse_majority_unseen'])}): "
                     "the confusions are between neighbours")
    if m.get("own_network"):
        lines.append(f"the {head} head reads a birthplace network of its own (accent_branch {N_BLOCKS}), not the shared "
                     "trunk: the trunk's linear probe and gradient shares say nothing about it and are left out")
    if ok("probe_accuracy", "probe_head_accuracy") and not m.get("own_network"):
        p, h = m["probe_accuracy"], m["probe_head_accuracy"]
        base = max(m["probe_majority"], m["chance"])
        if p - h >= PROBE_MARGIN and _beyond_noise(p - h, m.get("probe_difference_se")):
            causes += 1
            lines.append(f"the linear probe reaches {percent(p)} on unseen speakers{one_run} vs {percent(h)} for the "
                         "head: the information is in the trunk; the head or its training is the problem")
        elif p - h >= PROBE_MARGIN:
            lines.append(f"the linear probe reaches {percent(p)} on unseen speakers{one_run} vs {percent(h)} for the "
                         f"head, but the difference varies too much between speakers "
                         f"{_spread(m.get('probe_difference_se'))}: the evidence that the trunk holds more is mixed")
        elif p - base < SIGNAL_MARGIN:
            causes += 1
            lines.append(f"the linear probe reaches only {percent(p)} on unseen speakers (baseline "
                         f"{percent(base)}{in_run}): the trunk holds little {head} information that transfers to new speakers")
        else:
            lines.append(f"the linear probe ({percent(p)}) and the head ({percent(h)}) agree on unseen speakers"
                         f"{one_run}: the head uses what the trunk holds")
    if ok("loss_relative_change"):
        z, k = m["loss_relative_change"], m["loss_window"]
        v = m.get("unseen_val_loss_relative_change", float("nan"))
        if z <= -STILL_FALLING and ok("unseen_val_loss_relative_change") and v >= STILL_FALLING:
            lines.append(f"mixed evidence: the {head} training loss was still falling ({z:+.1%} over the last {k} "
                         f"epochs{in_run}) but the unseen-speaker validation loss rose ({v:+.1%}): longer training "
                         "would likely deepen memorisation rather than help")
        elif z <= -STILL_FALLING:
            causes += 1
            lines.append(f"{head} loss was still falling ({z:+.1%} over the last {k} epochs{in_run}): longer training "
                         "may help")
        else:
            lines.append(f"{head} loss had flattened ({z:+.1%} over the last {k} epochs{in_run}): longer training "
                         "alone is unlikely to help")
    if ok("gradient_share") and not m.get("own_network"):
        w, equal = m["gradient_share"], 1.0 / m["n_heads"]
        other = (f" vs {percent(m['gradient_share_speaker'])} for speaker"
                 if ok("gradient_share_speaker") and head != "speaker" else "")
        if w < LOW_GRADIENT_SHARE * equal:
            causes += 1
            lines.append(f"{head} receives {percent(w)} of the gradient reaching the trunk{other}{one_run}: it has "
                         "little say in what the trunk learns")
        else:
            lines.append(f"{head} receives {percent(w)} of the gradient reaching the trunk{other}{one_run}: "
                         "it is not starved of gradient")
    if not causes:
        lines.append("the evidence is mixed: none of the tested explanations is clearly supported by these numbers")
    return lines


HEADLINE_COLUMNS = ["head", "speakers", "scope", "n", "discriminator", "low", "high", *REPRESENTATIONS, "majority",
                    "chance"]


def headline(run: Run | str | Path, pooled=None, reference=None, explained: str = "birthplace") -> pd.DataFrame:
    """The finding in one table: per head, on seen and on unseen speakers, the discriminator beside the
    reference baselines fitted on the same split(s) and the majority baseline and chance.

    ``pooled`` (a ``runfolder.Pooled``): the discriminator's numbers are the pooled ones (unseen with its
    interval ``low``/``high``), and ``reference`` should be pooled over the same members. ``scope`` says
    which: ``pooled over 3 folds`` or ``one run``. One column per representation in ``reference``
    (``mfcc``, ``encoder``; see baselines.REPRESENTATIONS), absent when it was not fitted. The rows of
    ``explained``, the head the investigation explains, come first.
    """
    run = as_run(run)
    table = reference.table if hasattr(reference, "table") else reference
    records = []
    for head in sorted(run.heads, key=lambda h: h != explained):
        for group in GROUPS:
            if pooled is not None and head in pooled.summary:
                found = pooled.summary[head].get(group)
                if not found:
                    continue
                record = {"scope": scope(pooled), "n": found["n"], "discriminator": found["accuracy"],
                          "low": found.get("low"), "high": found.get("high"), "majority": found["majority"],
                          "chance": pooled.summary[head]["chance"]}
            else:
                rows = scored(run, head, GROUPS[group])
                if rows.empty:
                    continue
                s = scores(run, head, rows)
                record = {"scope": scope(None), "n": s["n"], "discriminator": s["accuracy"], "low": None, "high": None,
                          "majority": s["majority"], "chance": s["chance"]}
            record |= {"head": head, "speakers": group}
            if table is not None:
                for r in table[(table["head"] == head) & (table["split"] == group)].itertuples(index=False):
                    record[r.representation] = float(r.accuracy)
            records.append(record)
    frame = pd.DataFrame(records, columns=HEADLINE_COLUMNS)
    return frame.loc[:, [c for c in frame.columns if c not in REPRESENTATIONS or frame[c].notna().any()]]


def verdict(run: Run | str | Path, head: str = "birthplace", **options) -> list[str]:
    """The verdict sentences for one run (see ``verdict_from_measures``)."""
    return verdict_from_measures(measures(run, head, **options))


def verdict_markdown(lines: Sequence[str], title: str = "Verdict") -> str:
    """The verdict as a markdown bullet list, for a notebook cell or an HTML report."""
    return f"### {title}\n\n" + "\n".join(f"- {line[0].upper() + line[1:]}" for line in lines) + "\n"


def birthplace_report(run: Run | str | Path, head: str = "birthplace", min_speakers: int = 5,
                      project: bool = True, probe: bool = True, seed: int = 0, confound=None) -> dict:
    """Every table and number of the investigation, for notebook 03.

    Keys that cannot be computed for this run (no such head, no speaker head, no embeddings, no
    coarse level) hold None, and ``notes`` says why, so a corpus without birthplaces still reports.
    """
    run = as_run(run)
    notes: list[str] = []
    report: dict = {"run": run.name, "head": head, "accuracy": accuracy_table(run), "notes": notes}
    keys = ("baselines", "seen_unseen", "class_sizes", "small_classes", "confusion_seen", "confusion_unseen",
            "confused_pairs", "rollup", "projection", "probe", "loss_trend", "gradient_share",
            "mean_gradient_share", "measures", "verdict", "verdict_markdown")
    report |= dict.fromkeys(keys)
    if not has_head(run, head):
        notes.append(f"no {head} head in this run (heads: {', '.join(run.heads)})")
        report["measures"] = measures(run, head, min_speakers, probe=False)
        report["verdict"] = verdict_from_measures(report["measures"])
        report["verdict_markdown"] = verdict_markdown(report["verdict"])
        report["gradient_share"] = gradient_share(run)
        report["mean_gradient_share"] = mean_gradient_share(run)
        return report
    if not has_head(run, "speaker"):
        notes.append(f"no speaker head: the speaker→{head} baseline is not available")
    report["baselines"] = baselines(run, head)
    report["seen_unseen"] = seen_unseen(run, [h for h in run.heads if h != "speaker"])
    report["class_sizes"] = class_size_table(run, head)
    report["small_classes"] = small_classes(run, head, min_speakers)
    for group, splits in GROUPS.items():
        if len(scored(run, head, splits)):
            report[f"confusion_{group}"] = confusion(run, head, splits)
    report["confused_pairs"] = confused_pairs(run, head)
    report["rollup"] = rollup(run, head)
    if report["rollup"] is None:
        notes.append(f"no coarser level than {head} in splits.csv (e.g. a region column)")
    if run.has_embeddings:
        if project:
            report["projection"] = project_embeddings(run, seed=seed)
        if probe:
            try:
                report["probe"] = linear_probe(run, head)
            except ProbeUnavailable as err:
                notes.append(f"no linear probe: {err}")
    else:
        notes.append("no embeddings.npz: no projection and no linear probe")
    report["loss_trend"] = loss_trend(run, head)
    report["gradient_share"] = gradient_share(run)
    report["mean_gradient_share"] = mean_gradient_share(run)
    report["measures"] = measures(run, head, min_speakers, probe=probe, probe_result=report["probe"],
                                  confound=confound)
    report["verdict"] = verdict_from_measures(report["measures"])
    report["verdict_markdown"] = verdict_markdown(report["verdict"])
    return report


SHARE_MEASURES = ("accuracy_", "balanced_accuracy_", "top3_", "majority_", "through_speaker_", "coarse_",
                  "errors_within_", "probe_accuracy", "probe_head_accuracy", "probe_majority", "gradient_share",
                  "reference_", "confound_balanced_accuracy", "confound_chance", "confound_low", "confound_high",
                  "unseen_low", "unseen_high", "gap", "se_unseen", "seen_std", "fold_std", "chance",
                  "probe_difference_se", "loss_relative_change", "unseen_val_loss_relative_change")


def share_measures(names) -> list[str]:
    """The measures (keys of :func:`measures`) that are shares or differences of shares: shown as percent."""
    return [n for n in names if isinstance(n, str) and n.startswith(SHARE_MEASURES)]


def compare_runs(run_a: Run | str | Path, run_b: Run | str | Path, head: str = "birthplace",
                 names: tuple[str, str] | None = None, **options) -> pd.DataFrame:
    """Two runs side by side on every measure, with ``b - a`` for the numeric ones.

    Typical use: a baseline run against a class-balanced one. Column names default to the run
    folders' names (suffixed when equal).
    """
    a, b = as_run(run_a), as_run(run_b)
    name_a, name_b = names or (a.name, b.name if b.name != a.name else b.name + " (b)")
    ma, mb = measures(a, head, **options), measures(b, head, **options)
    keys = [k for k in ma if k != "run"] + [k for k in mb if k not in ma and k != "run"]
    table = pd.DataFrame({name_a: [ma.get(k) for k in keys], name_b: [mb.get(k) for k in keys]},
                         index=pd.Index(keys, name="measure"), dtype=object)

    def diff(x, y):
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (x, y))
        return y - x if numeric else None

    table["difference"] = [diff(x, y) for x, y in zip(table[name_a], table[name_b])]
    return table


# --- a remedies study ----------------------------------------------------------------------------------
SAME_SPEAKER_MARGIN = 0.02  # seen-speaker speaker accuracy within this of the seed discriminator: kept


def study_findings(table: pd.DataFrame) -> list[str]:
    """What a remedies study (runfolder.load_study) says about birthplace on new voices, in sentences.

    Preset accent against the seed discriminator (both pooled over the study's folds, with their
    speaker-resampled intervals), whether the gap to the best reference baseline closed, what it cost
    the speaker head, and how the remedies rank alone.
    """
    rows = table.set_index("variant")
    reference = table[table["variant"].str.startswith("baseline:") & table["unseen_birthplace"].notna()]
    seed = rows.loc["seed"] if "seed" in rows.index else None
    accent = rows.loc["accent"] if "accent" in rows.index else None

    def unseen(row) -> str:
        interval = f" [{percent(row.unseen_low)}, {percent(row.unseen_high)}]" if pd.notna(row.unseen_low) else ""
        return f"{percent(row.unseen_birthplace)}{interval}"

    lines = []
    if seed is not None and accent is not None:
        apart = ("the intervals do not overlap" if accent.unseen_low > seed.unseen_high else
                 "the intervals overlap, so the difference is not shown beyond the spread between speakers")
        lines.append(f"birthplace on unseen speakers (pooled over the study's folds): preset accent {unseen(accent)} "
                     f"against the seed discriminator's {unseen(seed)}; {apart}")
    if len(reference):
        best = reference.loc[reference["unseen_birthplace"].idxmax()]
        for name, row in (("the seed discriminator", seed), ("preset accent", accent)):
            if row is None:
                continue
            gap = best.unseen_birthplace - row.unseen_birthplace
            if gap <= 0:
                said = f"{name} is {points(-gap)} above it: the gap is closed"
            elif pd.notna(row.unseen_high) and row.unseen_high >= best.unseen_birthplace:
                said = f"{name} is {points(gap)} below it, within its own interval: the gap is closed within the noise"
            else:
                said = f"{name} is {points(gap)} below it: the gap is not closed"
            lines.append(f"{best.label} reaches {percent(best.unseen_birthplace)} on the same unseen speakers; {said}")
    if seed is not None and accent is not None and pd.notna(seed.seen_speaker) and pd.notna(accent.seen_speaker):
        change = accent.seen_speaker - seed.seen_speaker
        kept = "within" if abs(change) <= SAME_SPEAKER_MARGIN else "beyond"
        lines.append(f"the speaker head StarGAN needs, on held-out utterances of training speakers: preset accent "
                     f"{percent(accent.seen_speaker)} against {percent(seed.seen_speaker)} ({kept} "
                     f"{points(SAME_SPEAKER_MARGIN)} of the seed discriminator)")
    if seed is not None and accent is not None and pd.notna(accent.unseen_sex) and pd.notna(seed.unseen_sex):
        worse = pd.notna(accent.sex_high) and accent.sex_high < seed.unseen_sex
        lines.append(f"sex on unseen speakers: preset accent {percent(accent.unseen_sex)} against "
                     f"{percent(seed.unseen_sex)} ({'worse beyond' if worse else 'not worse beyond'} its interval)")
    alone = table[~table["variant"].isin(["seed", "accent"]) & ~table["variant"].str.startswith("baseline:")
                  & table["unseen_birthplace"].notna()]
    if len(alone) and seed is not None:
        ranked = alone.sort_values("unseen_birthplace", ascending=False)
        lines.append("each remedy alone, birthplace on unseen speakers: " + "; ".join(
            f"{r.label} {percent(r.unseen_birthplace)}" for r in ranked.itertuples())
            + f" (seed discriminator {percent(seed.unseen_birthplace)})")
    return lines


def remedies_used(run: Run) -> list[str]:
    """The generalisation remedies a run was trained with, as a sentence for a report."""
    cfg = Config.from_dict({k: v for k, v in run.config.items() if k in field_names()})
    used = cfg.remedies()
    if not used:
        return ["this run used no generalisation remedy: it is the seed discriminator (give study_dir, a folder made by "
                "python -m voxlib.remedies, to see what each remedy changes on the same folds)"]
    preset = f" (preset {cfg.preset!r})" if cfg.preset else ""
    return [f"this run was trained with{preset}: " + ", ".join(f"{k}={v}" for k, v in used.items())]


def study_display(table: pd.DataFrame) -> pd.DataFrame:
    """The study table with the columns a reader wants, named for a reader (shares stay numbers for styled)."""
    shown = table.rename(columns={"label": "variant ", "seen_speaker": "seen speaker", "seen_birthplace": "seen birthplace",
                                  "unseen_birthplace": "unseen birthplace", "unseen_low": "low", "unseen_high": "high",
                                  "unseen_sex": "unseen sex", "train_minutes": "training minutes"})
    columns = ["variant ", "seen speaker", "seen birthplace", "unseen birthplace", "low", "high", "unseen sex",
               "training minutes"]
    return shown[columns].set_index("variant ")
