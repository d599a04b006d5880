"""read_manifest on good corpora (the Manifest contract), load_audio, the digest and the validation cache."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf

import voxlib.corpora.manifest as manifest_module
from voxlib.corpora import Manifest, load_audio, read_manifest

SR = 16000


def tone(seconds: float, sr: int, freq: float, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(round(seconds * sr))) / sr
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def dominant_hz(wave: np.ndarray, sr: int) -> float:
    spectrum = np.abs(np.fft.rfft(wave * np.hanning(len(wave))))
    return float(np.argmax(spectrum) * sr / len(wave))


@pytest.fixture
def corpus_copy(tiny_corpus, tmp_path) -> Path:
    """A writable copy of the shared tiny corpus (for tests that touch or edit files)."""
    shutil.copytree(tiny_corpus.parent, tmp_path / "tiny")
    return tmp_path / "tiny" / "manifest.csv"


def test_tiny_corpus_table_follows_the_contract(tiny_corpus):
    m = read_manifest(tiny_corpus, progress=False)
    assert isinstance(m, Manifest) and len(m) == 72
    t = m.table
    assert list(t.columns) == ["path", "rel_path", "speaker", "birthplace", "sex", "start", "end", "split", "row",
                               "duration"]
    assert t.index.tolist() == list(range(72)) and t["row"].tolist() == list(range(1, 73))
    assert m.label_columns == ["speaker", "birthplace", "sex"]
    assert set(t["sex"]) == {"female", "male"} and t["speaker"].nunique() == 12
    assert t["start"].isna().all() and t["end"].isna().all() and (t["split"] == "").all()
    assert m.root == tiny_corpus.parent and m.source == tiny_corpus and m.name == tiny_corpus.parent.name
    assert len(m.digest) == 64 and m.rejected.empty and m.notices == []
    for _, r in t.sample(5, random_state=0).iterrows():
        assert Path(r["path"]).is_absolute() and Path(r["path"]) == tiny_corpus.parent / r["rel_path"]
        assert r["duration"] == pytest.approx(sf.info(r["path"]).duration, abs=1e-9)
    assert 2.0 * 0.8 < t["duration"].min() and t["duration"].max() < 2.5 * 1.2 + 0.01


def test_digest_tracks_manifest_and_file_changes(corpus_copy):
    first = read_manifest(corpus_copy, progress=False).digest
    assert read_manifest(corpus_copy, progress=False).digest == first
    clip = corpus_copy.parent / "north0" / "north0_000.wav"
    stat = clip.stat()
    os.utime(clip, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    touched = read_manifest(corpus_copy, progress=False).digest
    assert touched != first
    text = corpus_copy.read_text()
    corpus_copy.write_text(text.replace("north0/north0_001.wav,north0,north,female",
                                        "north0/north0_001.wav,north0,south,female"))
    relabelled = read_manifest(corpus_copy, progress=False, label_conflicts="majority").digest  # one row relabelled
    assert relabelled not in (first, touched)


def test_validation_results_are_reused_until_the_corpus_changes(corpus_copy, monkeypatch, tmp_path):
    cache = tmp_path / "cache"
    first = read_manifest(corpus_copy, progress=False, cache_dir=cache)
    assert list((cache / "validation").glob("*.json"))
    calls = []
    real_probe = manifest_module._probe

    def counting_probe(*args):
        calls.append(args[0])
        return real_probe(*args)

    monkeypatch.setattr(manifest_module, "_probe", counting_probe)
    again = read_manifest(corpus_copy, progress=False, cache_dir=cache)
    assert calls == [] and any("audio checks reused" in n for n in again.notices)
    pd.testing.assert_frame_equal(again.table, first.table)
    # A changed clip changes the digest, so everything is checked again, and the change is seen.
    bad = corpus_copy.parent / "east3" / "east3_002.wav"
    sf.write(bad, np.zeros(SR, np.float32), SR)
    with pytest.raises(manifest_module.ManifestError, match=r"row \d+ \(east3/east3_002.wav\): silent"):
        read_manifest(corpus_copy, progress=False, cache_dir=cache)
    assert len(calls) == 72
    read_manifest(corpus_copy, progress=False, cache_dir=cache, use_cache=False, on_bad_file="skip")
    assert len(calls) == 144


def test_process_pool_gives_the_same_table(tiny_corpus):
    serial = read_manifest(tiny_corpus, progress=False, use_cache=False, workers=1)
    pooled = read_manifest(tiny_corpus, progress=False, use_cache=False, workers=2)
    pd.testing.assert_frame_equal(serial.table, pooled.table)


def test_manifest_without_birthplace_is_accepted_with_a_notice(tmp_path):
    for i, sex in enumerate(["女", "男", "F", "Male"]):
        sf.write(tmp_path / f"{i}.wav", tone(0.5, SR, 200 + 50 * i), SR)
    (tmp_path / "manifest.csv").write_text(
        "path,speaker,sex\n0.wav,jvs001,女\n1.wav,jvs002,男\n2.wav,jvs003,F\n3.wav,jvs004,Male\n", encoding="utf-8")
    m = read_manifest(tmp_path / "manifest.csv", progress=False)
    assert m.label_columns == ["speaker", "sex"] and "birthplace" not in m.table.columns
    assert m.table["sex"].tolist() == ["female", "male", "female", "male"]
    assert any("no 'birthplace' column" in n for n in m.notices)


@pytest.mark.parametrize("token, expected", [
    ("f", "female"), ("Female", "female"), ("WOMAN", "female"), ("女", "female"), (" female ", "female"),
    ("M", "male"), ("male", "male"), ("Man", "male"), ("男", "male"),
])
def test_sex_tokens_are_normalised(tmp_path, token, expected):
    sf.write(tmp_path / "a.wav", tone(0.5, SR, 300), SR)
    (tmp_path / "manifest.csv").write_text(f"path,speaker,birthplace,sex\na.wav,s,north,{token}\n", encoding="utf-8")
    m = read_manifest(tmp_path / "manifest.csv", progress=False)
    assert m.table["sex"].tolist() == [expected]


def test_bom_extra_labels_split_segments_and_single_class_notice(tmp_path):
    long = np.concatenate([tone(1.0, SR, 300), tone(1.0, SR, 1200)])
    sf.write(tmp_path / "long.wav", long, SR)
    text = ("path,speaker,birthplace,sex,region,split,start,end\n"
            "long.wav,s1,north,f,alpine,train,0,1\n"
            "long.wav,s1,north,f,alpine,test,1.0,2.0\n"
            "long.wav,s1,north,f,coast,,0.5,\n")
    (tmp_path / "manifest.csv").write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
    m = read_manifest(tmp_path / "manifest.csv", progress=False)
    t = m.table
    assert m.label_columns == ["speaker", "birthplace", "sex", "region"]
    assert t["region"].tolist() == ["alpine", "alpine", "coast"]
    assert t["split"].tolist() == ["train", "test", ""]
    assert t["start"].tolist() == [0.0, 1.0, 0.5] and t["end"].isna().tolist() == [False, False, True]
    assert t["duration"].tolist() == pytest.approx([1.0, 1.0, 1.5])
    for label in ("speaker", "birthplace", "sex"):
        assert any(f"label {label!r} has a single class" in n for n in m.notices)
    assert not any("'region'" in n for n in m.notices)
    second = load_audio(t.loc[1, "path"], SR, t.loc[1, "start"], t.loc[1, "end"])
    np.testing.assert_array_equal(second, sf.read(tmp_path / "long.wav", dtype="float32")[0][SR:])
    assert dominant_hz(second, SR) == pytest.approx(1200, abs=2)


@pytest.mark.parametrize("native", [8000, 48000])
def test_other_rates_are_accepted_and_resampled(tmp_path, native):
    sf.write(tmp_path / "a.wav", tone(1.0, native, 440), native)
    (tmp_path / "manifest.csv").write_text("path,speaker,birthplace,sex\na.wav,s,north,f\n")
    m = read_manifest(tmp_path / "manifest.csv", progress=False)
    assert m.table["duration"].tolist() == pytest.approx([1.0])
    assert any(f"1 clip(s) at {native} Hz are resampled to 16000 Hz" in n for n in m.notices)
    wave = load_audio(tmp_path / "a.wav", SR)
    assert wave.dtype == np.float32 and wave.ndim == 1 and len(wave) == SR
    assert dominant_hz(wave, SR) == pytest.approx(440, abs=2)
    # Away from the edges the resampled wave is the same sine at the same level.
    np.testing.assert_allclose(wave[800:-800], tone(1.0, SR, 440)[800:-800], atol=2e-3)


def test_stereo_is_averaged_to_mono(tmp_path):
    left, right = tone(1.0, SR, 300, amp=0.6), tone(1.0, SR, 700, amp=0.2)
    sf.write(tmp_path / "st.wav", np.stack([left, right], axis=1), SR, subtype="FLOAT")
    (tmp_path / "manifest.csv").write_text("path,speaker,birthplace,sex\nst.wav,s,north,m\n")
    m = read_manifest(tmp_path / "manifest.csv", progress=False)
    assert any("1 clip(s) have more than one channel" in n for n in m.notices)
    wave = load_audio(tmp_path / "st.wav", SR)
    np.testing.assert_allclose(wave, (left + right) / 2, atol=1e-7)


@pytest.mark.parametrize("fmt, ext", [("FLAC", "flac"), ("MP3", "mp3"), ("OGG", "ogg")])
def test_compressed_formats_decode(tmp_path, fmt, ext):
    sf.write(tmp_path / f"a.{ext}", tone(1.0, SR, 440, amp=0.3), SR, format=fmt)
    wave = load_audio(tmp_path / f"a.{ext}", SR)
    assert abs(len(wave) - SR) < 0.05 * SR  # lossy codecs may pad a frame
    assert dominant_hz(wave, SR) == pytest.approx(440, abs=2)
    assert np.abs(wave).max() == pytest.approx(0.3, abs=0.03)
    (tmp_path / "manifest.csv").write_text(f"path,speaker,birthplace,sex\na.{ext},s,north,f\n")
    assert len(read_manifest(tmp_path / "manifest.csv", progress=False)) == 1


def test_load_audio_names_the_file_it_cannot_decode(tmp_path):
    (tmp_path / "junk.wav").write_bytes(b"junk" * 100)
    with pytest.raises(ValueError, match="junk.wav: cannot decode audio"):
        load_audio(tmp_path / "junk.wav", SR)
