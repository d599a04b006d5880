"""spectrogram against known signals and a librosa reference; FeatureCache build, reuse and failure modes."""
from __future__ import annotations

import errno
import logging
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import torch

import voxlib.features as features
from voxlib.config import Config
from voxlib.corpora import load_audio, read_manifest
from voxlib.features import FeatureCache, mel_filterbank, spectrogram, spectrogram_batch

SR = 16000


def sine(freq: float, amp: float = 1.0, seconds: float = 1.0) -> np.ndarray:
    t = np.arange(int(seconds * SR)) / SR
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


@pytest.fixture
def corpus_copy(tiny_corpus, tmp_path) -> Path:
    shutil.copytree(tiny_corpus.parent, tmp_path / "tiny")
    return tmp_path / "tiny" / "manifest.csv"


# --- the transform -------------------------------------------------------------------------------
def test_shape_range_and_frame_count(tiny_corpus):
    wave = load_audio(tiny_corpus.parent / "north0" / "north0_000.wav", SR)
    spec = spectrogram(wave, Config())
    assert spec.shape == (1, 256, 1 + len(wave) // 125) and spec.dtype == torch.float32
    assert spec.min() >= 0 and spec.max() <= 1 and 0.5 < spec.max()


def test_full_scale_sine_reads_one_in_its_bin_and_quieter_sines_scale_in_db():
    cfg = Config()
    spec = spectrogram(sine(1000.0), cfg)[0]
    middle = spec[:, 10:-10]  # away from the reflect-padded edges
    peak_bin = round(1000 * cfg.n_fft / SR)  # 31.9 -> bin 32
    assert (middle.argmax(dim=0) == peak_bin).all()
    assert middle[peak_bin].min() > 0.995 and middle.max() <= 1.0
    # An exactly bin-centred sine at -40 dBFS reads (80 - 40) / 80 = 0.5.
    centred = spectrogram(sine(40 * SR / cfg.n_fft, amp=0.01), cfg)[0][:, 10:-10]
    assert centred[40].mean().item() == pytest.approx(0.5, abs=1e-4)
    # With top_db = 60 the same sine reads (60 - 40) / 60.
    narrow = spectrogram(sine(40 * SR / cfg.n_fft, amp=0.01), Config(top_db=60.0))[0][:, 10:-10]
    assert narrow[40].mean().item() == pytest.approx(1 / 3, abs=1e-4)


def test_silence_is_exactly_zero():
    assert spectrogram(np.zeros(SR, np.float32), Config()).abs().max().item() == 0.0
    assert spectrogram(np.zeros(SR, np.float32), Config(feature="mel")).abs().max().item() == 0.0


def test_matches_a_librosa_stft_reference(tiny_corpus):
    import librosa  # librosa.stft is numpy-only: no numba start-up cost

    wave = load_audio(tiny_corpus.parent / "south1" / "south1_003.wav", SR)
    magnitude = np.abs(librosa.stft(wave.astype(np.float64), n_fft=510, hop_length=125, window="hann",
                                    center=True, pad_mode="reflect"))
    reference = np.clip((20 * np.log10(np.maximum(magnitude, 1e-30) / 127.5) + 80) / 80, 0, 1)
    ours = spectrogram(wave, Config())[0].numpy()
    assert ours.shape == reference.shape
    assert np.abs(ours - reference).max() < 1e-4
    assert (reference > 0).mean() > 0.9  # the comparison covers real content, not clipped zeros


def test_batch_and_long_waves_give_the_values_of_single_waves(monkeypatch):
    cfg = Config()
    rng = np.random.default_rng(0)
    waves = [rng.normal(0, 0.1, n).astype(np.float32) for n in (300, 510, 4000, 20000, 9999)]
    alone = [spectrogram(w, cfg)[0] for w in waves]
    # Small pieces and batches force the piece-splitting and multi-call paths on short test waves.
    monkeypatch.setattr(features, "_PIECE_FRAMES", 16)
    monkeypatch.setattr(features, "_BATCH_FRAMES", 40)
    together = spectrogram_batch(waves, cfg)
    for a, b, w in zip(alone, together, waves):
        assert b.shape == (256, 1 + len(w) // 125)
        assert torch.allclose(a, b, atol=1e-6)
    with pytest.raises(ValueError, match="wave 0 has 200 samples"):
        spectrogram_batch([np.ones(200, np.float32)], cfg)


def test_mel_bank_has_no_empty_band_and_a_sine_lands_in_the_right_band():
    import librosa

    bank = mel_filterbank(SR, 510)
    assert bank.shape == (256, 256) and bool((bank.sum(dim=1) > 0.99).all())
    assert mel_filterbank(SR, 510) is bank  # built once per process
    cfg = Config(feature="mel")
    spec = spectrogram(sine(1000.0), cfg)[0][:, 10:-10]
    assert spec.shape[0] == 256
    centres = librosa.mel_frequencies(258, fmin=0.0, fmax=SR / 2, htk=True)[1:-1]
    band = int(spec.mean(dim=1).argmax())
    assert abs(centres[band] - 1000) < 25  # bands are ~7-20 Hz apart near 1 kHz
    assert spec[band].min() > 0.99
    # Above ~2.5 kHz bands are wider than a bin and sum several bins; a sine still reads ~0 dB.
    high = spectrogram(sine(5000.0), cfg)[0][:, 10:-10]
    assert 0.99 < high.max() <= 1.0


# --- the cache -----------------------------------------------------------------------------------
def cache_entries(root) -> list[str]:
    """What a cache folder holds besides its build locks (which stay, like any lock file)."""
    return sorted(p.name for p in root.iterdir() if p.name != ".locks")


def test_cache_builds_once_and_serves_the_spectrograms(tiny_corpus, tmp_path, monkeypatch):
    m = read_manifest(tiny_corpus, progress=False)
    cfg = Config(cache_dir=str(tmp_path / "cache"))
    cache = FeatureCache.build_or_open(m, cfg, workers=1, progress=False)
    assert cache.path == tmp_path / "cache" / cache.key and len(cache) == 72
    assert sorted(p.name for p in cache.path.iterdir()) == ["features.f16", "index.csv", "meta.json"]
    total = int(cache.lengths.sum())
    assert (cache.path / "features.f16").stat().st_size == total * 256 * 2
    assert cache.offsets[0] == 0 and (np.diff(cache.offsets) == cache.lengths[:-1]).all()
    for i in (0, 17, 71):
        wave = load_audio(m.table.loc[i, "path"], SR)
        got = cache.get(i)
        assert got.dtype == np.float32 and got.shape == (256, 1 + len(wave) // 125)
        assert np.abs(got - spectrogram(wave, cfg)[0].numpy()).max() < 1e-3  # float16 storage
    assert np.array_equal(cache.get(-1), cache.get(71))
    with pytest.raises(IndexError):
        cache.get(72)
    # A second open, e.g. the next run, reads the same folder and decodes nothing.
    monkeypatch.setattr(features, "_features_chunk", lambda *a: pytest.fail("cache was rebuilt"))
    again = FeatureCache(m, cfg)
    assert again.key == cache.key and np.array_equal(again.get(5), cache.get(5))
    # Data-loader workers receive the index, not the memory-mapped data.
    clone = pickle.loads(pickle.dumps(again))
    assert len(pickle.dumps(again)) < 20_000 and np.array_equal(clone.get(5), cache.get(5))


def test_process_pool_build_equals_in_process_build(tiny_corpus, tmp_path):
    m = read_manifest(tiny_corpus, progress=False)
    serial = FeatureCache(m, Config(cache_dir=str(tmp_path / "a")), workers=1, progress=False)
    pooled = FeatureCache(m, Config(cache_dir=str(tmp_path / "b")), workers=2, progress=False)
    assert serial.key == pooled.key and serial.meta["build_workers"] == 1 and pooled.meta["build_workers"] == 2
    a, b = pd.read_csv(serial.path / "index.csv"), pd.read_csv(pooled.path / "index.csv")
    assert a[["row", "n_frames"]].equals(b[["row", "n_frames"]])
    # Pool workers place chunks in the order they finish; every row's frames are still exactly the
    # same and the rows tile the file without gaps or overlaps.
    ends = sorted(zip(b["offset"], b["offset"] + b["n_frames"]))
    assert ends[0][0] == 0 and all(stop == nxt for (_, stop), (nxt, _) in zip(ends, ends[1:]))
    assert (pooled.path / "features.f16").stat().st_size == (serial.path / "features.f16").stat().st_size
    for i in range(len(serial)):
        assert np.array_equal(serial.get(i), pooled.get(i)), i
    assert sorted(p.name for p in pooled.path.iterdir()) == ["features.f16", "index.csv", "meta.json"]


def test_disk_full_in_a_pool_worker_names_the_file_and_leaves_no_temp_folder(tiny_corpus, tmp_path, monkeypatch):
    m = read_manifest(tiny_corpus, progress=False)
    real_pwrite = os.pwrite

    def full_disk(fd, data, position):
        if position > 0:  # the first chunk fits, a later one does not
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_pwrite(fd, data, position)

    monkeypatch.setattr(os, "pwrite", full_disk)  # pool workers are forked and inherit the patch
    with pytest.raises(OSError) as info:
        FeatureCache(m, Config(cache_dir=str(tmp_path / "cache")), workers=2, progress=False)
    assert info.value.errno == errno.ENOSPC and "(disk full)" in str(info.value) and "features.f16" in str(info.value)
    assert cache_entries(tmp_path / "cache") == []


def test_key_changes_with_settings_and_corpus_and_says_why(corpus_copy, tmp_path, caplog):
    cfg = Config(cache_dir=str(tmp_path / "cache"))
    m = read_manifest(corpus_copy, progress=False)
    first = FeatureCache(m, cfg, workers=1, progress=False)
    assert features.cache_key(m, Config(cache_dir=cfg.cache_dir, top_db=60.0)) != first.key
    assert features.cache_key(m, Config(cache_dir=cfg.cache_dir, feature="mel")) != first.key
    assert features.cache_key(m, Config(cache_dir=cfg.cache_dir, eval_crops=5)) == first.key  # crops taken later
    assert features.cache_key(m, Config(cache_dir=cfg.cache_dir, epochs=3)) == first.key  # a learning setting
    clip = corpus_copy.parent / "west_is_new.wav"
    sf.write(clip, sine(300, 0.3), SR)
    with corpus_copy.open("a") as fh:
        fh.write("west_is_new.wav,west0,west,male\n")
    changed = read_manifest(corpus_copy, progress=False)
    with caplog.at_level(logging.INFO, logger="voxlib.features"):
        second = FeatureCache(changed, cfg, workers=1, progress=False)
    assert second.key != first.key and len(second) == 73
    assert f"corpus changed since cache {first.key} was built; building {second.key}" in caplog.text
    assert first.path.exists()  # the old cache stays for runs that still use it
    assert np.abs(second.get(72) - spectrogram(load_audio(clip, SR), cfg)[0].numpy()).max() < 1e-3


def test_disk_full_leaves_existing_cache_intact_and_no_temp_folder(corpus_copy, tmp_path, monkeypatch):
    cfg = Config(cache_dir=str(tmp_path / "cache"))
    original = read_manifest(corpus_copy, progress=False)
    good = FeatureCache(original, cfg, workers=1, progress=False)
    before = (good.path / "features.f16").read_bytes()
    clip = corpus_copy.parent / "north0" / "north0_000.wav"
    os.utime(clip, ns=(clip.stat().st_atime_ns, clip.stat().st_mtime_ns + 10**9))
    changed = read_manifest(corpus_copy, progress=False)
    written = []

    def full_disk(fh, block):
        if len(written) == 2:  # the third block of four: features.f16 is part-written
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        written.append(len(block))
        fh.write(block.tobytes())

    monkeypatch.setattr(features, "_write_block", full_disk)
    with pytest.raises(OSError) as info:
        FeatureCache(changed, cfg, workers=1, progress=False)
    assert info.value.errno == errno.ENOSPC
    message = str(info.value)
    assert "No space left on device (disk full)" in message and "features.f16" in message
    assert str(tmp_path / "cache") in message and "existing caches" in message
    assert cache_entries(tmp_path / "cache") == [good.key]  # temp folder removed
    assert (good.path / "features.f16").read_bytes() == before
    reopened = FeatureCache(original, cfg, progress=False)  # opens, does not rebuild
    assert reopened.path == good.path and np.array_equal(reopened.get(0), good.get(0))


def test_interrupted_builds_are_detected_and_rebuilt(tiny_corpus, tmp_path, caplog):
    cfg = Config(cache_dir=str(tmp_path / "cache"))
    m = read_manifest(tiny_corpus, progress=False)
    key = features.cache_key(m, cfg)
    root = tmp_path / "cache"
    # A build killed mid-way leaves its temp folder (its process is gone) ...
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = root / f".{key}.tmp-{int(dead.stdout)}-abcd"
    stale.mkdir(parents=True)
    (stale / "features.f16").write_bytes(b"\0" * 1000)
    # ... and a final folder without meta.json (the completeness marker) must not be read.
    (root / key).mkdir()
    (root / key / "features.f16").write_bytes(b"\0" * 1000)
    (root / key / "index.csv").write_text("offset,n_frames,row\n0,1,1\n")
    with caplog.at_level(logging.INFO, logger="voxlib.features"):
        cache = FeatureCache(m, cfg, workers=1, progress=False)
    assert "incomplete (interrupted build?); rebuilding" in caplog.text
    assert "left by an interrupted feature-cache build" in caplog.text
    assert cache_entries(root) == [key]
    assert len(cache) == 72 and cache.get(3).max() > 0.5
    # A truncated features file (size disagrees with meta.json) is also treated as incomplete.
    with open(cache.path / "features.f16", "r+b") as fh:
        fh.truncate(1000)
    assert len(FeatureCache(m, cfg, workers=1, progress=False).get(71).T) == cache.lengths[71]


def test_skip_mode_cache_covers_only_kept_rows(corpus_copy, tmp_path):
    (corpus_copy.parent / "east2" / "east2_004.wav").unlink()
    m = read_manifest(corpus_copy, on_bad_file="skip", progress=False)
    assert len(m) == 71 and len(m.rejected) == 1
    cache = FeatureCache(m, Config(cache_dir=str(tmp_path / "cache")), workers=1, progress=False)
    assert len(cache) == 71
    last = load_audio(m.table["path"].iloc[-1], SR)
    assert cache.get(70).shape[1] == 1 + len(last) // 125
