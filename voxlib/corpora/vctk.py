"""VCTK (0.80 and 0.92) -> vox manifest: birthplace = the ACCENTS column, REGION as `region`.

VCTK's accents (English, Scottish, Irish, American, ...) play the part of CSJ's birthplace: ~110
speakers reading the same sentences, so a birthplace head has little besides accent to go on.

`speaker-info.txt` is whitespace-aligned and irregular, so it is parsed by tokens, not by columns:
`ID AGE GENDER ACCENTS REGION...` where REGION is the rest of the line (multi-word, sometimes empty,
sometimes followed by a parenthesised comment such as "(mic2 files unavailable)", which is dropped).
IDs appear with (0.92: p225) or without (0.80: 225) the `p`; both name the folder `p225`.
Audio: 0.92 `wav48_silence_trimmed/pNNN/pNNN_XXX_mic1.flac` (mic2 ignored unless mic="mic2"),
0.80 `wav48/pNNN/pNNN_XXX.wav`. Transcripts are not used, so p315 (no text) is kept.
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path

from .common import (CommonOptions, CorpusError, Rejection, Summary, Utterance, clean_label, default_out,
                     read_text, require_file, write_corpus)

LAYOUTS = {"0.92": "wav48_silence_trimmed", "0.80": "wav48"}


def speaker_folder(raw_id: str) -> str:
    """'225' and 'p225' -> 'p225'; other IDs ('s5') as written."""
    raw_id = raw_id.strip()
    return f"p{raw_id}" if raw_id.isdigit() else raw_id


def read_speaker_info(path: Path) -> tuple[dict[str, dict[str, str]], list[Rejection]]:
    """{folder id: {sex, accent, region, comment}} and a Rejection for each line that cannot be read."""
    speakers: dict[str, dict[str, str]] = {}
    problems: list[Rejection] = []
    for number, line in enumerate(read_text(path).splitlines(), start=1):
        tokens = line.split()
        if not tokens or tokens[0].upper() == "ID":
            continue
        if len(tokens) < 3:
            problems.append(Rejection(path, "speaker-info line with too few fields", f"line {number}: {line.strip()!r}"))
            continue
        rest = " ".join(tokens[4:])
        comment = " ".join(re.findall(r"\(([^)]*)\)", rest))
        region = clean_label(re.sub(r"\([^)]*\)", " ", rest))
        speaker = speaker_folder(tokens[0])
        if speaker in speakers:
            problems.append(Rejection(path, "speaker listed twice in speaker-info", f"line {number}: {speaker}"))
            continue
        speakers[speaker] = {"sex": tokens[2], "accent": tokens[3] if len(tokens) > 3 else "",
                             "region": region, "comment": comment, "line": str(number)}
    return speakers, problems


def build_manifest(
    root: str | Path,
    out: str | Path | None = None,
    *,
    layout: str = "auto",
    mic: str = "mic1",
    **common,
) -> Summary:
    """Write a manifest of VCTK utterances.

    layout: "0.92" (wav48_silence_trimmed, flac), "0.80" (wav48, wav) or "auto" (0.92 when present).
    mic: which 0.92 microphone, "mic1" (default) or "mic2"; the two are the same utterance, so never
        both (a seen-speaker split would put one sentence in train and test).
    """
    options = CommonOptions.from_kwargs("vctk", common)
    root = Path(root)
    info_path = root / "speaker-info.txt"
    require_file(info_path, "ROOT must be the VCTK folder holding speaker-info.txt")
    if layout == "auto":
        layout = next((v for v, d in LAYOUTS.items() if (root / d).is_dir()), "")
        if not layout:
            raise CorpusError(f"neither {root / LAYOUTS['0.92']} nor {root / LAYOUTS['0.80']} exists")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be 'auto', '0.92' or '0.80', got {layout!r}")
    if mic not in ("mic1", "mic2"):
        raise ValueError(f"mic must be 'mic1' or 'mic2', got {mic!r}")
    audio_root = root / LAYOUTS[layout]
    pattern = f"*_{mic}.flac" if layout == "0.92" else "*.wav"

    speakers, rejections = read_speaker_info(info_path)
    utterances: list[Utterance] = []
    notes: list[str] = []
    folders = {p.name: p for p in sorted(audio_root.iterdir()) if p.is_dir()} if audio_root.is_dir() else {}
    for name, folder in folders.items():
        files = sorted(folder.glob(pattern))
        info = speakers.get(name)
        if info is None:
            rejections += [Rejection(f, "speaker not in speaker-info.txt", name) for f in files]
            continue
        for f in files:
            utterances.append(Utterance(f.absolute(), name, info["sex"], info["accent"],
                                        extra={"region": info["region"]}))
    silent = sorted(set(speakers) - set(folders))
    if silent:
        notes.append(f"{len(silent)} speaker(s) in speaker-info.txt without an audio folder in "
                     f"{audio_root.name}/: {', '.join(silent)}")
    empty = sorted(n for n in set(speakers) & set(folders) if not any(folders[n].glob(pattern)))
    if empty:
        notes.append(f"{len(empty)} speaker folder(s) without {pattern} files: {', '.join(empty)}")
    return write_corpus("vctk", utterances, rejections, default_out(root, out), options,
                        extra_columns=("region",), notes=notes)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--layout", choices=("auto", "0.92", "0.80"), default="auto",
                        help="0.92: wav48_silence_trimmed/*_mic1.flac; 0.80: wav48/*.wav (default: detect)")
    parser.add_argument("--mic", choices=("mic1", "mic2"), default="mic1", help="0.92 microphone (default mic1)")
