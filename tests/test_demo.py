"""The espeak-ng demo corpus: labels, balance, determinism, voices that differ where they should."""
from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from voxlib import demo
from voxlib.config import Config, ConfigError

SMALL = dict(demo_accents="us,gb-rp", demo_speakers_per_accent=2, demo_utterances=3, demo_seed=3)


def read_csv(path: Path) -> list[dict]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """2 accents x 2 speakers (1 female, 1 male) x 3 utterances."""
    return demo.build_demo_corpus(tmp_path_factory.mktemp("demo") / "small", Config(**SMALL)).parent


def median_f0(wave: np.ndarray, sr: int, fmin: float = 60.0, fmax: float = 400.0) -> float:
    """Median F0 of voiced frames by autocorrelation (peak above half the zero-lag energy)."""
    n, hop = int(0.04 * sr), int(0.01 * sr)
    lo, hi = int(sr / fmax), int(sr / fmin)
    loud = 0.05 * np.abs(wave).max()
    f0 = []
    for start in range(0, len(wave) - n, hop):
        frame = wave[start:start + n] * np.hanning(n)
        if np.sqrt(np.mean(frame ** 2)) < loud:
            continue
        ac = np.correlate(frame, frame, "full")[n - 1:]
        lag = lo + int(np.argmax(ac[lo:hi]))
        if ac[lag] > 0.5 * ac[0]:
            f0.append(sr / lag)
    assert len(f0) > 20, "too few voiced frames to estimate F0"
    return float(np.median(f0))


def test_manifest_columns_and_labels(corpus):
    rows = read_csv(corpus / "manifest.csv")
    assert list(rows[0]) == ["path", "speaker", "birthplace", "sex"]
    assert len(rows) == 2 * 2 * 3
    assert {r["birthplace"] for r in rows} == {"us", "gb-rp"}
    assert {r["sex"] for r in rows} == {"female", "male"}
    assert {r["speaker"] for r in rows} == {"us-f1", "us-m1", "gb-rp-f1", "gb-rp-m1"}
    for r in rows:
        assert not Path(r["path"]).is_absolute() and (corpus / r["path"]).is_file()
        assert r["speaker"].startswith(r["birthplace"] + "-" + r["sex"][0])
    speakers = read_csv(corpus / "speakers.csv")
    assert {s["speaker"]: s["espeak_voice"] for s in speakers} == {
        "us-f1": "en-us", "us-m1": "en-us", "gb-rp-f1": "en-gb-x-rp", "gb-rp-m1": "en-gb-x-rp"}
    utterances = read_csv(corpus / "utterances.csv")
    assert [u["path"] for u in utterances] == [r["path"] for r in rows]
    assert all(u["text"] and u["phonemes"] for u in utterances)


def test_balanced_per_accent_sex_and_speaker(corpus):
    rows = read_csv(corpus / "manifest.csv")
    for column in ("birthplace", "sex", "speaker"):
        counts = {}
        for r in rows:
            counts[r[column]] = counts.get(r[column], 0) + 1
        assert len(set(counts.values())) == 1, (column, counts)


def test_clips_are_16k_mono_audible_and_short(corpus):
    for r in read_csv(corpus / "manifest.csv"):
        info = sf.info(corpus / r["path"])
        assert (info.samplerate, info.channels) == (16000, 1)
        wave, _ = sf.read(corpus / r["path"])
        assert np.all(np.isfinite(wave))
        assert np.sqrt(np.mean(wave ** 2)) > 0.005, r["path"]
        assert 1.5 < len(wave) / 16000 < 5.0, r["path"]
        # peak level is a seeded gain between -12 and -2 dBFS, never clipped
        assert 10 ** (-12.5 / 20) < np.abs(wave).max() < 10 ** (-1.5 / 20), r["path"]


def test_same_settings_give_identical_files_and_another_seed_does_not(corpus, tmp_path):
    again = demo.main(["--out", str(tmp_path / "again"), "--demo-accents", "us,gb-rp",
                       "--demo-speakers-per-accent", "2", "--demo-utterances", "3", "--demo-seed", "3"]).parent
    rows = read_csv(corpus / "manifest.csv")
    assert read_csv(again / "manifest.csv") == rows
    for r in rows:
        assert (again / r["path"]).read_bytes() == (corpus / r["path"]).read_bytes(), r["path"]
    other = demo.build_demo_corpus(tmp_path / "other", Config(**{**SMALL, "demo_seed": 4})).parent
    for r in rows:
        assert (other / r["path"]).read_bytes() != (corpus / r["path"]).read_bytes(), r["path"]


def test_female_voices_are_higher_and_follow_their_pitch_setting(corpus):
    rows = read_csv(corpus / "manifest.csv")
    base = {s["speaker"]: float(s["pitch_base_hz"]) for s in read_csv(corpus / "speakers.csv")}
    f0 = {}
    for speaker in base:
        clips = [sf.read(corpus / r["path"])[0] for r in rows if r["speaker"] == speaker]
        f0[speaker] = float(np.median([median_f0(c, 16000) for c in clips]))
        # espeak's intonation sits above the variant's base pitch; the variant file must apply
        assert 1.05 < f0[speaker] / base[speaker] < 1.6, (speaker, f0[speaker], base[speaker])
    female = [v for k, v in f0.items() if "-f" in k]
    male = [v for k, v in f0.items() if "-m" in k]
    # base pitch ranges do not overlap (male <= 130 Hz < 160 Hz <= female): a clear gap in F0
    assert min(female) > 190 and max(male) < 180, f0
    assert min(female) - max(male) > 40 and np.mean(female) > 1.3 * np.mean(male), f0


def test_accents_differ_in_phonemes_and_audio(corpus):
    # slot k of each accent reads the same sentences: compare them across accents
    utts = {(u["speaker"], u["text"]): u["phonemes"] for u in read_csv(corpus / "utterances.csv")}
    pairs = [(p, utts[("gb-rp" + s[2:], t)]) for (s, t), p in utts.items()
             if s.startswith("us-") and ("gb-rp" + s[2:], t) in utts]
    assert len(pairs) == 6
    assert all(us != rp for us, rp in pairs)

    # the same voice and sentence in two accents, without augmentation: only the accent differs,
    # and a second rendition in the same accent is identical, so the difference is the accent
    job = demo.plan_speakers(Config(demo_accents="us", demo_speakers_per_accent=1, demo_utterances=1))[0]
    job.utterances[0].text = "I can't park the car near the water, but the goat likes the bath."
    jobs = []
    for i, voice_name in enumerate(["en-us", "en-gb-x-rp", "en-us"]):
        voice = dataclasses.replace(job.voice, espeak_voice=voice_name, speaker=f"t{i}")
        utt = dataclasses.replace(job.utterances[0], path=f"t{i}.wav")
        jobs.append(demo.SpeakerJob(voice, [utt], augment=False))
    private = demo.make_private_data([job.voice])
    out = Path(private) / "out"
    for j in jobs:
        j.data_dir, j.out_dir = str(private), str(out)
    try:
        done = demo.run_jobs(jobs)
        us, rp, us_again = (sf.read(out / f"t{i}.wav")[0] for i in range(3))
    finally:
        demo.shutil.rmtree(private)
    assert np.array_equal(us, us_again)
    us_ipa, rp_ipa = done[0].results[0]["phonemes"], done[1].results[0]["phonemes"]
    assert "kˈɑːɹ" in us_ipa and "bˈæθ" in us_ipa  # rhotic "car", TRAP vowel in "bath"
    assert "kˈɑː " in rp_ipa and "bˈɑːθ" in rp_ipa  # non-rhotic "car", BATH vowel
    n = min(len(us), len(rp))
    assert len(us) != len(rp) or not np.allclose(us[:n], rp[:n], atol=1e-3)


def test_skips_complete_corpus_and_rebuilds_partial_or_changed(tmp_path):
    cfg = Config(demo_accents="scotland", demo_speakers_per_accent=2, demo_utterances=2)
    manifest = demo.ensure_demo_corpus(cfg)
    assert manifest.parent == tmp_path / "outputs" / "demo" / "scotland_2spk_2utt_spread1_seed0"
    files = sorted(manifest.parent.rglob("*.wav")) + [manifest]
    mtimes = [f.stat().st_mtime_ns for f in files]
    assert demo.ensure_demo_corpus(cfg) == manifest
    assert [f.stat().st_mtime_ns for f in files] == mtimes

    files[0].unlink()  # partial: rebuilt
    demo.build_demo_corpus(manifest.parent, cfg)
    assert files[0].is_file()

    changed = Config(demo_accents="scotland", demo_speakers_per_accent=2, demo_utterances=1)
    demo.build_demo_corpus(manifest.parent, changed)
    rows = read_csv(manifest)
    assert len(rows) == 2 and len(list(manifest.parent.rglob("*.wav"))) == 2
    settings = json.loads((manifest.parent / "settings.json").read_text())
    assert settings["utterances"] == 1 and settings["accents"] == ["scotland"]


def test_voice_spread_pulls_voices_together():
    wide = demo.plan_speakers(Config(demo_speakers_per_accent=6, demo_utterances=1))
    narrow = demo.plan_speakers(Config(demo_speakers_per_accent=6, demo_utterances=1, demo_voice_spread=0.3))
    for sex in ("female", "male"):
        spread = [np.std([j.voice.pitch_base_hz for j in jobs if j.voice.sex == sex]) for jobs in (wide, narrow)]
        assert spread[1] == pytest.approx(0.3 * spread[0], rel=0.02)
        lo, hi = demo.PITCH_BASE_HZ[sex]
        assert all(lo <= j.voice.pitch_base_hz <= hi for j in wide if j.voice.sex == sex)
    assert all(1 <= j.voice.flutter <= 4 for j in wide)
    assert len(wide) == 48 and sum(j.voice.sex == "female" for j in wide) == 24
    # a speaker's voice does not depend on which other accents are generated
    alone = demo.plan_speakers(Config(demo_accents="caribbean", demo_speakers_per_accent=6, demo_utterances=1))
    assert [j.voice for j in alone] == [j.voice for j in wide if j.voice.birthplace == "caribbean"]


def test_sentences_are_distinct_deterministic_and_accent_rich():
    a, b = demo.sentences(200, seed=0), demo.sentences(200, seed=0)
    assert a == b and len(set(a)) == 200
    assert demo.sentences(200, seed=1) != a
    for text in a:
        assert 8 <= len(text.split()) <= 16, text
        assert " a a" not in text and " a o" not in text, text
    marker_words = {"car", "bath", "can't", "water", "laugh", "start", "far", "rather", "ask", "park"}
    share = np.mean([any(w.strip(",.?") in marker_words for w in t.lower().split()) for t in a])
    assert share > 0.5


def test_accent_names_and_errors(tmp_path):
    assert demo.resolve_accents(["en-gb", "en-GB-scotland", "caribbean"]) == ["gb", "scotland", "caribbean"]
    assert demo.resolve_accents([]) == list(demo.ACCENTS)
    with pytest.raises(ConfigError, match="'welsh'"):
        demo.plan_speakers(Config(demo_accents="us,welsh"))
    with pytest.raises(ConfigError, match="demo_voice_spread"):
        demo.plan_speakers(Config(demo_voice_spread=1.5))
    (tmp_path / "lang" / "gmw").mkdir(parents=True)
    (tmp_path / "lang" / "gmw" / "en-US").write_text("name English (America)\n")
    demo.check_voices(tmp_path, ["us"])
    with pytest.raises(demo.DemoCorpusError, match="gb-rp"):
        demo.check_voices(tmp_path, ["us", "gb-rp"])


def test_trim_silence_keeps_the_speech_and_a_short_pad():
    sr = 16000
    tone = 0.5 * np.sin(2 * np.pi * 200 * np.arange(sr) / sr)
    wave = np.concatenate([np.zeros(sr), tone, np.zeros(sr // 2)])
    trimmed = demo.trim_silence(wave, sr, pad_s=0.05)
    assert abs(len(trimmed) - (sr + 2 * 0.05 * sr)) <= 0.01 * sr
