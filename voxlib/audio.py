"""Decode one clip (or a segment of a long recording) into the mono float waveform features expect.

soundfile (libsndfile) decodes WAV, FLAC, OGG and MP3 alike, and soxr resamples; librosa.load would
do the same through the same libraries but pays for librosa's import and numba start-up, which
matters when every clip of a corpus passes through here.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr


class AudioError(ValueError):
    """A clip that cannot be decoded; the message names the file."""


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
