"""A generated first-language reading corpus: one English paragraph read by espeak-ng voices of other languages.

The demo corpus checks a birthplace head on eight English accents, many short sentences per speaker.
Accent studies on real recordings often look different: first-language classes, one read paragraph
per speaker cut into 4 s windows, speaker folds (like the Speech Accent Archive). This corpus has
that shape, so a conclusion drawn on the demo can be checked on a second, differently made corpus:

- birthplace = the reader's first language: an espeak-ng voice of that language reads the English
  paragraph with its own letter-to-sound rules and phonemes (German ``th`` -> ``t``, Spanish vowels,
  Polish final devoicing), a caricature of a foreign accent, but one that lives in pronunciation;
- every speaker has a seeded voice of its own (pitch, formants, breathiness, roughness, flutter and
  speaking rate, from the demo's ranges), so voice identity varies as much as in the demo;
- each reading is one file, light room and noise augmentation as in the demo; the manifest lists
  ``window``-second windows of it (``start,end`` rows of the same file), as the accent_archive
  adapter does; the tail shorter than a window is dropped.

The paragraph is written for this corpus. The same settings give byte-identical files.
"""
from __future__ import annotations

import argparse
import csv
import json
import shutil
import sys
from pathlib import Path

import numpy as np

from voxlib import demo
from voxlib.corpora.accent_archive import windows

VERSION = 1
LANGUAGES: dict[str, str] = {  # birthplace label -> espeak-ng voice reading the English text
    "german": "de",
    "french": "fr",
    "spanish": "es",
    "italian": "it",
    "polish": "pl",
    "dutch": "nl",
}
PARAGRAPH = (
    "Last Thursday my brother asked me to bring a few things from the market: three ripe pears, a bag of "
    "brown rice, fresh thyme, two thick slices of cheddar and a small jar of honey for his daughter. We "
    "will also need a cheap umbrella, because the weather report warns of heavy rain over the weekend. "
    "He said he would wait for us near the old railway bridge at half past seven, and then drive us all "
    "to the village hall, where the choir sings every other Sunday evening."
)


def plan_readers(languages: list[str], speakers: int, seed: int, spread: float = 1.0) -> list[demo.SpeakerJob]:
    """Every reader's voice and reading; a reader depends only on (seed, language, slot)."""
    unknown = [name for name in languages if name not in LANGUAGES]
    if unknown:
        raise ValueError(f"unknown language(s) {unknown}; use some of {list(LANGUAGES)}")
    n_female = (speakers + 1) // 2
    jobs = []
    for language in languages:
        index = list(LANGUAGES).index(language)
        for slot in range(speakers):
            sex = "female" if slot < n_female else "male"
            number = slot + 1 if sex == "female" else slot - n_female + 1
            speaker = f"{language}-{sex[0]}{number}"
            voice = demo.draw_voice(np.random.default_rng([seed, 5051, index, slot]), speaker, language, sex,
                                    LANGUAGES[language], f"l1{index}{sex[0]}{number}", spread)
            r = np.random.default_rng([seed, 5051, index, slot, 1])
            reading = demo.Utterance(
                path=f"wav/{speaker}.wav", text=PARAGRAPH, rate_wpm=round(voice.rate_wpm),
                pitch_range=int(r.integers(35, 66)), seed=[seed, 5051, index, slot],
                snr_db=round(r.uniform(*demo.SNR_DB), 2), peak_dbfs=round(r.uniform(*demo.PEAK_DBFS), 2),
                rt60_s=round(r.uniform(*demo.RT60_S), 3), drr_db=round(r.uniform(*demo.DRR_DB), 2))
            jobs.append(demo.SpeakerJob(voice, [reading]))
    return jobs


def build_reading_corpus(out: str | Path, languages: list[str] | None = None, speakers: int = 10, seed: int = 0,
                         window: float = 4.0, spread: float = 1.0) -> Path:
    """Write the corpus into ``out`` (skipped when complete with the same settings); return manifest.csv."""
    out = Path(out)
    languages = languages or list(LANGUAGES)
    settings = {"version": VERSION, "languages": languages, "speakers": speakers, "seed": seed, "window": window,
                "spread": spread, "sample_rate": demo.SAMPLE_RATE}
    marker, manifest = out / "settings.json", out / "manifest.csv"
    if marker.is_file() and manifest.is_file() and json.loads(marker.read_text()) == settings:
        return manifest
    jobs = plan_readers(languages, speakers, seed, spread)
    out.mkdir(parents=True, exist_ok=True)
    marker.unlink(missing_ok=True)
    shutil.rmtree(out / "wav", ignore_errors=True)
    private = demo.make_private_data([job.voice for job in jobs])
    try:
        for job in jobs:
            job.data_dir, job.out_dir = str(private), str(out)
        jobs = demo.run_jobs(jobs, desc=f"reading corpus {out.name}")
    finally:
        shutil.rmtree(private, ignore_errors=True)
    with manifest.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "speaker", "birthplace", "sex", "start", "end"])
        for job in jobs:
            v, reading, result = job.voice, job.utterances[0], job.results[0]
            for start, end in windows(result["seconds"], window, window):
                writer.writerow([reading.path, v.speaker, v.birthplace, v.sex, f"{start:g}", f"{end:g}"])
    with (out / "speakers.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["speaker", "birthplace", "sex", "espeak_voice", "pitch_base_hz", "formant_scale",
                         "rate_wpm", "seconds", "phonemes"])
        for job in jobs:
            v, result = job.voice, job.results[0]
            writer.writerow([v.speaker, v.birthplace, v.sex, v.espeak_voice, v.pitch_base_hz, v.formant_scale[0],
                             v.rate_wpm, result["seconds"], result["phonemes"]])
    marker.write_text(json.dumps(settings, indent=2) + "\n")
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m voxlib.corpora.l1_reading", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="corpus folder")
    parser.add_argument("--languages", default=",".join(LANGUAGES), help="comma list of first languages")
    parser.add_argument("--speakers", type=int, default=10, help="readers per language (half female)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--window", type=float, default=4.0, help="seconds per manifest row")
    args = parser.parse_args(argv)
    print(build_reading_corpus(args.out, [s.strip() for s in args.languages.split(",") if s.strip()], args.speakers,
                               args.seed, args.window))
    return 0


if __name__ == "__main__":
    sys.exit(main())
