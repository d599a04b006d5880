"""Waveform -> 256-bin spectrogram in [0, 1], and the on-disk cache every run reads features from.

The transform (``spectrogram``), for a mono float waveform ``x`` at ``cfg.sample_rate``:

1. ``X = torch.stft(x, n_fft, hop_length, window=hann_window(n_fft) (periodic), center=True,
   pad_mode="reflect")`` — with the defaults 510/125 that is 256 bins x one frame per 7.8 ms,
   ``T = 1 + len(x) // hop_length`` frames.
2. Power ``P = |X|^2``; for ``feature="mel"`` ``P = M @ P`` with the 256-band mel filterbank ``M``
   of ``mel_filterbank`` (see there for how bands narrower than one STFT bin are handled).
3. Level relative to a full-scale sine, ``dB = 10 log10(P / ref^2)`` with ``ref = sum(window) / 2``
   (the magnitude a sine of amplitude 1 reaches in its bin), so a full-scale sine reads 0 dB.
4. ``clip((dB + top_db) / top_db, 0, 1)``: 0 dB -> 1, ``-top_db`` and below (silence) -> 0.

Long waves are cut into pieces of at most ``_PIECE_FRAMES`` frames whose samples overlap by
``n_fft - hop``; each piece yields exactly the frames the whole wave would, so batching clips of any
length into one ``torch.stft`` call changes no value and memory stays bounded.

The cache stores these spectrograms once per (corpus, feature settings) so training never decodes
audio: see ``FeatureCache``.
"""
from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import json
import logging
import math
import multiprocessing
import os
import secrets
import shutil
import sys
import time
import warnings
import zlib
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from voxlib import __version__
from voxlib.audio import load_audio
from voxlib.config import Config, outputs_dir, usable_cores
from voxlib.fileio import fsync_dir
from voxlib.heap import trim_before_fork
from voxlib.lock import LockedError, exclusive_lock
from voxlib.signals import process_pool, terminate_as_interrupt

log = logging.getLogger(__name__)

N_MELS = 256
FORMAT_VERSION = 2  # bump when the transform or the file layout changes: old caches get a new key (2: crc32 per row)
_PIECE_FRAMES = 2048  # frames per STFT piece (bounds memory for long recordings)
_MIN_POWER = 1e-30  # floor before log10 (a normal float32); anything this small maps to 0 anyway
_CHUNK_ROWS = 16  # clips per work item of a pool build (at least 4 items per worker)
_SYNC_BYTES = 32 << 20  # a pool build starts flushing features.f16 to disk every this many bytes
_BATCH_FRAMES = 512  # frames per torch.stft call; larger batches fall out of the CPU cache and run slower


# --- the transform -------------------------------------------------------------------------------
def n_bins(cfg: Config) -> int:
    """Feature rows: 256 mel bands, or the n_fft // 2 + 1 STFT bins (256 for n_fft = 510)."""
    return N_MELS if cfg.feature == "mel" else cfg.n_fft // 2 + 1


@functools.lru_cache(maxsize=None)
def _window(n_fft: int) -> torch.Tensor:
    return torch.hann_window(n_fft, periodic=True, dtype=torch.float32)


@functools.lru_cache(maxsize=None)
def mel_filterbank(sample_rate: int, n_fft: int, n_mels: int = N_MELS) -> torch.Tensor:
    """(n_mels, n_fft // 2 + 1) weights on the power spectrum; built once per process.

    librosa.filters.mel with ``htk=True, fmin=0, fmax=sample_rate/2, norm=None``: HTK mel because
    it is smooth (no linear/log knee at 1 kHz), the full band because the linear feature covers it
    too, and unnormalised triangles (peak 1) so a full-scale sine at a band centre still reads
    about 0 dB, as in the linear feature. 256 bands over 256 bins are denser than the bins below
    about 2.5 kHz: there a triangle is narrower than a bin and holds less than one bin's weight
    (27 bands come out empty at 16 kHz). Those bands instead read the power spectrum linearly
    interpolated at their centre frequency, so every band carries signal and the low bands are a
    smooth resampling of the linear bins.
    """
    import librosa  # deferred: only the mel feature pays librosa's start-up

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Empty filters detected")
        bank = librosa.filters.mel(
            sr=sample_rate, n_fft=n_fft, n_mels=n_mels, fmin=0.0, fmax=sample_rate / 2, htk=True, norm=None
        )
    centres = librosa.mel_frequencies(n_mels + 2, fmin=0.0, fmax=sample_rate / 2, htk=True)[1:-1]
    bins = bank.shape[1]
    for band in np.flatnonzero(bank.sum(axis=1) < 1.0):
        position = centres[band] * n_fft / sample_rate
        low = min(int(math.floor(position)), bins - 1)
        frac = position - low
        bank[band] = 0.0
        bank[band, low] += 1.0 - frac
        bank[band, min(low + 1, bins - 1)] += frac
    return torch.from_numpy(bank.astype(np.float32))


def _scale(power: torch.Tensor, cfg: Config, ref: float) -> torch.Tensor:
    """Power -> [0, 1] (steps 3-4 of the module docstring), in place: 1 + 10 log10(P / ref^2) / top_db.

    The floor keeps zeros and denormals (silence, batch padding) out of log10, where they cost ~2x.
    """
    gain = 10.0 / cfg.top_db
    return power.clamp_min_(_MIN_POWER).log10_().mul_(gain).add_(1.0 - gain * 2 * math.log10(ref)).clamp_(0.0, 1.0)


def spectrogram_batch(waves: Sequence[np.ndarray | torch.Tensor], cfg: Config) -> list[torch.Tensor]:
    """Spectrograms of several waves in as few torch.stft calls as memory allows.

    Returns one float32 tensor ``(n_bins, 1 + len(wave) // hop_length)`` per wave with the values of
    computing each wave alone (to float rounding). The tensors may share one batch's storage.
    """
    n_fft, hop = cfg.n_fft, cfg.hop_length
    pad = n_fft // 2
    pieces: list[tuple[int, torch.Tensor, int]] = []  # (wave index, samples, frames)
    for i, wave in enumerate(waves):
        wave = torch.as_tensor(wave, dtype=torch.float32).reshape(-1)
        if wave.numel() <= pad:
            raise ValueError(f"wave {i} has {wave.numel()} samples; reflect padding needs more than {pad}")
        padded = torch.nn.functional.pad(wave[None, None], (pad, pad), mode="reflect")[0, 0]
        total = 1 + wave.numel() // hop
        for first in range(0, total, _PIECE_FRAMES):
            frames = min(_PIECE_FRAMES, total - first)
            pieces.append((i, padded[first * hop: first * hop + (frames - 1) * hop + n_fft], frames))
    parts: list[list[torch.Tensor]] = [[] for _ in waves]
    start = 0
    while start < len(pieces):
        stop, frames = start, 0
        while stop < len(pieces) and (stop == start or frames + pieces[stop][2] <= _BATCH_FRAMES):
            frames += pieces[stop][2]
            stop += 1
        group = pieces[start:stop]
        if len(group) == 1:
            batch = group[0][1][None]
        else:
            batch = torch.zeros(len(group), max(p[1].numel() for p in group))
            for row, (_, samples, _) in enumerate(group):
                batch[row, : samples.numel()] = samples
        power = _transform(batch, cfg)
        for row, (i, _, frames) in enumerate(group):
            parts[i].append(power[row, :, :frames])
        start = stop
    return [p[0] if len(p) == 1 else torch.cat(p, dim=1) for p in parts]


def _transform(batch: torch.Tensor, cfg: Config) -> torch.Tensor:
    """Steps 1-4 on rows of samples already padded (center=False): ``(rows, n_bins, frames)``."""
    window = _window(cfg.n_fft)
    spec = torch.stft(batch, cfg.n_fft, hop_length=cfg.hop_length, win_length=cfg.n_fft, window=window,
                      center=False, return_complex=True)
    squares = torch.view_as_real(spec).square()  # |X|^2 as re^2 + im^2: complex abs() is ~4x slower on CPU
    power = squares[..., 0] + squares[..., 1]
    if cfg.feature == "mel":
        power = torch.matmul(mel_filterbank(cfg.sample_rate, cfg.n_fft), power)
    return _scale(power, cfg, float(window.sum()) / 2)


def _padded_index(first: int, frames: int, samples: int, cfg: Config) -> np.ndarray:
    """The wave sample each padded sample of frames ``first .. first+frames-1`` is (reflect padding)."""
    index = np.arange(first * cfg.hop_length, (first + frames - 1) * cfg.hop_length + cfg.n_fft) - cfg.n_fft // 2
    index = np.where(index < 0, -index, index)
    return np.where(index >= samples, 2 * (samples - 1) - index, index)


def crop_samples(first: int, frames: int, samples: int, cfg: Config) -> tuple[int, int]:
    """The samples ``[lo, hi)`` of a ``samples``-long wave that frames ``first .. first+frames-1`` of
    :func:`spectrogram` read, the reflected ones at either end included."""
    index = _padded_index(first, frames, samples, cfg)
    return int(index.min()), int(index.max()) + 1


def spectrogram_crop(window: np.ndarray, lo: int, first: int, frames: int, samples: int, cfg: Config
                     ) -> torch.Tensor:
    """Frames ``first .. first+frames-1`` of ``spectrogram(wave, cfg)[0]`` from ``window = wave[lo:hi]``
    alone (``crop_samples``): ``(n_bins, frames)``, the same values, without the rest of the wave."""
    piece = torch.from_numpy(np.ascontiguousarray(window[_padded_index(first, frames, samples, cfg) - lo]))
    return _transform(piece[None], cfg)[0]


def spectrogram(wave: np.ndarray | torch.Tensor, cfg: Config) -> torch.Tensor:
    """One mono waveform at ``cfg.sample_rate`` -> float32 tensor ``(1, n_bins, T)`` in [0, 1].

    The exact transform is in the module docstring; silence maps to 0.
    """
    return spectrogram_batch([wave], cfg)[0].unsqueeze(0)


# --- the cache -----------------------------------------------------------------------------------
def feature_settings(cfg: Config) -> dict:
    """Everything that changes cached values; a change gives a different cache key."""
    return {
        "format": FORMAT_VERSION, "sample_rate": cfg.sample_rate, "n_fft": cfg.n_fft,
        "hop_length": cfg.hop_length, "feature": cfg.feature, "top_db": cfg.top_db, "n_bins": n_bins(cfg),
    }


def cache_key(manifest, cfg: Config) -> str:
    """Hash of the feature settings, the corpus digest and the rows kept (skip mode drops some)."""
    rows = manifest.table[["path", "start", "end"]].to_csv(index=False).encode("utf-8", "surrogateescape")
    blob = json.dumps(
        {"settings": feature_settings(cfg), "digest": manifest.digest, "rows": hashlib.sha256(rows).hexdigest()},
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _cache_root(cfg: Config) -> Path:
    return Path(cfg.cache_dir) if cfg.cache_dir else outputs_dir() / "cache"


def _features_chunk(jobs: list[tuple[str, float, float]], cfg: Config, position: int = 0
                    ) -> tuple[list[int], list[int], np.ndarray]:
    """Decode and transform a few rows, the first at index ``position``.

    Returns (frames per row, ``row_checksum`` per row, one time-major float16 block ``(sum, n_bins)``).
    """
    waves = [load_audio(path, cfg.sample_rate, start, end) for path, start, end in jobs]
    specs = spectrogram_batch(waves, cfg)
    lengths = [s.shape[1] for s in specs]
    block = torch.empty(sum(lengths), n_bins(cfg), dtype=torch.float16)
    first = 0
    for spec, frames in zip(specs, lengths):
        block[first: first + frames].copy_(spec.T)
        first += frames
    block = block.numpy()
    ends = np.cumsum(lengths).tolist()
    checksums = [row_checksum(block[stop - frames: stop], position + k)
                 for k, (frames, stop) in enumerate(zip(lengths, ends))]
    return lengths, checksums, block


def row_checksum(frames: np.ndarray, position: int) -> int:
    """crc32 of a row's float16 bytes, started from the row's index position.

    Starting from the position (crc32 is linear, so distinct starts give distinct sums for the same
    bytes) makes a row's frames served at another row's place fail too, e.g. after two rows' offsets
    were swapped in index.csv. zlib's crc32 reads a 200 kB row in well under a millisecond.
    """
    return zlib.crc32(frames, position & 0xFFFFFFFF)


# A pool worker's handle on the file being built: its descriptor and the shared count of frames placed.
_SHARED_FILE: dict = {}


def _worker_init(path: str, placed) -> None:
    # One intra-op thread per worker: the pool already uses every core.
    torch.set_num_threads(1)
    _SHARED_FILE.update(fd=os.open(path, os.O_WRONLY), placed=placed)


def _features_into_file(jobs: list[tuple[str, float, float]], cfg: Config, position: int
                        ) -> tuple[list[int], list[int], int]:
    """Pool-worker form of ``_features_chunk``: write the block into the shared features file.

    The block goes to the next free frames, reserved under a lock, and only ``(frames per row,
    crc32 per row, first frame)`` travels back. Sending the ~200 kB per clip back through a pipe instead cost the
    parent process about a third of a worker's CPU time, taken from the same cores.
    """
    lengths, checksums, block = _features_chunk(jobs, cfg, position)
    placed = _SHARED_FILE["placed"]
    with placed.get_lock():
        first = placed.value
        placed.value += len(block)
    data = memoryview(block).cast("B")
    position = first * block.shape[1] * block.itemsize
    while data:
        written = os.pwrite(_SHARED_FILE["fd"], data, position)
        data, position = data[written:], position + written
    return lengths, checksums, first


def _write_block(fh, block: np.ndarray) -> None:
    """Append a block of frames to features.f16 (in-process builds; a single point to fail, e.g. on a full disk)."""
    fh.write(memoryview(np.ascontiguousarray(block)).cast("B"))


class FeatureCacheError(RuntimeError):
    """The cache on disk is not what was built (bytes or index changed); the message names the cache and row."""


def _read_meta(folder: Path) -> dict | None:
    """meta.json of a complete cache folder, or None (missing, unreadable, or sizes disagree)."""
    try:
        meta = json.loads((folder / "meta.json").read_text())
        size = (folder / "features.f16").stat().st_size
        ok = meta.get("complete") is True and size == meta["total_frames"] * meta["settings"]["n_bins"] * 2
        return meta if ok and (folder / "index.csv").is_file() else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


_INDEX_COLUMNS = ("offset", "n_frames", "row", "crc32")


def index_problem(index: pd.DataFrame, total_frames: int, rows: np.ndarray) -> str | None:
    """What is wrong with index.csv for a features file of ``total_frames`` and these manifest rows, or None.

    The rows must tile features.f16 exactly (every frame belongs to one row, none reaches past the
    end) and name the manifest's rows in its order, so a swapped, shifted or truncated index is found
    before any frame is read. The frames themselves are checked by each row's crc32 when first read.
    """
    missing = [c for c in _INDEX_COLUMNS if c not in index.columns]
    if missing:
        return f"index.csv lacks column(s) {', '.join(missing)}"
    if len(index) != len(rows):
        return f"index.csv has {len(index)} rows, the manifest {len(rows)}"
    not_whole = [c for c in _INDEX_COLUMNS if not pd.api.types.is_integer_dtype(index[c])]
    if not_whole:
        return f"index.csv column(s) {', '.join(not_whole)} hold values that are not whole numbers"
    offsets, lengths = index["offset"].to_numpy(np.int64), index["n_frames"].to_numpy(np.int64)
    stops = offsets + lengths
    outside = np.flatnonzero((offsets < 0) | (lengths < 1) | (stops > total_frames))
    if outside.size:
        i = int(outside[0])
        return (f"index row {i} (manifest row {rows[i]}) spans frames {offsets[i]}..{stops[i]}, "
                f"outside features.f16's {total_frames} frames")
    order = np.argsort(offsets, kind="stable")
    starts, ends = offsets[order], stops[order]
    seams = np.flatnonzero(starts[1:] != ends[:-1])
    if len(rows) and (starts[0] != 0 or ends[-1] != total_frames or seams.size):
        where = 0 if starts[0] != 0 else int(ends[seams[0]]) if seams.size else int(ends[-1])
        return f"index rows do not tile features.f16 (a gap or an overlap at frame {where})"
    moved = np.flatnonzero(index["row"].to_numpy(np.int64) != rows)
    if moved.size:
        i = int(moved[0])
        return f"index row {i} is for manifest row {index['row'].iloc[i]}, the manifest has row {rows[i]} there"
    crc = index["crc32"].to_numpy(np.int64)
    if ((crc < 0) | (crc > 0xFFFFFFFF)).any():
        return "index.csv column crc32 holds values that are not 32-bit checksums"
    return None


class FeatureCache:
    """Spectrograms of every manifest row in one float16 memory map, built once and shared by runs.

    Layout under ``cache_dir/<key>/``: ``features.f16`` (all rows' frames concatenated, time-major
    ``(total_frames, n_bins)``), ``index.csv`` (``offset,n_frames,row,crc32`` per manifest row) and
    ``meta.json`` (settings, digest, sizes; written last, it marks the folder complete).

    The build writes into a temp folder beside the final one, fsyncs, and renames it into place,
    so a reader sees a complete cache or none; a leftover temp folder or a folder without a valid
    meta.json is discarded and rebuilt. One process builds a key at a time (a lock under
    ``cache_dir/.locks/``; a second one waits, and a lock of a dead process frees itself). Rows are
    decoded in chunks by a process pool whose workers write each finished chunk straight into
    features.f16 (so chunks sit in the order they finished, and only ``index.csv`` says where a row
    is); memory stays flat however large the corpus. A corpus change changes ``manifest.digest`` and
    therefore the key: stale features are never served.

    Damage after the build is never trained on: opening checks that the index tiles features.f16
    and matches meta.json and the manifest (else the cache is rebuilt), and with ``verify`` (the
    default) each row's bytes are checked against the crc32 stored at build time the first time the
    row is read in a process (``FeatureCacheError`` names the cache and the row).
    """

    def __init__(self, manifest, cfg: Config, workers: int | None = None, progress: bool = True,
                 verify: bool = True):
        self.key = cache_key(manifest, cfg)
        self.path = _cache_root(cfg) / self.key
        self.verify = verify
        rows = manifest.table["row"].to_numpy(np.int64)
        try:
            meta, index = self._open(rows)
            log.info("using feature cache %s", self.path)
        except FeatureCacheError as unusable:
            with terminate_as_interrupt(), self._build_lock():
                try:  # another process may have built it while this one waited for the lock
                    meta, index = self._open(rows)
                except FeatureCacheError:
                    if self.path.exists():
                        log.warning("feature cache %s; rebuilding it", unusable)
                    self._build(manifest, cfg, workers, progress)
                    meta, index = self._open(rows)
        self.meta = meta
        self.n_bins = int(meta["settings"]["n_bins"])
        self.offsets = index["offset"].to_numpy(np.int64)
        self.lengths = index["n_frames"].to_numpy(np.int64)
        self.rows = rows
        self.checksums = index["crc32"].to_numpy(np.int64)
        self._verified = np.zeros(len(rows), dtype=bool)
        self._features: np.memmap | None = None

    @classmethod
    def build_or_open(cls, manifest, cfg: Config, workers: int | None = None, progress: bool = True,
                      verify: bool = True) -> "FeatureCache":
        """Open the cache for (corpus, settings), building it first if it does not exist yet."""
        return cls(manifest, cfg, workers=workers, progress=progress, verify=verify)

    def _open(self, rows: np.ndarray) -> tuple[dict, pd.DataFrame]:
        """meta.json and index.csv of a complete, structurally sound cache; else FeatureCacheError saying why."""
        meta = _read_meta(self.path)
        if meta is None:
            raise FeatureCacheError(f"{self.path} is incomplete (interrupted build?)")
        try:
            index = pd.read_csv(self.path / "index.csv")
        except (OSError, ValueError) as err:
            raise FeatureCacheError(f"{self.path} is damaged: index.csv unreadable ({err})") from None
        if meta["n_rows"] != len(rows):
            raise FeatureCacheError(f"{self.path} is damaged: meta.json says {meta['n_rows']} rows, "
                                    f"the manifest has {len(rows)}")
        problem = index_problem(index, int(meta["total_frames"]), rows)
        if problem:
            raise FeatureCacheError(f"{self.path} is damaged: {problem}")
        return meta, index

    def _build_lock(self) -> contextlib.ExitStack:
        """Hold this key's build lock; if another process holds it, say who and wait for it."""
        locks = self.path.parent / ".locks"
        locks.mkdir(parents=True, exist_ok=True)
        lock, what = locks / f"{self.key}.lock", f"feature cache {self.path}"
        held = contextlib.ExitStack()
        try:
            held.enter_context(exclusive_lock(lock, what))
        except LockedError as busy:
            log.warning("%s; waiting for that build", busy)
            held.enter_context(exclusive_lock(lock, what, wait_s=-1))
        return held

    # --- reading ---------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.offsets)

    def get(self, i: int) -> np.ndarray:
        """Row ``i``'s spectrogram as float32 ``(n_bins, n_frames_i)``; its bytes checked on first read."""
        i = range(len(self))[i]
        if self._features is None:
            self._features = np.memmap(self.path / "features.f16", dtype=np.float16, mode="r",
                                       shape=(int(self.meta["total_frames"]), self.n_bins))
        start = self.offsets[i]
        frames = self._features[start: start + self.lengths[i]]
        if self.verify and not self._verified[i]:
            self._check_row(i, frames)
        return np.ascontiguousarray(frames.T, dtype=np.float32)

    def _check_row(self, i: int, frames: np.ndarray) -> None:
        if row_checksum(frames, i) != self.checksums[i]:
            raise FeatureCacheError(
                f"feature cache {self.path}: row {i} (manifest row {self.rows[i]}) does not match the checksum "
                f"stored when it was built (features.f16 or index.csv changed on disk); delete {self.path} "
                f"and re-run to rebuild it")
        self._verified[i] = True

    def __getstate__(self) -> dict:
        # Data-loader workers get the index, not a copy of the memory map; they reopen it lazily.
        return {**self.__dict__, "_features": None}

    # --- building --------------------------------------------------------------------------------
    def _build(self, manifest, cfg: Config, workers: int | None, progress: bool) -> None:
        """Build into a temp folder and rename it into place; the caller holds the build lock."""
        root = self.path.parent
        self._remove_stale_temps(root)
        self._note_corpus_change(root, manifest, cfg)
        tmp = root / f".{self.key}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
        tmp.mkdir()
        target = tmp / "features.f16"
        started = time.perf_counter()
        try:
            offsets, lengths, checksums = self._write_features(manifest, cfg, target, workers, progress)
            target = tmp / "index.csv"
            index = pd.DataFrame({"offset": offsets, "n_frames": lengths, "row": manifest.table["row"].to_numpy(),
                                  "crc32": checksums})
            _write_text(target, index.to_csv(index=False))
            target = tmp / "meta.json"
            meta = {
                "complete": True, "key": self.key, "settings": feature_settings(cfg),
                "manifest_digest": manifest.digest, "source": str(manifest.source), "name": manifest.name,
                "n_rows": len(offsets), "total_frames": int(sum(lengths)), "voxlib_version": __version__,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "build_seconds": round(time.perf_counter() - started, 3),
                "build_workers": self.build_workers,
            }
            _write_text(target, json.dumps(meta, indent=1))
            fsync_dir(tmp)
            target = self.path
            self._install(tmp)
        except OSError as err:
            shutil.rmtree(tmp, ignore_errors=True)
            reason = err.strerror or str(err)
            raise OSError(
                err.errno,
                f"building feature cache {self.key} failed while writing {target}: {reason}"
                f"{' (disk full)' if err.errno == errno.ENOSPC else ''}; the partial build was removed and "
                f"existing caches in {root} are untouched (free space or set cache_dir)",
            ) from err
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        log.info("built feature cache %s (%d clips, %.1f s)", self.path, len(manifest.table), meta["build_seconds"])

    def _write_features(self, manifest, cfg: Config, target: Path, workers: int | None, progress: bool):
        table = manifest.table
        jobs = list(zip(table["path"], table["start"].astype(float), table["end"].astype(float)))
        if workers is None:
            workers = usable_cores()
        if not hasattr(os, "pwrite"):
            workers = 1  # Windows: pool workers write with positional writes, which it lacks
        workers = self.build_workers = max(1, min(workers, len(jobs)))
        size = max(1, min(_CHUNK_ROWS, math.ceil(len(jobs) / (workers * 4))))
        chunks = [jobs[i:i + size] for i in range(0, len(jobs), size)]
        if cfg.feature == "mel":
            mel_filterbank(cfg.sample_rate, cfg.n_fft)  # once, before forking, so workers inherit it
        bar = tqdm(total=len(jobs), desc=f"features {manifest.name}", unit="clip", disable=not progress)
        offsets: list[int] = []
        lengths: list[int] = []
        checksums: list[int] = []
        row_bytes, unsynced, flushing = n_bins(cfg) * 2, 0, None
        with open(target, "wb") as fh, ThreadPoolExecutor(1) as syncer, contextlib.closing(
                self._chunk_results(chunks, cfg, workers, fh) if workers > 1 else self._in_process(chunks, cfg, fh)
        ) as results:  # closing: an interrupt in this loop stops the pool's workers at once
            for frames, sums, first in results:
                offsets.extend((first + np.cumsum([0] + frames[:-1])).tolist())
                lengths.extend(frames)
                checksums.extend(sums)
                bar.update(len(frames))
                unsynced += sum(frames) * row_bytes
                if workers > 1 and unsynced >= _SYNC_BYTES and (flushing is None or flushing.done()):
                    # While pool workers compute, push what they wrote to disk from a thread here, so
                    # the closing fsync has little left to wait for.
                    flushing, unsynced = syncer.submit(os.fsync, fh.fileno()), 0
            if flushing is not None:
                flushing.result()
            fh.flush()
            os.fsync(fh.fileno())
            size = os.fstat(fh.fileno()).st_size
        bar.close()
        expected = sum(lengths) * row_bytes
        if size != expected:
            raise OSError(errno.EIO, f"{target} holds {size} bytes after the build, expected {expected}")
        return offsets, lengths, checksums

    @staticmethod
    def _in_process(chunks: list, cfg: Config, fh):
        """Yield ``(frames per row, crc32 per row, first frame)`` per chunk, computing and appending here in order."""
        # One intra-op thread here too: on a busy machine torch's thread pool spins and stalls.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        first, position = 0, 0
        try:
            for chunk in chunks:
                frames, checksums, block = _features_chunk(chunk, cfg, position)
                position += len(chunk)
                _write_block(fh, block)
                yield frames, checksums, first
                first += len(block)
        finally:
            torch.set_num_threads(threads)

    @staticmethod
    def _chunk_results(chunks: list, cfg: Config, workers: int, fh):
        """Yield ``(frames per row, crc32 per row, first frame)`` per chunk, in chunk order, from a process pool.

        Workers write straight into ``fh``'s file (``_features_into_file``), so a chunk's place in it
        is the order in which chunks finish; index.csv records where each row went. At most 2 chunks
        per worker are in flight, so memory stays flat however large the corpus. The workers end
        with the parent and are terminated on any exception or interrupt (``voxlib.signals``).
        """
        # fork starts workers in milliseconds; elsewhere (macOS, Windows) the platform default.
        context = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else None)
        placed = context.Value("q", 0)
        trim_before_fork()
        with process_pool(workers, context, _worker_init, (fh.name, placed)) as pool:
            pending: deque = deque()
            position = 0
            for number, chunk in enumerate(chunks):
                pending.append(pool.submit(_features_into_file, chunk, cfg, position))
                position += len(chunk)
                while len(pending) >= 2 * workers or (pending and number == len(chunks) - 1):
                    yield pending.popleft().result()

    def _install(self, tmp: Path) -> None:
        """Rename the finished temp folder into place, replacing an incomplete or damaged folder there."""
        if self.path.exists():
            # Under the build lock the folder there failed its checks; move it aside first (a
            # directory cannot be renamed onto a non-empty one) and delete it.
            doomed = self.path.parent / f".{self.key}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
            os.rename(self.path, doomed)
            shutil.rmtree(doomed, ignore_errors=True)
        os.rename(tmp, self.path)
        fsync_dir(self.path.parent)

    def _remove_stale_temps(self, root: Path) -> None:
        """Delete temp folders of this key: with the build lock held, any that exist were left by a dead build."""
        for stale in root.glob(f".{self.key}.tmp-*"):
            log.warning("removing %s left by an interrupted feature-cache build", stale)
            shutil.rmtree(stale, ignore_errors=True)

    def _note_corpus_change(self, root: Path, manifest, cfg: Config) -> None:
        """Say when this build replaces a cache of the same manifest built before the corpus changed."""
        settings = feature_settings(cfg)
        older = []
        for meta_file in root.glob("*/meta.json"):
            meta = _read_meta(meta_file.parent)
            if meta and meta["source"] == str(manifest.source) and meta["settings"] == settings \
                    and meta["key"] != self.key:
                older.append((meta["created"], meta["key"]))
        if older:
            log.warning("corpus changed since cache %s was built; building %s", max(older)[1], self.key)
        else:
            log.info("building feature cache %s for %s (%d clips)", self.key, manifest.name, len(manifest.table))


def _write_text(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
