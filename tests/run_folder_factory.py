"""Synthetic run folders whose right answers are known by construction.

A real run takes minutes and its numbers are whatever the network learned; these folders follow the
run-folder contract of ARCHITECTURE.md file for file, but every prediction is *chosen*: a head with
accuracy ``a`` on a split gets exactly ``round(a * n)`` right rows, wrong predictions never hit the
true class by accident, and the trunk embeddings carry birthplace linearly with a chosen strength.
So a test can state the expected accuracy, baseline or verdict before looking at the code under test.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from voxlib.config import Config

SEXES = ("female", "male")


def make_run_folder(
    root: Path,
    speakers: Sequence[int] = (4, 4, 4),
    unseen: int | Sequence[int] = 1,
    utterances: int = 10,
    held_out: int = 2,
    regions: Sequence[str] | None = None,
    heads: Sequence[str] = ("speaker", "birthplace", "sex"),
    birthplace_seen: float | str = 1.0,
    birthplace_unseen: float | str = 1 / 3,
    speaker_seen: float = 1.0,
    unseen_speaker_same_birthplace: float = 0.0,
    sex_seen: float = 1.0,
    sex_unseen: float = 1.0,
    true_in_top3: float = 0.5,
    epochs: int = 10,
    loss_tau: dict[str, float] | None = None,
    unseen_val_loss_slope: float = 0.0,
    grad_norm: dict[str, float] | None = None,
    probe_signal: float = 0.0,
    embedding_dim: int = 16,
    train_sample: int = 4,
    write_embeddings: bool = True,
    seed: int = 0,
) -> Path:
    """Write a complete run folder under ``root`` and return it.

    ``speakers[i]`` training speakers and ``unseen[i]`` unseen speakers come from birthplace class
    ``place{i:02d}`` (optionally in region ``regions[i]``). Every speaker has ``utterances``
    utterances; a training speaker gives ``held_out`` of them to each of seen_val and seen_test;
    an unseen speaker's utterances are split evenly between unseen_val and unseen_test.

    ``birthplace_seen`` / ``birthplace_unseen``: accuracy of the birthplace head on each split, or
    ``"speaker"`` to predict the birthplace of the predicted speaker (a head that only knows identity).
    On unseen speakers the speaker head predicts a training speaker of the right birthplace for exactly
    ``unseen_speaker_same_birthplace`` of the rows, so speaker->birthplace accuracy there is that share.
    Wrong speaker predictions on seen speakers always point to a speaker from another birthplace.
    """
    rng = np.random.default_rng(seed)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    n_classes = len(speakers)
    unseen = [unseen] * n_classes if isinstance(unseen, int) else list(unseen)
    places = [f"place{i:02d}" for i in range(n_classes)]

    # splits.csv ------------------------------------------------------------------------------------
    records = []
    for i, place in enumerate(places):
        for j in range(speakers[i] + unseen[i]):
            is_unseen = j >= speakers[i]
            speaker = f"{place}_{'u' if is_unseen else 's'}{j}"
            for u in range(utterances):
                if is_unseen:
                    split = "unseen_val" if u < utterances // 2 else "unseen_test"
                elif u < held_out:
                    split = "seen_val"
                elif u < 2 * held_out:
                    split = "seen_test"
                else:
                    split = "train"
                records.append({"path": f"{speaker}/{u:03d}.wav", "speaker": speaker, "birthplace": place,
                                "sex": SEXES[(i + j) % 2], "region": regions[i] if regions else "", "split": split})
    splits = pd.DataFrame(records)
    splits.insert(0, "row", np.arange(len(splits)))
    if not regions:
        splits = splits.drop(columns="region")
    train = splits[splits["split"] == "train"]
    labels = {"speaker": sorted(train["speaker"].unique()), "birthplace": sorted(set(places)),
              "sex": list(SEXES)}
    labels = {h: labels[h] for h in heads}
    speaker_place = dict(zip(train["speaker"], train["birthplace"]))

    # predictions.csv ---------------------------------------------------------------------------------
    held = splits[splits["split"] != "train"].reset_index(drop=True)
    pred = pd.DataFrame({"row": held["row"], "path": held["path"], "speaker": held["speaker"],
                         "split": held["split"]})
    if "speaker" in heads:
        pred["speaker_true"] = np.where(held["split"].str.startswith("seen"), held["speaker"], "")
        pred["speaker_pred"] = ""
        for split, idx in held.groupby("split").groups.items():
            idx = np.asarray(idx)
            if split.startswith("seen"):
                hit = _exact_hits(len(idx), speaker_seen, rng)
            else:
                hit = _exact_hits(len(idx), unseen_speaker_same_birthplace, rng)
            for k, ok in zip(idx, hit):
                place = held.at[k, "birthplace"]
                if split.startswith("seen") and ok:
                    choice = held.at[k, "speaker"]
                else:
                    same = [s for s in labels["speaker"] if (speaker_place[s] == place) == bool(ok)
                            and s != held.at[k, "speaker"]]
                    choice = same[rng.integers(len(same))]
                pred.at[k, "speaker_pred"] = choice
        _finish_head(pred, "speaker", labels["speaker"], true_in_top3, rng)
    if "birthplace" in heads:
        pred["birthplace_true"] = held["birthplace"]
        pred["birthplace_pred"] = ""
        for split, idx in held.groupby("split").groups.items():
            idx = np.asarray(idx)
            rule = birthplace_seen if split.startswith("seen") else birthplace_unseen
            if rule == "speaker":
                pred.loc[idx, "birthplace_pred"] = pred.loc[idx, "speaker_pred"].map(speaker_place)
            else:
                pred.loc[idx, "birthplace_pred"] = _predict(held.loc[idx, "birthplace"].to_numpy(),
                                                            labels["birthplace"], rule, rng)
        _finish_head(pred, "birthplace", labels["birthplace"], true_in_top3, rng)
    if "sex" in heads:
        pred["sex_true"] = held["sex"]
        pred["sex_pred"] = ""
        for split, idx in held.groupby("split").groups.items():
            idx = np.asarray(idx)
            acc = sex_seen if split.startswith("seen") else sex_unseen
            pred.loc[idx, "sex_pred"] = _predict(held.loc[idx, "sex"].to_numpy(), labels["sex"], acc, rng)
        _finish_head(pred, "sex", labels["sex"], true_in_top3, rng)

    # metrics.csv -------------------------------------------------------------------------------------
    tau = {h: 2.0 for h in heads} | (loss_tau or {})
    norms = {h: 1.0 for h in heads} | (grad_norm or {})
    metrics = []
    for epoch in range(1, epochs + 1):
        for split, floor in (("train", 0.2), ("seen_val", 0.4), ("unseen_val", 0.8)):
            for head in heads:
                loss = floor + 2.0 * np.exp(-epoch / tau[head])
                if split == "unseen_val" and head == "birthplace":
                    loss += unseen_val_loss_slope * epoch
                metrics.append((epoch, split, head, "loss", loss))
                metrics.append((epoch, split, head, "acc", 1.0 - 0.5 * np.exp(-epoch / tau[head])))
        for head in heads:
            metrics.append((epoch, "train", head, "grad_norm", norms[head] * (1 + 0.05 * np.sin(epoch))))
        metrics.append((epoch, "train", "all", "seconds", 1.5))

    # embeddings.npz ----------------------------------------------------------------------------------
    if write_embeddings:
        sample = train.groupby("speaker").head(train_sample)
        chosen = pd.concat([sample, splits[splits["split"].isin(["seen_test", "unseen_test"])]])
        centroid = {p: v for p, v in zip(places, rng.normal(size=(n_classes, embedding_dim)))}
        offset = {s: rng.normal(scale=0.3, size=embedding_dim) for s in splits["speaker"].unique()}
        features = np.stack([probe_signal * centroid[p] + offset[s] + rng.normal(size=embedding_dim)
                             for p, s in zip(chosen["birthplace"], chosen["speaker"])])
        np.savez(root / "embeddings.npz", features=features.astype(np.float16),
                 row=chosen["row"].to_numpy(), split=chosen["split"].to_numpy().astype(str))

    config = Config(epochs=epochs, labels=",".join(heads), seed=seed).to_dict()
    config |= {"voxlib_version": "0.1.0", "git_commit": "synthetic", "manifest_digest": "synthetic",
               "cache_key": "synthetic"}
    (root / "config.json").write_text(json.dumps(config, indent=1))
    (root / "labels.json").write_text(json.dumps(labels, indent=1))
    # a corpus without birthplaces (JVS) has no such column at all
    splits.drop(columns=[] if "birthplace" in heads else ["birthplace"]).to_csv(root / "splits.csv", index=False)
    order = ["row", "path", "speaker", "split"] + [f"{h}_{part}" for h in heads
                                                   for part in ("true", "pred", "prob", "top5")]
    pred[order].to_csv(root / "predictions.csv", index=False)
    pd.DataFrame(metrics, columns=["epoch", "split", "head", "metric", "value"]).to_csv(
        root / "metrics.csv", index=False)
    # written last, as training does: a finished run
    (root / "summary.json").write_text(json.dumps({"epochs": epochs, "epochs_trained": epochs, "best_epoch": epochs}))
    return root


def _exact_hits(n: int, accuracy: float, rng: np.random.Generator) -> np.ndarray:
    """A shuffled boolean mask with exactly round(accuracy * n) True values."""
    hits = np.zeros(n, dtype=bool)
    hits[: int(round(accuracy * n))] = True
    rng.shuffle(hits)
    return hits


def _predict(truth: np.ndarray, classes: list[str], accuracy: float, rng: np.random.Generator) -> np.ndarray:
    """Predictions that are right on exactly round(accuracy * n) rows and wrong on the others."""
    hits = _exact_hits(len(truth), accuracy, rng)
    out = truth.astype(object).copy()
    for k in np.flatnonzero(~hits):
        others = [c for c in classes if c != truth[k]]
        out[k] = others[rng.integers(len(others))]
    return out


def _finish_head(pred: pd.DataFrame, head: str, classes: list[str], true_in_top3: float,
                 rng: np.random.Generator) -> None:
    """Fill ``{head}_prob`` and ``{head}_top5``: predicted class first; among wrong rows with a target,
    exactly round(true_in_top3 * n_wrong) put the true class second, the rest keep it out of the
    first three whenever there are enough other classes."""
    truth, guess = pred[f"{head}_true"].to_numpy(), pred[f"{head}_pred"].to_numpy()
    wrong = np.flatnonzero((truth != guess) & (truth != ""))
    hinted = set(wrong[_exact_hits(len(wrong), true_in_top3, rng)].tolist())
    top5, prob = [], []
    for k, (t, g) in enumerate(zip(truth, guess)):
        names = [g] + ([t] if k in hinted else [])
        names += [c for c in classes if c not in names and c != t][: 5 - len(names)]
        if t and t not in names and len(names) < 5:
            names.append(t)
        top5.append("|".join(names[:5]))
        prob.append(0.9 if t == g else 0.4)
    pred[f"{head}_top5"] = top5
    pred[f"{head}_prob"] = prob
