"""Bounded memory: predict reads only the crops it scores, and they are the crops training evaluates.

Each of a clip's ``eval_crops`` crops is computed from its own window of samples (features.crop_samples
and spectrogram_crop; audio.read_window with a margin when resampling). The crops equal the whole-clip
path (load_audio -> spectrogram -> float16 -> eval_crops_of, which is what the feature cache and
training's evaluation compute) bit for bit at the model's rate (WAV, FLAC, Ogg), and to the
cache's float16 rounding through soxr and for MP3 (decoded forward, never seeked into); a run
trained on 44.1 kHz stereo files gets its own predictions.csv back. Peak memory of a
predict process is the same for a 3 s clip and a 30-minute one (measured with ru_maxrss).
"""
from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf

from conftest import make_tiny_corpus
from voxlib.audio import load_audio
from voxlib.config import Config
from voxlib.data import eval_crops_of
from voxlib.features import spectrogram
from voxlib.predict import Classifier, Clip
from voxlib.train import train

ROOT = Path(__file__).resolve().parent.parent
GROWTH_BOUND_MIB = 32  # README: peak memory does not grow with clip length beyond this


FORMATS = {".wav": {"subtype": "PCM_16"}, ".flac": {}, ".ogg": {"format": "OGG", "subtype": "VORBIS"},
           ".mp3": {"format": "MP3", "subtype": "MPEG_LAYER_III"}}


def write_tone(path: Path, seconds: float, sr: int, channels: int = 1, seed: int = 0) -> Path:
    """A long voiced-ish tone with a slow level change, written in 10 s blocks (never whole in memory);
    the format follows the suffix."""
    rng = np.random.default_rng(seed)
    with sf.SoundFile(path, "w", samplerate=sr, channels=channels, **FORMATS[path.suffix]) as fh:
        done, total = 0, int(seconds * sr)
        while done < total:
            n = min(10 * sr, total - done)
            t = (np.arange(n) + done) / sr
            x = 0.3 * np.sin(2 * np.pi * 150 * t) * (1 + 0.5 * np.sin(2 * np.pi * 0.3 * t)) + 0.01 * rng.normal(size=n)
            fh.write(np.stack([x * (0.5 + 0.5 * c) for c in range(channels)], axis=1) if channels > 1 else x)
            done += n
    return path


def whole_clip_crops(clf: Classifier, clip: Clip) -> np.ndarray:
    """The crops as the feature cache and training's evaluation compute them: the whole clip at once."""
    wave = load_audio(clip.path, clf.cfg.sample_rate, clip.start, clip.end)
    spec = spectrogram(wave, clf.cfg)[0].numpy().astype(np.float16).astype(np.float32)
    return eval_crops_of(spec, clf.cfg.n_frames, clf.cfg.eval_crops)


@pytest.fixture(scope="module")
def clf5(trained_run) -> Classifier:
    clf = Classifier.from_run(trained_run)
    clf.cfg = dataclasses.replace(clf.cfg, eval_crops=5)
    return clf


@pytest.mark.parametrize("seconds,sr,channels,start,end,suffix", [
    (40.0, 16000, 1, None, None, ".wav"), (1.3, 16000, 1, None, None, ".wav"), (0.04, 16000, 1, None, None, ".wav"),
    (20.0, 16000, 2, 3.25, 11.5, ".wav"), (30.0, 44100, 2, None, None, ".wav"), (12.0, 8000, 1, None, None, ".wav"),
    (25.0, 48000, 1, 2.0, 19.0, ".wav"), (9.0, 22050, 3, 0.5, None, ".wav"), (20.0, 16000, 1, None, None, ".flac"),
    (20.0, 16000, 1, 1.0, None, ".ogg"), (20.0, 44100, 1, None, None, ".ogg"), (20.0, 16000, 1, None, None, ".mp3"),
    (20.0, 44100, 2, 2.5, 17.0, ".mp3"),
])
def test_windowed_crops_equal_the_whole_clip_path(clf5, tmp_path, seconds, sr, channels, start, end, suffix):
    path = write_tone(tmp_path / f"clip{suffix}", seconds, sr, channels)
    clip = Clip(str(path), float("nan") if start is None else start, float("nan") if end is None else end)
    crops, problem = clf5._load(clip)
    assert problem is None
    expected = whole_clip_crops(clf5, clip)
    assert crops.shape == expected.shape == (5, 1, 256, 256)
    got = crops.numpy()
    if sr == 16000 and suffix != ".mp3":
        np.testing.assert_array_equal(got, expected)  # no resampling: the same samples, the same values
    else:  # soxr on a window (with margin) agrees with soxr on the whole clip to float32 rounding of the
        # samples (an MP3 decoder's output depends on its read sizes to the same rounding); after the
        # cache's float16 rounding no value moves by more than that rounding's step near 1.0 (2**-11),
        # and on average by under 1e-5 (0.001 dB)
        assert np.abs(got - expected).max() <= 2 ** -11
        assert np.abs(got - expected).mean() < 1e-5


def test_a_run_on_44k_stereo_files_gets_its_own_predictions_back(tmp_path):
    manifest = make_tiny_corpus(tmp_path / "corpus", birthplaces=("north", "south"), speakers_per_birthplace=2,
                                utterances=10, seconds=4.0, sr=44100)
    for wav in manifest.parent.rglob("*.wav"):  # make every clip stereo, the channels at different levels
        mono, sr = sf.read(wav, dtype="float32")
        sf.write(wav, np.stack([mono, 0.6 * mono], axis=1), sr)
    run = train(Config(width=1 / 16, batch_size=8, epochs=1, threads=2, grad_log_every=0, eval_crops=3,
                       manifest=str(manifest), cache_dir=str(tmp_path / "cache"), run_dir=str(tmp_path / "run")))
    stored = pd.read_csv(run / "predictions.csv", keep_default_na=False)
    fresh = Classifier.from_run(run).predict(stored["path"].tolist(), batch_size=4)
    assert fresh["problem"].eq("").all() and fresh["path"].tolist() == stored["path"].tolist()
    for head in ("speaker", "birthplace", "sex"):
        assert (fresh[f"{head}_pred"] == stored[f"{head}_pred"]).all(), head
        np.testing.assert_allclose(fresh[f"{head}_prob"], stored[f"{head}_prob"], atol=1e-4)


PEAK = """
import resource, sys
from voxlib.predict import Classifier
table = Classifier.from_run(sys.argv[1]).predict([sys.argv[2]])
assert table["problem"][0] == "", table["problem"][0]
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)  # KiB on Linux
"""


def peak_mib(run: Path, clip: Path) -> float:
    proc = subprocess.run([sys.executable, "-c", PEAK, str(run), str(clip)], capture_output=True, text=True,
                          timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return int(proc.stdout.split()[-1]) / 1024


@pytest.mark.skipif(sys.platform != "linux", reason="ru_maxrss is in KiB on Linux")
def test_peak_memory_does_not_grow_with_the_clip(trained_run, tmp_path):
    """A 30-minute 16 kHz clip (the whole-clip path held 670 MiB more for it) and a 10-minute 44.1 kHz stereo
    clip against a 3 s one."""
    short = peak_mib(trained_run, write_tone(tmp_path / "short.wav", 3, 16000))
    long16 = peak_mib(trained_run, write_tone(tmp_path / "long16.wav", 30 * 60, 16000))
    (tmp_path / "long16.wav").unlink()
    long44 = peak_mib(trained_run, write_tone(tmp_path / "long44.wav", 10 * 60, 44100, channels=2))
    assert long16 - short < GROWTH_BOUND_MIB, (short, long16)
    assert long44 - short < GROWTH_BOUND_MIB, (short, long44)
