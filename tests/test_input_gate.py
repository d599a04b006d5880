"""One input gate for the command line and the API: the same checks, the same one-line reasons, no row lost.

A file and the same samples given as an array are refused for the same reason in the same words
(non-finite samples, too short, silent, no samples), by ``predict`` (a row with ``problem``),
``predict_waveform`` (raises), ``embed`` (raises naming each input, or NaN rows), ``run`` (the
rejected table) and ``python -m voxlib.predict`` (the CSV's problem column and a warning). A 2-D
array follows one rule (time is the longer axis), a square or oversized one is refused naming its
shape, and a sample rate that is not a whole number of Hz is refused.
"""
from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf

from voxlib.predict import Classifier, PredictError, Wave

ROOT = Path(__file__).resolve().parent.parent
SR = 16000


@pytest.fixture(scope="module")
def clf(trained_run) -> Classifier:
    return Classifier.from_run(trained_run)


@pytest.fixture(scope="module")
def good(tiny_corpus) -> tuple[np.ndarray, int, Path]:
    path = sorted(tiny_corpus.parent.rglob("*.wav"))[0]
    wave, sr = sf.read(path, dtype="float32")
    return wave, sr, path


def bad_waves(good_wave: np.ndarray) -> dict[str, tuple[np.ndarray, str]]:
    """name -> (float32 samples, the reason every entry point gives)."""
    nan = good_wave.copy()
    nan[[10, 500, 900]] = np.nan
    inf = good_wave.copy()
    inf[-1] = -np.inf
    return {
        "nan": (nan, "3 NaN/inf samples"),
        "inf": (inf, "1 NaN/inf samples"),
        "zeros": (np.zeros(SR, np.float32), "silent (peak -inf dBFS)"),
        "whisper": (np.full(SR, 1e-6, np.float32), "silent (peak -120 dBFS)"),
        "short": (good_wave[:300], "too short: 18.8 ms = 300 samples at 16000 Hz, less than one STFT frame (510 samples)"),
    }


@pytest.mark.parametrize("name", ["nan", "inf", "zeros", "whisper", "short"])
def test_a_file_and_its_samples_are_refused_for_the_same_reason_everywhere(clf, good, tmp_path, name):
    wave, reason = bad_waves(good[0])[name]
    path = tmp_path / f"{name}.wav"
    sf.write(path, wave, SR, subtype="FLOAT")
    with pytest.raises(PredictError) as caught:
        clf.predict_waveform(wave, SR)
    assert str(caught.value) == f"waveform: {reason}"
    table = clf.predict([good[2], path, (wave, SR), Wave(wave, SR, "mine")])
    assert table["path"].tolist() == [str(good[2]), str(path), "waveform 2", "mine"]
    assert table["problem"].tolist() == ["", reason, reason, reason]
    assert table["sex_pred"].iloc[0] != "" and table["sex_pred"].iloc[1:].eq("").all()
    assert table["sex_prob"].iloc[1:].isna().all() and table["speaker_top5"].iloc[1:].eq("").all()
    frame, rejected, _ = clf.run([path, (wave, SR), good[2]])
    assert frame["index"].tolist() == [2] and rejected["index"].tolist() == [0, 1]
    assert rejected["reason"].tolist() == [reason, reason]
    with pytest.raises(PredictError) as caught:
        clf.embed([good[2], (wave, SR), path])
    assert str(caught.value) == f"2 of 3 input(s) cannot be used: waveform 1: {reason}; {path}: {reason}"
    proc = subprocess.run([sys.executable, "-m", "voxlib.predict", "--run-dir", str(clf.run_dir), str(good[2]),
                           str(path)], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    printed = pd.read_csv(io.StringIO(proc.stdout), keep_default_na=False)
    assert printed["problem"].tolist() == ["", reason] and f"{path}: skipped: {reason}" in proc.stderr


def test_embed_keeps_one_row_per_input(clf, good):
    wave, sr, path = good
    rows = clf.embed([path, (np.zeros(SR, np.float32), SR), path, (wave, sr)], on_bad="nan")
    assert rows.shape[0] == 4 and np.isnan(rows[1]).all() and not np.isnan(rows[[0, 2, 3]]).any()
    np.testing.assert_array_equal(rows[0], rows[2])
    np.testing.assert_allclose(rows[0], rows[3], atol=1e-5)  # the file and its samples: one path
    np.testing.assert_array_equal(clf.embed([path])[0], rows[0])
    with pytest.raises(ValueError, match="on_bad must be"):
        clf.embed([path], on_bad="drop")


def test_the_channel_layout_rule_and_its_refusals(clf, good):
    wave = good[0]
    stereo = np.stack([wave, 0.5 * wave], axis=1)  # (samples, channels)
    mono = clf.predict_waveform(stereo.mean(axis=1), SR)
    for layout in (stereo, stereo.T, np.ascontiguousarray(stereo.T)):  # (channels, samples) is the same clip
        got = clf.predict_waveform(layout, SR)
        for head in clf.heads:
            assert got[head]["pred"] == mono[head]["pred"] and got[head]["prob"] == pytest.approx(mono[head]["prob"], abs=1e-6)
    refused = {
        "square": (np.zeros((600, 600), np.float32), r"a 600 x 600 array is ambiguous \(time is the longer axis\)"),
        "many channels": (np.zeros((5000, 70), np.float32), r"a 5000 x 70 array would have 70 channels .*at most 64"),
        "3-D": (np.zeros((2, 2, 5000), np.float32), r"expected samples \(N,\) or \(samples, channels\), got shape \(2, 2, 5000\)"),
        "text": (np.array(["a"] * 1000), "samples must be real numbers, got dtype <U1"),
        "complex": (np.zeros(5000, np.complex64), "samples must be real numbers, got dtype complex64"),
        "empty": (np.zeros(0, np.float32), "no audio samples"),
        "empty stereo": (np.zeros((0, 2), np.float32), "no audio samples"),
    }
    for name, (samples, message) in refused.items():
        with pytest.raises(PredictError, match=f"^waveform: {message}"):
            clf.predict_waveform(samples, SR)
        assert clf.predict([(samples, SR)])["problem"].str.match(message).all(), name


@pytest.mark.parametrize("rate", [0, -16000, 16000.5, float("nan"), True, "16000", None, 10**7])
def test_a_sample_rate_that_is_not_whole_hertz_is_refused(clf, good, rate):
    with pytest.raises(PredictError, match=r"waveform: sample rate must be a whole number of Hz in 1\.\.1000000, got"):
        clf.predict_waveform(good[0], rate)


def test_integer_pcm_and_other_rates_are_the_same_clip(clf, good):
    wave, sr, _ = good
    as_int16 = np.round(wave * 32767).astype(np.int16)
    a, b = clf.predict_waveform(wave, sr), clf.predict_waveform(as_int16, sr)
    c = clf.predict_waveform(wave, 16000.0)  # a float that is a whole number of Hz
    for head in clf.heads:
        assert a[head]["pred"] == b[head]["pred"] == c[head]["pred"]
        assert a[head]["prob"] == pytest.approx(b[head]["prob"], abs=1e-3)


def test_nothing_readable_is_an_error_not_an_empty_table(clf, tmp_path):
    (tmp_path / "empty.wav").write_bytes(b"")
    (tmp_path / "text.wav").write_text("not audio")
    out = tmp_path / "preds.csv"
    proc = subprocess.run([sys.executable, "-m", "voxlib.predict", "--run-dir", str(clf.run_dir), str(tmp_path),
                           "--out", str(out)], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 1 and not out.exists() and proc.stdout == ""
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: none of the 2 input(s) could be read: ") and "empty.wav: empty file (0 bytes)" in last
    empty = subprocess.run([sys.executable, "-m", "voxlib.predict", "--run-dir", str(clf.run_dir),
                            str(tmp_path / "nothing-here")], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert empty.returncode == 1 and empty.stderr.strip() == f"error: {tmp_path / 'nothing-here'}: no such file or folder"
    (tmp_path / "sub").mkdir()
    none = subprocess.run([sys.executable, "-m", "voxlib.predict", "--run-dir", str(clf.run_dir), str(tmp_path / "sub")],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert none.returncode == 1 and "error: no audio files" in none.stderr and none.stderr.count("\n") == 1
