"""Reference baselines: MFCC statistics + logistic regression on the run's own split."""
from __future__ import annotations

import json

import pandas as pd
import pytest

from voxlib import baselines
from voxlib.baselines import mfcc_statistics, reference_baselines
from voxlib.config import Config
from voxlib.corpora.manifest import read_manifest
from voxlib.data import build_vocabularies, make_splits
from voxlib.runfolder import Run


@pytest.fixture(scope="module")
def tiny_run(tiny_corpus, tmp_path_factory):
    """The run-folder content baselines read (config, labels, splits.csv) for the tiny corpus' split."""
    manifest = read_manifest(tiny_corpus, progress=False, use_cache=False)
    cfg = Config()
    splits = make_splits(manifest.table, cfg)
    labels = build_vocabularies(manifest.table, splits, cfg.head_names())
    frame = manifest.table[["row", "path", "speaker", "birthplace", "sex"]].assign(split=splits.to_numpy())
    return Run(tmp_path_factory.mktemp("run"), json.loads(json.dumps(cfg.to_dict())), labels, frame,
               pd.DataFrame(), pd.DataFrame())


def test_mfcc_baseline_beats_the_majority_class_on_seen_and_unseen_speakers(tiny_run, monkeypatch):
    monkeypatch.setattr(baselines, "encoder_available", lambda: False)
    result = reference_baselines(tiny_run)
    table = result.table.set_index(["representation", "head", "split"])
    assert list(result.table.columns) == ["representation", "head", "split", "n", "accuracy", "majority"]
    assert ("mfcc", "speaker", "unseen") not in table.index  # an unseen speaker is not a class
    speaker = table.loc[("mfcc", "speaker", "seen")]
    assert speaker["n"] == 18 and speaker["majority"] < 0.15 and speaker["accuracy"] >= speaker["majority"] + 0.5
    # measured: birthplace 1.00 / 0.56 and sex 1.00 / 1.00 (seen / unseen), majority 0.33-0.56
    for head, group, margin in [("birthplace", "seen", 0.5), ("birthplace", "unseen", 0.15), ("sex", "seen", 0.4),
                                ("sex", "unseen", 0.5)]:
        row = table.loc[("mfcc", head, group)]
        assert row["accuracy"] >= row["majority"] + margin, (head, group, row.to_dict())
    assert table.loc[("mfcc", "birthplace", "unseen"), "n"] == 18  # 3 unseen speakers x 6 utterances
    assert result.notes == ["pretrained speaker encoder skipped: the optional extra is not installed "
                            "(pip install -e .[encoder] installs Resemblyzer, whose weights ship in its wheel)"]
    assert reference_baselines(tiny_run, encoder=False).notes == []


def test_mfcc_statistics_shape_and_short_clips():
    import numpy as np

    rng = np.random.default_rng(0)
    assert mfcc_statistics(rng.normal(0, 0.1, 16000).astype(np.float32), 16000).shape == (80,)
    short = mfcc_statistics(rng.normal(0, 0.1, 600).astype(np.float32), 16000)  # 2 frames: no deltas
    assert short.shape == (80,) and np.isfinite(short).all()


def test_a_broken_encoder_install_is_skipped_with_a_note(tiny_run, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_resemblyzer(name, *args, **kwargs):
        if name == "resemblyzer":
            raise ImportError("No module named 'pkg_resources'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(baselines, "encoder_available", lambda: True)
    monkeypatch.setattr(builtins, "__import__", no_resemblyzer)
    result = reference_baselines(tiny_run)
    assert set(result.table["representation"]) == {"mfcc"}
    assert result.notes == ["pretrained speaker encoder skipped: Resemblyzer is installed but cannot be imported "
                            "(No module named 'pkg_resources')"]


def test_encoder_rows_when_the_extra_is_installed(tiny_run):
    pytest.importorskip("resemblyzer")
    table = reference_baselines(tiny_run).table.set_index(["representation", "head", "split"])
    assert set(table.index.get_level_values(0)) == {"mfcc", "encoder"}
    for head in ("speaker", "sex"):
        row = table.loc[("encoder", head, "seen")]
        assert row["accuracy"] >= row["majority"] + 0.3, (head, row.to_dict())
