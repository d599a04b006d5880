"""JVS (Japanese versatile speech, 100 speakers) -> vox manifest without a birthplace column.

JVS has no birthplace metadata, so the manifest is `path,speaker,sex`: the manifest reader accepts
that with a notice and training builds no birthplace head. It is still useful as a clean speaker/sex
check on Japanese speech recorded in one studio.

Reads `gender_f0range.txt` (`speaker Male_or_Female minf0[Hz] maxf0[Hz]`, rows like `jvs001 M 70 220`)
and `jvsNNN/<subset>/wav24kHz16bit/*.wav` for each requested subset (parallel100 and nonpara30 by
default; whisper10 and falset10 are other phonations and must be asked for). Where a subset has
`transcripts_utf8.txt`, utterances listed there without a wav (JVS ships three such gaps) are
reported as missing audio.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from voxlib.fileio import file_kind

from .common import (CommonOptions, CorpusError, Rejection, Summary, Utterance, default_out, read_text, require_file,
                     write_corpus)

SUBSETS = ("parallel100", "nonpara30", "whisper10", "falset10")
WAV_DIR = "wav24kHz16bit"


def read_genders(path: Path) -> tuple[dict[str, str], list[Rejection]]:
    """{speaker: sex as written} from gender_f0range.txt, and a Rejection per unreadable line."""
    genders: dict[str, str] = {}
    problems: list[Rejection] = []
    for number, line in enumerate(read_text(path).splitlines(), start=1):
        tokens = line.split()
        if not tokens or tokens[0].lower() == "speaker":
            continue
        if len(tokens) < 2:
            problems.append(Rejection(path, "gender file line with too few fields", f"line {number}: {line.strip()!r}"))
            continue
        genders[tokens[0]] = tokens[1]
    return genders, problems


def build_manifest(
    root: str | Path,
    out: str | Path | None = None,
    *,
    subsets: str = "parallel100,nonpara30",
    **common,
) -> Summary:
    """Write a manifest of JVS utterances.

    subsets: comma list out of parallel100, nonpara30, whisper10, falset10.
    """
    options = CommonOptions.from_kwargs("jvs", common)
    chosen = [s.strip() for s in subsets.split(",") if s.strip()]
    unknown = sorted(set(chosen) - set(SUBSETS))
    if unknown or not chosen:
        raise ValueError(f"subsets must be a comma list out of {SUBSETS}, got {subsets!r}")
    root = Path(root)
    gender_file = root / "gender_f0range.txt"
    require_file(gender_file, "ROOT must be the jvs_ver1 folder")
    genders, rejections = read_genders(gender_file)

    utterances: list[Utterance] = []
    notes: list[str] = []
    speaker_dirs = sorted(p for p in root.glob("jvs*") if p.is_dir())
    for speaker_dir in speaker_dirs:
        speaker = speaker_dir.name
        for subset in chosen:
            wav_dir = speaker_dir / subset / WAV_DIR
            wavs = {p.stem: p for p in sorted(wav_dir.glob("*.wav"))}
            transcripts = speaker_dir / subset / "transcripts_utf8.txt"
            listed = []
            if file_kind(transcripts) != "missing":
                try:
                    listed = [line.split(":", 1)[0].strip() for line in read_text(transcripts).splitlines()
                              if ":" in line]
                except CorpusError as err:
                    rejections.append(Rejection(transcripts, "metadata file not read", str(err)))
            for name in sorted(set(listed) - set(wavs)):
                rejections.append(Rejection(wav_dir / f"{name}.wav", "missing audio file",
                                            f"listed in {subset}/transcripts_utf8.txt"))
            for wav in wavs.values():
                if speaker not in genders:
                    rejections.append(Rejection(wav, "speaker not in gender_f0range.txt", speaker))
                else:
                    utterances.append(Utterance(wav.absolute(), speaker, genders[speaker]))
    silent = sorted(set(genders) - {p.name for p in speaker_dirs})
    if silent:
        notes.append(f"{len(silent)} speaker(s) in gender_f0range.txt without a folder: {', '.join(silent)}")
    return write_corpus("jvs", utterances, rejections, default_out(root, out), options,
                        has_birthplace=False, notes=notes)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--subsets", default="parallel100,nonpara30",
                        help=f"comma list out of {','.join(SUBSETS)} (default parallel100,nonpara30)")
