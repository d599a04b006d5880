"""Splits keep speakers and recordings where they belong; crops are seeded and exact."""
from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest

from conftest import speaker_table
from voxlib.config import Config
from voxlib.data import (
    BalancedSampler,
    CropDataset,
    build_vocabularies,
    crop_starts,
    encode_targets,
    make_splits,
)


def corpus_table(places=("north", "south", "east"), speakers=4, utterances=6) -> pd.DataFrame:
    return speaker_table(dict.fromkeys(places, speakers), utterances)


def test_default_splits_on_a_balanced_corpus():
    table = corpus_table()
    splits = make_splits(table, Config())
    assert set(splits) == {"train", "seen_val", "seen_test", "unseen_val", "unseen_test"}
    per_speaker = pd.crosstab(table["speaker"], splits)
    unseen = per_speaker.index[per_speaker["train"] == 0]
    # one whole speaker per birthplace, utterances half val / half test
    assert len(unseen) == 3
    assert sorted(table.drop_duplicates("speaker").set_index("speaker").loc[unseen, "birthplace"]) == [
        "east", "north", "south"]
    assert (per_speaker.loc[unseen, "unseen_val"] == 3).all() and (per_speaker.loc[unseen, "unseen_test"] == 3).all()
    # both sexes among the held-out speakers
    assert table.drop_duplicates("speaker").set_index("speaker").loc[unseen, "sex"].nunique() == 2
    seen = per_speaker.drop(unseen)
    assert (seen["train"] == 4).all() and (seen["seen_val"] == 1).all() and (seen["seen_test"] == 1).all()
    assert (seen[["unseen_val", "unseen_test"]] == 0).all().all()


def test_splits_are_deterministic_per_seed():
    table = corpus_table()
    a, b = make_splits(table, Config(seed=3)), make_splits(table, Config(seed=3))
    assert a.equals(b)
    others = [make_splits(table, Config(seed=s)) for s in range(4, 9)]
    assert any(not a.equals(o) for o in others)
    # shuffling the table's row order does not change which utterance lands where
    shuffled = table.sample(frac=1, random_state=1)
    c = make_splits(shuffled, Config(seed=3))
    assert c.sort_index().equals(a)


def test_small_classes_give_no_unseen_speaker_and_tiny_speakers_stay_in_train():
    table = corpus_table(places=("north",), speakers=2, utterances=6)  # 2 speakers < unseen_min_speakers=3
    few = pd.DataFrame([{"path": f"/c/lone_{u}.wav", "speaker": "lone", "birthplace": "south", "sex": "male",
                         "split": ""} for u in range(2)])
    table = pd.concat([table, few], ignore_index=True)
    splits = make_splits(table, Config())
    assert not splits.str.startswith("unseen").any()
    assert (splits[table["speaker"] == "lone"] == "train").all()  # 2 utterances: 10 % rounds to 0


def test_segments_of_one_recording_never_straddle_splits():
    rows = []
    for s in range(3):
        for rec in range(5):
            for seg in range(4):  # 4 segments of each of 5 recordings
                rows.append({"path": f"/c/s{s}_rec{rec}.wav", "speaker": f"s{s}", "birthplace": "x",
                             "sex": "female", "start": seg * 3.0, "end": seg * 3.0 + 3, "split": ""})
    table = pd.DataFrame(rows)
    splits = make_splits(table, Config(val_fraction=0.2, test_fraction=0.2, unseen_per_class=0))
    per_file = splits.groupby(table["path"]).nunique()
    assert (per_file == 1).all()
    assert {"seen_val", "seen_test", "train"} <= set(splits)
    # a speaker with a single long recording keeps everything in train
    single = table[table["path"] == "/c/s0_rec0.wav"].assign(speaker="solo")
    s2 = make_splits(single, Config(unseen_per_class=0))
    assert (s2 == "train").all()


def test_manifest_split_column_overrides_and_is_validated():
    table = corpus_table()
    table["split"] = "train"
    table.loc[5, "split"] = "seen_test"
    splits = make_splits(table, Config())
    assert splits[5] == "seen_test" and (splits.drop(5) == "train").all()
    table.loc[7, "split"] = "valid"
    with pytest.raises(ValueError, match=r"row 8 \(/c/north1_1.wav\): split 'valid'"):
        make_splits(table, Config())


def test_vocabularies_from_training_rows_and_unknown_targets(caplog):
    table = corpus_table()
    table["region"] = "all-the-same"
    splits = make_splits(table, Config())
    with caplog.at_level(logging.WARNING):
        vocab = build_vocabularies(table, splits, ["speaker", "birthplace", "sex", "region"])
    assert "region" not in vocab and "head 'region' skipped" in caplog.text
    train_speakers = sorted(table.loc[splits == "train", "speaker"].unique())
    assert vocab["speaker"] == train_speakers and len(train_speakers) == 9
    assert vocab["birthplace"] == ["east", "north", "south"] and vocab["sex"] == ["female", "male"]
    targets, unknown = encode_targets(table, vocab)
    unseen_rows = splits.str.startswith("unseen").to_numpy()
    assert (targets["speaker"][unseen_rows] == -1).all() and (targets["speaker"][~unseen_rows] >= 0).all()
    assert unknown == {"speaker": 18, "birthplace": 0, "sex": 0}
    assert table["speaker"].iloc[0] == vocab["speaker"][targets["speaker"][0]] or targets["speaker"][0] == -1
    with pytest.raises(ValueError, match="not in the manifest"):
        build_vocabularies(table, splits, ["accent"])


class FakeCache:
    """Clips whose every frame holds its own index, so a crop reveals where it was cut."""

    def __init__(self, lengths):
        self.lengths = lengths

    def __len__(self):
        return len(self.lengths)

    def get(self, i):
        frames = np.arange(self.lengths[i], dtype=np.float32) + 1
        return np.tile(frames, (256, 1))


def test_training_crops_are_seeded_by_epoch_and_row():
    cache = FakeCache([600, 300, 100])
    targets = {"sex": np.array([0, 1, 1])}
    ds = CropDataset(cache, [0, 1, 2], targets, n_frames=256, train=True, seed=7)
    x, y, row = ds[0]
    assert x.shape == (1, 256, 256) and x.dtype.__str__() == "torch.float32"
    assert row == 0 and int(y["sex"]) == 0 and str(y["sex"].dtype) == "torch.int64"
    start = int(x[0, 0, 0]) - 1
    assert 0 <= start <= 600 - 256 and np.array_equal(x[0, 5].numpy(), np.arange(start, start + 256) + 1)
    again = CropDataset(cache, [0, 1, 2], targets, train=True, seed=7)
    assert all(np.array_equal(ds[i][0], again[i][0]) for i in range(3))
    starts = set()
    for epoch in range(8):
        ds.set_epoch(epoch)
        starts.add(int(ds[0][0][0, 0, 0]))
    assert len(starts) > 4  # a new crop each epoch
    short = ds[2][0][0]
    assert np.array_equal(short[:, :100].numpy()[0], np.arange(1, 101)) and (short[:, 100:] == 0).all()


def test_evaluation_crops_are_fixed_and_evenly_spaced():
    assert crop_starts(600, 256, 3) == [0, 172, 344]
    assert crop_starts(100, 256, 3) == [0, 0, 0]
    ds = CropDataset(FakeCache([600]), [0], {"sex": np.array([1])}, train=False, eval_crops=3)
    x, _, _ = ds[0]
    assert x.shape == (3, 1, 256, 256)
    assert [int(x[k, 0, 0, 0]) - 1 for k in range(3)] == [0, 172, 344]
    assert int(x[2, 0, 0, -1]) == 600  # the last crop ends at the clip's last frame


def test_balanced_sampler_evens_out_classes_and_splits_across_ranks():
    labels = np.array([0] * 90 + [1] * 10)
    sampler = BalancedSampler(labels, seed=1)
    drawn = labels[list(sampler)]
    assert 0.35 < drawn.mean() < 0.65  # 10 % minority drawn about half the time
    sampler.set_epoch(1)
    assert list(sampler) != list(BalancedSampler(labels, seed=1))
    ranks = [BalancedSampler(labels, seed=1, num_replicas=2, rank=r) for r in range(2)]
    for r in ranks:
        r.set_epoch(1)
    merged = [i for pair in zip(*(list(r) for r in ranks)) for i in pair]
    assert merged == list(sampler) and len(ranks[0]) == 50


def test_corpus_without_birthplace_still_splits_and_skips_that_head(caplog):
    """JVS has no birthplace column: unseen speakers come from the whole corpus, the head is absent."""
    table = corpus_table(places=("jvs",), speakers=6).drop(columns="birthplace")
    splits = make_splits(table, Config(unseen_per_class=2))
    unseen = set(table.loc[splits.str.startswith("unseen"), "speaker"])
    assert len(unseen) == 2
    assert table.drop_duplicates("speaker").set_index("speaker").loc[sorted(unseen), "sex"].nunique() == 2
    with caplog.at_level(logging.WARNING):
        vocab = build_vocabularies(table, splits, ["speaker", "birthplace", "sex"])
    assert set(vocab) == {"speaker", "sex"} and "birthplace" in caplog.text


def test_split_by_utterance_splits_segments_of_one_talk():
    """CSJ-style: every speaker has one long talk cut into segments that share a path."""
    table = corpus_table(places=("tokyo", "osaka"), speakers=3, utterances=10)
    table["path"] = table["speaker"].map(lambda s: f"/c/{s}.wav")
    by_recording = make_splits(table, Config(unseen_per_class=0))
    assert set(by_recording) == {"train"}  # one recording per speaker cannot be split
    by_utterance = make_splits(table, Config(unseen_per_class=0, split_by="utterance"))
    counts = pd.crosstab(table["speaker"], by_utterance)
    assert (counts["train"] == 8).all() and (counts["seen_val"] == 1).all() and (counts["seen_test"] == 1).all()
