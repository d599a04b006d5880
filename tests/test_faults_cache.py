"""The feature cache after it is built: any change to its bytes or index is found before a batch sees it.

Structural damage (index and file disagree) is found when the cache is opened and rebuilt; changed
frames fail their row's checksum on first read with an error naming the cache and the row.
"""
from __future__ import annotations

import logging
import shutil
import subprocess
import sys
import threading
import time

import numpy as np
import pandas as pd
import pytest

from conftest import make_tiny_corpus
from voxlib import features
from voxlib.config import Config
from voxlib.corpora.manifest import read_manifest
from voxlib.features import FeatureCache, FeatureCacheError


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A small corpus, its manifest and a freshly built cache (copied per test before damaging it)."""
    root = tmp_path_factory.mktemp("faults_cache")
    manifest = read_manifest(make_tiny_corpus(root / "corpus", speakers_per_birthplace=2, utterances=3),
                             progress=False)
    cfg = Config(cache_dir=str(root / "pristine"))
    cache = FeatureCache(manifest, cfg, workers=1, progress=False)
    return manifest, cache, [cache.get(i) for i in range(len(cache))]


@pytest.fixture()
def damaged(built, tmp_path):
    """(manifest, cfg, cache folder) of a private copy of the built cache."""
    manifest, cache, _ = built
    cfg = Config(cache_dir=str(tmp_path / "cache"))
    shutil.copytree(cache.path, tmp_path / "cache" / cache.key)
    return manifest, cfg, tmp_path / "cache" / cache.key


def frame_bytes(cache_dir, index_row: int) -> tuple[int, int]:
    """(byte offset, byte length) of one row's frames in features.f16."""
    index = pd.read_csv(cache_dir / "index.csv")
    return int(index["offset"][index_row]) * 512, int(index["n_frames"][index_row]) * 512


def write_at(path, position: int, data: bytes) -> None:
    with open(path, "r+b") as fh:
        fh.seek(position)
        fh.write(data)


def read_all(cache) -> None:
    for i in range(len(cache)):
        cache.get(i)


# --- content: found on first read ------------------------------------------------------------------
@pytest.mark.parametrize("damage", ["zeroed", "nan", "one_bit", "inf_tail", "other_row_bytes"])
def test_changed_frames_fail_their_row_with_the_cache_and_row_named(damaged, built, damage):
    manifest, cfg, folder = damaged
    start, length = frame_bytes(folder, 5)
    data = bytearray((folder / "features.f16").read_bytes()[start: start + length])
    if damage == "zeroed":
        data[100:4100] = bytes(4000)
    elif damage == "nan":
        data[1024:1026] = np.array([np.nan], np.float16).tobytes()
    elif damage == "one_bit":
        data[len(data) // 2] ^= 0x01
    elif damage == "inf_tail":
        data[-2:] = np.array([np.inf], np.float16).tobytes()
    else:  # row 6's leading bytes copied over row 5's
        other, _ = frame_bytes(folder, 6)
        data[:2048] = (folder / "features.f16").read_bytes()[other: other + 2048]
    write_at(folder / "features.f16", start, bytes(data))
    cache = FeatureCache(manifest, cfg, workers=1, progress=False)  # structure intact: no rebuild
    assert cache.path == folder
    for i in (0, 4, 6, len(cache) - 1):  # undamaged rows are served unchanged
        assert np.array_equal(cache.get(i), built[2][i])
    with pytest.raises(FeatureCacheError) as info:
        cache.get(5)
    message = str(info.value)
    assert str(folder) in message and "row 5 (manifest row 6)" in message and "checksum" in message


def test_rows_whose_places_were_swapped_in_the_index_fail_their_checksum(damaged):
    manifest, cfg, folder = damaged
    index = pd.read_csv(folder / "index.csv")
    # Swap where rows 2 and 3 point, with their lengths and checksums, but keep the row column: the
    # index still tiles the file and names the right manifest rows.
    index.loc[[2, 3], ["offset", "n_frames", "crc32"]] = index.loc[[3, 2], ["offset", "n_frames", "crc32"]].to_numpy()
    index.to_csv(folder / "index.csv", index=False)
    cache = FeatureCache(manifest, cfg, workers=1, progress=False)
    assert cache.path == folder
    with pytest.raises(FeatureCacheError, match=r"row 2 \(manifest row 3\)"):
        cache.get(2)
    with pytest.raises(FeatureCacheError, match=r"row 3 \(manifest row 4\)"):
        cache.get(3)


def test_every_row_is_checked_once_per_process_and_verify_off_skips_it(damaged, built, monkeypatch):
    manifest, cfg, folder = damaged
    cache = FeatureCache(manifest, cfg, workers=1, progress=False)
    calls = []
    real = features.row_checksum
    monkeypatch.setattr(features, "row_checksum", lambda frames, i: calls.append(i) or real(frames, i))
    for _ in range(3):  # three epochs
        read_all(cache)
    assert sorted(calls) == list(range(len(cache)))
    reopened = FeatureCache(manifest, cfg, workers=1, progress=False)  # e.g. the next process
    calls.clear()
    read_all(reopened)
    assert sorted(calls) == list(range(len(cache)))
    unchecked = FeatureCache(manifest, cfg, workers=1, progress=False, verify=False)
    calls.clear()
    read_all(unchecked)
    assert calls == [] and np.array_equal(unchecked.get(1), built[2][1])


# --- structure: found when opened, then rebuilt ----------------------------------------------------
def _swap_index_lines(index):
    index.iloc[[2, 3]] = index.iloc[[3, 2]].to_numpy()
    return index


def _offset_past_end(index):
    index.loc[len(index) - 1, "offset"] += 10_000
    return index


def _shifted_offset(index):
    index.loc[4, "offset"] += 1
    return index


def _length_grown(index):
    index.loc[0, "n_frames"] += 3
    return index


def _negative_offset(index):
    index.loc[0, "offset"] = -1
    return index


def _row_dropped(index):
    return index.drop(index=7)


def _checksum_column_lost(index):
    return index.drop(columns="crc32")


def _text_in_offset(index):
    index["offset"] = index["offset"].astype(str)
    index.loc[1, "offset"] = "12a"
    return index


@pytest.mark.parametrize("damage", [_swap_index_lines, _offset_past_end, _shifted_offset, _length_grown,
                                    _negative_offset, _row_dropped, _checksum_column_lost, _text_in_offset])
def test_an_index_that_disagrees_with_the_file_is_found_on_open_and_rebuilt(damaged, built, damage, caplog):
    manifest, cfg, folder = damaged
    damage(pd.read_csv(folder / "index.csv")).to_csv(folder / "index.csv", index=False)
    with caplog.at_level(logging.WARNING, logger="voxlib.features"):
        cache = FeatureCache(manifest, cfg, workers=1, progress=False)
    assert f"feature cache {folder} is damaged: " in caplog.text and "rebuilding it" in caplog.text
    for i in range(len(cache)):
        assert np.array_equal(cache.get(i), built[2][i]), i
    assert sorted(p.name for p in folder.parent.iterdir()) == [".locks", folder.name]


@pytest.mark.parametrize("damage", ["truncated", "grown", "meta_rows", "index_garbage", "index_missing"])
def test_file_sizes_and_meta_that_disagree_are_rebuilt(damaged, built, damage, caplog):
    manifest, cfg, folder = damaged
    if damage == "truncated":
        with open(folder / "features.f16", "r+b") as fh:
            fh.truncate(fh.seek(0, 2) - 512)
    elif damage == "grown":
        with open(folder / "features.f16", "ab") as fh:
            fh.write(bytes(512))
    elif damage == "meta_rows":
        meta = (folder / "meta.json").read_text().replace('"n_rows": 18', '"n_rows": 17')
        (folder / "meta.json").write_text(meta)
    elif damage == "index_garbage":
        (folder / "index.csv").write_bytes(b"\x00\xff\"unterminated\n1,2")
    else:
        (folder / "index.csv").unlink()
    with caplog.at_level(logging.WARNING, logger="voxlib.features"):
        cache = FeatureCache(manifest, cfg, workers=1, progress=False)
    assert f"feature cache {folder} is " in caplog.text and "rebuilding it" in caplog.text
    read_all(cache)
    assert np.array_equal(cache.get(17), built[2][17])


# --- one builder per key ---------------------------------------------------------------------------
HOLD_LOCK = """
import sys, time
from voxlib.lock import exclusive_lock
with exclusive_lock(sys.argv[1], "test"):
    print("held", flush=True)
    time.sleep(600)
"""


def test_a_second_builder_waits_naming_the_holder_and_a_dead_holder_frees_the_key(built, tmp_path, caplog):
    manifest, cache, spectrograms = built
    cfg = Config(cache_dir=str(tmp_path / "cache"))
    lock = tmp_path / "cache" / ".locks" / f"{cache.key}.lock"
    lock.parent.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(lock)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        result = {}

        def build():
            result["cache"] = FeatureCache(manifest, cfg, workers=1, progress=False)

        with caplog.at_level(logging.WARNING, logger="voxlib.features"):
            waiter = threading.Thread(target=build)
            waiter.start()
            for _ in range(200):  # until the waiter has said whom it waits for
                if "waiting for that build" in caplog.text:
                    break
                time.sleep(0.05)
            assert f"PID {holder.pid} on " in caplog.text and "waiting for that build" in caplog.text
            assert waiter.is_alive() and not (tmp_path / "cache" / cache.key).exists()
            holder.kill()  # the holder dies without releasing: the kernel frees its lock
            holder.wait()
            waiter.join(60)
        assert not waiter.is_alive()
        assert np.array_equal(result["cache"].get(3), spectrograms[3])
    finally:
        holder.kill()
        holder.wait()
