"""read_manifest on broken corpora: every problem is found up front, named by row and file, at once."""
from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from voxlib.corpora import ManifestError, read_manifest

SR = 16000


def tone(seconds: float = 0.5, sr: int = SR, freq: float = 440.0, amp: float = 0.3) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def write_manifest(root: Path, rows: list[dict], fields=("path", "speaker", "birthplace", "sex")) -> Path:
    manifest = root / "manifest.csv"
    with manifest.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(fields))
        writer.writeheader()
        writer.writerows(rows)
    return manifest


def row(path: str, speaker: str = "s1", birthplace: str = "north", sex: str = "female", **extra) -> dict:
    return {"path": path, "speaker": speaker, "birthplace": birthplace, "sex": sex, **extra}


# Each bad case: (file name, how to create it or None for missing, row overrides, expected reason).
def _truncated_header(path: Path) -> None:
    sf.write(path, tone(), SR)
    path.write_bytes(path.read_bytes()[:30])  # RIFF/WAVE and part of fmt, no data chunk


def _nan_clip(path: Path) -> None:
    wave = tone()
    wave[100:110] = np.nan
    wave[200] = np.inf
    sf.write(path, wave, SR, subtype="FLOAT")


BAD_CASES = {
    "missing": ("missing.wav", None, {}, "missing file"),
    "zero_length": ("zero.wav", lambda p: p.write_bytes(b""), {}, "empty file (0 bytes)"),
    "truncated_header": ("trunc.wav", _truncated_header, {}, "truncated or corrupt WAV header"),
    "not_audio": ("text.wav", lambda p: p.write_bytes(b"this is a text file, not audio\n" * 20), {},
                  "not a readable audio file"),
    "no_samples": ("nosamples.wav", lambda p: sf.write(p, np.zeros(0, np.float32), SR), {}, "no audio samples"),
    "nan": ("nan.wav", _nan_clip, {}, "11 NaN/inf samples"),
    "silence": ("silent.wav", lambda p: sf.write(p, np.zeros(SR, np.float32), SR), {}, "silent (peak -inf dBFS)"),
    "too_short": ("short.wav", lambda p: sf.write(p, tone(300 / SR), SR), {}, "less than one STFT frame (510 samples)"),
    "short_after_resampling": ("short8k.wav", lambda p: sf.write(p, tone(200 / 8000, sr=8000), 8000), {},
                               "400 samples at 16000 Hz, less than one STFT frame"),
    "empty_speaker": ("ok_a.wav", lambda p: sf.write(p, tone(), SR), {"speaker": ""}, "empty speaker"),
    "empty_birthplace": ("ok_b.wav", lambda p: sf.write(p, tone(), SR), {"birthplace": ""}, "empty birthplace"),
    "empty_sex": ("ok_c.wav", lambda p: sf.write(p, tone(), SR), {"sex": ""}, "empty sex"),
    "unknown_sex": ("ok_d.wav", lambda p: sf.write(p, tone(), SR), {"sex": "x"}, "unknown sex 'x'"),
    "escapes_dotdot": ("../outside.wav", lambda p: sf.write(p, tone(), SR), {},
                       "path escapes it via '..' and points outside the manifest folder"),
}


@pytest.fixture
def bad_corpus(tmp_path) -> tuple[Path, dict[str, int]]:
    """Two good clips plus one row per BAD_CASES entry; returns the manifest and case -> row number."""
    root = tmp_path / "corpus"
    root.mkdir()
    rows, numbers = [], {}
    for i in range(2):
        sf.write(root / f"good{i}.wav", tone(freq=300 + 100 * i), SR)
        rows.append(row(f"good{i}.wav", speaker=f"s{i}", sex="female" if i == 0 else "male"))
    for case, (name, make, overrides, _) in BAD_CASES.items():
        if make is not None:
            make(root / name)
        rows.append(row(name, **overrides))
        numbers[case] = len(rows)
    rows.append(row("good0.wav"))  # duplicate of row 1
    numbers["duplicate"] = len(rows)
    return write_manifest(root, rows), numbers


def test_every_problem_is_reported_at_once_with_row_and_file(bad_corpus):
    manifest, numbers = bad_corpus
    with pytest.raises(ManifestError) as info:
        read_manifest(manifest, progress=False)
    err = info.value
    message = str(err)
    assert message.startswith(f"{manifest}: {len(BAD_CASES) + 1} problems")
    for case, (name, _, _, reason) in BAD_CASES.items():
        lines = [l for l in message.splitlines() if l.startswith(f"row {numbers[case]} ({name}): ")]
        assert len(lines) == 1 and reason in lines[0], (case, lines)
    assert f"row {numbers['duplicate']} (good0.wav): duplicate of row 1" in message
    assert not any(line.startswith(("row 1 (", "row 2 (")) for line in message.splitlines())  # good rows
    assert {p[0] for p in err.problems} == set(numbers.values())
    assert isinstance(err, ValueError)


def test_skip_mode_keeps_good_rows_and_lists_rejected(bad_corpus, tmp_path):
    manifest, numbers = bad_corpus
    m = read_manifest(manifest, on_bad_file="skip", progress=False)
    assert m.table["row"].tolist() == [1, 2]
    assert m.table["rel_path"].tolist() == ["good0.wav", "good1.wav"]
    assert sorted(m.rejected["row"]) == sorted(numbers.values())
    assert list(m.rejected.columns) == ["row", "path", "reason"]
    reasons = dict(zip(m.rejected["row"], m.rejected["reason"]))
    for case, (_, _, _, reason) in BAD_CASES.items():
        assert reason in reasons[numbers[case]]
    assert any("skipped as bad" in n for n in m.notices)
    out = m.write_rejected(tmp_path / "run")
    assert out == tmp_path / "run" / "rejected.csv"
    with out.open() as fh:
        written = list(csv.DictReader(fh))
    assert len(written) == len(numbers) and written[0].keys() == {"row", "path", "reason"}


def test_missing_column_names_it_and_lists_columns_found(tmp_path):
    sf.write(tmp_path / "a.wav", tone(), SR)
    manifest = write_manifest(tmp_path, [{"path": "a.wav", "speaker": "s"}], fields=("path", "speaker"))
    for mode in ("stop", "skip"):  # structural problems raise in skip mode too
        with pytest.raises(ManifestError, match=r"missing column 'sex'; columns found: path, speaker"):
            read_manifest(manifest, on_bad_file=mode, progress=False)


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "manifest is empty"),
        (b"path,speaker,birthplace,sex\n", "header but no data rows"),
        (b"path,speaker,sex,speaker\na.wav,s,f,s\n", "duplicate column name(s): speaker"),
        (b"path,speaker,sex,duration\na.wav,s,f,1\n", "column(s) duration are reserved"),
    ],
)
def test_structurally_broken_manifests(tmp_path, content, message):
    (tmp_path / "manifest.csv").write_bytes(content)
    with pytest.raises(ManifestError) as info:
        read_manifest(tmp_path / "manifest.csv", on_bad_file="skip", progress=False)
    assert message in str(info.value)


def test_row_with_wrong_field_count_is_named(tmp_path):
    sf.write(tmp_path / "a.wav", tone(), SR)
    (tmp_path / "manifest.csv").write_text("path,speaker,birthplace,sex\na.wav,s,north,f\nb.wav,s,north\n")
    with pytest.raises(ManifestError, match=r"row 2 \(b.wav\): has 3 fields, the header has 4"):
        read_manifest(tmp_path / "manifest.csv", progress=False)


def test_non_utf8_manifest_is_refused_with_line_and_byte(tmp_path):
    sf.write(tmp_path / "a.wav", tone(), SR)
    text = "path,speaker,birthplace,sex\na.wav,s1,north,f\na.wav,José,north,m\n"
    (tmp_path / "manifest.csv").write_bytes(text.encode("cp1252"))
    with pytest.raises(ManifestError) as info:
        read_manifest(tmp_path / "manifest.csv", on_bad_file="skip", progress=False)
    message = str(info.value)
    assert "not valid UTF-8: line 3, column 10 has byte 0xe9" in message
    assert "iconv" in message


def test_utf16_manifest_is_refused(tmp_path):
    (tmp_path / "manifest.csv").write_bytes("path,speaker,sex\n".encode("utf-16"))
    with pytest.raises(ManifestError, match="UTF-16 encoded; save it as UTF-8"):
        read_manifest(tmp_path / "manifest.csv", progress=False)


def test_non_utf8_file_name_on_disk_is_explained(tmp_path):
    # A Latin-1 name on disk cannot be spelled in a UTF-8 manifest; the error says why it is "missing".
    sf.write(os.fsencode(tmp_path) + b"/caf\xe9.wav", tone(), SR)
    manifest = write_manifest(tmp_path, [row("café.wav")])
    with pytest.raises(ManifestError) as info:
        read_manifest(manifest, progress=False)
    message = str(info.value)
    assert "row 1 (café.wav): missing file" in message
    assert "1 file name(s) that are not valid UTF-8" in message and "caf\\xe9.wav" in message
    assert "convmv" in message


def test_absolute_and_dotdot_paths_outside_are_refused_unless_allowed(tmp_path):
    root = tmp_path / "corpus"
    root.mkdir()
    sf.write(tmp_path / "outside.wav", tone(), SR)
    sf.write(tmp_path / "outside2.wav", tone(), SR)
    sf.write(root / "inside.wav", tone(), SR)
    rows = [row("../outside.wav"), row(str(tmp_path / "outside2.wav"), speaker="s2"),
            row(str(root / "inside.wav"), speaker="s3"), row("sub/../inside.wav", speaker="s4")]
    with pytest.raises(ManifestError) as info:
        read_manifest(write_manifest(root, rows), progress=False)
    message = str(info.value)
    assert "row 1 (../outside.wav): path escapes it via '..' and points outside" in message
    assert f"row 2 ({tmp_path / 'outside2.wav'}): path is absolute and points outside" in message
    assert "row 4 (sub/../inside.wav): duplicate of row 3" in message  # same file, spelled differently
    assert {p[0] for p in info.value.problems} == {1, 2, 4}

    m = read_manifest(write_manifest(root, rows[:3]), allow_outside_paths=True, progress=False)
    assert m.table["path"].tolist() == [str(tmp_path / "outside.wav"), str(tmp_path / "outside2.wav"),
                                        str(root / "inside.wav")]
    assert m.table["rel_path"].tolist()[0] == "../outside.wav"


def test_bad_segments(tmp_path):
    sf.write(tmp_path / "long.wav", tone(2.0), SR)
    fields = ("path", "speaker", "birthplace", "sex", "start", "end")
    rows = [
        row("long.wav", start="0", end="1"),
        row("long.wav", start="1.5", end="2.5"),
        row("long.wav", start="2.5", end="3"),
        row("long.wav", start="1", end="1"),
        row("long.wav", start="1.2", end="0.8"),
        row("long.wav", start="abc", end="1"),
        row("long.wav", start="-1", end="1"),
        row("long.wav", start="1.0", end="1.02"),
        row("long.wav", start="1", end="2.005"),  # within tolerance of the file end
    ]
    with pytest.raises(ManifestError) as info:
        read_manifest(write_manifest(tmp_path, rows, fields), progress=False)
    message = str(info.value)
    expected = {
        2: "end 2.5 s is past the end of the file (2.000 s)",
        3: "start 2.5 s is past the end of the file",
        4: "end 1 s is not after start 1 s",
        5: "end 0.8 s is not after start 1.2 s",
        6: "start 'abc' is not a number of seconds",
        7: "negative start/end",
        8: "too short: 20.0 ms = 320 samples",
    }
    for number, reason in expected.items():
        assert f"row {number} (long.wav): {reason}" in message
    assert {p[0] for p in info.value.problems} == set(expected)


def test_all_rows_bad_in_skip_mode_is_an_error(tmp_path):
    manifest = write_manifest(tmp_path, [row("nope.wav"), row("nope2.wav")])
    with pytest.raises(ManifestError, match="no usable rows left"):
        read_manifest(manifest, on_bad_file="skip", progress=False)


def test_bad_on_bad_file_value():
    with pytest.raises(ValueError, match="on_bad_file"):
        read_manifest("whatever.csv", on_bad_file="ignore")
