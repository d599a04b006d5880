"""CSJ (Corpus of Spontaneous Japanese) -> vox manifest, one row per inter-pausal unit (IPU).

CSJ talks are 10-20 minute recordings; the model wants utterances. The per-talk XML already cuts a
talk into IPUs (speech between pauses of 200 ms or more), so each IPU becomes a manifest row with
`start,end` into the talk's wav. This is the corpus of the original experiment, where the birthplace
label is the speaker's prefecture; a `region` column (the eight regions of Japan) is added because
47 prefectures give many classes with few speakers.

What this adapter reads (check against your copy; docs/corpora.md has the layout):

- `Talk` root element attributes `TalkID`, `SpeakerID`, `SpeakerSex` (男/女), `SpeakerBirthPlace`,
  `SpeakerBirthGeneration`; missing ones are filled from RDB exports `infoSpeaker` / `infoTalk`.
- `IPU` elements with `IPUID`, `IPUStartTime`, `IPUEndTime` (seconds) and, in dialogues, `Channel`
  (L/R). IPUs containing a `TransSUW` with `TagMaskStart/Midst/End="1"` had their audio replaced by
  noise for privacy ((R) tag) and are dropped.
- Dialogue talks (TalkID starting with D) are skipped unless `dialogues=True`; then each channel is
  its own speaker, with audio `<TalkID>-L.wav` / `<TalkID>-R.wav`. Who speaks on which channel comes
  from an `infoTalk` export with a `Channel` column, else from a two-ID `SpeakerID` attribute
  ("0123/0456": L then R). This is an assumption about the distribution; check it on your copy.
"""
from __future__ import annotations

import argparse
import csv
import io
import re
import unicodedata
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import defusedxml
import defusedxml.ElementTree as SafeET
from tqdm import tqdm

from voxlib.fileio import UnreadableFile, read_regular

from .common import (CommonOptions, CorpusError, Rejection, Summary, Utterance, clean_label, default_out,
                     fmt_seconds, read_text, write_corpus)

REGIONS = ("Hokkaido", "Tohoku", "Kanto", "Chubu", "Kinki", "Chugoku", "Shikoku", "Kyushu-Okinawa")

# (kanji without suffix, suffix, romaji, region): all 47 prefectures.
PREFECTURES = (
    ("北海道", "", "hokkaido", "Hokkaido"),
    ("青森", "県", "aomori", "Tohoku"), ("岩手", "県", "iwate", "Tohoku"), ("宮城", "県", "miyagi", "Tohoku"),
    ("秋田", "県", "akita", "Tohoku"), ("山形", "県", "yamagata", "Tohoku"), ("福島", "県", "fukushima", "Tohoku"),
    ("茨城", "県", "ibaraki", "Kanto"), ("栃木", "県", "tochigi", "Kanto"), ("群馬", "県", "gunma", "Kanto"),
    ("埼玉", "県", "saitama", "Kanto"), ("千葉", "県", "chiba", "Kanto"), ("東京", "都", "tokyo", "Kanto"),
    ("神奈川", "県", "kanagawa", "Kanto"),
    ("新潟", "県", "niigata", "Chubu"), ("富山", "県", "toyama", "Chubu"), ("石川", "県", "ishikawa", "Chubu"),
    ("福井", "県", "fukui", "Chubu"), ("山梨", "県", "yamanashi", "Chubu"), ("長野", "県", "nagano", "Chubu"),
    ("岐阜", "県", "gifu", "Chubu"), ("静岡", "県", "shizuoka", "Chubu"), ("愛知", "県", "aichi", "Chubu"),
    ("三重", "県", "mie", "Kinki"), ("滋賀", "県", "shiga", "Kinki"), ("京都", "府", "kyoto", "Kinki"),
    ("大阪", "府", "osaka", "Kinki"), ("兵庫", "県", "hyogo", "Kinki"), ("奈良", "県", "nara", "Kinki"),
    ("和歌山", "県", "wakayama", "Kinki"),
    ("鳥取", "県", "tottori", "Chugoku"), ("島根", "県", "shimane", "Chugoku"), ("岡山", "県", "okayama", "Chugoku"),
    ("広島", "県", "hiroshima", "Chugoku"), ("山口", "県", "yamaguchi", "Chugoku"),
    ("徳島", "県", "tokushima", "Shikoku"), ("香川", "県", "kagawa", "Shikoku"), ("愛媛", "県", "ehime", "Shikoku"),
    ("高知", "県", "kochi", "Shikoku"),
    ("福岡", "県", "fukuoka", "Kyushu-Okinawa"), ("佐賀", "県", "saga", "Kyushu-Okinawa"),
    ("長崎", "県", "nagasaki", "Kyushu-Okinawa"), ("熊本", "県", "kumamoto", "Kyushu-Okinawa"),
    ("大分", "県", "oita", "Kyushu-Okinawa"), ("宮崎", "県", "miyazaki", "Kyushu-Okinawa"),
    ("鹿児島", "県", "kagoshima", "Kyushu-Okinawa"), ("沖縄", "県", "okinawa", "Kyushu-Okinawa"),
)
ABROAD = ("海外", "外国", "国外", "abroad", "overseas", "foreign")
UNKNOWN = ("", "不明", "未回答", "無回答", "unknown", "-", "?")


def _fold_romaji(text: str) -> str:
    """'Hyōgo-ken', 'HYOUGO', 'Hyogo Prefecture' -> 'hyogo': macrons, long-vowel spellings, suffixes."""
    text = unicodedata.normalize("NFKD", text.lower())
    text = "".join(c for c in text if not unicodedata.combining(c)).strip()
    text = re.sub(r"[\s\-]+(prefecture|pref\.?|metropolis|ken|fu|to|do)$", "", text)
    for long, short in (("ou", "o"), ("oo", "o"), ("uu", "u")):
        text = text.replace(long, short)
    return text.strip()


_BY_ROMAJI = {_fold_romaji(r): (k + s, region) for k, s, r, region in PREFECTURES}
_BY_KANJI = sorted(((k, k + s, region) for k, s, _, region in PREFECTURES), key=lambda t: -len(t[0]))


def region_of(birthplace: str) -> tuple[str, str]:
    """(canonical birthplace, region) for a CSJ birthplace string.

    A prefecture in kanji (with or without 都/道/府/県, possibly followed by a city) or in romaji gives
    its full kanji name and one of REGIONS; abroad answers give (value, 'abroad'); empty or unknown
    answers ('', '不明') give ('', 'unknown'); anything else is kept as written with region 'unknown'.
    """
    value = unicodedata.normalize("NFKC", birthplace or "").strip()
    if value.lower() in UNKNOWN:
        return "", "unknown"
    for base, full, region in _BY_KANJI:
        if value.startswith(base):
            return full, region
    if value.lower() in ABROAD or any(value.startswith(a) for a in ABROAD[:3]):
        return value, "abroad"
    folded = _fold_romaji(value)
    if folded in _BY_ROMAJI:
        return _BY_ROMAJI[folded]
    return value, "unknown"


# --- reading ----------------------------------------------------------------------------------
def parse_xml(path: Path) -> ET.Element:
    """Parse a talk XML, whatever its declared encoding (expat cannot read Shift_JIS itself).

    Only a regular file of sane size is read (a CorpusError names anything else), and through
    defusedxml: entity declarations (billion laughs) and external references are refused with a
    defusedxml error, whatever the installed libexpat would do with them. A DOCTYPE line is fine.
    """
    try:
        data = read_regular(path)
    except UnreadableFile as err:
        raise CorpusError(str(err)) from None
    match = re.match(rb"\s*<\?xml[^>]*encoding=[\"']([A-Za-z0-9_.\-]+)[\"']", data)
    encoding = (match.group(1).decode().lower() if match else "utf-8").replace("_", "-")
    if encoding in ("utf-8", "utf8", "us-ascii", "ascii", "iso-8859-1", "latin-1"):
        return _fromstring(data)
    if encoding in ("shift-jis", "sjis", "x-sjis", "windows-31j", "cp932", "ms932"):
        encoding = "cp932"  # the superset Windows tools write
    text = re.sub(r"^\s*<\?xml[^>]*\?>", "", data.decode(encoding), count=1)
    return _fromstring(text)


def _fromstring(data: bytes | str) -> ET.Element:
    return SafeET.fromstring(data, forbid_dtd=False, forbid_entities=True, forbid_external=True)


def _speaker_key(value: str | None) -> str:
    """CSJ speaker IDs are 4-digit numbers; exports sometimes lose the leading zeros."""
    value = (value or "").strip()
    return value.zfill(4) if value.isdigit() else value


def _read_table(path: Path) -> list[dict[str, str]]:
    text = read_text(path)
    header = text.split("\n", 1)[0]
    reader = csv.DictReader(io.StringIO(text), delimiter="\t" if "\t" in header else ",")
    return [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in reader]


def _find_table(folder: Path, name: str) -> Path | None:
    found = sorted(p for p in folder.rglob(f"{name}.*") if p.suffix.lower() in (".csv", ".tsv", ".txt"))
    return found[0] if found else None


@dataclass
class _Speaker:
    sex: str = ""
    birthplace: str = ""
    generation: str = ""


@dataclass
class _IPU:
    ipu_id: str
    start: float
    end: float
    channel: str
    masked: bool


def _ipus(talk: ET.Element) -> tuple[list[_IPU], list[str]]:
    """All IPUs in document order, and a message for each one with unusable times."""
    ipus, bad = [], []
    for element in talk.iter("IPU"):
        ipu_id = element.get("IPUID", "?")
        try:
            start, end = float(element.get("IPUStartTime", "")), float(element.get("IPUEndTime", ""))
        except ValueError:
            bad.append(f"IPU {ipu_id}: times {element.get('IPUStartTime')!r}, {element.get('IPUEndTime')!r}")
            continue
        masked = any(t.get(k) == "1" for t in element.iter("TransSUW")
                     for k in ("TagMaskStart", "TagMaskMidst", "TagMaskEnd"))
        ipus.append(_IPU(ipu_id, start, end, (element.get("Channel") or "").strip().upper(), masked))
    return ipus, bad


def _segments(ipus: list[_IPU], min_duration: float, merge_gap: float) -> list[tuple[float, float, list[str]]]:
    """Cut one channel's IPUs into segments; short neighbours closer than merge_gap are joined.

    A masked IPU is never joined into a segment (its audio is noise) and breaks any run. Segments are
    returned whatever their length; the caller drops the ones shorter than min_duration.
    """
    out: list[tuple[float, float, list[str]]] = []
    current: list | None = None
    for ipu in ipus:
        if ipu.masked:
            current = None
            continue
        if (current is not None and merge_gap > 0 and current[1] - current[0] < min_duration
                and ipu.start - current[1] <= merge_gap):
            current[1] = max(current[1], ipu.end)
            current[2].append(ipu.ipu_id)
            continue
        current = [ipu.start, ipu.end, [ipu.ipu_id]]
        out.append(current)  # the same list object keeps growing while merging
    return [(s, e, ids) for s, e, ids in out]


# --- the adapter ------------------------------------------------------------------------------
def build_manifest(
    root: str | Path,
    out: str | Path | None = None,
    *,
    min_duration: float = 0.5,
    merge_gap: float = 0.0,
    dialogues: bool = False,
    xml_dir: str | Path | None = None,
    wav_dir: str | Path | None = None,
    rdb_dir: str | Path | None = None,
    **common,
) -> Summary:
    """Write a manifest of CSJ IPUs; see the module docstring for what is read.

    min_duration: IPUs (after merging) shorter than this many seconds are dropped.
    merge_gap: join an IPU shorter than min_duration with the next one of the same channel when the
        pause between them is at most this many seconds (0 = never join).
    dialogues: include D* talks, one speaker per channel.
    xml_dir / wav_dir / rdb_dir: where the talk XML, the wavs and the RDB exports are
        (default ROOT/XML, ROOT/WAV, ROOT; each searched recursively).
    """
    options = CommonOptions.from_kwargs("csj", common)
    root = Path(root)
    if not root.is_dir():
        raise CorpusError(f"CSJ root {root} is not a folder")
    xml_root = Path(xml_dir) if xml_dir else (root / "XML" if (root / "XML").is_dir() else root)
    wav_root = Path(wav_dir) if wav_dir else (root / "WAV" if (root / "WAV").is_dir() else root)
    xml_files = sorted(xml_root.rglob("*.xml"))
    if not xml_files:
        raise CorpusError(f"no talk XML (*.xml) under {xml_root}; expected ROOT/XML/BaseXML/core/<TalkID>.xml")

    notes: list[str] = []
    wavs: dict[str, Path] = {}
    for wav in sorted(wav_root.rglob("*.wav")):
        if wav.stem in wavs:
            notes.append(f"{wav.name} exists twice; using {wavs[wav.stem]}")
        else:
            wavs.setdefault(wav.stem, wav)

    # RDB exports fill what the XML leaves out.
    rdb_root = Path(rdb_dir) if rdb_dir else root
    speaker_table: dict[str, _Speaker] = {}
    talk_table: dict[str, list[dict[str, str]]] = {}
    rejections: list[Rejection] = []

    def table_rows(name: str) -> list[dict[str, str]]:
        path = _find_table(rdb_root, name)
        try:
            return _read_table(path) if path is not None else []
        except CorpusError as err:  # a FIFO or device named like an export: named, skipped, never read
            rejections.append(Rejection(path, "metadata file not read", str(err)))
            return []

    for row in table_rows("infoSpeaker"):
        speaker_table[_speaker_key(row.get("SpeakerID"))] = _Speaker(
            row.get("SpeakerSex", ""), row.get("SpeakerBirthPlace", ""), row.get("SpeakerBirthGeneration", ""))
    for row in table_rows("infoTalk"):
        talk_table.setdefault(row.get("TalkID", ""), []).append(row)

    utterances: list[Utterance] = []
    unrecognised: set[str] = set()
    for xml in tqdm(xml_files, desc="csj: reading talk XML", unit="talk", disable=not options.progress):
        try:
            talk = parse_xml(xml)
        except CorpusError as err:
            rejections.append(Rejection(xml, "metadata file not read", str(err)))
            continue
        except defusedxml.DefusedXmlException as err:
            rejections.append(Rejection(xml, "talk XML refused (entity declarations or external references)",
                                        f"{xml}: {err}"))
            continue
        except (ET.ParseError, UnicodeDecodeError, LookupError) as err:
            rejections.append(Rejection(xml, "unreadable talk XML", str(err)))
            continue
        if talk.tag != "Talk":
            rejections.append(Rejection(xml, "not a CSJ talk XML", f"root element <{talk.tag}>"))
            continue
        talk_id = talk.get("TalkID") or xml.stem
        ipus, bad = _ipus(talk)
        rejections += [Rejection(xml, "IPU without valid times", msg) for msg in bad]
        if not ipus:
            rejections.append(Rejection(xml, "talk without IPUs", talk_id))
            continue
        dialogue = talk_id.startswith("D")
        if dialogue and not dialogues:
            rejections.append(Rejection(xml, "dialogue talk skipped (use --dialogues)", f"{talk_id}: {len(ipus)} IPUs"))
            continue

        # Who speaks on each channel ("" = the one channel of a monologue).
        speaker_ids = [_speaker_key(s) for s in re.split(r"[/,;&、\s]+", talk.get("SpeakerID") or "") if s]
        table_rows = talk_table.get(talk_id, [])
        if not speaker_ids and table_rows:
            speaker_ids = [_speaker_key(table_rows[0].get("SpeakerID"))]
        if dialogue:
            by_channel = {r.get("Channel", "").upper(): _speaker_key(r.get("SpeakerID")) for r in table_rows
                          if r.get("Channel")}
            if not by_channel and len(speaker_ids) == 2:
                by_channel = dict(zip("LR", speaker_ids))
            if set(by_channel) != {"L", "R"}:
                rejections.append(Rejection(xml, "dialogue without a speaker for each channel", talk_id))
                continue
        else:
            if len(speaker_ids) != 1:
                rejections.append(Rejection(xml, "no single SpeakerID for the talk", f"{talk_id}: {speaker_ids}"))
                continue
            by_channel = {"": speaker_ids[0]}

        # Labels per speaker: the Talk attributes (split per channel in dialogues), then the tables.
        attributes = {k: re.split(r"[/,;&、]+", talk.get(k) or "") if dialogue else [talk.get(k) or ""]
                      for k in ("SpeakerSex", "SpeakerBirthPlace", "SpeakerBirthGeneration")}
        for index, (channel, speaker_id) in enumerate(sorted(by_channel.items())):
            def attribute(name: str) -> str:
                values = attributes[name]
                return values[index].strip() if len(values) == len(by_channel) else ""

            table = speaker_table.get(speaker_id, _Speaker())
            sex = attribute("SpeakerSex") or table.sex
            raw_birthplace = attribute("SpeakerBirthPlace") or table.birthplace
            generation = attribute("SpeakerBirthGeneration") or table.generation
            birthplace, region = region_of(raw_birthplace)
            if region == "unknown" and birthplace:
                unrecognised.add(birthplace)
            audio = wavs.get(f"{talk_id}-{channel}" if channel else talk_id) or (
                wav_root / (f"{talk_id}-{channel}.wav" if channel else f"{talk_id}.wav"))
            channel_ipus = [i for i in ipus if i.channel == channel] if channel else ipus
            for ipu in channel_ipus:
                if ipu.masked:
                    rejections.append(Rejection(audio, "IPU audio masked with noise ((R) tag)",
                                                f"IPU {ipu.ipu_id} {fmt_seconds(ipu.start)}-{fmt_seconds(ipu.end)} s"))
            for start, end, ids in _segments(channel_ipus, min_duration, merge_gap):
                label = f"IPU {'+'.join(ids)} {fmt_seconds(start)}-{fmt_seconds(end)} s"
                if end - start < min_duration:
                    rejections.append(Rejection(audio, f"IPU shorter than {min_duration:g} s", label))
                    continue
                utterances.append(Utterance(
                    path=audio.absolute(), speaker=speaker_id, sex=sex, birthplace=birthplace,
                    start=start, end=end,
                    extra={"region": region, "generation": clean_label(generation)},
                ))
    if unrecognised:
        notes.append("birthplaces not recognised as a prefecture (region 'unknown'): "
                     + ", ".join(sorted(unrecognised)))
    return write_corpus("csj", utterances, rejections, default_out(root, out), options,
                        extra_columns=("region", "generation"), notes=notes)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--min-duration", type=float, default=0.5, metavar="S",
                        help="drop IPUs shorter than S seconds (default 0.5)")
    parser.add_argument("--merge-gap", type=float, default=0.0, metavar="S",
                        help="join a short IPU with the next one across pauses up to S seconds (default 0: never)")
    parser.add_argument("--dialogues", action="store_true", help="include dialogue talks (D*), one speaker per channel")
    parser.add_argument("--xml-dir", help="talk XML folder (default ROOT/XML)")
    parser.add_argument("--wav-dir", help="wav folder (default ROOT/WAV)")
    parser.add_argument("--rdb-dir", help="folder with infoSpeaker/infoTalk CSV or TSV exports (default ROOT)")
