"""Label checks: per-speaker labels that disagree stop the run; spelling variants are reported."""
from __future__ import annotations

import unicodedata

import pandas as pd
import pytest

from conftest import make_tiny_corpus
from voxlib.corpora.labels import check_labels, spelling_variants, too_few_speakers, too_few_speakers_notice
from voxlib.corpora.manifest import ManifestError, read_manifest

LABELS = ["speaker", "birthplace", "sex"]


@pytest.fixture
def corpus(tmp_path):
    """3 birthplaces x 2 speakers x 4 short utterances; the manifest is edited per test."""
    return make_tiny_corpus(tmp_path / "c", speakers_per_birthplace=2, utterances=4, seconds=0.5)


def edit(manifest, change) -> None:
    table = pd.read_csv(manifest, dtype=str, keep_default_na=False)
    change(table)
    table.to_csv(manifest, index=False)


def frame(rows: list[tuple[str, str, str]]) -> pd.DataFrame:
    table = pd.DataFrame(rows, columns=LABELS)
    table["row"] = range(1, len(table) + 1)
    return table


def test_a_speaker_with_two_birthplaces_stops_naming_speaker_values_and_counts(corpus):
    def change(t):
        t.loc[t["speaker"] == "north0", "birthplace"] = ["north", "north", "north", "Glasgow"]
        t.loc[t["speaker"] == "south1", "birthplace"] = ["south", "east", "east", "east"]
        t.loc[t["speaker"] == "east0", "sex"] = ["female", "female", "m", "female"]
    edit(corpus, change)
    with pytest.raises(ManifestError) as info:
        read_manifest(corpus, progress=False, use_cache=False)
    lines = str(info.value).splitlines()
    assert lines[0].endswith("3 problems")  # all at once, one line per speaker and label
    north0 = next(line for line in lines if "'north0'" in line)
    assert "2 birthplace values: 'north' (3 rows), 'Glasgow' (1 row: row 4)" in north0
    south1 = next(line for line in lines if "'south1'" in line)
    assert "'east' (3 rows), 'south' (1 row: row 13)" in south1
    east0 = next(line for line in lines if "'east0'" in line)
    assert "2 sex values: 'female' (3 rows), 'male' (1 row: row 19)" in east0  # compared after normalising
    assert all("label_conflicts=majority" in line for line in lines[1:])


def test_majority_resolution_changes_the_minority_rows_and_reports_it(corpus):
    def change(t):
        t.loc[t["speaker"] == "north0", "birthplace"] = ["north", "north", "south", "north"]
    edit(corpus, change)
    m = read_manifest(corpus, progress=False, use_cache=False, label_conflicts="majority")
    assert (m.table.loc[m.table["speaker"] == "north0", "birthplace"] == "north").all()
    assert m.table["birthplace"].value_counts().to_dict() == {"north": 8, "south": 8, "east": 8}
    notice = [n for n in m.notices if "north0" in n]
    assert notice == ["speaker 'north0': birthplace set to its majority value 'north' on 1 row(s) "
                      "(label_conflicts=majority)"]


def test_a_tie_stops_even_with_majority_resolution():
    table = frame([("a", "x", "female"), ("a", "y", "female"), ("b", "x", "male"), ("b", "x", "male")])
    checked = check_labels(table, LABELS, ["birthplace", "sex"], "majority")
    assert len(checked.problems) == 1
    assert checked.problems[0].startswith("speaker 'a' has 2 birthplace values: 'x' (1 row), 'y' (1 row: row 2)")
    assert "tie" in checked.problems[0]
    assert checked.notices == []


def test_an_extra_column_declared_per_speaker_is_checked_and_undeclared_ones_are_not():
    table = frame([("a", "x", "female"), ("a", "x", "female"), ("b", "y", "male")])
    table["region"] = ["Kanto", "Kinki", "Kanto"]
    table["mic"] = ["usb", "headset", "usb"]  # not declared: may vary within a speaker
    checked = check_labels(table, LABELS + ["region", "mic"], ["birthplace", "sex", "region"])
    assert len(checked.problems) == 1 and "speaker 'a' has 2 region values" in checked.problems[0]


def test_speaker_labels_naming_a_missing_column_is_a_problem_but_a_missing_birthplace_is_not():
    table = frame([("a", "x", "female")]).drop(columns=["birthplace"])
    assert check_labels(table, ["speaker", "sex"], ["birthplace", "sex"]).problems == []
    problems = check_labels(table, ["speaker", "sex"], ["sex", "regoin"]).problems
    assert problems == ["speaker_labels names 'regoin', which is not a label column of the manifest "
                        "(label columns: speaker, sex)"]


def test_case_whitespace_and_width_variants_are_reported_not_merged_nfd_is_merged():
    nfc, nfd = "Zürich", unicodedata.normalize("NFD", "Zürich")
    assert nfc != nfd
    rows = ([("a", "Glasgow", "female")] * 12 + [("b", "glasgow", "male")] * 3 + [("c", "Ｇｌａｓｇｏｗ", "male")]
            + [("d", "New York", "female")] * 2 + [("e", "New  York", "male")]
            + [("f", nfc, "female")] * 2 + [("g", nfd, "male")] * 2)
    checked = check_labels(frame(rows), LABELS, ["birthplace", "sex"])
    assert checked.problems == []
    assert checked.notices == [
        "birthplace: 'Glasgow' (12 rows) and 'glasgow' (3 rows) and 'Ｇｌａｓｇｏｗ' (1 row) differ only by case, "
        "whitespace or character width; they are kept as separate classes (rename them in the manifest if they "
        "are one)",
        "birthplace: 'New York' (2 rows) and 'New  York' (1 row) differ only by case, whitespace or character width; "
        "they are kept as separate classes (rename them in the manifest if they are one)",
    ]
    classes = checked.table["birthplace"].value_counts()
    assert classes[nfc] == 4 and nfd not in classes.index  # NFD merged into the NFC spelling
    assert {"Glasgow", "glasgow", "Ｇｌａｓｇｏｗ"} <= set(classes.index)  # reported, not merged
    assert [name for name, _ in spelling_variants(checked.table, "birthplace")[0]] == [
        "Glasgow", "glasgow", "Ｇｌａｓｇｏｗ"]


def test_one_speaker_spelled_two_ways_is_a_conflict_and_reaches_the_manifest_notices(corpus):
    def change(t):
        t.loc[t["birthplace"] == "north", "birthplace"] = "Glasgow"
        t.loc[t["speaker"] == "north1", "birthplace"] = "glasgow"
    edit(corpus, change)
    m = read_manifest(corpus, progress=False, use_cache=False)
    assert any(n.startswith("birthplace: 'Glasgow' (4 rows) and 'glasgow' (4 rows) differ only by case")
               for n in m.notices)
    edit(corpus, lambda t: t.__setitem__("birthplace", t["birthplace"].where(t.index != 1, "glasgow")))
    with pytest.raises(ManifestError, match=r"speaker 'north0' has 2 birthplace values: 'Glasgow' \(3 rows\), "
                                            r"'glasgow' \(1 row: row 2\)"):
        read_manifest(corpus, progress=False, use_cache=False)


def test_classes_with_too_few_speakers_for_unseen_evaluation_are_named():
    rows = [(f"n{i}", "north", "female") for i in range(4)] + [("s0", "south", "male"), ("s1", "south", "female"),
                                                               ("e0", "east", "male")]
    table = frame(rows + rows)  # two utterances each: speakers, not rows, are counted
    small = too_few_speakers(table, "birthplace", 3)
    assert small.to_dict("list") == {"class": ["east", "south"], "speakers": [1, 2]}
    assert too_few_speakers_notice(table, "birthplace", 3) == (
        "2 birthplace class(es) have fewer than 3 speakers (unseen_min_speakers) and get no unseen-speaker "
        "evaluation: 'east' (1), 'south' (2)")
    assert too_few_speakers_notice(table, "birthplace", 1) is None
    assert too_few_speakers(table.drop(columns=["birthplace"]), "birthplace", 3).empty
