"""Decode one clip (or a segment of a long recording) into the mono float waveform features expect.

soundfile (libsndfile) decodes WAV, FLAC, OGG and MP3 alike, and soxr resamples; librosa.load would
do the same through the same libraries but pays for librosa's import and numba start-up, which
matters when every clip of a corpus passes through here.

The input gate lives here too, so a file and an in-memory waveform are refused for the same reason
in the same words (:func:`wave_problem`, and the manifest check's use of the same phrases):
non-finite samples, too short for one STFT frame, silent, no samples. A waveform array follows one
layout rule (:func:`as_mono`). :func:`read_window` reads only a window of a file (resampled with a
margin), so scoring a few crops of an hour-long recording holds a few seconds of audio in memory.
"""
from __future__ import annotations

import math
import numbers
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr


class AudioError(ValueError):
    """A clip that cannot be decoded, or a waveform that breaks the layout rule; the message names it."""


# A clip whose peak stays below -80 dBFS is all zeros after the default top_db=80 scaling.
SILENCE_PEAK = 1e-4
MAX_CHANNELS = 64  # a 2-D waveform's shorter axis holds the channels, at most this many
MAX_SAMPLE_RATE = 1_000_000
RESAMPLE_MARGIN = 1024  # samples (at the target rate) read beyond a window, so soxr's filter sees its context
# libsndfile seeks into MPEG audio only approximately (the bit reservoir of the frames before is missing):
# such a file is read forward from the segment's start, as load_audio does, keeping only the windows
FORWARD_ONLY_FORMATS = ("MP3",)
_SKIP_BLOCK = 1 << 16  # frames decoded at a time while reading forward to a window


# --- the reasons a clip is refused: one wording for files and waveforms ------------------------------
def nonfinite_reason(count: int) -> str:
    return f"{count} NaN/inf samples"


def silent_reason(peak: float) -> str:
    level = "-inf" if peak == 0 else f"{20 * math.log10(peak):.0f}"
    return f"silent (peak {level} dBFS)"


def too_short_reason(seconds: float, at_rate: float, sample_rate: int, n_fft: int) -> str:
    return (f"too short: {seconds * 1000:.1f} ms = {at_rate:.0f} samples at {sample_rate} Hz, "
            f"less than one STFT frame ({n_fft} samples)")


def as_mono(wave, sample_rate, name: str = "waveform") -> tuple[np.ndarray, int]:
    """A waveform array as float32 mono samples and its rate, by one documented rule.

    - ``sample_rate``: a whole number of Hz, 1 .. 1,000,000.
    - 1-D: samples. 2-D: the longer axis is time and the shorter one channels (at most 64), so
      ``(samples, channels)`` as soundfile returns it and ``(channels, samples)`` as torchaudio returns
      it both work; a square array is ambiguous and refused, naming its shape. Channels are averaged.
    - Float samples are taken as they are (full scale 1.0); integer PCM is scaled by its full scale
      (int16 / 32768), like soundfile reads it. Other dtypes and other shapes are refused.

    Raises AudioError ``"<name>: ..."``.
    """
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, numbers.Real) or \
            not math.isfinite(sample_rate) or sample_rate != int(sample_rate) or \
            not 1 <= sample_rate <= MAX_SAMPLE_RATE:
        raise AudioError(f"{name}: sample rate must be a whole number of Hz in 1..{MAX_SAMPLE_RATE}, "
                         f"got {sample_rate!r}")
    array = np.asarray(wave)
    if array.dtype.kind in "iu":
        full = float(2 ** (8 * array.dtype.itemsize - 1))  # unsigned PCM is offset by the same amount
        array = (array.astype(np.float64) - (full if array.dtype.kind == "u" else 0.0)) / full
    elif array.dtype.kind != "f":
        raise AudioError(f"{name}: samples must be real numbers, got dtype {array.dtype}")
    if array.ndim == 2 and array.size == 0:
        array = np.zeros(0, np.float32)  # no samples, whatever the layout: refused as such by wave_problem
    elif array.ndim == 2:
        rows, columns = array.shape
        if rows == columns:
            raise AudioError(f"{name}: a {rows} x {columns} array is ambiguous (time is the longer axis); "
                             f"pass (samples, channels)")
        if rows < columns:
            array = array.T
        if array.shape[1] > MAX_CHANNELS:
            raise AudioError(f"{name}: a {rows} x {columns} array would have {array.shape[1]} channels (time is "
                             f"the longer axis; at most {MAX_CHANNELS} channels)")
        array = array[:, 0] if array.shape[1] == 1 else array.astype(np.float32).mean(axis=1)
    elif array.ndim != 1:
        raise AudioError(f"{name}: expected samples (N,) or (samples, channels), got shape {array.shape}")
    return np.ascontiguousarray(array, dtype=np.float32), int(sample_rate)


def wave_problem(wave: np.ndarray, sample_rate: int, target_rate: int, n_fft: int) -> str | None:
    """Why a mono waveform cannot be scored, or None: the checks every manifest row passes, in their order."""
    if wave.size == 0:
        return "no audio samples"
    at_rate = wave.size * target_rate / sample_rate
    if at_rate < n_fft:
        return too_short_reason(wave.size / sample_rate, at_rate, target_rate, n_fft)
    finite = np.isfinite(wave)
    if not finite.all():
        return nonfinite_reason(int(wave.size - finite.sum()))
    peak = float(np.abs(wave).max())
    if peak < SILENCE_PEAK:
        return silent_reason(peak)
    return None


def segment_frames(start: float | None, end: float | None, samplerate: int, frames: int) -> tuple[int, int]:
    """Sample range [s0, s1) of a segment given in seconds; None/NaN means the file's start/end.

    Shared by validation and loading so both agree on exactly which samples a row covers.
    """
    s0 = 0 if start is None or math.isnan(start) else int(round(start * samplerate))
    s1 = frames if end is None or math.isnan(end) else int(round(end * samplerate))
    return s0, s1


def load_audio(
    path: str | Path, sample_rate: int, start: float | None = None, end: float | None = None
) -> np.ndarray:
    """Return the clip (or its ``start``..``end`` seconds) as float32 mono at ``sample_rate``.

    Channels are averaged (not summed), so a full-scale stereo clip stays full scale; other rates
    are resampled with soxr's high-quality filter. The segment end is clamped to the file end.
    """
    try:
        with sf.SoundFile(str(path)) as fh:
            native = fh.samplerate
            s0, s1 = segment_frames(start, end, native, fh.frames)
            s1 = min(s1, fh.frames)
            if s0 < 0 or s0 >= s1:
                raise AudioError(f"{path}: segment {start}..{end} s is empty or outside the file")
            fh.seek(s0)
            data = fh.read(s1 - s0, dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, OSError) as err:
        raise AudioError(f"{path}: cannot decode audio ({err})") from err
    wave = data[:, 0] if data.shape[1] == 1 else data.mean(axis=1)
    if native != sample_rate:
        wave = soxr.resample(wave, native, sample_rate)
    return np.ascontiguousarray(wave, dtype=np.float32)


# --- reading a window of a file ----------------------------------------------------------------------
def resampled_length(samples: int, native: int, sample_rate: int) -> int:
    """How many samples ``load_audio`` returns for ``samples`` at ``native`` Hz: soxr rounds half up."""
    return samples if native == sample_rate else (2 * samples * sample_rate + native) // (2 * native)


def read_window(fh: sf.SoundFile, first: int, samples: int, sample_rate: int, lo: int, hi: int) -> np.ndarray:
    """Samples ``lo..hi`` (at ``sample_rate``) of the segment of ``samples`` native frames that starts at
    frame ``first`` of the open file: what ``load_audio(...)[lo:hi]`` returns, reading only the window.

    Without resampling the values are identical (an MP3 is decoded forward from the segment's start,
    as ``load_audio`` does, since seeking into it is not sample-exact). With resampling, the window is read with
    ``RESAMPLE_MARGIN`` samples of context either side, from a native frame that maps to a whole
    target sample, so soxr's output lines up with the whole segment's to float32 rounding (its
    filter is far shorter than the margin; at the segment's ends both see the same edge).
    """
    native = fh.samplerate
    if native == sample_rate:
        start, stop, skip = lo, hi, 0
    else:
        step = sample_rate // math.gcd(native, sample_rate)  # target samples per whole native frame step
        start_t = max(0, lo - RESAMPLE_MARGIN) // step * step
        start = start_t * native // sample_rate
        stop = min(samples, -(-(hi + RESAMPLE_MARGIN) * native // sample_rate))
        skip = lo - start_t
    if fh.format in FORWARD_ONLY_FORMATS:
        at = fh.tell()
        if not first <= at <= first + start:  # windows come in order: carry on from the last one if we can
            at = fh.seek(first)
        while at < first + start:
            at += len(fh.read(min(_SKIP_BLOCK, first + start - at), dtype="float32", always_2d=True)) or \
                (first + start - at)  # a short read at the end: the window's length check below reports it
    else:
        fh.seek(first + start)
    data = fh.read(stop - start, dtype="float32", always_2d=True)
    wave = data[:, 0] if data.shape[1] == 1 else data.mean(axis=1)
    if native != sample_rate:
        wave = soxr.resample(wave, native, sample_rate)
    window = np.ascontiguousarray(wave[skip: skip + hi - lo], dtype=np.float32)
    if len(window) != hi - lo:
        raise AudioError(f"{fh.name}: could read only {len(window)} of samples {lo}..{hi}")
    return window
