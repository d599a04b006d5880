"""Read a corpus manifest and check every row and every clip before any training starts.

A bad clip found in epoch 7 costs hours; found here it costs seconds, and all problems are reported
together so one fix-and-rerun cycle is enough. Validation decodes every clip once (header checks,
then a streaming pass for NaN/inf and silence); the per-row results are stored under the cache
folder keyed by the manifest digest, so re-reading an unchanged corpus does not decode it again.

Decisions worth knowing:

- The manifest must be UTF-8 (a BOM is fine). Any other encoding is refused with the line and byte
  that failed, rather than guessed: a wrong guess silently renames speakers.
- File names on disk must be valid UTF-8 too: a UTF-8 manifest cannot spell a Latin-1 or Shift-JIS
  byte name. Such a row is reported as a missing file, and the message names the undecodable file
  names found in that folder so the fix (rename them, e.g. with ``convmv``) is obvious.
- Paths are checked lexically (``..`` and absolute paths), not by resolving symlinks, so a corpus
  folder made of symlinks into a shared data store is fine.
- The same file may appear in several rows only with different ``start``/``end`` segments.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import multiprocessing
import numpy as np
import pandas as pd
import soundfile as sf
from tqdm import tqdm

from voxlib.audio import SILENCE_PEAK, load_audio, nonfinite_reason, segment_frames, silent_reason, too_short_reason
from voxlib.config import outputs_dir
from voxlib.fileio import UnreadableFile, file_kind, read_regular
from voxlib.signals import process_pool
from voxlib.text import one_line
from voxlib.corpora.labels import check_labels

__all__ = ["Manifest", "ManifestError", "read_manifest", "load_audio", "SEX_TOKENS", "SILENCE_PEAK"]

REQUIRED = ("path", "speaker", "sex")
STANDARD = ("path", "speaker", "birthplace", "sex", "split", "start", "end")
RESERVED = ("rel_path", "row", "duration")  # columns read_manifest adds to the table
SEX_TOKENS = {
    "f": "female", "female": "female", "woman": "female", "女": "female", "女性": "female",
    "m": "male", "male": "male", "man": "male", "男": "male", "男性": "male",
}
# Tolerance for a segment end slightly past the file end (rounding in annotation tools).
END_TOLERANCE_S = 0.01
VALIDATION_VERSION = 1
POOL_MIN_ROWS = 400  # below this a process pool costs more than it saves
_BLOCK = 1 << 20  # frames decoded at a time when scanning content


class ManifestError(ValueError):
    """Every problem in a manifest, one line each (``row 12 (clips/a.wav): missing file``).

    ``problems`` holds the same as (row, path, reason) tuples; row 0 is the manifest itself.
    """

    def __init__(self, source: Path | str, problems: list[tuple[int, str, str]]):
        self.source = str(source)
        self.problems = problems
        lines = [_format_problem(*p) for p in problems]
        head = f"{source}: {len(problems)} problem{'s' if len(problems) != 1 else ''}"
        super().__init__(head + "\n" + "\n".join(lines))


def _format_problem(row: int, path: str, reason: str) -> str:
    """One line, whatever the file name or label holds (text.one_line escapes control characters)."""
    return one_line(reason) if row == 0 else f"row {row} ({one_line(path)}): {one_line(reason)}"


@dataclass
class Manifest:
    """A validated corpus: one table row per usable utterance (see ARCHITECTURE.md)."""

    table: pd.DataFrame
    label_columns: list[str]
    rejected: pd.DataFrame
    root: Path
    source: Path
    digest: str
    name: str
    notices: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.table)

    def write_rejected(self, path: str | Path) -> Path:
        """Write ``rejected.csv`` (row, path, reason); ``path`` is a folder or a file name."""
        path = Path(path)
        if path.is_dir() or not path.suffix:
            path = path / "rejected.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        self.rejected.to_csv(path, index=False)
        return path


# --- reading the CSV -----------------------------------------------------------------------------
def _decode(source: Path, raw: bytes) -> str:
    """Manifest bytes -> text; refuses anything but UTF-8 with the failing line and byte."""
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise ManifestError(source, [(0, "", "manifest is UTF-16 encoded; save it as UTF-8")])
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line_start = raw.rfind(b"\n", 0, err.start) + 1
        line = raw.count(b"\n", 0, err.start) + 1
        column = err.start - line_start + 1
        bad = raw[err.start:err.start + 1].hex()
        context = raw[line_start:raw.find(b"\n", err.start) if b"\n" in raw[err.start:] else None]
        reason = (
            f"manifest is not valid UTF-8: line {line}, column {column} has byte 0x{bad} "
            f"({context.decode('utf-8', 'replace').strip()!r}); re-save it as UTF-8, e.g. "
            f"`iconv -f CP1252 -t UTF-8` (Western) or `iconv -f SHIFT-JIS -t UTF-8` (Japanese)"
        )
        raise ManifestError(source, [(0, "", reason)]) from None


def _parse(source: Path, text: str) -> tuple[list[str], list[tuple[int, list[str]]], list[tuple[int, str, str]]]:
    """Header and (row number, fields) pairs; structural problems raise, ragged rows are reported."""
    try:
        records = list(csv.reader(io.StringIO(text, newline="")))
    except csv.Error as err:
        raise ManifestError(source, [(0, "", f"unreadable CSV: {err}")]) from None
    records = [r for r in records if any(cell.strip() for cell in r)]  # blank lines carry nothing
    if not records:
        raise ManifestError(source, [(0, "", "manifest is empty (no header line)")])
    header = [h.strip() for h in records[0]]
    structural = []
    missing = [c for c in REQUIRED if c not in header]
    for column in missing:
        structural.append((0, "", f"missing column {column!r}; columns found: {', '.join(header)}"))
    duplicates = sorted({h for h in header if header.count(h) > 1})
    if duplicates:
        structural.append((0, "", f"duplicate column name(s): {', '.join(duplicates)}"))
    reserved = [h for h in header if h in RESERVED]
    if reserved:
        structural.append((0, "", f"column(s) {', '.join(reserved)} are reserved (computed by read_manifest)"))
    if len(records) == 1:
        structural.append((0, "", "manifest has a header but no data rows"))
    if structural:
        raise ManifestError(source, structural)
    rows, ragged = [], []
    for number, record in enumerate(records[1:], start=1):
        if len(record) != len(header):
            path = record[header.index("path")] if len(record) > header.index("path") else ""
            ragged.append((number, path, f"has {len(record)} fields, the header has {len(header)}"))
        else:
            rows.append((number, [cell.strip() for cell in record]))
    return header, rows, ragged


# --- checking one row's labels and path ----------------------------------------------------------
def _inside(root: str, path: str) -> bool:
    return os.path.commonpath([root, path]) == root


def _number(value: str, what: str) -> tuple[float, str | None]:
    if value == "":
        return math.nan, None
    try:
        number = float(value)
    except ValueError:
        return math.nan, f"{what} {value!r} is not a number of seconds"
    if not math.isfinite(number):
        return math.nan, f"{what} {value!r} is not a finite number of seconds"
    return number, None


def _undecodable_names(folder: str) -> list[str]:
    """File names in ``folder`` that are not valid UTF-8 (shown escaped), for a missing-file hint."""
    try:
        names = os.listdir(os.fsencode(folder))
    except OSError:
        return []
    bad = []
    for name in names:
        try:
            name.decode("utf-8")
        except UnicodeDecodeError:
            bad.append(name.decode("utf-8", "backslashreplace"))
    return sorted(bad)


# --- checking one clip (runs in worker processes) ------------------------------------------------
def _probe(path: str, start: float, end: float, sample_rate: int, n_fft: int) -> dict:
    """Decode one row's audio once and say what is wrong with it, if anything.

    Returns ``samplerate``, ``channels``, ``duration`` (seconds of the row's segment) and
    ``problem`` (None when usable). Header problems are found before any sample is decoded; the
    content scan streams in blocks so an hour-long recording does not fill memory.
    """
    result = {"samplerate": 0, "channels": 0, "duration": math.nan, "problem": None}

    def bad(reason: str) -> dict:
        result["problem"] = reason
        return result

    try:
        stat = os.stat(path)
    except FileNotFoundError:
        hint = _undecodable_names(os.path.dirname(path))
        if hint:
            shown = ", ".join(hint[:3]) + (" ..." if len(hint) > 3 else "")
            return bad(
                f"missing file (its folder has {len(hint)} file name(s) that are not valid UTF-8 "
                f"and cannot be named in a UTF-8 manifest: {shown}; rename them to UTF-8, e.g. with convmv)"
            )
        return bad("missing file")
    except OSError as err:
        return bad(f"cannot access file ({err.strerror})")
    kind = file_kind(path)
    if kind is not None:
        return bad(f"not a regular file ({kind}); not read")
    if stat.st_size == 0:
        return bad("empty file (0 bytes)")
    try:
        info = sf.info(path)
    except (sf.LibsndfileError, RuntimeError) as err:
        with open(path, "rb") as fh:
            head = fh.read(12)
        if head[:4] in (b"RIFF", b"RIFX", b"RF64") and head[8:12] == b"WAVE":
            return bad(f"truncated or corrupt WAV header ({_short(err)})")
        return bad(f"not a readable audio file ({_short(err)}; first bytes {head!r})")
    result["samplerate"], result["channels"] = info.samplerate, info.channels
    if info.frames <= 0:
        return bad("no audio samples")
    file_seconds = info.frames / info.samplerate
    if (not math.isnan(start) and start < 0) or (not math.isnan(end) and end < 0):
        return bad("negative start/end")
    if not math.isnan(end) and not math.isnan(start) and end <= start:
        return bad(f"end {end:g} s is not after start {start:g} s")
    if not math.isnan(start) and start >= file_seconds:
        return bad(f"start {start:g} s is past the end of the file ({file_seconds:.3f} s)")
    if not math.isnan(end) and end > file_seconds + END_TOLERANCE_S:
        return bad(f"end {end:g} s is past the end of the file ({file_seconds:.3f} s)")
    s0, s1 = segment_frames(start, end, info.samplerate, info.frames)
    s1 = min(s1, info.frames)
    result["duration"] = (s1 - s0) / info.samplerate
    at_rate = (s1 - s0) * sample_rate / info.samplerate
    if at_rate < n_fft:
        return bad(too_short_reason(result["duration"], at_rate, sample_rate, n_fft))
    peak, nonfinite, decoded = 0.0, 0, 0
    try:
        with sf.SoundFile(path) as fh:
            fh.seek(s0)
            while decoded < s1 - s0:
                block = fh.read(min(_BLOCK, s1 - s0 - decoded), dtype="float32")
                if len(block) == 0:
                    break
                decoded += len(block)
                finite = np.isfinite(block)
                if not finite.all():
                    nonfinite += int(block.size - finite.sum())
                    block = np.where(finite, block, 0)
                peak = max(peak, float(np.abs(block).max()))
    except (sf.LibsndfileError, RuntimeError) as err:
        return bad(f"audio data unreadable after {decoded} samples ({_short(err)})")
    if decoded < s1 - s0:
        return bad(f"truncated: the header promises {s1 - s0} samples, only {decoded} could be decoded")
    if nonfinite:
        return bad(nonfinite_reason(nonfinite))
    if peak < SILENCE_PEAK:
        return bad(silent_reason(peak))
    return result


def check_clip(path: str, start: float, end: float, sample_rate: int, n_fft: int) -> dict:
    """The checks every manifest row passes, for one clip outside a manifest (voxlib.predict)."""
    return _probe(str(path), float(start), float(end), sample_rate, n_fft)


def _short(err: Exception) -> str:
    return str(err).split(": ", 1)[-1] if "Error opening" in str(err) else str(err)


def _probe_chunk(args: list[tuple]) -> list[dict]:
    return [_probe(*a) for a in args]


def _probe_all(jobs: list[tuple], workers: int | None, progress: bool, label: str) -> list[dict]:
    """Probe every job, in a process pool for large corpora; results in job order."""
    if workers is None:
        workers = (os.cpu_count() or 1) if len(jobs) >= POOL_MIN_ROWS else 1
    bar = tqdm(total=len(jobs), desc=f"checking audio {label}", unit="clip", disable=not progress)
    results: list[dict] = []
    if workers <= 1 or len(jobs) < 2:
        for job in jobs:
            results.append(_probe(*job))
            bar.update()
    else:
        size = max(1, min(64, len(jobs) // (workers * 4)))
        chunks = [jobs[i:i + size] for i in range(0, len(jobs), size)]
        context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else None)
        with process_pool(workers, context) as pool:  # an interrupt stops the workers at once
            for chunk_results in pool.map(_probe_chunk, chunks):
                results.extend(chunk_results)
                bar.update(len(chunk_results))
    bar.close()
    return results


# --- digest and validation cache -----------------------------------------------------------------
def _digest(raw: bytes, paths: list[str]) -> str:
    """sha256 over the manifest bytes and each referenced file's path, size and mtime_ns."""
    h = hashlib.sha256(raw)
    for path in dict.fromkeys(paths):
        try:
            st = os.stat(path)
            h.update(f"\n{path}\0{st.st_size}\0{st.st_mtime_ns}".encode("utf-8", "surrogateescape"))
        except OSError:
            h.update(f"\n{path}\0missing".encode("utf-8", "surrogateescape"))
    return h.hexdigest()


def _validation_file(cache_dir: str | Path | None, digest: str, sample_rate: int, n_fft: int) -> Path:
    root = Path(cache_dir) if cache_dir else outputs_dir() / "cache"
    return root / "validation" / f"{digest[:32]}-{sample_rate}-{n_fft}-v{VALIDATION_VERSION}.json"


def _load_validation(path: Path, rows: list[int]) -> dict[int, dict] | None:
    try:
        stored = {int(k): v for k, v in json.loads(path.read_text())["rows"].items()}
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not all(r in stored for r in rows):
        return None
    for value in stored.values():
        value["duration"] = math.nan if value["duration"] is None else value["duration"]
    return stored


def _save_validation(path: Path, probes: dict[int, dict]) -> None:
    """Atomic write (temp + rename); a failure only costs a re-decode next time."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        clean = {r: {**p, "duration": None if math.isnan(p["duration"]) else p["duration"]} for r, p in probes.items()}
        tmp.write_text(json.dumps({"rows": clean}))
        os.replace(tmp, path)
    except OSError:
        pass


# --- the entry point -----------------------------------------------------------------------------
def read_manifest(
    path: str | Path,
    on_bad_file: str = "stop",
    allow_outside_paths: bool = False,
    sample_rate: int = 16000,
    n_fft: int = 510,
    progress: bool = True,
    *,
    workers: int | None = None,
    cache_dir: str | Path | None = None,
    use_cache: bool = True,
    speaker_labels: tuple[str, ...] | list[str] = ("birthplace", "sex"),
    label_conflicts: str = "stop",
) -> Manifest:
    """Read and validate ``path``; raise one ManifestError listing every problem.

    ``on_bad_file="skip"`` drops bad rows into ``Manifest.rejected`` instead of raising (structural
    problems — unreadable CSV, missing column, no usable row — always raise). ``sample_rate`` and
    ``n_fft`` define "too short" (less than one STFT frame after resampling). ``workers``: processes
    for decoding (None = all cores for corpora of at least 400 rows). Validation results are stored
    under ``cache_dir/validation`` (default outputs/cache) unless ``use_cache=False``.
    ``speaker_labels``: columns that must be constant per speaker; a speaker whose rows disagree is a
    problem that always stops, unless ``label_conflicts="majority"`` (see corpora/labels.py).
    """
    if on_bad_file not in ("stop", "skip"):
        raise ValueError(f"on_bad_file must be 'stop' or 'skip', got {on_bad_file!r}")
    source = Path(path).absolute()
    try:
        raw = read_regular(source)
    except UnreadableFile as err:
        raise ManifestError(source, [(0, "", f"manifest not read: {err.kind}")]) from None
    except OSError as err:
        raise ManifestError(source, [(0, "", f"cannot read manifest ({err.strerror})")]) from None
    header, rows, problems = _parse(source, _decode(source, raw))
    root = os.path.normpath(str(source.parent))
    col = {name: header.index(name) for name in header}
    has_birthplace = "birthplace" in col
    extras = [h for h in header if h not in STANDARD]
    labels = ["speaker"] + (["birthplace"] if has_birthplace else []) + ["sex"] + extras

    records: dict[int, dict] = {}
    seen: dict[tuple, int] = {}
    for number, cells in rows:
        rel = cells[col["path"]]
        reasons = []
        if not rel:
            problems.append((number, rel, "empty path"))
            continue
        full = os.path.normpath(os.path.join(root, rel))
        if not allow_outside_paths and not _inside(root, full):
            how = "is absolute" if os.path.isabs(rel) else "escapes it via '..'"
            reasons.append(f"path {how} and points outside the manifest folder {root} (allow_outside_paths=False)")
        for name in ["speaker", "birthplace", "sex"]:
            if name in col and not cells[col[name]]:
                reasons.append(f"empty {name}")
        sex = cells[col["sex"]]
        if sex and sex.lower() not in SEX_TOKENS:
            reasons.append(f"unknown sex {sex!r} (use female/f/woman/女 or male/m/man/男)")
        start, err_start = _number(cells[col["start"]], "start") if "start" in col else (math.nan, None)
        end, err_end = _number(cells[col["end"]], "end") if "end" in col else (math.nan, None)
        reasons += [e for e in (err_start, err_end) if e]
        key = (full, start, end)
        if key in seen:
            reasons.append(f"duplicate of row {seen[key]} (same file{' and segment' if 'start' in col or 'end' in col else ''})")
        else:
            seen[key] = number
        problems += [(number, rel, r) for r in reasons]
        record = {
            "path": full, "rel_path": rel, "speaker": cells[col["speaker"]],
            **({"birthplace": cells[col["birthplace"]]} if has_birthplace else {}),
            "sex": SEX_TOKENS.get(sex.lower(), sex), "start": start, "end": end,
            "split": cells[col["split"]] if "split" in col else "",
            **{x: cells[col[x]] for x in extras}, "row": number,
        }
        records[number] = record

    digest = _digest(raw, [r["path"] for r in records.values()])
    # Rows with a label or path problem are not decoded: they are rejected whatever their audio.
    bad_rows = {p[0] for p in problems}
    to_probe = [n for n in records if n not in bad_rows]
    cache_file = _validation_file(cache_dir, digest, sample_rate, n_fft)
    notices: list[str] = []
    probes = _load_validation(cache_file, to_probe) if use_cache else None
    if probes is not None:
        notices.append(f"audio checks reused from {cache_file} (corpus unchanged since they ran)")
    else:
        jobs = [(records[n]["path"], records[n]["start"], records[n]["end"], sample_rate, n_fft) for n in to_probe]
        probes = dict(zip(to_probe, _probe_all(jobs, workers, progress, source.parent.name)))
        if use_cache:
            _save_validation(cache_file, probes)
    for number in to_probe:
        probe = probes[number]
        records[number]["duration"] = probe["duration"]
        if probe["problem"]:
            problems.append((number, records[number]["rel_path"], probe["problem"]))
    problems.sort(key=lambda p: p[0])

    rejected_rows = {p[0] for p in problems}
    # Per-speaker labels and class spellings, judged on the rows that will be used (corpora/labels.py).
    usable = [n for n in sorted(records) if n not in rejected_rows]
    labelled = check_labels(pd.DataFrame([records[n] for n in usable], index=usable), labels,
                            list(speaker_labels), label_conflicts)
    label_problems = [(0, "", p) for p in labelled.problems]
    if (problems and on_bad_file == "stop") or label_problems:
        raise ManifestError(source, (problems if on_bad_file == "stop" else []) + label_problems)
    for number, values in labelled.table[labels].iterrows():
        records[number].update(values.to_dict())
    notices += labelled.notices
    kept = [records[n] for n in sorted(records) if n not in rejected_rows]
    if not kept:
        raise ManifestError(source, problems + [(0, "", "no usable rows left after skipping bad ones")])
    columns = ["path", "rel_path", "speaker"] + (["birthplace"] if has_birthplace else []) + [
        "sex", "start", "end", "split"] + extras + ["row", "duration"]
    table = pd.DataFrame(kept, columns=columns).reset_index(drop=True)
    table[["start", "end", "duration"]] = table[["start", "end", "duration"]].astype(float)
    rejected = pd.DataFrame(problems, columns=["row", "path", "reason"])

    if not has_birthplace:
        notices.append("no 'birthplace' column: the birthplace head and its analysis are unavailable")
    for label in labels:
        classes = table[label].unique()
        if len(classes) == 1:
            notices.append(f"label {label!r} has a single class ({classes[0]!r}); the model skips that head")
    kept_probes = [probes[r] for r in table["row"]]
    rates = pd.Series([p["samplerate"] for p in kept_probes]).value_counts()
    for rate, count in rates.items():
        if rate != sample_rate:
            notices.append(f"{count} clip(s) at {rate} Hz are resampled to {sample_rate} Hz")
    multichannel = sum(p["channels"] > 1 for p in kept_probes)
    if multichannel:
        notices.append(f"{multichannel} clip(s) have more than one channel; they are averaged to mono")
    for extra in extras:
        empty = int((table[extra] == "").sum())
        if empty:
            notices.append(f"column {extra!r} is empty in {empty} row(s); those rows have class ''")
    if len(rejected):
        notices.append(f"{rejected['row'].nunique()} row(s) skipped as bad (see Manifest.rejected)")
    return Manifest(
        table=table, label_columns=labels, rejected=rejected, root=Path(root), source=source,
        digest=digest, name=source.parent.name, notices=notices,
    )
