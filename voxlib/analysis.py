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

voxlib.verdict turns those numbers into sentences with explicit thresholds, so the conclusions are
recomputed for every run rather than written by hand. Everything takes a ``head`` argument (default
``birthplace``) so the same questions can be asked of another label.
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

from voxlib.evaluate import balanced_accuracy, class_sizes, majority_class, per_class_metrics, scored, scores
from voxlib.runfolder import HELD_OUT_SPLITS, SEEN_SPLITS, UNSEEN_SPLITS, Run, RunError, load_run

GROUPS = {"seen": SEEN_SPLITS, "unseen": UNSEEN_SPLITS}
STANDARD_COLUMNS = {"row", "path", "rel_path", "speaker", "birthplace", "sex", "split", "start", "end"}

TSNE_MAX = 2000  # t-SNE above this many points is slow and no clearer than PCA
TSNE_THREADED_FROM = 1000  # below this many points t-SNE runs single-threaded (faster)


class ProbeUnavailable(RunError):
    """The run folder is fine but has too little to fit or score a probe (e.g. one class only)."""


def as_run(run: Run | str | Path) -> Run:
    """A Run, read from its folder when given a path."""
    return run if isinstance(run, Run) else load_run(run)


def has_head(run: Run, head: str) -> bool:
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
        if has_head(run, "speaker") and head != "speaker":
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
    for head in [h for h in heads if has_head(run, h)]:
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
    head_guess = pred.loc[rows_test, f"{head}_pred"].to_numpy() if has_head(run, head) else None
    majority = majority_class(run, head) if has_head(run, head) else run.train[head].mode().sort_values().iloc[0]
    n_classes = len(run.labels[head]) if has_head(run, head) else run.train[head].nunique()
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
