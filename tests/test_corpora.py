"""Corpus adapters: each one on a small copy of its corpus' layout (tests/corpus_fixtures.py)."""
from __future__ import annotations

import csv
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from corpus_fixtures import (make_accent_archive_tree, make_common_voice_tree, make_csj_tree, make_jvs_tree,
                             make_vctk_tree, write_tone)
from voxlib.corpora import read_manifest
from voxlib.corpora.__main__ import main
from voxlib.corpora.accent_archive import windows
from voxlib.corpora.common import (ADAPTERS, CommonOptions, CorpusError, Utterance, normalise_sex,
                                   write_corpus)
from voxlib.corpora.csj import PREFECTURES, REGIONS, region_of

REPO = Path(__file__).resolve().parent.parent


def rows(path: Path) -> list[dict[str, str]]:
    with Path(path).open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def reasons(summary) -> Counter:
    """Reasons counted from rejected.csv itself, to check it against the summary."""
    return Counter(r["reason"] for r in rows(summary.rejected_csv))


def build(name: str, root: Path, out: Path | None = None, **options):
    return ADAPTERS[name](root, out, progress=False, **options)


# --- CSJ --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def csj_root(tmp_path_factory) -> Path:
    return make_csj_tree(tmp_path_factory.mktemp("csj"))


def test_csj_cuts_talks_into_ipus_with_exact_bounds(csj_root, tmp_path):
    summary = build("csj", csj_root, tmp_path / "csj.csv")
    table = rows(summary.manifest)
    assert list(table[0]) == ["path", "speaker", "birthplace", "sex", "start", "end", "region", "generation"]
    got = [(Path(r["path"]).name, r["speaker"], r["start"], r["end"]) for r in table]
    assert got == [
        ("A01F0002.wav", "0002", "0", "0.6"), ("A01F0002.wav", "0002", "0.8", "1.6"),
        ("A01M0001.wav", "0001", "0.1", "0.9"), ("A01M0001.wav", "0001", "2.7", "3.4"),
        ("S01F0003.wav", "0003", "0.2", "1"), ("S01F0003.wav", "0003", "1.2", "2"),
    ]
    labels = {r["speaker"]: (r["birthplace"], r["sex"], r["region"], r["generation"]) for r in table}
    assert labels == {
        "0001": ("東京都", "male", "Kanto", "1970"),  # 男 in kanji
        "0002": ("大阪府", "female", "Kinki", "1980"),  # romaji 'Osaka', XML in Shift_JIS
        "0003": ("北海道", "female", "Hokkaido", "1960"),  # from RDB/infoSpeaker.tsv, ID '3'
    }
    assert summary.utterances == 6 and summary.speakers == 3
    assert summary.hours == pytest.approx((0.6 + 0.8 + 0.8 + 0.7 + 0.8 + 0.8) / 3600)
    assert summary.dropped == {
        "IPU shorter than 0.5 s": 2, "unknown sex value 'X'": 2, "missing audio file": 2,
        "IPU audio masked with noise ((R) tag)": 1, "unreadable talk XML": 1,
        "dialogue talk skipped (use --dialogues)": 1, "segment ends after the audio": 1,
    }
    assert reasons(summary) == Counter(summary.dropped)
    beyond = [r for r in rows(summary.rejected_csv) if r["reason"] == "segment ends after the audio"]
    assert beyond[0]["detail"] == "3.5-4 s; audio is 3.800 s"
    assert summary.outside_paths  # written outside the corpus root
    assert "allow-outside-paths" in str(summary)


def test_csj_merging_min_duration_and_dialogues(csj_root, tmp_path):
    merged = build("csj", csj_root, tmp_path / "m.csv", merge_gap=0.2)
    spans = [(r["start"], r["end"]) for r in rows(merged.manifest) if r["speaker"] == "0001"]
    assert spans == [("0.1", "0.9"), ("1", "1.7"), ("2.7", "3.4")]  # IPUs 2+3 joined across 0.15 s
    assert "IPU shorter than 0.5 s" not in merged.dropped

    strict = build("csj", csj_root, tmp_path / "s.csv", min_duration=0.75)
    assert [(r["speaker"], r["start"]) for r in rows(strict.manifest)] == [
        ("0002", "0.8"), ("0001", "0.1"), ("0003", "0.2"), ("0003", "1.2")]
    assert strict.dropped["IPU shorter than 0.75 s"] == 5  # 0001: IPUs 2, 3, 5, 6; 0002: IPU 1

    both = build("csj", csj_root, tmp_path / "d.csv", dialogues=True)
    dialogue = [(Path(r["path"]).name, r["speaker"], r["sex"], r["birthplace"], r["region"], r["start"])
                for r in rows(both.manifest) if r["path"].endswith(("-L.wav", "-R.wav"))]
    assert dialogue == [
        ("D01M0006-L.wav", "0006", "male", "福岡県", "Kyushu-Okinawa", "0.1"),
        ("D01M0006-L.wav", "0006", "male", "福岡県", "Kyushu-Okinawa", "1.7"),
        ("D01M0006-R.wav", "0007", "female", "海外", "abroad", "0.9"),
    ]
    assert both.speakers == 5 and "dialogue talk skipped (use --dialogues)" not in both.dropped


def test_csj_dialogue_channels_from_rdb_tables(tmp_path):
    root = make_csj_tree(tmp_path / "csj")
    xml = root / "XML" / "BaseXML" / "core" / "D01M0006.xml"
    text = xml.read_text("utf-8")
    text = text.replace('SpeakerID="0006/0007" SpeakerSex="男/女" SpeakerBirthPlace="福岡県/海外"', "")
    xml.write_text(text, "utf-8")
    (root / "RDB" / "infoTalk.csv").write_text("TalkID,SpeakerID,Channel\nD01M0006,7,L\nD01M0006,6,R\n", "utf-8")
    with (root / "RDB" / "infoSpeaker.tsv").open("a", encoding="utf-8") as fh:
        fh.write("6\t男\t1950\t宮城県\n7\t女\t1990\tKagawa\n")
    summary = build("csj", root, dialogues=True)
    got = {(Path(r["path"]).name, r["speaker"], r["region"]) for r in rows(summary.manifest) if "D01" in r["path"]}
    assert got == {("D01M0006-L.wav", "0007", "Shikoku"), ("D01M0006-R.wav", "0006", "Tohoku")}
    assert summary.manifest == root / "vox_manifest.csv" and not summary.outside_paths
    assert summary.rejected_csv == root / "vox_rejected.csv"


def test_region_mapping_covers_all_47_prefectures_in_every_spelling():
    assert len(PREFECTURES) == 47 and len({p[0] for p in PREFECTURES}) == 47
    per_region = Counter(region for *_, region in PREFECTURES)
    assert per_region == {"Hokkaido": 1, "Tohoku": 6, "Kanto": 7, "Chubu": 9, "Kinki": 7, "Chugoku": 5,
                          "Shikoku": 4, "Kyushu-Okinawa": 8}
    assert set(per_region) == set(REGIONS)
    for base, suffix, romaji, region in PREFECTURES:
        full = base + suffix
        for spelling in (base, full, full + "横浜市", romaji, romaji.upper(), f"{romaji.title()} Prefecture"):
            assert region_of(spelling) == (full, region), spelling
    assert region_of("Hyōgo-ken") == ("兵庫県", "Kinki")
    assert region_of("KOUCHI") == ("高知県", "Shikoku")
    assert region_of("Tōkyō-to") == ("東京都", "Kanto")
    assert region_of("京都") == ("京都府", "Kinki") and region_of("東京") == ("東京都", "Kanto")
    assert region_of("海外") == ("海外", "abroad")
    assert region_of("不明") == ("", "unknown") and region_of("") == ("", "unknown")
    assert region_of("Atlantis") == ("Atlantis", "unknown")


# --- VCTK -------------------------------------------------------------------------------------
@pytest.mark.parametrize("version", ["0.92", "0.80"])
def test_vctk_reads_both_layouts_and_irregular_speaker_info(tmp_path, version):
    root = make_vctk_tree(tmp_path / "vctk", version)
    summary = build("vctk", root)
    table = rows(summary.manifest)
    assert list(table[0]) == ["path", "speaker", "birthplace", "sex", "region"]
    per_speaker = Counter(r["speaker"] for r in table)
    assert per_speaker == {"p225": 3, "p226": 3, "p227": 2, "p248": 2, "p280": 2, "p315": 2, "s5": 2}
    labels = {r["speaker"]: (r["birthplace"], r["sex"], r["region"]) for r in table}
    assert labels["p225"] == ("English", "female", "Southern England")
    assert labels["p315"] == ("American", "male", "New England")  # comment '(Text unavailable)' dropped
    assert labels["p280"] == ("France", "female", "")  # no region, comment only
    assert labels["p248"] == ("Indian", "female", "")
    assert not any("mic2" in r["path"] for r in table)
    suffix = "_mic1.flac" if version == "0.92" else ".wav"
    assert all(r["path"].endswith(suffix) for r in table)
    assert summary.partial_labels == {"region": 4}
    assert summary.dropped == {"speaker-info line with too few fields": 1, "speaker not in speaker-info.txt": 1,
                               "unknown sex value 'X'": 1, "unreadable audio": 1}
    assert reasons(summary) == Counter(summary.dropped)
    bad_line = [r["detail"] for r in rows(summary.rejected_csv) if r["path"] == "speaker-info.txt"]
    assert bad_line == ["line 9: '400  22'" if version == "0.80" else "line 9: 'p400  22'"]
    assert summary.classes["birthplace"]["English"] == 2


def test_vctk_mic2_and_speaker_filters(tmp_path):
    root = make_vctk_tree(tmp_path / "vctk")
    mic2 = build("vctk", root, tmp_path / "mic2.csv", mic="mic2")
    assert Counter(r["speaker"] for r in rows(mic2.manifest)) == {"p225": 3}

    few = build("vctk", root, tmp_path / "few.csv", min_utterances=3)
    assert few.speakers == 2 and few.utterances == 6
    assert few.dropped["speaker has fewer than 3 utterances"] == 10

    other = build("vctk", root, tmp_path / "other.csv", min_speakers=2)
    assert other.classes["birthplace"] == {"other": 5, "English": 2} and other.utterances == 16
    dropped = build("vctk", root, tmp_path / "drop.csv", min_speakers=2, small_classes="drop")
    assert dropped.classes["birthplace"] == {"English": 2} and dropped.utterances == 6
    assert dropped.dropped["birthplace class has fewer than 2 speakers"] == 10
    assert reasons(dropped) == Counter(dropped.dropped)


# --- Speech Accent Archive --------------------------------------------------------------------
def test_window_positions():
    assert windows(2.3, 1.0, 1.0) == [(0.0, 1.0), (1.0, 2.0)]
    assert windows(2.0, 1.0, 1.0) == [(0.0, 1.0), (1.0, 2.0)]
    assert windows(2.0, 1.0, 0.5) == [(0.0, 1.0), (0.5, 1.5), (1.0, 2.0)]
    assert windows(0.6, 1.0, 1.0) == [(0.0, 0.6)]
    assert windows(30.0, 4.0, 4.0)[-1] == (24.0, 28.0)


def test_accent_archive_windows_and_dropped_rows(tmp_path):
    root = make_accent_archive_tree(tmp_path / "saa")
    summary = build("accent_archive", root, window=1.0)
    table = rows(summary.manifest)
    assert list(table[0]) == ["path", "speaker", "birthplace", "sex", "start", "end", "native_language", "birth_city"]
    got = [(r["path"], r["birthplace"], r["sex"], r["start"], r["end"]) for r in table]
    assert got == [
        ("recordings/afrikaans1.mp3", "south africa", "female", "0", "1"),
        ("recordings/afrikaans1.mp3", "south africa", "female", "1", "2"),
        ("recordings/english1.mp3", "usa", "male", "0", "1"),
        ("recordings/english1.mp3", "usa", "male", "1", "2"),
        ("recordings/english2.mp3", "usa", "female", "0", "1"),  # 'famale' in the csv
        ("recordings/french1.mp3", "france", "male", "0", "0.6"),  # shorter than one window
    ]
    assert summary.dropped == {"marked file_missing? in speakers_all.csv": 1, "filename listed twice": 1,
                               "unknown sex value 'mle'": 1, "missing audio file": 1}
    rejected = {r["path"]: r["reason"] for r in rows(summary.rejected_csv)}
    assert rejected["recordings/mandarin1.mp3"] == "marked file_missing? in speakers_all.csv"
    assert rejected["recordings/arabic1.mp3"] == "missing audio file"

    by_language = build("accent_archive", root, tmp_path / "l.csv", window=1.0, hop=0.5,
                        birthplace_from="native_language")
    table = rows(by_language.manifest)
    assert list(table[0])[-2:] == ["country", "birth_city"]
    assert [r["start"] for r in table if r["speaker"] == "afrikaans1"] == ["0", "0.5", "1"]
    assert by_language.classes["birthplace"] == {"english": 2, "afrikaans": 1, "french": 1}


# --- Common Voice -----------------------------------------------------------------------------
@pytest.mark.parametrize("release", ["new", "old"])
def test_common_voice_gender_vocabularies_and_missing_labels(tmp_path, release):
    root = make_common_voice_tree(tmp_path / "cv", release)
    summary = build("common_voice", root)
    table = rows(summary.manifest)
    assert Counter((r["speaker"], r["sex"], r["birthplace"]) for r in table) == {
        ("aaa", "female", "United States English"): 4, ("bbb", "male", "England English"): 3}
    assert summary.partial_labels == {"age": 3}
    expected = {"no gender": 1, "no accent": 1, "missing audio file": 1}
    if release == "new":
        expected.update({"sex 'non-binary' is outside the two classes (female, male)": 1, "no sex given": 1,
                         "sex 'intersex' is outside the two classes (female, male)": 1})
    else:
        expected.update({"sex 'other' is outside the two classes (female, male)": 2, "unknown sex value 'fmale'": 1})
    assert summary.dropped == expected
    assert reasons(summary) == Counter(expected)


def test_common_voice_per_speaker_cap_is_seeded(tmp_path):
    root = make_common_voice_tree(tmp_path / "cv")
    first = build("common_voice", root, tmp_path / "a.csv", max_per_speaker=2, seed=3)
    again = build("common_voice", root, tmp_path / "b.csv", max_per_speaker=2, seed=3)
    assert Counter(r["speaker"] for r in rows(first.manifest)) == {"aaa": 2, "bbb": 2}
    assert rows(first.manifest) == rows(again.manifest)
    assert first.dropped["over the per-speaker cap"] == 3


# --- JVS --------------------------------------------------------------------------------------
def test_jvs_has_no_birthplace_column(tmp_path):
    root = make_jvs_tree(tmp_path / "jvs")
    summary = build("jvs", root)
    table = rows(summary.manifest)
    assert list(table[0]) == ["path", "speaker", "sex"]
    assert Counter((r["speaker"], r["sex"]) for r in table) == {("jvs001", "male"): 4, ("jvs002", "female"): 4}
    assert "birthplace" not in summary.classes
    assert summary.dropped == {"unknown sex value 'X'": 2, "missing audio file": 1,
                               "speaker not in gender_f0range.txt": 1}
    missing = [r["path"] for r in rows(summary.rejected_csv) if r["reason"] == "missing audio file"]
    assert missing == ["jvs001/parallel100/wav24kHz16bit/VOICEACTRESS100_004.wav"]
    assert any("jvs004" in note for note in summary.notes)
    assert build("jvs", root, tmp_path / "w.csv", subsets="parallel100,nonpara30,whisper10").utterances == 10
    with pytest.raises(ValueError, match="subsets"):
        build("jvs", root, tmp_path / "x.csv", subsets="parallel100,shouting")


# --- shared behaviour -------------------------------------------------------------------------
def test_sex_values():
    assert normalise_sex(" F ") == ("female", "") and normalise_sex("男") == ("male", "")
    assert normalise_sex("male_masculine") == ("male", "") and normalise_sex("女性") == ("female", "")
    assert normalise_sex("") == (None, "no sex given")
    assert normalise_sex("other")[1] == "sex 'other' is outside the two classes (female, male)"
    assert normalise_sex("q") == (None, "unknown sex value 'q'")


def test_one_sex_per_speaker_and_label_checks(tmp_path):
    clips = [write_tone(tmp_path / f"c{k}.wav", 0.2, seed=k) for k in range(5)]
    utterances = [
        Utterance(clips[0], "s1", "f", "north"), Utterance(clips[1], "s1", "female", "north"),
        Utterance(clips[2], "s1", "m", "north"),  # disagrees with the speaker's majority
        Utterance(clips[3], "s2", "m", " "),  # no birthplace
        Utterance(clips[4], "", "m", "north"),  # no speaker
        Utterance(clips[4], "s3", "m", "north", start=0.1, end=0.05),  # end before start
    ]
    summary = write_corpus("test", utterances, [], tmp_path / "out" / "m.csv", CommonOptions(progress=False))
    assert summary.utterances == 2
    assert summary.dropped == {"sex differs from the speaker's other utterances": 1, "no birthplace": 1,
                               "no speaker": 1, "bad segment bounds": 1}
    assert any("s1" in note for note in summary.notes)
    table = rows(summary.manifest)
    assert [r["path"] for r in table] == ["../c0.wav", "../c1.wav"]
    assert all((summary.manifest.parent / r["path"]).is_file() for r in table)


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(CorpusError, match="speaker-info.txt"):
        build("vctk", tmp_path)
    with pytest.raises(CorpusError, match="validated.tsv"):
        build("common_voice", tmp_path)
    with pytest.raises(TypeError, match="min_utterance"):
        ADAPTERS["jvs"](make_jvs_tree(tmp_path / "jvs"), min_utterance=3)
    assert sorted(ADAPTERS) == ["accent_archive", "common_voice", "csj", "jvs", "vctk"]


def test_every_adapter_output_passes_the_manifest_reader(tmp_path, csj_root):
    trees = {
        "csj": (csj_root, {"dialogues": True}), "vctk": (make_vctk_tree(tmp_path / "vctk"), {}),
        "accent_archive": (make_accent_archive_tree(tmp_path / "saa"), {"window": 1.0}),
        "common_voice": (make_common_voice_tree(tmp_path / "cv"), {}), "jvs": (make_jvs_tree(tmp_path / "jvs"), {}),
    }
    for name, (root, options) in trees.items():
        summary = build(name, root, tmp_path / name / "manifest.csv", **options)
        manifest = read_manifest(summary.manifest, allow_outside_paths=True, progress=False, use_cache=False)
        assert len(manifest.table) == summary.utterances, name
        assert manifest.table["speaker"].nunique() == summary.speakers, name


# --- CLI --------------------------------------------------------------------------------------
def test_cli_end_to_end(tmp_path):
    root = make_vctk_tree(tmp_path / "vctk")
    out = tmp_path / "out" / "manifest.csv"
    done = subprocess.run(
        [sys.executable, "-m", "voxlib.corpora", "vctk", str(root), "-o", str(out), "--min-utterances", "3",
         "--no-progress"], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "vctk: 6 utterances, 2 speakers" in done.stdout
    assert "speaker has fewer than 3 utterances" in done.stdout and "allow-outside-paths" in done.stdout
    assert Counter(r["speaker"] for r in rows(out)) == {"p225": 3, "p226": 3}
    assert Counter(r["reason"] for r in rows(out.parent / "rejected.csv"))["unreadable audio"] == 1


def test_cli_exit_status(tmp_path, capsys):
    assert main(["jvs", str(tmp_path / "nowhere"), "--no-progress"]) == 2
    assert "gender_f0range.txt not found" in capsys.readouterr().err
    root = make_jvs_tree(tmp_path / "jvs")
    assert main(["jvs", str(root), "--min-utterances", "99", "--no-progress"]) == 1
    assert main(["csj", str(make_csj_tree(tmp_path / "csj")), "--merge-gap", "0.2", "--no-progress"]) == 0
    assert "csj: 7 utterances, 3 speakers" in capsys.readouterr().out
