"""Speech Accent Archive -> vox manifest: each ~30 s paragraph cut into fixed windows.

Every speaker reads the same paragraph once, so one recording is all a speaker has. Cutting it into
windows (`start,end` rows of the same file) gives the speaker several utterances. The windows of one
recording share its `path`, and the splitter groups by path, so they never straddle train and test;
this manifest carries no `split` column. Since a speaker is one recording, a seen-speaker split (which
needs one speaker in both train and test) gets nothing from this corpus unless the splitter cuts within
a path; unseen-speaker evaluation is what it is good for.

Reads `speakers_all.csv` (Kaggle release: age, age_onset, birthplace, filename, native_language, sex,
speakerid, country, file_missing?) and `recordings/<filename>.mp3`. Rows flagged `file_missing?` are
dropped and counted. birthplace = country by default (`birthplace_from` picks native_language or the
city-level birthplace instead); the other two are kept as extra columns (`country`, `native_language`,
and `birth_city` for the CSV's own `birthplace` column).
"""
from __future__ import annotations

import argparse
import csv
import io
from pathlib import Path

from .common import (CommonOptions, CorpusError, Rejection, Summary, Utterance, check_audio, default_out,
                     fmt_seconds, read_text, require_file, write_corpus)

SOURCES = ("country", "native_language", "birthplace")
EXTRA_NAMES = {"country": "country", "native_language": "native_language", "birthplace": "birth_city"}
TRUE = {"true", "1", "yes", "y", "t"}
# 'famale' appears in the Kaggle release; it is a typo, not a third answer.
SEX_TYPOS = {"famale": "female"}


def windows(duration: float, window: float, hop: float) -> list[tuple[float, float]]:
    """[start, end) windows of `window` s every `hop` s that fit in `duration`; the tail shorter than a
    window is not used. A recording shorter than one window is one window of its own length."""
    if duration <= window:
        return [(0.0, duration)]
    count = int((duration - window) / hop + 1e-9) + 1
    return [(round(k * hop, 6), round(k * hop + window, 6)) for k in range(count)]


def build_manifest(
    root: str | Path,
    out: str | Path | None = None,
    *,
    window: float = 4.0,
    hop: float | None = None,
    birthplace_from: str = "country",
    **common,
) -> Summary:
    """Write a manifest of fixed windows over each speaker's recording.

    window: window length in seconds (default 4.0: two 2-second crops).
    hop: seconds between window starts (default = window: no overlap).
    birthplace_from: "country" (default), "native_language" or "birthplace".
    """
    options = CommonOptions.from_kwargs("accent_archive", common)
    if birthplace_from not in SOURCES:
        raise ValueError(f"birthplace_from must be one of {SOURCES}, got {birthplace_from!r}")
    hop = window if hop is None else hop
    if window <= 0 or hop <= 0:
        raise ValueError("window and hop must be positive")
    root = Path(root)
    table = root / "speakers_all.csv"
    require_file(table, "ROOT must hold speakers_all.csv and recordings/")
    reader = csv.DictReader(io.StringIO(read_text(table)))
    header = {(h or "").strip() for h in reader.fieldnames or []}
    missing = {"filename", "sex", birthplace_from} - header
    if missing:
        raise CorpusError(f"{table}: missing column(s) {sorted(missing)}; found {sorted(header)}")
    # The two columns not used as birthplace stay as extra labels; the city-level one cannot keep its
    # name, which the manifest reserves for the label column.
    extras = {c: EXTRA_NAMES[c] for c in SOURCES if c != birthplace_from}

    utterances: list[Utterance] = []
    rejections: list[Rejection] = []
    notes: list[str] = []
    tails = 0.0
    seen: set[str] = set()
    for number, raw in enumerate(reader, start=2):
        row = {(k or "").strip(): (v or "").strip() for k, v in raw.items() if k}
        name = row.get("filename", "")
        audio = (root / "recordings" / f"{name}.mp3").absolute()
        if not name:
            rejections.append(Rejection(table, "row without filename", f"line {number}"))
            continue
        if name in seen:
            rejections.append(Rejection(audio, "filename listed twice", f"line {number}"))
            continue
        seen.add(name)
        if row.get("file_missing?", "").lower() in TRUE:
            rejections.append(Rejection(audio, "marked file_missing? in speakers_all.csv", f"line {number}"))
            continue
        # Windows need the duration now; a bad file becomes one row that write_corpus rejects.
        duration, _, _ = check_audio(audio)
        spans = windows(duration, window, hop) if duration else [(0.0, window)]
        if duration:
            tails += duration - spans[-1][1]
        sex = row.get("sex", "")
        sex = SEX_TYPOS.get(sex.lower(), sex)
        for start, end in spans:
            utterances.append(Utterance(audio, name, sex, row.get(birthplace_from, ""), start, end,
                                        extra={name: row.get(c, "") for c, name in extras.items()}))
    if tails > 0:
        notes.append(f"{tails:.1f} s of recording tails shorter than a {fmt_seconds(window)} s window not used")
    return write_corpus("accent_archive", utterances, rejections, default_out(root, out), options,
                        extra_columns=list(extras.values()), notes=notes)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--window", type=float, default=4.0, metavar="S", help="window length in seconds (default 4)")
    parser.add_argument("--hop", type=float, default=None, metavar="S",
                        help="seconds between window starts (default: the window length, no overlap)")
    parser.add_argument("--birthplace-from", choices=SOURCES, default="country",
                        help="column used as the birthplace label (default country)")
