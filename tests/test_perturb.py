"""Voice perturbation: a new pitch and vocal-tract length by the drawn factors, the crop's shape kept.

A steady synthetic vowel (harmonics of f0 under a two-formant envelope) goes through the real feature
transform; its harmonic spacing is read from the peaks of the spectrum and its formant positions from
a smoothed spectrum, before and after perturbation, by measurements that do not use the code under
test. Crops are drawn from (seed, epoch, row) like the unperturbed ones, so resume stays bit-exact.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy.ndimage import gaussian_filter1d
from scipy.signal import find_peaks

from voxlib.config import Config
from voxlib.corpora import read_manifest
from voxlib.data import CropDataset, build_vocabularies, encode_targets
from voxlib.features import FeatureCache, spectrogram
from voxlib.perturb import Factors, VoicePerturbation, resample_time, split_source_filter, warp_frequency

SR = 16000
BIN_HZ = SR / 510  # 31.4 Hz per bin of the 256-bin linear feature
F0 = 180.0
FORMANTS = (700.0, 2200.0)


def vowel(f0: float = F0, seconds: float = 2.2) -> np.ndarray:
    """Harmonics of f0 shaped by two Gaussian formants, as the feature transform sees it: (256, T)."""
    t = np.arange(int(seconds * SR)) / SR
    wave = np.zeros_like(t)
    for k in range(1, int(7800 / f0)):
        f = k * f0
        amplitude = sum(np.exp(-0.5 * ((f - c) / 250.0) ** 2) for c in FORMANTS) + 0.01
        wave += amplitude * np.sin(2 * np.pi * f * t)
    wave = 0.5 * wave / np.abs(wave).max()
    return spectrogram(wave.astype(np.float32), Config())[0].numpy()[:, 20:276]  # 256 steady frames


def harmonic_spacing(spec: np.ndarray) -> float:
    """Bins between neighbouring harmonics: the slope of peak position over harmonic number."""
    profile = spec.mean(axis=1)[: int(4000 / BIN_HZ)]
    peaks, _ = find_peaks(profile, prominence=0.05)
    gaps = np.diff(peaks)
    typical = np.median(gaps)
    keep = np.abs(gaps - typical) < 0.5 * typical  # consecutive harmonics only
    return float(gaps[keep].mean())


def formant_bins(spec: np.ndarray) -> list[float]:
    """Peak positions (bins) of the smoothed spectrum: the two formants."""
    smooth = gaussian_filter1d(spec.mean(axis=1), sigma=6)
    peaks, props = find_peaks(smooth, prominence=0.02)
    top = sorted(peaks[np.argsort(props["prominences"])[-2:]])
    return [float(p) for p in top]


@pytest.fixture(scope="module")
def crop() -> np.ndarray:
    return vowel()


def test_the_measurements_see_the_synthetic_voice(crop):
    assert harmonic_spacing(crop) == pytest.approx(F0 / BIN_HZ, rel=0.03)
    assert formant_bins(crop) == pytest.approx([c / BIN_HZ for c in FORMANTS], abs=2.5)
    assert harmonic_spacing(vowel(1.2 * F0)) == pytest.approx(1.2 * F0 / BIN_HZ, rel=0.03)


@pytest.mark.parametrize("pitch", [0.8, 1.25])
def test_pitch_scales_the_harmonic_spacing_and_keeps_the_formants(crop, pitch):
    out = VoicePerturbation(pitch=0.3).apply(crop, Factors(pitch=pitch), 256)
    assert out.shape == crop.shape and out.dtype == np.float32
    assert harmonic_spacing(out) == pytest.approx(pitch * harmonic_spacing(crop), rel=0.04)
    assert formant_bins(out) == pytest.approx(formant_bins(crop), abs=2.5)


@pytest.mark.parametrize("formant", [0.88, 1.12])
def test_vocal_tract_length_moves_the_formants_and_keeps_the_pitch(crop, formant):
    out = VoicePerturbation(formant=0.15).apply(crop, Factors(formant=formant), 256)
    assert out.shape == crop.shape
    assert formant_bins(out) == pytest.approx([formant * b for b in formant_bins(crop)], abs=2.5)
    assert harmonic_spacing(out) == pytest.approx(harmonic_spacing(crop), rel=0.04)


def test_equal_factors_warp_the_whole_spectrum_and_no_change_is_no_change(crop):
    both = VoicePerturbation(formant=0.2, pitch=0.2).apply(crop, Factors(formant=1.1, pitch=1.1), 256)
    np.testing.assert_allclose(both, np.clip(warp_frequency(crop, 1.1), 0, 1), atol=1e-5)
    envelope, fine = split_source_filter(crop)
    np.testing.assert_allclose(envelope + fine, crop, atol=1e-6)
    np.testing.assert_array_equal(VoicePerturbation(formant=0.2).apply(crop, Factors(), 256), crop)


def test_tempo_reads_a_longer_window_into_the_crop_length():
    window = np.zeros((256, 300), np.float32)
    window[:, 150] = 1.0  # an onset half-way through the window
    factors = Factors(tempo=300 / 256)
    assert VoicePerturbation.window_frames(factors, 256) == 300
    out = VoicePerturbation(tempo=0.2).apply(window, factors, 256)
    assert out.shape == (256, 256)
    assert abs(int(out[0].argmax()) - 150 * 255 / 299) <= 1  # the onset comes sooner: faster speech
    np.testing.assert_allclose(resample_time(window[:, :256], 256), window[:, :256])


def test_draws_are_log_uniform_within_the_bounds_and_repeatable():
    perturb = VoicePerturbation(formant=0.1, pitch=0.25, tempo=0.0)
    draws = [perturb.draw(np.random.default_rng([0, i])) for i in range(2000)]
    formant = np.array([d.formant for d in draws])
    pitch = np.array([d.pitch for d in draws])
    assert formant.min() >= 1 / 1.1 and formant.max() <= 1.1 and {d.tempo for d in draws} == {1.0}
    assert pitch.min() >= 1 / 1.25 and pitch.max() <= 1.25
    assert abs(np.log(pitch).mean()) < 0.01 and np.log(pitch).max() > 0.95 * np.log(1.25)
    assert perturb.draw(np.random.default_rng([0, 5])) == draws[5]
    assert not VoicePerturbation().active and perturb.active


@pytest.fixture(scope="module")
def cache_and_targets(tiny_corpus, tmp_path_factory):
    cfg = Config(manifest=str(tiny_corpus), cache_dir=str(tmp_path_factory.mktemp("cache")))
    manifest = read_manifest(tiny_corpus, progress=False, cache_dir=cfg.cache_dir)
    cache = FeatureCache.build_or_open(manifest, cfg, workers=1, progress=False)
    table = manifest.table
    vocab = build_vocabularies(table, pd.Series("train", index=table.index), ["speaker", "birthplace", "sex"])
    return cache, encode_targets(table, vocab)[0], len(table)


def test_training_crops_are_drawn_from_seed_epoch_and_row(cache_and_targets):
    cache, targets, n = cache_and_targets
    rows = np.arange(n)
    perturb = VoicePerturbation(formant=0.12, pitch=0.25, tempo=0.12)

    def crops(epoch: int, seed: int = 0, perturbation=perturb, order=rows) -> dict[int, np.ndarray]:
        data = CropDataset(cache, order, targets, train=True, seed=seed, perturb=perturbation)
        data.set_epoch(epoch)
        return {int(r): x.numpy() for x, _, r in (data[i] for i in range(len(order)))}

    first = crops(1)
    assert all(x.shape == (1, 256, 256) for x in first.values())
    again = crops(1, order=rows[::-1])  # another order (another worker, a resumed run): the same crops
    assert all(np.array_equal(first[r], again[r]) for r in first)
    assert not any(np.array_equal(first[r], x) for r, x in crops(2).items())
    assert not any(np.array_equal(first[r], x) for r, x in crops(1, seed=1).items())
    plain = crops(1, perturbation=None)
    assert not any(np.array_equal(first[r], plain[r]) for r in first)
    off = crops(1, perturbation=VoicePerturbation())  # all zero: exactly the crops of a run without it
    assert all(np.array_equal(plain[r], off[r]) for r in plain)


def test_a_perturbed_crop_keeps_its_birthplace_but_not_its_speaker_or_sex(cache_and_targets):
    cache, targets, n = cache_and_targets
    rows = np.arange(n)
    plain = CropDataset(cache, rows, targets, train=True, seed=0)
    half = CropDataset(cache, rows, targets, train=True, seed=0,
                       perturb=VoicePerturbation(formant=0.12, pitch=0.25, share=0.5))
    perturbed = 0
    for i in range(n):
        (x, y, _), (x0, y0, _) = half[i], plain[i]
        if y["speaker"] < 0:
            perturbed += 1
            assert y["sex"] == -1 and y["birthplace"] == y0["birthplace"] >= 0
            assert not np.array_equal(x.numpy(), x0.numpy())
        else:  # left as recorded: the very crop and targets of a run without perturbation
            assert np.array_equal(x.numpy(), x0.numpy()) and y == y0
    assert 0.3 * n < perturbed < 0.7 * n
    assert VoicePerturbation.from_config(Config(perturb_pitch=0.2)).share == Config().perturb_share == 0.5
    assert not VoicePerturbation(pitch=0.2, share=0.0).active


def test_with_a_view_for_the_birthplace_network_the_recorded_crop_and_every_target_stay(cache_and_targets):
    cache, targets, n = cache_and_targets
    rows = np.arange(n)
    plain = CropDataset(cache, rows, targets, train=True, seed=0)
    views = CropDataset(cache, rows, targets, train=True, seed=0, perturb_view=True,
                        perturb=VoicePerturbation(formant=0.12, pitch=0.25, tempo=0.1, share=0.5))
    voiced = 0
    for i in range(n):
        (x, y, _), (x0, y0, _) = views[i], plain[i]
        assert x.shape == (2, 256, 256) and y == y0
        assert np.array_equal(x[:1].numpy(), x0.numpy())  # the speaker trunk's crop is the recorded one
        voiced += not np.array_equal(x[1].numpy(), x[0].numpy())
    assert 0.3 * n < voiced < 0.7 * n
