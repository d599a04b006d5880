"""Class 7: corpus metadata that is not a regular file of sane size is named and skipped, never read.

Every adapter and the manifest reader meet, where they expect a metadata file, each of: a FIFO (a
blocking open would hang forever), a symlink to /dev/zero (a read would never end), a sparse file
larger than the cap, a folder and a Unix socket. Required files stop the adapter with a CorpusError
naming the file and what it is; optional ones (a CSJ talk XML or RDB export, a JVS transcript list)
become a rejected.csv line and the rest of the corpus is built. An alarm turns a hang into a failure.
"""
from __future__ import annotations

import csv
import os
import shutil
import signal
import socket
from pathlib import Path

import pytest

from corpus_fixtures import (make_accent_archive_tree, make_common_voice_tree, make_csj_tree, make_jvs_tree,
                             make_vctk_tree, write_tone)
from voxlib.corpora import ManifestError, read_manifest
from voxlib.corpora.common import ADAPTERS, CorpusError
from voxlib.fileio import MAX_METADATA_BYTES, MAX_STREAMED_BYTES, file_kind

KINDS = {  # kind -> words the message must hold
    "fifo": "a FIFO (named pipe)",
    "symlink_to_dev_zero": "a symlink to a character device",
    "oversized": "bytes, more than the",
    "folder": "a folder",
    "socket": "a socket",
}
HANG_S = 20


@pytest.fixture(autouse=True)
def no_hang():
    """A blocking open or an endless read raises instead of hanging the suite."""
    def stop(signum, frame):
        raise TimeoutError(f"still reading after {HANG_S} s: blocked on a non-regular file")

    previous = signal.signal(signal.SIGALRM, stop)
    signal.alarm(HANG_S)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


@pytest.fixture
def keep_sockets():
    held: list[socket.socket] = []
    yield held
    for s in held:
        s.close()


def replace_with(path: Path, kind: str, keep_sockets: list, cap: int = MAX_METADATA_BYTES) -> None:
    """Put ``kind`` where the regular file ``path`` was."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "symlink_to_dev_zero":
        path.symlink_to("/dev/zero")
    elif kind == "oversized":
        with open(path, "wb") as fh:
            fh.truncate(cap + 1)  # sparse: no disk used, but its size says what reading it would cost
    elif kind == "folder":
        path.mkdir()
    elif kind == "socket":
        server = socket.socket(socket.AF_UNIX)
        here = os.getcwd()
        os.chdir(path.parent)  # a relative name keeps within the 108-byte limit of a socket path
        try:
            server.bind(path.name)
        finally:
            os.chdir(here)
        keep_sockets.append(server)
    assert (file_kind(path) is None) == (kind == "oversized")


def rejected_rows(summary) -> list[dict[str, str]]:
    with Path(summary.rejected_csv).open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


# --- required metadata: the adapter stops, naming the file and what it is ------------------------
REQUIRED = {  # adapter -> (tree builder, the file it cannot go without, options, size cap)
    "vctk": (make_vctk_tree, "speaker-info.txt", {}, MAX_METADATA_BYTES),
    "accent_archive": (make_accent_archive_tree, "speakers_all.csv", {"window": 1.0}, MAX_METADATA_BYTES),
    "common_voice": (make_common_voice_tree, "validated.tsv", {}, MAX_STREAMED_BYTES),
    "jvs": (make_jvs_tree, "gender_f0range.txt", {}, MAX_METADATA_BYTES),
}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("adapter", REQUIRED)
def test_required_metadata_that_is_not_a_regular_file_is_named_and_not_read(adapter, kind, tmp_path, keep_sockets):
    make_tree, name, options, cap = REQUIRED[adapter]
    root = make_tree(tmp_path / adapter)
    replace_with(root / name, kind, keep_sockets, cap)
    with pytest.raises(CorpusError) as caught:
        ADAPTERS[adapter](root, tmp_path / "out" / "manifest.csv", progress=False, **options)
    message = str(caught.value)
    assert str(root / name) in message and KINDS[kind] in message and "\n" not in message
    assert not (tmp_path / "out" / "manifest.csv").exists()


# --- optional metadata: a rejected.csv line, the rest of the corpus is built ---------------------
OPTIONAL = {  # case -> (adapter, tree builder, file, options, utterances still built)
    "csj_talk_xml": ("csj", make_csj_tree, "XML/BaseXML/core/A01F0002.xml", {}, 4),
    "csj_rdb_export": ("csj", make_csj_tree, "RDB/infoSpeaker.tsv", {}, 4),
    "jvs_transcripts": ("jvs", make_jvs_tree, "jvs001/parallel100/transcripts_utf8.txt", {}, 8),
}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("case", OPTIONAL)
def test_optional_metadata_that_is_not_a_regular_file_is_skipped_with_a_line(case, kind, tmp_path, keep_sockets):
    adapter, make_tree, name, options, kept = OPTIONAL[case]
    root = make_tree(tmp_path / adapter)
    replace_with(root / name, kind, keep_sockets)
    summary = ADAPTERS[adapter](root, tmp_path / "out" / "manifest.csv", progress=False, **options)
    assert summary.utterances == kept
    lines = [r for r in rejected_rows(summary) if r["reason"] == "metadata file not read"]
    assert len(lines) == 1 and lines[0]["path"].endswith(Path(name).name)
    assert str(root / name) in lines[0]["detail"] and KINDS[kind] in lines[0]["detail"]


# --- the manifest reader: the manifest itself and the audio its rows name ------------------------
def small_manifest(folder: Path) -> Path:
    for i, sex in enumerate(["female", "male", "female", "male"]):
        write_tone(folder / f"clip{i}.wav", 0.5, 150 + 30 * i, seed=i)
    rows = ["path,speaker,sex"] + [f"clip{i}.wav,s{i},{sex}" for i, sex in enumerate(["f", "m", "f", "m"])]
    manifest = folder / "manifest.csv"
    manifest.write_text("\n".join(rows) + "\n", "utf-8")
    return manifest


@pytest.mark.parametrize("kind", KINDS)
def test_a_manifest_that_is_not_a_regular_file_is_named_and_not_read(kind, tmp_path, keep_sockets):
    manifest = small_manifest(tmp_path)
    replace_with(manifest, kind, keep_sockets)
    with pytest.raises(ManifestError) as caught:
        read_manifest(manifest, progress=False, use_cache=False)
    assert str(manifest) in str(caught.value) and KINDS[kind] in str(caught.value)


@pytest.mark.parametrize("kind", [k for k in KINDS if k != "oversized"])  # audio has no size cap
def test_a_row_whose_audio_is_not_a_regular_file_is_rejected_with_what_it_is(kind, tmp_path, keep_sockets):
    manifest = small_manifest(tmp_path)
    replace_with(tmp_path / "clip2.wav", kind, keep_sockets)
    table = read_manifest(manifest, on_bad_file="skip", progress=False, use_cache=False)
    assert list(table.table["rel_path"]) == ["clip0.wav", "clip1.wav", "clip3.wav"]
    [reason] = table.rejected["reason"]
    assert reason.startswith("not a regular file") and KINDS[kind] in reason


# --- XML that attacks the parser --------------------------------------------------------------
HOSTILE_XML = {
    "billion_laughs": ('<?xml version="1.0"?>\n<!DOCTYPE Talk [\n <!ENTITY a "ha">\n'
                       + "".join(f' <!ENTITY {b} "{("&" + a + ";") * 10}">\n'
                                 for a, b in zip("abcdefgh", "bcdefghi"))
                       + ']>\n<Talk TalkID="A09M0009" SpeakerID="0009" SpeakerSex="男" SpeakerBirthPlace="&i;">'
                         '<IPU IPUID="1" IPUStartTime="0.1" IPUEndTime="0.9"/></Talk>\n'),
    "external_entity": ('<?xml version="1.0"?>\n<!DOCTYPE Talk [<!ENTITY secret SYSTEM "file:///etc/passwd">]>\n'
                        '<Talk TalkID="A09M0009" SpeakerID="0009" SpeakerSex="男" SpeakerBirthPlace="&secret;">'
                        '<IPU IPUID="1" IPUStartTime="0.1" IPUEndTime="0.9"/></Talk>\n'),
    "external_parameter_entity": ('<?xml version="1.0"?>\n<!DOCTYPE Talk [<!ENTITY % p SYSTEM "http://example.invalid/x.dtd"> %p;]>\n'
                                  '<Talk TalkID="A09M0009" SpeakerID="0009" SpeakerSex="男" SpeakerBirthPlace="東京都">'
                                  '<IPU IPUID="1" IPUStartTime="0.1" IPUEndTime="0.9"/></Talk>\n'),
}


@pytest.mark.parametrize("attack", HOSTILE_XML)
def test_csj_refuses_entity_bombs_and_external_entities_naming_the_file(attack, tmp_path):
    root = make_csj_tree(tmp_path / "csj")
    hostile = root / "XML" / "BaseXML" / "core" / "A09M0009.xml"
    hostile.write_text(HOSTILE_XML[attack], "utf-8")
    write_tone(root / "WAV" / "core" / "A09M0009.wav", 1.0, 140, seed=9)
    summary = ADAPTERS["csj"](root, tmp_path / "out" / "manifest.csv", progress=False)
    assert summary.utterances == 6 and "0009" not in summary.classes["speaker"]
    [line] = [r for r in rejected_rows(summary) if r["path"].endswith("A09M0009.xml")]
    assert line["reason"].startswith("talk XML refused") and str(hostile) in line["detail"]


def test_csj_reads_a_talk_xml_with_a_plain_doctype(tmp_path):
    """Refusing entities must not refuse XML that only names its DTD."""
    root = make_csj_tree(tmp_path / "csj")
    (root / "XML" / "BaseXML" / "core" / "A09M0009.xml").write_text(
        '<?xml version="1.0"?>\n<!DOCTYPE Talk SYSTEM "csj.dtd">\n'
        '<Talk TalkID="A09M0009" SpeakerID="0009" SpeakerSex="男" SpeakerBirthPlace="東京都">'
        '<IPU IPUID="1" IPUStartTime="0.1" IPUEndTime="0.9"/></Talk>\n', "utf-8")
    write_tone(root / "WAV" / "core" / "A09M0009.wav", 1.0, 140, seed=9)
    summary = ADAPTERS["csj"](root, tmp_path / "out" / "manifest.csv", progress=False)
    assert summary.utterances == 7 and "0009" in summary.classes["speaker"]
