"""Small copies of real corpus layouts, built in a temp folder, for the adapter tests.

Each `make_<corpus>_tree(root)` writes the metadata files and tiny generated recordings (tones plus a
little noise, a few hundred ms; mp3 and flac through soundfile) in the layout docs/corpora.md
documents, with the irregular rows the real corpora have: missing audio, unreadable audio, unknown sex
values, rows with missing fields, files without metadata. The docstrings state what each tree holds,
so a test can assert exact counts. They are plain functions (not fixtures) so other tests can build
the same trees, e.g. to run notebook 01 on every adapter's output.
"""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import soundfile as sf


def write_tone(path: Path, seconds: float, f0: float = 150.0, sr: int = 16000, seed: int = 0) -> Path:
    """A voiced-ish tone (three harmonics + noise); the format follows the suffix (.wav/.flac/.mp3)."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(round(seconds * sr))) / sr
    wave = sum(np.sin(2 * np.pi * k * f0 * t) / k for k in (1, 2, 3)) + rng.normal(0, 0.05, t.size)
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, (0.2 * wave / np.abs(wave).max()).astype(np.float32), sr)
    return path


def write_garbage(path: Path, header: bytes = b"RIFF") -> Path:
    """A file with an audio suffix that no decoder can read."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(header + b"\x00not audio\x01" * 20)
    return path


# --- CSJ --------------------------------------------------------------------------------------
def _talk_xml(attributes: dict[str, str], ipus: list[tuple], encoding: str = "UTF-8") -> str:
    """A CSJ-style talk XML; ipus are (id, start, end, channel, masked)."""
    attrs = " ".join(f'{k}="{v}"' for k, v in attributes.items())
    body = []
    for ipu_id, start, end, channel, masked in ipus:
        mask = ' TagMaskStart="1"' if masked else ""
        body.append(
            f'  <IPU IPUID="{ipu_id}" IPUStartTime="{start}" IPUEndTime="{end}" Channel="{channel}">\n'
            f'    <LUW><SUW><TransSUW TransSUWID="1"{mask}/></SUW></LUW>\n  </IPU>'
        )
    return f'<?xml version="1.0" encoding="{encoding}"?>\n<Talk {attrs}>\n' + "\n".join(body) + "\n</Talk>\n"


def make_csj_tree(root: Path) -> Path:
    """A CSJ copy: XML/BaseXML/{core,noncore}/*.xml, WAV/{core,noncore}/*.wav, RDB/infoSpeaker.tsv.

    Default run (min_duration 0.5, no merging, no dialogues) keeps 6 IPUs of 3 speakers:
      A01M0001 (0001, 男, 東京都 -> Kanto, wav 3.8 s): IPU 1 0.1-0.9 and IPU 5 2.7-3.4 kept;
        IPUs 2 (1.0-1.3) and 3 (1.45-1.7) too short (merged into 1.0-1.7 with merge_gap >= 0.15),
        IPU 4 masked ((R) tag), IPU 6 (3.5-4.0) ends after the audio.
      A01F0002 (0002, 女, 'Osaka' in romaji -> 大阪府, Kinki; XML in Shift_JIS): 0.0-0.6, 0.8-1.6.
      S01F0003 (no sex/birthplace attributes; from RDB/infoSpeaker.tsv, ID '3' -> 0003, 女, 北海道):
        0.2-1.0, 1.2-2.0.
    Rejected: S02M0004 sex 'X' (2 IPUs), A02M0005 wav missing (2 IPUs), D01M0006 dialogue (1 talk),
    A03M0008 broken XML (1 file). With dialogues=True, D01M0006 adds speaker 0006 (男, 福岡県,
    channel L: 0.1-0.8, 1.7-2.4) and 0007 (女, 海外 -> abroad, channel R: 0.9-1.6).
    """
    xml, wav = root / "XML" / "BaseXML", root / "WAV"
    talks = {
        "core/A01M0001": ({"SpeakerID": "0001", "SpeakerSex": "男", "SpeakerBirthPlace": "東京都",
                           "SpeakerBirthGeneration": "1970"},
                          [(1, 0.1, 0.9, "L", False), (2, 1.0, 1.3, "L", False), (3, 1.45, 1.7, "L", False),
                           (4, 1.9, 2.6, "L", True), (5, 2.7, 3.4, "L", False), (6, 3.5, 4.0, "L", False)], 3.8),
        "core/A01F0002": ({"SpeakerID": "0002", "SpeakerSex": "女", "SpeakerBirthPlace": "Osaka",
                           "SpeakerBirthGeneration": "1980"},
                          [(1, 0.0, 0.6, "L", False), (2, 0.8, 1.6, "L", False)], 2.0),
        "noncore/S01F0003": ({"SpeakerID": "0003"}, [(1, 0.2, 1.0, "L", False), (2, 1.2, 2.0, "L", False)], 2.2),
        "noncore/S02M0004": ({"SpeakerID": "0004", "SpeakerSex": "X", "SpeakerBirthPlace": "東京都"},
                             [(1, 0.1, 0.9, "L", False), (2, 1.0, 1.8, "L", False)], 2.0),
        "core/A02M0005": ({"SpeakerID": "0005", "SpeakerSex": "男", "SpeakerBirthPlace": "京都府"},
                          [(1, 0.1, 0.9, "L", False), (2, 1.0, 1.8, "L", False)], None),
        "core/D01M0006": ({"SpeakerID": "0006/0007", "SpeakerSex": "男/女", "SpeakerBirthPlace": "福岡県/海外"},
                          [(1, 0.1, 0.8, "L", False), (2, 0.9, 1.6, "R", False), (3, 1.7, 2.4, "L", False)], 2.5),
    }
    for seed, (name, (attrs, ipus, seconds)) in enumerate(talks.items()):
        talk_id = name.split("/")[1]
        encoding = "Shift_JIS" if talk_id == "A01F0002" else "UTF-8"
        text = _talk_xml({"TalkID": talk_id, **attrs}, ipus, encoding)
        (xml / name).parent.mkdir(parents=True, exist_ok=True)
        (xml / f"{name}.xml").write_bytes(text.encode("cp932" if encoding == "Shift_JIS" else "utf-8"))
        if seconds is None:
            continue
        if talk_id.startswith("D"):
            for k, channel in enumerate("LR"):
                write_tone(wav / f"{name}-{channel}.wav", seconds, 120 + 80 * k, seed=seed)
        else:
            write_tone(wav / f"{name}.wav", seconds, 110 + 20 * seed, seed=seed)
    (xml / "core" / "A03M0008.xml").write_text('<?xml version="1.0"?>\n<Talk TalkID="A03M0008"><IPU', "utf-8")
    (root / "RDB").mkdir(parents=True, exist_ok=True)
    (root / "RDB" / "infoSpeaker.tsv").write_text(
        "SpeakerID\tSpeakerSex\tSpeakerBirthGeneration\tSpeakerBirthPlace\n3\t女\t1960\t北海道\n", "utf-8")
    return root


# --- VCTK -------------------------------------------------------------------------------------
VCTK_INFO_092 = """ID  AGE  GENDER  ACCENTS  REGION COMMENTS 
p225  23  F    English    Southern  England
p226  22  M    English    Surrey
p227  38  M    Scottish  Fife
p248  23  F    Indian
p280  25  F    France  (mic2 files unavailable)
p315  18  M    American    New  England  (Text unavailable)
p999  30  X    English    London
p400  22
s5  22  F    British    Southern  England
"""


def make_vctk_tree(root: Path, version: str = "0.92") -> Path:
    """A VCTK copy; "0.92": wav48_silence_trimmed/pNNN/*_mic{1,2}.flac, "0.80": wav48/pNNN/*.wav with
    IDs written without the p in speaker-info.txt.

    Kept (16 utterances, 7 speakers): p225 3, p226 3 (English); p227 2 (Scottish); p248 2 (Indian, no
    region); p280 2 (France, no region, comment dropped); p315 2 (American, New England); s5 2
    (British). Rejected (4): p227_003 unreadable, p999 sex 'X', p500 has audio but no speaker-info row,
    the p400 line has too few fields. 0.92 also has mic2 files for p225 that must not be used.
    """
    counts = {"p225": 3, "p226": 3, "p227": 2, "p248": 2, "p280": 2, "p315": 2, "p999": 1, "s5": 2, "p500": 1}
    info = VCTK_INFO_092
    if version == "0.80":
        info = "\n".join(line[1:] if line.startswith("p") else line for line in info.splitlines()) + "\n"
    root.mkdir(parents=True, exist_ok=True)
    (root / "speaker-info.txt").write_text(info, "utf-8")
    folder = root / ("wav48_silence_trimmed" if version == "0.92" else "wav48")
    for s, (speaker, n) in enumerate(counts.items()):
        for u in range(1, n + 1):
            if version == "0.92":
                write_tone(folder / speaker / f"{speaker}_{u:03d}_mic1.flac", 0.3, 100 + 15 * s, seed=u)
                if speaker == "p225":
                    write_tone(folder / speaker / f"{speaker}_{u:03d}_mic2.flac", 0.3, 100 + 15 * s, seed=u)
            else:
                write_tone(folder / speaker / f"{speaker}_{u:03d}.wav", 0.3, 100 + 15 * s, seed=u)
    suffix = "_mic1.flac" if version == "0.92" else ".wav"
    write_garbage(folder / "p227" / f"p227_003{suffix}", b"fLaC" if version == "0.92" else b"RIFF")
    return root


# --- Speech Accent Archive --------------------------------------------------------------------
def make_accent_archive_tree(root: Path) -> Path:
    """A Speech Accent Archive copy: speakers_all.csv (with the Kaggle release's three empty trailing
    columns) and recordings/*.mp3.

    With window=1.0: afrikaans1 (2.3 s, south africa, female) -> windows 0-1, 1-2 (0.3 s tail unused);
    english1 (2.0 s, usa, male) -> 0-1, 1-2; english2 (1.5 s, usa, sex 'famale' read as female) -> 0-1;
    french1 (0.6 s, france, male) -> one window 0-0.6. Rejected: mandarin1 (file_missing? TRUE),
    arabic1 (mp3 absent), spanish1 (sex 'mle'), english1 listed a second time.
    """
    rows = [
        ("27", "9", "virginia, south africa", "afrikaans1", "afrikaans", "female", "1", "south africa", "FALSE", 2.3),
        ("40", "0", "chicago, illinois, usa", "english1", "english", "male", "2", "usa", "FALSE", 2.0),
        ("33", "0", "boston, massachusetts, usa", "english2", "english", "famale", "3", "usa", "FALSE", 1.5),
        ("25", "0", "lyon, france", "french1", "french", "male", "4", "france", "FALSE", 0.6),
        ("30", "6", "beijing, china", "mandarin1", "mandarin", "female", "5", "china", "TRUE", None),
        ("28", "12", "cairo, egypt", "arabic1", "arabic", "male", "6", "egypt", "FALSE", None),
        ("35", "8", "madrid, spain", "spanish1", "spanish", "mle", "7", "spain", "FALSE", 1.2),
        ("40", "0", "chicago, illinois, usa", "english1", "english", "male", "2", "usa", "FALSE", None),
    ]
    root.mkdir(parents=True, exist_ok=True)
    with (root / "speakers_all.csv").open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["age", "age_onset", "birthplace", "filename", "native_language", "sex", "speakerid",
                         "country", "file_missing?", "", "", ""])
        for k, (*fields, seconds) in enumerate(rows):
            writer.writerow(fields + ["", "", ""])
            if seconds is not None:
                write_tone(root / "recordings" / f"{fields[3]}.mp3", seconds, 100 + 20 * k, seed=k)
    return root


# --- Common Voice -----------------------------------------------------------------------------
def make_common_voice_tree(root: Path, release: str = "new") -> Path:
    """A Common Voice language folder: validated.tsv + clips/*.mp3.

    release "new": columns ..., gender (male_masculine/female_feminine/...), accents; "old": gender
    male/female/other, column `accent`. Kept (7 clips): aaa 4 (female, 'United States English',
    age twenties), bbb 3 (male, 'England English', no age). Rejected (6): ccc gender non-binary
    ('other' in old), ddd no gender, eee no accent, fff do_not_wish_to_say (old: 'fmale', unknown),
    ggg intersex (old: 'other'), hhh's clip missing from clips/.
    """
    new = release == "new"
    g = {"f": "female_feminine" if new else "female", "m": "male_masculine" if new else "male"}
    rows = [("aaa", g["f"], "United States English", "twenties")] * 4 + [("bbb", g["m"], "England English", "")] * 3
    rows += [
        ("ccc", "non-binary" if new else "other", "Canadian English", "thirties"),
        ("ddd", "", "India and South Asia (India, Pakistan, Sri Lanka)", "forties"),
        ("eee", g["m"], "", "fifties"),
        ("fff", "do_not_wish_to_say" if new else "fmale", "England English", ""),
        ("ggg", "intersex" if new else "other", "Scottish English", "twenties"),
        ("hhh", g["f"], "Irish English", "twenties"),
    ]
    accent = "accents" if new else "accent"
    header = ["client_id", "path", "sentence", "up_votes", "down_votes", "age", "gender", accent, "locale", "segment"]
    lines = ["\t".join(header)]
    for k, (client, gender, acc, age) in enumerate(rows):
        name = f"common_voice_en_{k:05d}.mp3"
        lines.append("\t".join([client, name, f'A "quoted" sentence {k}.', "2", "0", age, gender, acc, "en", ""]))
        if client != "hhh":
            write_tone(root / "clips" / name, 0.4, 100 + 7 * k, seed=k)
    (root / "validated.tsv").write_text("\n".join(lines) + "\n", "utf-8")
    return root


# --- JVS --------------------------------------------------------------------------------------
def make_jvs_tree(root: Path) -> Path:
    """A jvs_ver1 copy: gender_f0range.txt and jvsNNN/<subset>/wav24kHz16bit/*.wav (24 kHz).

    Default subsets (parallel100, nonpara30) keep 8 utterances: jvs001 (M) and jvs002 (F) each have 3
    parallel100 + 1 nonpara30 wavs; each also has a whisper10 wav (only with subsets including it).
    Rejected (4): jvs001's parallel100 transcripts list VOICEACTRESS100_004 with no wav; jvs003 has
    sex 'X' (2 wavs); jvs005 has a folder but no line in gender_f0range.txt (1 wav).
    jvs004 is listed but has no folder (a note, not a row).
    """
    root.mkdir(parents=True, exist_ok=True)
    (root / "gender_f0range.txt").write_text(
        "speaker Male_or_Female minf0[Hz] maxf0[Hz]\njvs001 M 70 220\njvs002 F 150 400\n"
        "jvs003 X 100 300\njvs004 F 140 380\n", "utf-8")
    layout = {
        "jvs001": {"parallel100": 3, "nonpara30": 1, "whisper10": 1},
        "jvs002": {"parallel100": 3, "nonpara30": 1, "whisper10": 1},
        "jvs003": {"parallel100": 2},
        "jvs005": {"parallel100": 1},
    }
    names = {"parallel100": "VOICEACTRESS100_{:03d}", "nonpara30": "BASIC5000_{:04d}", "whisper10": "UT-PARAPHRASE-{:04d}"}
    for s, (speaker, subsets) in enumerate(layout.items()):
        for subset, n in subsets.items():
            for u in range(1, n + 1):
                write_tone(root / speaker / subset / "wav24kHz16bit" / f"{names[subset].format(u)}.wav", 0.3,
                           110 + 60 * s, sr=24000, seed=u)
    (root / "jvs001" / "parallel100" / "transcripts_utf8.txt").write_text(
        "".join(f"VOICEACTRESS100_{u:03d}:テキスト{u}\n" for u in range(1, 5)), "utf-8")
    return root
