"""The generated first-language reading corpus: one paragraph per reader, cut into windows, reproducible."""
from __future__ import annotations

import csv
from pathlib import Path

import pytest
import soundfile as sf

from voxlib.config import Config
from voxlib.corpora import l1_reading, read_manifest
from voxlib.data import make_splits


def read_csv(path: Path) -> list[dict]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """2 languages x 2 readers (1 female, 1 male), 4 s windows."""
    return l1_reading.build_reading_corpus(tmp_path_factory.mktemp("l1") / "small", ["german", "spanish"], 2,
                                           seed=3).parent


def test_each_reader_is_one_file_cut_into_whole_windows(corpus):
    rows = read_csv(corpus / "manifest.csv")
    assert list(rows[0]) == ["path", "speaker", "birthplace", "sex", "start", "end"]
    readers = {r["speaker"]: (r["birthplace"], r["sex"]) for r in rows}
    assert readers == {"german-f1": ("german", "female"), "german-m1": ("german", "male"),
                       "spanish-f1": ("spanish", "female"), "spanish-m1": ("spanish", "male")}
    for speaker in readers:
        mine = [r for r in rows if r["speaker"] == speaker]
        assert {r["path"] for r in mine} == {f"wav/{speaker}.wav"}
        seconds = sf.info(corpus / mine[0]["path"]).duration
        starts = [float(r["start"]) for r in mine]
        assert starts == [4.0 * k for k in range(len(mine))]
        assert all(float(r["end"]) - float(r["start"]) == 4.0 for r in mine)
        assert float(mine[-1]["end"]) <= seconds < float(mine[-1]["end"]) + 4.0  # only the short tail is dropped
        assert len(mine) >= 5  # the paragraph takes over 20 s to read


def test_languages_read_the_same_paragraph_with_their_own_phonemes(corpus):
    readers = {r["speaker"]: r for r in read_csv(corpus / "speakers.csv")}
    german, spanish = readers["german-f1"]["phonemes"], readers["spanish-f1"]["phonemes"]
    assert german != spanish
    assert readers["german-m1"]["phonemes"] == german  # the language, not the voice, sets the phonemes
    # "Thursday" is read with the language's rules (a 't'), not as English 'θˈɜːzdeɪ'
    assert german.split()[1].startswith("t") and spanish.split()[1].startswith("t")


def test_same_settings_give_identical_files_and_the_manifest_reads_and_splits(corpus, tmp_path):
    again = l1_reading.main(["--out", str(tmp_path / "again"), "--languages", "german,spanish", "--speakers", "2",
                             "--seed", "3"])
    assert again == 0
    rows = read_csv(corpus / "manifest.csv")
    assert read_csv(tmp_path / "again" / "manifest.csv") == rows
    for path in {r["path"] for r in rows}:
        assert (tmp_path / "again" / path).read_bytes() == (corpus / path).read_bytes(), path
    manifest = read_manifest(corpus / "manifest.csv", progress=False, cache_dir=tmp_path / "cache")
    assert len(manifest.table) == len(rows) and manifest.table["duration"].eq(4.0).all()
    splits = make_splits(manifest.table, Config(split_by="utterance", unseen_min_speakers=2))
    assert set(splits) >= {"train", "seen_val", "unseen_val"}


def test_unknown_language_is_refused():
    with pytest.raises(ValueError, match="klingon"):
        l1_reading.plan_readers(["german", "klingon"], 2, 0)
