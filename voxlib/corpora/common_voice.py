"""Mozilla Common Voice -> vox manifest: speaker = client_id, birthplace = the self-reported accent.

Common Voice is the large, uneven case: a few speakers record thousands of clips, most record a
handful, and gender and accent are optional profile fields. Rows without either are dropped and
counted; answers outside the two sex classes (other, non-binary, ...) are dropped with that reason.
`max_per_speaker` caps heavy contributors with a seeded sample so one voice cannot dominate a class.

Reads `<tsv>` (default validated.tsv: client_id, path, sentence, up_votes, down_votes, age, gender,
accents — `accent` in releases before 2021 — locale, ...) and `clips/<path>`. Gender values of both
vocabularies are understood: male/female/other and male_masculine/female_feminine/intersex/
transgender/non-binary/do_not_wish_to_say. Multiple accents ("a|b") are kept as one class as written.
"""
from __future__ import annotations

import argparse
import csv
import io
import random
from collections import defaultdict
from pathlib import Path

from voxlib.fileio import MAX_STREAMED_BYTES, UnreadableFile, open_regular

from .common import (CommonOptions, CorpusError, Rejection, Summary, Utterance, clean_label, default_out,
                     require_file, write_corpus)


def build_manifest(
    root: str | Path,
    out: str | Path | None = None,
    *,
    tsv: str = "validated.tsv",
    max_per_speaker: int = 0,
    seed: int = 0,
    **common,
) -> Summary:
    """Write a manifest of Common Voice clips.

    tsv: which table under ROOT (validated.tsv, train.tsv, ...).
    max_per_speaker: keep at most this many clips per speaker, sampled with `seed` (0 = all). The cap
        is applied to rows with usable labels, before the audio checks.
    """
    options = CommonOptions.from_kwargs("common_voice", common)
    if max_per_speaker < 0:
        raise ValueError("max_per_speaker must be >= 0")
    root = Path(root)
    table = root / tsv
    require_file(table, f"ROOT must be a Common Voice language folder (clips/, {tsv})")
    # Streamed, not read whole: validated.tsv of a large language is hundreds of MB.
    try:
        handle = io.TextIOWrapper(open_regular(table, MAX_STREAMED_BYTES), encoding="utf-8-sig", newline="")
    except UnreadableFile as err:
        raise CorpusError(str(err)) from None
    reader = csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
    header = [(h or "").strip() for h in reader.fieldnames or []]
    accent_column = "accents" if "accents" in header else "accent"
    missing = {"client_id", "path", "gender", accent_column} - set(header)
    if missing:
        handle.close()
        raise CorpusError(f"{table}: missing column(s) {sorted(missing)}; found {header}")

    rejections: list[Rejection] = []
    by_speaker: dict[str, list[Utterance]] = defaultdict(list)
    with handle:
        for number, raw in enumerate(reader, start=2):
            row = {(k or "").strip(): (v or "").strip() for k, v in raw.items() if k}
            name = row.get("path", "")
            if not name:
                rejections.append(Rejection(table, "row without path", f"line {number}"))
                continue
            audio = (root / "clips" / (name if Path(name).suffix else f"{name}.mp3")).absolute()
            if not row.get("gender"):
                rejections.append(Rejection(audio, "no gender", f"line {number}"))
            elif not clean_label(row.get(accent_column)):
                rejections.append(Rejection(audio, "no accent", f"line {number}"))
            else:
                by_speaker[row.get("client_id", "")].append(Utterance(
                    audio, row.get("client_id", ""), row["gender"], row[accent_column],
                    extra={"age": row.get("age", "")}))

    utterances: list[Utterance] = []
    rng = random.Random(seed)
    for speaker in sorted(by_speaker):
        clips = by_speaker[speaker]
        if max_per_speaker and len(clips) > max_per_speaker:
            keep = set(rng.sample(range(len(clips)), max_per_speaker))
            rejections += [Rejection(u.path, "over the per-speaker cap", f"--max-per-speaker {max_per_speaker}")
                           for i, u in enumerate(clips) if i not in keep]
            clips = [u for i, u in enumerate(clips) if i in keep]
        utterances += clips
    return write_corpus("common_voice", utterances, rejections, default_out(root, out), options,
                        extra_columns=("age",))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tsv", default="validated.tsv", help="table under ROOT (default validated.tsv)")
    parser.add_argument("--max-per-speaker", type=int, default=0, metavar="N",
                        help="keep at most N clips per speaker, seeded sample (default 0: all)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the per-speaker sample (default 0)")
