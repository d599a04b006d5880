"""What every corpus adapter shares: label normalisation, audio checks, filters and the output files.

An adapter only knows its corpus' layout: it turns metadata and audio paths into `Utterance`s and the
rows it could not use into `Rejection`s, then hands both to `write_corpus`. Everything a user must be
able to trust the same way for every corpus lives here: which rows are dropped and why, the
per-speaker and per-class filters, the manifest columns, `rejected.csv`, and the printed `Summary`.
Nothing is dropped without a line in `rejected.csv` and a count in the summary.
"""
from __future__ import annotations

import argparse
import csv
import importlib
import os
from collections import Counter, defaultdict
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterable

import soundfile as sf
from tqdm import tqdm

from voxlib.corpora.manifest import SEX_TOKENS
from voxlib.fileio import UnreadableFile, file_kind, read_regular

DEFAULT_MANIFEST = "vox_manifest.csv"
SEX_CLASSES = ("female", "male")

# Spellings of the two sex classes met in corpus metadata (VCTK F/M, CSJ kanji, Common Voice's
# newer gender vocabulary). Keys are compared lower-cased and stripped.
# The manifest's own spellings (SEX_TOKENS) plus those only corpus metadata uses.
SEX_ALIASES = {
    **SEX_TOKENS,
    "women": "female", "female_feminine": "female",
    "men": "male", "male_masculine": "male",
}
# Real answers that are neither of the two classes this experiment trains: dropped with their own
# reason, never forced into female/male.
SEX_OUTSIDE_TWO_CLASSES = {"other", "non-binary", "nonbinary", "intersex", "transgender"}
# Values that mean "no answer".
SEX_NOT_GIVEN = {"", "do_not_wish_to_say", "unknown", "n/a", "na", "nan", "none", "?", "-", "不明"}
# Birthplace values that mean "no answer"; such rows have no birthplace class to learn.
BIRTHPLACE_NOT_GIVEN = {"", "unknown", "n/a", "na", "nan", "none", "?", "-", "不明"}


class CorpusError(ValueError):
    """The corpus is not where or how the adapter expects it (missing metadata file, wrong root)."""


@dataclass
class Utterance:
    """One manifest row before the checks: an audio file, or a [start, end) segment of one."""

    path: Path  # absolute
    speaker: str
    sex: str  # as written in the corpus; normalised by write_corpus
    birthplace: str | None = None  # None for corpora without birthplace (JVS)
    start: float | None = None
    end: float | None = None
    extra: dict[str, str] = field(default_factory=dict)


@dataclass
class Rejection:
    """A row the adapter could not use. `path` is the audio file, or the metadata file for bad lines."""

    path: Path
    reason: str  # short and countable: the summary groups by it
    detail: str = ""  # the specifics: line number, value, error text


@dataclass
class CommonOptions:
    """Filters every adapter offers (CLI flags of the same names)."""

    min_utterances: int = 1  # speakers with fewer usable utterances are dropped
    min_speakers: int = 1  # birthplace classes with fewer speakers become `other` or are dropped
    small_classes: str = "other"  # "other" or "drop"
    progress: bool = True  # tqdm bar while checking audio

    def __post_init__(self) -> None:
        if self.min_utterances < 1 or self.min_speakers < 1:
            raise ValueError("min_utterances and min_speakers must be at least 1")
        if self.small_classes not in ("other", "drop"):
            raise ValueError(f"small_classes must be 'other' or 'drop', got {self.small_classes!r}")

    @classmethod
    def from_kwargs(cls, adapter: str, options: dict[str, Any]) -> "CommonOptions":
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(options) - known)
        if unknown:
            raise TypeError(f"{adapter}.build_manifest got unknown option(s) {unknown}; common options: {sorted(known)}")
        return cls(**options)


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """The CommonOptions as CLI flags (dest = field name)."""
    group = parser.add_argument_group("filters shared by all adapters")
    group.add_argument("--min-utterances", type=int, default=1, metavar="N",
                       help="drop speakers with fewer than N usable utterances (default 1)")
    group.add_argument("--min-speakers", type=int, default=1, metavar="N",
                       help="birthplace classes with fewer than N speakers are merged or dropped (default 1)")
    group.add_argument("--small-classes", choices=("other", "drop"), default="other",
                       help="what --min-speakers does with a small class: relabel it 'other' or drop it")
    group.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


# --- label normalisation ----------------------------------------------------------------------
def normalise_sex(raw: str | None) -> tuple[str | None, str]:
    """('female'|'male', '') or (None, reason) — the reason goes into rejected.csv as is."""
    value = (raw or "").strip()
    key = value.lower()
    if key in SEX_ALIASES:
        return SEX_ALIASES[key], ""
    if key in SEX_NOT_GIVEN:
        return None, "no sex given"
    if key in SEX_OUTSIDE_TWO_CLASSES:
        return None, f"sex '{value}' is outside the two classes (female, male)"
    return None, f"unknown sex value '{value}'"


def clean_label(raw: str | None) -> str:
    """Trimmed, inner whitespace collapsed: 'Southern  England ' -> 'Southern England'."""
    return " ".join((raw or "").split())


# --- audio ------------------------------------------------------------------------------------
@lru_cache(maxsize=None)
def audio_duration(path: str) -> float:
    """Seconds of audio in `path` from its header (cheap: no decoding); raises on unreadable files.

    Cached because a long recording is cut into many segments; adapters call it to place windows and
    write_corpus calls it again for the checks.
    """
    info = sf.info(path)
    if info.samplerate <= 0:
        raise RuntimeError("sample rate is 0")
    return info.frames / info.samplerate


def check_audio(path: Path) -> tuple[float | None, str, str]:
    """(duration, '', '') for a readable file, else (None, reason, detail)."""
    kind = file_kind(path)
    if kind == "missing":
        return None, "missing audio file", ""
    if kind is not None:
        return None, "not a regular file", kind
    try:
        duration = audio_duration(str(path))
    except Exception as err:  # soundfile raises LibsndfileError, RuntimeError, TypeError...
        return None, "unreadable audio", f"{type(err).__name__}: {err}".strip()
    if duration <= 0:
        return None, "empty audio", "0 samples"
    return duration, "", ""


def require_file(path: Path, hint: str) -> Path:
    """``path`` if it is a regular file; else a CorpusError saying it is missing (with ``hint``) or
    what it is (a FIFO, a device, a folder: never opened, so never blocks)."""
    kind = file_kind(path)
    if kind == "missing":
        raise CorpusError(f"{path} not found: {hint}")
    if kind is not None:
        raise CorpusError(f"{path}: {kind}, not a regular file; not read")
    return path


def read_text(path: Path) -> str:
    """Text of a metadata file: UTF-8 (a BOM is fine), else cp932 (Shift_JIS, used by Japanese corpora).

    Only a regular file of sane size is read (fileio.read_regular); anything else is a CorpusError
    naming the file and what it is, which an adapter turns into a rejected.csv line for optional files.
    """
    try:
        data = read_regular(path)
    except UnreadableFile as err:
        raise CorpusError(str(err)) from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        try:
            return data.decode("cp932")
        except UnicodeDecodeError as err:
            raise CorpusError(f"{path}: neither UTF-8 nor Shift_JIS text ({err})") from None


def fmt_seconds(x: float) -> str:
    """Seconds for the manifest: exact to the microsecond, no trailing zeros ('12.34', '3')."""
    return f"{x:.6f}".rstrip("0").rstrip(".")


# --- summary ----------------------------------------------------------------------------------
@dataclass
class Summary:
    """What an adapter wrote and what it could not use; `str(summary)` is the printed report."""

    corpus: str
    manifest: Path
    rejected_csv: Path
    utterances: int
    speakers: int
    hours: float
    columns: list[str]
    classes: dict[str, dict[str, int]]  # label -> class -> speakers (utterances for 'speaker')
    dropped: dict[str, int]  # reason -> rows, most frequent first
    partial_labels: dict[str, int]  # label -> rows without a value
    outside_paths: bool  # paths escape the manifest's folder: needs allow_outside_paths
    notes: list[str] = field(default_factory=list)

    @property
    def dropped_total(self) -> int:
        return sum(self.dropped.values())

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["manifest"], out["rejected_csv"] = str(self.manifest), str(self.rejected_csv)
        return out

    def __str__(self) -> str:
        length = f"{self.hours:.2f} h" if self.hours >= 1 else f"{self.hours * 60:.1f} min"
        lines = [f"{self.corpus}: {self.utterances:,} utterances, {self.speakers:,} speakers, {length} -> {self.manifest}"]
        for label, counts in self.classes.items():
            if label == "speaker":
                continue
            shown = ", ".join(f"{name} {n}" for name, n in list(counts.items())[:8])
            more = f", ... ({len(counts) - 8} more)" if len(counts) > 8 else ""
            lines.append(f"  {label}: {len(counts)} classes (speakers per class: {shown}{more})")
        for label, n in self.partial_labels.items():
            lines.append(f"  {label}: no value for {n:,} of {self.utterances:,} utterances")
        if self.dropped:
            lines.append(f"  dropped {self.dropped_total:,} rows (each listed in {self.rejected_csv}):")
            lines += [f"    {n:>8,}  {reason}" for reason, n in self.dropped.items()]
        else:
            lines.append("  dropped nothing")
        if self.outside_paths:
            lines.append(
                "  paths leave the manifest's folder: train with --allow-outside-paths "
                "(notebooks: -p allow_outside_paths True)"
            )
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)


# --- the shared back half of every adapter ----------------------------------------------------
def default_out(root: Path, out: str | os.PathLike | None) -> Path:
    return Path(out) if out else Path(root) / DEFAULT_MANIFEST


def rejected_path(manifest: Path) -> Path:
    """rejected.csv beside the manifest; vox_rejected.csv beside the default vox_manifest.csv so a
    file written into a corpus root says whose it is."""
    return manifest.with_name("vox_rejected.csv" if manifest.name == DEFAULT_MANIFEST else "rejected.csv")


def write_corpus(
    corpus: str,
    utterances: Iterable[Utterance],
    rejections: list[Rejection],
    out: Path,
    options: CommonOptions,
    has_birthplace: bool = True,
    extra_columns: Iterable[str] = (),
    notes: Iterable[str] = (),
) -> Summary:
    """Check, filter and write `out` (the manifest) and its rejected.csv; return the Summary.

    Order matters and is fixed: label checks, audio checks, one value of each label per speaker,
    then --min-utterances, then --min-speakers (so a class is judged by speakers that survive).
    """
    out = Path(out).absolute()
    extra_columns = list(extra_columns)
    reserved = {"path", "speaker", "birthplace", "sex", "start", "end", "split"} & set(extra_columns)
    if reserved:
        raise ValueError(f"extra column(s) {sorted(reserved)} would shadow manifest columns")
    rejections = list(rejections)
    notes = list(notes)

    def reject(u: Utterance, reason: str, detail: str = "") -> None:
        if u.start is not None and u.end is not None:
            detail = f"{fmt_seconds(u.start)}-{fmt_seconds(u.end)} s" + (f"; {detail}" if detail else "")
        rejections.append(Rejection(u.path, reason, detail))

    # 1. labels and segment bounds
    rows: list[Utterance] = []
    for u in utterances:
        u.speaker = clean_label(u.speaker)
        sex, why = normalise_sex(u.sex)
        if not u.speaker:
            reject(u, "no speaker")
        elif sex is None:
            reject(u, why)
        elif has_birthplace and clean_label(u.birthplace).lower() in BIRTHPLACE_NOT_GIVEN:
            reject(u, "no birthplace", f"value '{u.birthplace or ''}'")
        elif (u.start is None) != (u.end is None) or (
            u.start is not None and not 0 <= u.start < u.end  # type: ignore[operator]
        ):
            reject(u, "bad segment bounds")
        else:
            u.sex = sex
            if has_birthplace:
                u.birthplace = clean_label(u.birthplace)
            u.extra = {k: clean_label(u.extra.get(k)) for k in extra_columns}
            rows.append(u)

    # 2. audio: exists, readable, long enough for the segment
    paths = sorted({u.path for u in rows})
    status = {p: check_audio(p) for p in tqdm(paths, desc=f"{corpus}: checking audio", unit="file",
                                               disable=not options.progress or not paths)}
    kept: list[tuple[Utterance, float]] = []
    for u in rows:
        duration, why, detail = status[u.path]
        if duration is None:
            reject(u, why, detail)
        elif u.end is not None and u.end > duration + 0.01:
            reject(u, "segment ends after the audio", f"audio is {duration:.3f} s")
        else:
            kept.append((u, (u.end - u.start) if u.end is not None else duration))  # type: ignore[operator]

    # 3. one sex / birthplace per speaker: rows disagreeing with the speaker's majority go
    for label in ("sex", "birthplace") if has_birthplace else ("sex",):
        votes: dict[str, Counter] = defaultdict(Counter)
        for u, _ in kept:
            votes[u.speaker][getattr(u, label)] += 1
        majority = {s: sorted(c.items(), key=lambda kv: (-kv[1], kv[0]))[0][0] for s, c in votes.items()}
        conflicted = sorted(s for s, c in votes.items() if len(c) > 1)
        if conflicted:
            notes.append(f"{len(conflicted)} speaker(s) with more than one {label}; kept each one's most "
                         f"frequent value ({', '.join(conflicted[:5])}{', ...' if len(conflicted) > 5 else ''})")
        survivors = []
        for u, d in kept:
            value = getattr(u, label)
            if value != majority[u.speaker]:
                reject(u, f"{label} differs from the speaker's other utterances",
                       f"'{value}' vs '{majority[u.speaker]}'")
            else:
                survivors.append((u, d))
        kept = survivors

    # 4. --min-utterances
    per_speaker = Counter(u.speaker for u, _ in kept)
    if options.min_utterances > 1:
        survivors = []
        for u, d in kept:
            if per_speaker[u.speaker] < options.min_utterances:
                reject(u, f"speaker has fewer than {options.min_utterances} utterances",
                       f"{u.speaker}: {per_speaker[u.speaker]}")
            else:
                survivors.append((u, d))
        kept = survivors

    # 5. --min-speakers per birthplace class
    if has_birthplace and options.min_speakers > 1:
        speakers_of: dict[str, set] = defaultdict(set)
        for u, _ in kept:
            speakers_of[u.birthplace].add(u.speaker)  # type: ignore[index]
        small = sorted(b for b, s in speakers_of.items() if len(s) < options.min_speakers)
        if small and options.small_classes == "other":
            for u, _ in kept:
                if u.birthplace in small:
                    u.birthplace = "other"
            notes.append(f"{len(small)} birthplace class(es) with fewer than {options.min_speakers} speakers "
                         f"relabelled 'other': {', '.join(small)}")
        elif small:
            survivors = []
            for u, d in kept:
                if u.birthplace in small:
                    reject(u, f"birthplace class has fewer than {options.min_speakers} speakers",
                           f"{u.birthplace}: {len(speakers_of[u.birthplace])}")  # type: ignore[index]
                else:
                    survivors.append((u, d))
            kept = survivors

    # 6. write
    kept.sort(key=lambda ud: (str(ud[0].path), ud[0].start or 0.0))
    segmented = any(u.start is not None for u, _ in kept)
    columns = ["path", "speaker"] + (["birthplace"] if has_birthplace else []) + ["sex"]
    columns += (["start", "end"] if segmented else []) + extra_columns
    out.parent.mkdir(parents=True, exist_ok=True)
    folder = out.parent

    def rel(p: Path) -> str:
        return Path(os.path.relpath(Path(p).absolute(), folder)).as_posix()

    with out.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(columns)
        for u, _ in kept:
            row = [rel(u.path), u.speaker] + ([u.birthplace] if has_birthplace else []) + [u.sex]
            if segmented:
                row += [fmt_seconds(u.start), fmt_seconds(u.end)] if u.start is not None else ["", ""]
            writer.writerow(row + [u.extra[k] for k in extra_columns])
    rejected_csv = rejected_path(out)
    with rejected_csv.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "reason", "detail"])
        writer.writerows([rel(r.path), r.reason, r.detail] for r in rejections)

    # 7. summary
    speakers_per: dict[str, dict[str, set]] = defaultdict(lambda: defaultdict(set))
    for u, _ in kept:
        labels = {"sex": u.sex, **({"birthplace": u.birthplace} if has_birthplace else {}), **u.extra}
        for label, value in labels.items():
            if value:
                speakers_per[label][value].add(u.speaker)
    classes: dict[str, dict[str, int]] = {"speaker": dict(sorted(Counter(u.speaker for u, _ in kept).items()))}
    for label in (["birthplace"] if has_birthplace else []) + ["sex"] + extra_columns:
        counts = {k: len(v) for k, v in speakers_per[label].items()}
        classes[label] = dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
    partial = {k: n for k in extra_columns if (n := sum(1 for u, _ in kept if not u.extra[k]))}
    if not kept:
        notes.append("no usable utterances: see the dropped rows above")
    return Summary(
        corpus=corpus,
        manifest=out,
        rejected_csv=rejected_csv,
        utterances=len(kept),
        speakers=len(classes["speaker"]),
        hours=sum(d for _, d in kept) / 3600,
        columns=columns,
        classes=classes,
        dropped=dict(Counter(r.reason for r in rejections).most_common()),
        partial_labels=partial,
        outside_paths=any(rel(u.path).startswith("../") for u, _ in kept),
        notes=notes,
    )


# --- registry ---------------------------------------------------------------------------------
ADAPTER_MODULES = {
    "csj": "voxlib.corpora.csj",
    "vctk": "voxlib.corpora.vctk",
    "accent_archive": "voxlib.corpora.accent_archive",
    "common_voice": "voxlib.corpora.common_voice",
    "jvs": "voxlib.corpora.jvs",
}


def adapter_module(name: str):
    """The adapter module for a registered name (imported on demand)."""
    if name not in ADAPTER_MODULES:
        raise KeyError(f"unknown corpus adapter {name!r}; known: {sorted(ADAPTER_MODULES)}")
    return importlib.import_module(ADAPTER_MODULES[name])


class _Registry(Mapping):
    """ADAPTERS[name] -> that adapter's build_manifest(root, out=None, **options) -> Summary."""

    def __getitem__(self, name: str) -> Callable[..., Summary]:
        return adapter_module(name).build_manifest

    def __iter__(self):
        return iter(ADAPTER_MODULES)

    def __len__(self) -> int:
        return len(ADAPTER_MODULES)


ADAPTERS: Mapping[str, Callable[..., Summary]] = _Registry()
