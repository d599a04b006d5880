"""Voice perturbation of training crops: change who speaks, keep how they pronounce.

With a handful of speakers per birthplace, a head can separate the classes by the training voices
alone: their vocal-tract length (where the formants sit), their pitch and their speaking rate. Each
training crop is therefore given a new voice, drawn per (seed, epoch, row) like the crop itself:

- vocal-tract length: the spectral envelope's frequency axis is scaled by a factor (VTLP, Jaitly &
  Hinton 2013): every formant moves by the same ratio, so the vowel *pattern* an accent is heard in
  stays, and only its position, which differs between speakers, changes;
- pitch: the fine structure (harmonics) is scaled on its own, so the harmonic spacing changes while
  the envelope stays;
- tempo: the crop is read from a longer or shorter window of the clip, resampled to the crop length.

A perturbed crop is somebody else speaking: it keeps its birthplace target, but not its speaker or sex
(``VOICE_HEADS``), which the crop no longer carries; only a ``share`` of the crops are perturbed, so
the speaker head still learns the recorded voices from the others.

The spectrogram is split into envelope and fine structure by cepstral liftering of each frame: the
features are dB values mapped linearly to [0, 1], so a frame is a log spectrum, whose lowest
``lifter`` DCT coefficients are the envelope and the rest the harmonics. A factor is drawn
log-uniformly in [1/(1+x), 1+x] for a setting x; 0 leaves that property alone.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.fft import dct, idct

VOICE_HEADS = ("speaker", "sex")  # targets a perturbed crop no longer has
LIFTER = 30  # DCT coefficients kept as envelope: periods above 17 bins (530 Hz at 16 kHz) are envelope
WARP_KNEE = 0.85  # above this share of the band the warp bends back to keep the top bin in place


@dataclass(frozen=True)
class Factors:
    """One draw: envelope (formant) scale, harmonic (pitch) scale and tempo, each 1 = unchanged."""

    formant: float = 1.0
    pitch: float = 1.0
    tempo: float = 1.0


@dataclass(frozen=True)
class VoicePerturbation:
    """The largest relative change of vocal-tract length, pitch and tempo (0 = off), and the share of
    crops perturbed."""

    formant: float = 0.0
    pitch: float = 0.0
    tempo: float = 0.0
    share: float = 1.0
    lifter: int = LIFTER

    @classmethod
    def from_config(cls, cfg) -> "VoicePerturbation":
        return cls(cfg.perturb_formant, cfg.perturb_pitch, cfg.perturb_tempo, cfg.perturb_share)

    @property
    def active(self) -> bool:
        return bool(self.formant or self.pitch or self.tempo) and self.share > 0

    def draw(self, rng: np.random.Generator) -> Factors | None:
        """Three log-uniform factors, or None for a crop left as recorded (probability 1 - share).

        Always four draws, so one setting never shifts another's.
        """
        keep, *u = rng.uniform(0.0, 1.0, size=4)
        if keep >= self.share:
            return None
        return Factors(*(math.exp((2 * v - 1) * math.log1p(x)) for v, x in zip(u, (self.formant, self.pitch,
                                                                                    self.tempo))))

    @staticmethod
    def window_frames(factors: Factors, n_frames: int) -> int:
        """Frames of the clip to read so that, resampled to ``n_frames``, the speech runs ``tempo`` times faster."""
        return max(1, int(round(n_frames * factors.tempo)))

    def apply(self, window: np.ndarray, factors: Factors, n_frames: int) -> np.ndarray:
        """(bins, window_frames) -> (bins, n_frames) float32 in [0, 1] with the drawn voice."""
        window = np.asarray(window, dtype=np.float32)
        crop = resample_time(window, n_frames) if window.shape[1] != n_frames else window
        if factors.formant == 1.0 and factors.pitch == 1.0:
            return np.ascontiguousarray(crop, dtype=np.float32)
        envelope, fine = split_source_filter(crop, self.lifter)
        out = warp_frequency(envelope, factors.formant) + warp_frequency(fine, factors.pitch)
        return np.clip(out, 0.0, 1.0, out=out)


def split_source_filter(spec: np.ndarray, lifter: int = LIFTER) -> tuple[np.ndarray, np.ndarray]:
    """(bins, frames) log spectrum -> (envelope, fine structure), which add up to ``spec``."""
    coefficients = dct(spec, type=2, axis=0, norm="ortho")
    coefficients[lifter:] = 0.0
    envelope = idct(coefficients, type=2, axis=0, norm="ortho")
    return envelope, spec - envelope


def warp_positions(bins: int, factor: float, knee: float = WARP_KNEE) -> np.ndarray:
    """For each output bin, the (fractional) input bin it reads: a content at bin ``b`` moves to
    ``factor * b`` up to the knee, and the band above the knee is stretched or squeezed linearly so
    the top bin stays the top bin (piecewise-linear VTLP)."""
    top = bins - 1
    out_knee = knee * top * min(1.0, factor)  # the knee in output bins (below the top for any factor)
    b = np.arange(bins, dtype=np.float64)
    low = b / factor
    in_knee = out_knee / factor
    high = in_knee + (b - out_knee) * (top - in_knee) / max(top - out_knee, 1e-9)
    return np.where(b <= out_knee, low, high)


def warp_frequency(spec: np.ndarray, factor: float) -> np.ndarray:
    """Scale the frequency axis (axis 0) of a (bins, frames) array by ``factor``, linearly interpolated."""
    if factor == 1.0:
        return spec
    source = warp_positions(spec.shape[0], factor)
    lower = np.floor(source).astype(np.int64)
    upper = np.minimum(lower + 1, spec.shape[0] - 1)
    w = (source - lower).astype(spec.dtype)[:, None]
    return spec[lower] * (1 - w) + spec[upper] * w


def resample_time(spec: np.ndarray, n_frames: int) -> np.ndarray:
    """(bins, T) -> (bins, n_frames) by linear interpolation along time (ends kept)."""
    frames = spec.shape[1]
    if frames == 1:
        return np.repeat(spec, n_frames, axis=1)
    source = np.linspace(0.0, frames - 1, n_frames)
    lower = np.floor(source).astype(np.int64)
    upper = np.minimum(lower + 1, frames - 1)
    w = (source - lower).astype(spec.dtype)
    return spec[:, lower] * (1 - w) + spec[:, upper] * w
