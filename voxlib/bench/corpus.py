"""A generated corpus for the bench: voiced clips whose pitch marks the speaker and brightness the place."""
from __future__ import annotations

import csv
import os
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import soundfile as sf

from voxlib.config import Config
from voxlib.data import load_run_data


def voice(f0: float, brightness: float, seconds: float, sr: int, rng: np.random.Generator) -> np.ndarray:
    """A voiced sound with syllable-rate loudness: pitch marks the speaker, brightness the place."""
    n = int(seconds * sr)
    t = np.arange(n) / sr
    pitch = f0 * (1 + 0.03 * np.sin(2 * np.pi * rng.uniform(3, 6) * t))
    phase = 2 * np.pi * np.cumsum(pitch) / sr
    harmonics = np.arange(1, 25)[:, None]
    gains = np.exp(-harmonics / (3.0 + 6.0 * brightness))
    wave = (gains * np.sin(harmonics * phase)).sum(0)
    syllables = 0.5 + 0.5 * np.sin(2 * np.pi * rng.uniform(3, 5) * t + rng.uniform(0, np.pi)) ** 2
    wave = wave * syllables * np.hanning(n) + rng.normal(0, 0.005, n)
    return (0.5 * wave / np.abs(wave).max()).astype(np.float32)


def write_corpus(root: Path, birthplaces: int = 3, speakers: int = 4, utterances: int = 8,
                 seconds: float = 3.0, sr: int = 16000, seed: int = 0) -> Path:
    """Generated wav clips and their manifest.csv under ``root``; returns the manifest path."""
    rng = np.random.default_rng(seed)
    rows = []
    for b in range(birthplaces):
        for s in range(speakers):
            speaker = f"p{b}s{s}"
            sex = "female" if s % 2 == 0 else "male"
            f0 = (210.0 if sex == "female" else 115.0) * (1 + 0.06 * s)
            (root / speaker).mkdir(parents=True, exist_ok=True)
            for u in range(utterances):
                rel = f"{speaker}/{u:03d}.wav"
                length = seconds * rng.uniform(0.8, 1.2)
                sf.write(root / rel, voice(f0, b / max(birthplaces - 1, 1), length, sr, rng), sr)
                rows.append((rel, speaker, f"place{b}", sex))
    return _write_manifest(root / "manifest.csv", rows)


def repeat_corpus(manifest: Path, copies: int, root: Path) -> Path:
    """The same clips ``copies`` times under distinct names (hard links where possible)."""
    with manifest.open(newline="") as fh:
        original = list(csv.DictReader(fh))
    rows = []
    for k in range(copies):
        for r in original:
            rel = f"copy{k}/{r['path']}"
            target = root / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            if not target.exists():
                try:
                    os.link(manifest.parent / r["path"], target)
                except OSError:
                    shutil.copy2(manifest.parent / r["path"], target)
            rows.append((rel, r["speaker"], r["birthplace"], r["sex"]))
    return _write_manifest(root / "manifest.csv", rows)


def _write_manifest(path: Path, rows: list[tuple]) -> Path:
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "speaker", "birthplace", "sex"])
        writer.writerows(rows)
    return path


def run_data(manifest_path: Path, cfg: Config):
    """The corpus as training sees it (``data.load_run_data``: cache, splits, vocabularies, targets)."""
    return load_run_data(replace(cfg, manifest=str(manifest_path)), progress=False)
