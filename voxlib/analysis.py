"""Why is the birthplace head weak? Evidence for each candidate explanation, from a run folder.

The candidate explanations and the number that tests each one:

1. the head under-uses identity: birthplace accuracy on seen speakers vs "birthplace through
   speaker" (the speaker head's guess mapped to that speaker's birthplace);
2. it memorises speakers: accuracy on held-out utterances of training speakers vs on unseen speakers;
3. too few voices per class: per-class recall against training speakers, how many classes are small,
   balanced vs plain accuracy;
4. the errors are sensible: most-confused pairs and accuracy rolled up to a coarser level (region);
5. the trunk knows more than the head says: a linear probe on frozen trunk features, trained without
   any unseen speaker, scored on unseen speakers beside the head on the same utterances;
6. training stopped early or the head is starved: loss slope at the end, share of the trunk gradient.

``verdict`` turns those numbers into sentences with explicit thresholds (the constants below), so the
conclusions are recomputed for every run rather than written by hand. Everything takes a ``head``
argument (default ``birthplace``) so the same questions can be asked of another label.
"""
from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from sklearn.decomposition import PCA
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.manifold import TSNE
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits  # a scikit-learn dependency

from voxlib.baselines import REPRESENTATIONS
from voxlib.corpora.labels import too_few_speakers
from voxlib.evaluate import (
    HELD_OUT_SPLITS,
    SEEN_SPLITS,
    UNSEEN_SPLITS,
    Run,
    RunError,
    accuracy_table,
    balanced_accuracy,
    class_sizes,
    confusion,
    load_run,
    majority_class,
    per_class_metrics,
    scored,
    scores,
)
from voxlib.text import percent, points

GROUPS = {"seen": SEEN_SPLITS, "unseen": UNSEEN_SPLITS}
STANDARD_COLUMNS = {"row", "path", "rel_path", "speaker", "birthplace", "sex", "split", "start", "end"}

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
TSNE_MAX = 2000  # t-SNE above this many points is slow and no clearer than PCA
TSNE_THREADED_FROM = 1000  # below this many points t-SNE runs single-threaded (faster)


class ProbeUnavailable(RunError):
    """The run folder is fine but has too little to fit or score a probe (e.g. one class only)."""


def _as_run(run: Run | str | Path) -> Run:
    return run if isinstance(run, Run) else load_run(run)


def _has(run: Run, head: str) -> bool:
    return head in run.labels


# --- 1. baselines: chance, majority, birthplace through speaker ---------------------------------------
def speaker_label_map(run: Run, head: str = "birthplace") -> pd.Series:
    """``speaker -> class of head`` from the training rows; a speaker with two classes is an error."""
    train = run.train
    per_speaker = train.groupby("speaker")[head].unique()
    conflicted = per_speaker[per_speaker.map(len) > 1]
    if len(conflicted):
        speaker = conflicted.index[0]
        raise RunError(f"{run.path / 'splits.csv'}: speaker {speaker!r} has several {head} values "
                       f"{sorted(conflicted.iloc[0])} in the training rows")
    return per_speaker.map(lambda v: v[0])


def through_speaker(run: Run, head: str = "birthplace", splits=HELD_OUT_SPLITS) -> pd.Series:
    """The ``head`` class implied by the speaker head's guess, for the scored rows of ``splits``.

    On seen speakers this is what a model that only knew identity would get; on unseen speakers it
    is the class of the most similar training voice.
    """
    rows = scored(run, head, splits)
    mapping = speaker_label_map(run, head)
    implied = rows["speaker_pred"].map(mapping)
    if implied.isna().any():
        bad = rows.loc[implied.isna(), "speaker_pred"].iloc[0]
        raise RunError(f"{run.path / 'predictions.csv'}: speaker_pred {bad!r} has no training rows")
    return implied


def baselines(run: Run, head: str = "birthplace") -> pd.DataFrame:
    """Per held-out split and pooled seen/unseen group: the head beside every baseline.

    Columns: ``set, n, accuracy, top3, balanced_accuracy, chance, majority, majority_class`` and,
    with a speaker head, ``through_speaker`` (accuracy of speaker->class) and ``agreement`` (share of
    rows where the head and speaker->class name the same class).
    """
    sets = {s: (s,) for s in HELD_OUT_SPLITS} | GROUPS
    records = []
    for name, splits in sets.items():
        rows = scored(run, head, splits)
        if rows.empty:
            continue
        record = {"set": name, **scores(run, head, rows)}
        if _has(run, "speaker") and head != "speaker":
            implied = through_speaker(run, head, splits)
            record["through_speaker"] = float((implied == rows[f"{head}_true"]).mean())
            record["agreement"] = float((implied == rows[f"{head}_pred"]).mean())
        records.append(record)
    return pd.DataFrame(records)


def speaker_accuracy(run: Run, head: str, splits) -> pd.Series:
    """Accuracy per speaker: the unit that varies independently (utterances of one voice do not)."""
    rows = scored(run, head, splits)
    return (rows[f"{head}_true"] == rows[f"{head}_pred"]).groupby(rows["speaker"]).mean()


def clustered_se(per_speaker: pd.Series | np.ndarray) -> float:
    """Standard error of a mean over speakers; infinite with fewer than two speakers (unknowable)."""
    values = np.asarray(per_speaker, dtype=float)
    return float(values.std(ddof=1) / np.sqrt(len(values))) if len(values) >= 2 else float("inf")


# --- 2. seen vs unseen speakers ---------------------------------------------------------------------
def seen_unseen(run: Run, heads: Sequence[str] = ("birthplace", "sex")) -> pd.DataFrame:
    """Accuracy on held-out utterances of training speakers vs on unseen speakers, per head.

    A large ``gap`` means the head recognises voices it was trained on rather than the label.
    ``gap_se`` is its standard error with speakers as the unit (utterances of one speaker are not
    independent evidence), ``speakers_unseen`` how many unseen speakers there are.
    """
    records = []
    for head in [h for h in heads if _has(run, h)]:
        seen, unseen = (scored(run, head, GROUPS[g]) for g in ("seen", "unseen"))
        s, u = scores(run, head, seen), scores(run, head, unseen)
        per_seen, per_unseen = (speaker_accuracy(run, head, GROUPS[g]) for g in ("seen", "unseen"))
        records.append({"head": head, "seen": s["accuracy"], "unseen": u["accuracy"],
                        "gap": s["accuracy"] - u["accuracy"],
                        "gap_se": float(np.hypot(clustered_se(per_seen), clustered_se(per_unseen))),
                        "seen_majority": s["majority"], "unseen_majority": u["majority"], "chance": s["chance"],
                        "n_seen": s["n"], "n_unseen": u["n"], "speakers_unseen": len(per_unseen)})
    return pd.DataFrame(records, columns=["head", "seen", "unseen", "gap", "gap_se", "seen_majority",
                                          "unseen_majority", "chance", "n_seen", "n_unseen", "speakers_unseen"])


# --- 3. class size ----------------------------------------------------------------------------------
def class_size_table(run: Run, head: str = "birthplace") -> pd.DataFrame:
    """Per class: training speakers and utterances, recall and support on seen and unseen speakers."""
    table = class_sizes(run, head).reset_index()
    for group, splits in GROUPS.items():
        pcm = per_class_metrics(run, head, splits).set_index("class")
        table[f"recall_{group}"] = table["class"].map(pcm["recall"])
        table[f"support_{group}"] = table["class"].map(pcm["support"]).fillna(0).astype(int)
    return table


def small_classes(run: Run, head: str = "birthplace", min_speakers: int = 5) -> dict:
    """How many classes of ``head`` have fewer than ``min_speakers`` training speakers."""
    sizes = class_sizes(run, head)
    small = sizes.index[sizes["train_speakers"] < min_speakers].tolist()
    return {"n_classes": len(sizes), "n_small": len(small), "min_speakers": min_speakers, "classes": small}


# --- 4. confusions ----------------------------------------------------------------------------------
def confused_pairs(run: Run, head: str = "birthplace", splits=UNSEEN_SPLITS, top: int = 10) -> pd.DataFrame:
    """The most frequent ``true -> predicted`` errors, with their share of the true class's rows."""
    rows = scored(run, head, splits)
    wrong = rows[rows[f"{head}_true"] != rows[f"{head}_pred"]]
    support = rows[f"{head}_true"].value_counts()
    pairs = wrong.groupby([f"{head}_true", f"{head}_pred"]).size().rename("count").reset_index()
    pairs.columns = ["true", "predicted", "count"]
    pairs["rate"] = pairs["count"] / pairs["true"].map(support)
    pairs = pairs.sort_values(["count", "rate", "true", "predicted"], ascending=[False, False, True, True])
    return pairs.head(top).reset_index(drop=True)


def coarse_column(run: Run, fine: str = "birthplace") -> str | None:
    """A column of splits.csv that groups ``fine`` classes into fewer, coarser ones, if any.

    ``region`` is preferred; otherwise any extra column that takes exactly one non-empty value per
    fine class and has at least two but fewer values than there are fine classes.
    """
    if fine not in run.splits.columns:
        return None
    extras = [c for c in run.splits.columns if c not in STANDARD_COLUMNS and c not in run.labels and c != fine]
    for column in sorted(extras, key=lambda c: c != "region"):
        values = run.splits[[fine, column]].drop_duplicates()
        if (values[column] == "").any() or values[fine].duplicated().any():
            if column == "region":
                _coarse_map(run, fine, column)  # raises, naming the offending class
            continue
        if 2 <= values[column].nunique() < values[fine].nunique():
            return column
    return None


def _coarse_map(run: Run, fine: str, coarse: str) -> pd.Series:
    pairs = run.splits[[fine, coarse]].drop_duplicates()
    if (pairs[coarse] == "").any():
        cls = pairs.loc[pairs[coarse] == "", fine].iloc[0]
        raise RunError(f"{run.path / 'splits.csv'}: {fine} {cls!r} has an empty {coarse}")
    if pairs[fine].duplicated().any():
        cls = pairs.loc[pairs[fine].duplicated(), fine].iloc[0]
        values = sorted(pairs.loc[pairs[fine] == cls, coarse])
        raise RunError(f"{run.path / 'splits.csv'}: {fine} {cls!r} belongs to several {coarse} values {values}")
    return pairs.set_index(fine)[coarse]


def rollup(run: Run, fine: str = "birthplace", coarse: str | None = None) -> pd.DataFrame | None:
    """Accuracy at the fine level and after mapping true and predicted classes to the coarse level.

    Returns None when the corpus has no coarse level. Columns: ``set, n, coarse, fine_accuracy,
    coarse_accuracy, coarse_chance, coarse_majority, coarse_majority_class, errors_within,
    errors_within_expected``: the share of wrong predictions that stay in the true coarse class,
    and the share expected if wrong predictions fell uniformly on the other fine classes (a small
    region makes staying inside it unlikely by chance, a big one makes it likely).
    """
    coarse = coarse or coarse_column(run, fine)
    if coarse is None:
        return None
    mapping = _coarse_map(run, fine, coarse)
    train_coarse = run.train[fine].map(mapping)
    counts = train_coarse.value_counts()
    majority = sorted(counts[counts == counts.max()].index)[0]
    classes = pd.Series(run.labels[fine]).map(mapping)
    # per fine class: how many *other* classes share its coarse class
    neighbours = {c: int((classes == mapping.get(c)).sum()) - 1 for c in run.labels[fine]}
    records = []
    for name, splits in ({s: (s,) for s in HELD_OUT_SPLITS} | GROUPS).items():
        rows = scored(run, fine, splits)
        if rows.empty:
            continue
        true_c, pred_c = rows[f"{fine}_true"].map(mapping), rows[f"{fine}_pred"].map(mapping)
        wrong = (rows[f"{fine}_true"] != rows[f"{fine}_pred"]).to_numpy()
        expected = rows.loc[wrong, f"{fine}_true"].map(lambda c: neighbours.get(c, 0) / (len(classes) - 1))
        records.append({"set": name, "n": len(rows), "coarse": coarse,
                        "fine_accuracy": float((rows[f"{fine}_true"] == rows[f"{fine}_pred"]).mean()),
                        "coarse_accuracy": float((true_c == pred_c).mean()),
                        "coarse_chance": 1.0 / mapping.nunique(),
                        "coarse_majority": float((true_c == majority).mean()),
                        "coarse_majority_class": majority,
                        "errors_within": float((true_c == pred_c)[wrong].mean()) if wrong.any() else float("nan"),
                        "errors_within_expected": float(expected.mean()) if wrong.any() else float("nan")})
    return pd.DataFrame(records)


# --- 5. what the trunk holds ------------------------------------------------------------------------
def _labelled_embeddings(run: Run) -> pd.DataFrame:
    emb = run.embeddings
    info = run.splits.set_index("row").drop(columns=["split"]).reindex(emb.row).reset_index()
    info.insert(1, "split", emb.split)
    return info


def project_embeddings(run: Run, splits: Sequence[str] = ("seen_test", "unseen_test"), method: str = "auto",
                       seed: int = 0) -> pd.DataFrame:
    """2-D projection of the trunk features of ``splits`` with each point's labels, for a scatter.

    ``method``: ``pca``, ``tsne``, or ``auto`` (t-SNE up to TSNE_MAX points, else PCA). Features are
    standardised first so that no single channel dominates. Column ``method`` says which was used.
    """
    info = _labelled_embeddings(run)
    keep = info["split"].isin(splits).to_numpy()
    if not keep.any():
        raise RunError(f"{run.path / 'embeddings.npz'}: no features for splits {list(splits)}")
    x = StandardScaler().fit_transform(run.embeddings.features[keep])
    if method == "auto":
        method = "tsne" if len(x) <= TSNE_MAX else "pca"
    if method == "tsne" and len(x) > 3:
        reduced = PCA(n_components=min(50, *x.shape), random_state=seed).fit_transform(x)
        # On small inputs OpenMP thread start-up dominates t-SNE (seconds for 100 points on a busy
        # machine); one thread is then much faster.
        with threadpool_limits(1 if len(x) < TSNE_THREADED_FROM else None):
            xy = TSNE(n_components=2, init="pca", perplexity=min(30.0, (len(x) - 1) / 3),
                      random_state=seed).fit_transform(reduced)
    elif method in ("pca", "tsne"):
        method = "pca"
        xy = PCA(n_components=2, random_state=seed).fit_transform(x)
    else:
        raise ValueError(f"method must be 'auto', 'pca' or 'tsne', got {method!r}")
    out = info[keep].reset_index(drop=True)
    out.insert(2, "x", xy[:, 0])
    out.insert(3, "y", xy[:, 1])
    out["method"] = method
    return out


def linear_probe(run: Run, head: str = "birthplace", train_splits: Sequence[str] = ("train",) + SEEN_SPLITS,
                 test_split: str = "unseen_test", C: float = 1.0) -> dict:
    """Logistic regression on standardised frozen trunk features, scored on unseen speakers.

    Trained only on rows of training speakers (the train sample and the seen splits); a training
    row whose speaker is unseen would let the probe recognise the test voices, so it is an error.
    ``head_accuracy`` is the head's own accuracy on exactly the probe's test utterances: if the
    probe beats it, the information is in the trunk and the head or its training is the problem.
    ``difference_se`` is the standard error of (probe - head) with speakers as the unit.
    """
    if head not in run.splits.columns:
        raise ProbeUnavailable(f"{run.path / 'splits.csv'}: no column {head!r} to probe for")
    info = _labelled_embeddings(run)
    features = run.embeddings.features
    train = info["split"].isin(train_splits).to_numpy()
    test = (info["split"] == test_split).to_numpy()
    unseen_speakers = set(run.splits.loc[run.splits["split"].str.startswith("unseen"), "speaker"])
    leaked = sorted(set(info.loc[train, "speaker"]) & (unseen_speakers | set(info.loc[test, "speaker"])))
    if leaked:
        raise RunError(f"{run.path}: probe training rows include unseen speaker(s) {leaked[:5]}")
    if not test.any() or info.loc[train, head].nunique() < 2:
        raise ProbeUnavailable(f"{run.path / 'embeddings.npz'}: need {test_split} rows and at least two {head} "
                       f"classes among {list(train_splits)} rows to fit a probe")
    probe = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=2000))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        probe.fit(features[train], info.loc[train, head])
    truth = info.loc[test, head].to_numpy()
    guess = probe.predict(features[test])
    pred = run.predictions.set_index("row")
    rows_test = info.loc[test, "row"]
    missing = sorted(set(rows_test) - set(pred.index))
    if missing:
        raise RunError(f"{run.path / 'predictions.csv'}: no predictions for {test_split} rows {missing[:5]}")
    head_guess = pred.loc[rows_test, f"{head}_pred"].to_numpy() if _has(run, head) else None
    majority = majority_class(run, head) if _has(run, head) else run.train[head].mode().sort_values().iloc[0]
    n_classes = len(run.labels[head]) if _has(run, head) else run.train[head].nunique()
    frame = pd.DataFrame({f"{head}_true": truth, f"{head}_pred": guess})
    test_speakers = info.loc[test, "speaker"].to_numpy()
    if head_guess is not None:  # paired per speaker: same utterances, probe minus head
        paired = pd.Series((guess == truth).astype(float) - (head_guess == truth)).groupby(test_speakers).mean()
        difference_se = clustered_se(paired)
    else:
        difference_se = float("nan")
    return {
        "head": head, "test_split": test_split, "n_train": int(train.sum()), "n_test": int(test.sum()),
        "train_speakers": int(info.loc[train, "speaker"].nunique()),
        "test_speakers": int(info.loc[test, "speaker"].nunique()),
        "probe_accuracy": float((guess == truth).mean()),
        "probe_balanced_accuracy": balanced_accuracy(frame, head),
        "head_accuracy": float((head_guess == truth).mean()) if head_guess is not None else float("nan"),
        "majority": float((truth == majority).mean()), "chance": 1.0 / n_classes,
        "difference_se": difference_se,
    }


# --- 6. training dynamics ---------------------------------------------------------------------------
def loss_trend(run: Run, head: str = "birthplace", split: str = "train", last_fraction: float = 0.2) -> dict:
    """Is the loss still falling at the end? A straight line through the last epochs.

    The window is the last ``ceil(last_fraction * epochs)`` epochs (at least 2); ``relative_change``
    is the fitted change across the window divided by the fitted value at its start.
    """
    m = run.metrics
    curve = m[(m["metric"] == "loss") & (m["head"] == head) & (m["split"] == split)]
    curve = curve.groupby("epoch")["value"].mean().sort_index()
    window = max(2, math.ceil(last_fraction * len(curve)))
    result = {"head": head, "split": split, "epochs": len(curve), "window": window, "slope": float("nan"),
              "relative_change": float("nan"), "final_loss": float(curve.iloc[-1]) if len(curve) else float("nan")}
    if len(curve) < 2:
        return result
    tail = curve.iloc[-window:]
    slope, intercept = np.polyfit(tail.index.to_numpy(float), tail.to_numpy(float), 1)
    start = slope * tail.index[0] + intercept
    result["slope"] = float(slope)
    result["relative_change"] = float(slope * (tail.index[-1] - tail.index[0]) / abs(start)) if start else float("nan")
    return result


def gradient_share(run: Run) -> pd.DataFrame:
    """Per epoch and head: mean ``grad_norm`` and its share of the sum over heads.

    The trainer measures each head's loss gradient at the trunk output; a head with a small share
    has little say in what the shared trunk learns.
    """
    m = run.metrics
    grads = m[(m["metric"] == "grad_norm") & m["head"].isin(run.heads)]
    per_epoch = grads.groupby(["epoch", "head"])["value"].mean().rename("grad_norm").reset_index()
    per_epoch["share"] = per_epoch["grad_norm"] / per_epoch.groupby("epoch")["grad_norm"].transform("sum")
    return per_epoch


def mean_gradient_share(run: Run) -> pd.Series:
    """Mean grad_norm per head divided by the sum of those means (empty when none was logged)."""
    grads = gradient_share(run)
    if grads.empty:
        return pd.Series(dtype=float, name="share")
    means = grads.groupby("head")["grad_norm"].mean()
    return (means / means.sum()).rename("share")


# --- summary numbers, verdict, report ---------------------------------------------------------------
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
    run = _as_run(run)
    nan = float("nan")
    out: dict = {"run": run.name, "head": head, "has_head": _has(run, head), "has_speaker_head": _has(run, "speaker"),
                 "pooled": False, "scope": "", "member": run.name}
    if not out["has_head"]:
        return out
    found = confound.for_head(head) if confound is not None else None
    out["confounded"] = bool(found["confounded"]) if found else None
    if found:
        out |= {f"confound_{key}": found[key] for key in ("balanced_accuracy", "chance", "low", "high", "strongest")}
    out["unseen_min_speakers"] = int(run.config.get("unseen_min_speakers", 3))
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
        if not _has(run, "speaker") or not _has(run, head):
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
    in_pooled = f"; {m['scope']}" if m.get("pooled") else ""
    ok = lambda *keys: all(k in m and m[k] is not None and not (isinstance(m[k], float) and math.isnan(m[k]))
                           for k in keys)  # noqa: E731
    if m.get("confounded"):  # before any other explanation: every number below may be about the channel
        causes += 1
        lines.append(f"{head} is confounded with recording conditions: a classifier on recording conditions alone "
                     f"(no speech content) reaches balanced accuracy {percent(m['confound_balanced_accuracy'])} "
                     f"[{percent(m['confound_low'])}, {percent(m['confound_high'])}] on held-out speakers vs "
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
        mapped = f"speaker→{head} (the speaker head's guess mapped to that speaker's {head})"
        if t - floor < SIGNAL_MARGIN:
            lines.append(f"{mapped} gives only {percent(t)} on seen speakers (baseline {percent(floor)}{in_pooled}): the "
                         f"speaker head has not learned identity well enough to tell whether the {head} head uses it")
        elif t - h >= IDENTITY_GAP:
            causes += 1
            lines.append(f"{head} head reaches {percent(h)} on seen speakers while {mapped} gives {percent(t)}{pooled}, "
                         f"{points(t - h)} more: the head under-uses identity")
        else:
            lines.append(f"{head} head reaches {percent(h)} on seen speakers against {percent(t)} for {mapped}{pooled}, "
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
    if ok("probe_accuracy", "probe_head_accuracy"):
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
    if ok("gradient_share"):
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
    run = _as_run(run)
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
    run = _as_run(run)
    notes: list[str] = []
    report: dict = {"run": run.name, "head": head, "accuracy": accuracy_table(run), "notes": notes}
    keys = ("baselines", "seen_unseen", "class_sizes", "small_classes", "confusion_seen", "confusion_unseen",
            "confused_pairs", "rollup", "projection", "probe", "loss_trend", "gradient_share",
            "mean_gradient_share", "measures", "verdict", "verdict_markdown")
    report |= dict.fromkeys(keys)
    if not _has(run, head):
        notes.append(f"no {head} head in this run (heads: {', '.join(run.heads)})")
        report["measures"] = measures(run, head, min_speakers, probe=False)
        report["verdict"] = verdict_from_measures(report["measures"])
        report["verdict_markdown"] = verdict_markdown(report["verdict"])
        report["gradient_share"] = gradient_share(run)
        report["mean_gradient_share"] = mean_gradient_share(run)
        return report
    if not _has(run, "speaker"):
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
    a, b = _as_run(run_a), _as_run(run_b)
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
