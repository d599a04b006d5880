"""Speaker folds: every eligible speaker unseen exactly once; the pooled estimate and its interval."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from conftest import speaker_table
from voxlib.config import Config, ConfigError
from voxlib.pooled import pooled_over_folds
from voxlib.data import make_splits, unseen_folds
from voxlib.experiment import refuse_useless_folds
from voxlib.train import train


def corpus_table(sizes: dict[str, int], utterances: int = 4) -> pd.DataFrame:
    return speaker_table(sizes, utterances)


SIZES = {"a": 6, "b": 5, "c": 3, "d": 2, "e": 1}  # with unseen_min_speakers=3, d and e are never held out


@pytest.mark.parametrize("k", [2, 3, 4])
def test_folds_hold_out_every_eligible_speaker_exactly_once(k):
    table = corpus_table(SIZES)
    speakers = table.drop_duplicates("speaker").set_index("speaker")
    unseen_in = {}
    for fold in range(k):
        splits = make_splits(table, Config(folds=k, fold=fold))
        per_speaker = pd.crosstab(table["speaker"], splits.str.startswith("unseen"))
        unseen = set(per_speaker.index[per_speaker.get(True, 0) > 0])
        assert all((splits[table["speaker"] == s].str.startswith("unseen")).all() for s in unseen)  # whole speakers
        for s in unseen:
            assert s not in unseen_in, f"{s} unseen in folds {unseen_in[s]} and {fold}"
            unseen_in[s] = fold
        trained = set(table.loc[splits == "train", "speaker"])
        assert set(speakers.loc[list(trained), "birthplace"]) == set(SIZES)  # every class keeps a seen speaker
    eligible = set(speakers.index[speakers["birthplace"].isin(["a", "b", "c"])])
    assert set(unseen_in) == eligible
    assert unseen_folds(table, Config(folds=k)) == unseen_in
    # per class, the folds' shares differ by at most one speaker
    for place in ("a", "b", "c"):
        counts = pd.Series([unseen_in[s] for s in unseen_in if speakers.at[s, "birthplace"] == place])
        counts = counts.value_counts().reindex(range(k), fill_value=0)
        assert counts.max() - counts.min() <= 1 and counts.sum() == SIZES[place]


def test_folds_mix_sexes_and_spread_the_larger_shares():
    table = corpus_table({"a": 3, "b": 3, "c": 3, "d": 3})
    folds = pd.Series(unseen_folds(table, Config(folds=2)))
    sexes = table.drop_duplicates("speaker").set_index("speaker")["sex"]
    for fold in (0, 1):
        held = folds.index[folds == fold]
        assert set(sexes[held]) == {"female", "male"}
    # each class splits 2 + 1; the class index rotates which fold gets the 2, so the folds are even
    assert folds.value_counts().tolist() == [6, 6]


def test_one_fold_is_the_single_split():
    table = corpus_table(SIZES)
    single = make_splits(table, Config())
    assert single.equals(make_splits(table, Config(folds=1, fold=0)))
    held = set(unseen_folds(table, Config()))
    assert len(held) == 3 and held == set(table.loc[single.str.startswith("unseen"), "speaker"])


def predictions(per_speaker: dict[str, tuple[int, int, int]]) -> pd.DataFrame:
    """speaker -> (fold, right, wrong) as rows of birthplace predictions."""
    rows = []
    for speaker, (fold, right, wrong) in per_speaker.items():
        rows += [{"fold": fold, "speaker": speaker, "birthplace_true": "x", "birthplace_pred": "x"}] * right
        rows += [{"fold": fold, "speaker": speaker, "birthplace_true": "x", "birthplace_pred": "y"}] * wrong
    return pd.DataFrame(rows)


def test_pooled_estimate_counts_every_utterance_once_and_reports_each_fold():
    table = predictions({"s1": (0, 3, 1), "s2": (0, 2, 2), "s3": (1, 0, 4), "s4": (1, 4, 0), "s5": (2, 1, 3)})
    pooled = pooled_over_folds(table, n_boot=500)
    assert pooled["accuracy"] == pytest.approx(10 / 20)
    assert pooled["fold_accuracy"] == {0: pytest.approx(5 / 8), 1: pytest.approx(4 / 8), 2: pytest.approx(1 / 4)}
    assert pooled["fold_std"] == pytest.approx(np.std([5 / 8, 1 / 2, 1 / 4], ddof=1))
    assert (pooled["n"], pooled["speakers"], pooled["folds"]) == (20, 5, 3)
    assert pooled["low"] < pooled["accuracy"] < pooled["high"]
    assert pooled == pooled_over_folds(table, n_boot=500)  # seeded


def test_interval_is_resampled_over_speakers_not_utterances():
    # every speaker at exactly 75 %: any draw of speakers gives 75 %, however few utterances
    same = pooled_over_folds(predictions({f"s{i}": (i % 2, 3, 1) for i in range(6)}))
    assert same["low"] == same["high"] == same["accuracy"] == 0.75
    # two speakers, one always right, one always wrong, equal sizes: a draw of two speakers gives
    # 0, 0.5 or 1 with probabilities 1/4, 1/2, 1/4, so the 95 % interval is [0, 1] ...
    split = pooled_over_folds(predictions({"right": (0, 50, 0), "wrong": (1, 0, 50)}), n_boot=4000)
    assert (split["accuracy"], split["low"], split["high"]) == (0.5, 0.0, 1.0)
    # ... while an utterance-level interval on the same 100 rows would be about +-10 %
    many = pooled_over_folds(predictions({f"s{i}": (i % 3, 50 * (i % 2), 50 * (1 - i % 2)) for i in range(40)}))
    assert many["accuracy"] == 0.5 and 0.3 < many["low"] < 0.45 and 0.55 < many["high"] < 0.7


def test_a_speaker_in_two_folds_is_refused():
    table = pd.concat([predictions({"s1": (0, 1, 1)}), predictions({"s1": (1, 1, 0)})])
    with pytest.raises(ValueError, match=r"\['s1'\] are unseen in more than one fold"):
        pooled_over_folds(table)


# --- folds that cannot all hold out a speaker are refused before any training ------------------------
def write_manifest(path, sizes: dict[str, int], birthplace: bool = True):
    """A manifest (no audio: the check reads only the speaker table) with ``sizes[place]`` speakers."""
    table = speaker_table(sizes, utterances=2).drop(columns=["row", "split"])
    if not birthplace:
        table = table.drop(columns="birthplace")
    path.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(path, index=False)
    return path


@pytest.mark.parametrize("sizes,settings,message", [
    ({"a": 2, "b": 2, "c": 1}, {"folds": 3}, r"5 speakers in 3 birthplace class\(es\): a 2, b 2, c 1; no class has "
                                             r"the 3 speakers unseen_min_speakers=3 asks for, .* set "
                                             r"unseen_min_speakers=2"),
    ({"a": 1, "b": 1}, {"folds": 2}, r"every class has one speaker: use folds=1 \(seeds=N repeats"),
    ({"a": 4, "b": 2}, {"folds": 5}, r"only 4 speakers can be held out, so fold\(s\) 4 would hold out none; use "
                                     r"folds=4 or fewer"),
    ({"a": 3, "b": 3}, {"folds": 2, "unseen_per_class": 0}, r"unseen_per_class=0 holds out no speaker"),
    ({"a": 3, "b": 3}, {"folds": 3, "unseen_min_speakers": 4}, r"set unseen_min_speakers=3"),
])
def test_folds_that_cannot_hold_out_a_speaker_are_refused_before_training(tmp_path, sizes, settings, message):
    manifest = write_manifest(tmp_path / "corpus" / "manifest.csv", sizes)
    with pytest.raises(ConfigError, match=r"parameter 'folds': \d+ folds would train runs without an unseen-speaker "
                                          r"result: .*" + message):
        train(Config(manifest=str(manifest), run_dir=str(tmp_path / "run"), **settings))
    assert not (tmp_path / "run").exists()


def test_a_corpus_without_birthplaces_is_counted_as_one_class(tmp_path):
    manifest = write_manifest(tmp_path / "jvs" / "manifest.csv", {"s": 3}, birthplace=False)
    with pytest.raises(ConfigError, match=r"3 speakers in 1 corpus class\(es\): \(whole corpus\) 3; only 3 speakers "
                                          r"can be held out, so fold\(s\) 3 would hold out none; use folds=3 or fewer"):
        refuse_useless_folds(Config(manifest=str(manifest), folds=4))
    refuse_useless_folds(Config(manifest=str(manifest), folds=3))  # every fold holds out one speaker: fine
    refuse_useless_folds(Config(manifest=str(manifest), folds=1, seeds=3))  # seeds need no unseen speaker
