"""voxlib.predict: a trained run used on its own held-out clips, new files and another corpus."""
from __future__ import annotations

import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import soundfile as sf

from conftest import TRAINED_SETTINGS, make_tiny_corpus
from voxlib import evaluate, runfolder
from voxlib.config import Config
from voxlib.model import Discriminator
from voxlib.predict import Classifier, evaluate_manifest
from voxlib.train import train

SETTINGS = TRAINED_SETTINGS


@pytest.fixture(scope="module")
def run(trained_run):
    return trained_run


def test_predicting_held_out_rows_reproduces_predictions_csv(run):
    stored = pd.read_csv(run / "predictions.csv", keep_default_na=False)
    clf = Classifier.from_run(run)
    assert clf.heads == ["speaker", "birthplace", "sex"]
    fresh = clf.predict(stored["path"].tolist(), batch_size=5)
    assert fresh["path"].tolist() == stored["path"].tolist()
    for head in clf.heads:
        assert (fresh[f"{head}_pred"] == stored[f"{head}_pred"]).all(), head
        assert (fresh[f"{head}_top5"] == stored[f"{head}_top5"]).all(), head
        np.testing.assert_allclose(fresh[f"{head}_prob"], stored[f"{head}_prob"], atol=1e-4)


def test_waveform_embeddings_and_the_bare_model(run, tiny_corpus):
    clf = Classifier.from_run(run, checkpoint="last")
    path = next(tiny_corpus.parent.rglob("*.wav"))
    wave, sr = sf.read(path, dtype="float32")
    stereo_48k = np.repeat(np.interp(np.arange(0, len(wave), sr / 48000), np.arange(len(wave)), wave)[:, None], 2, 1)
    a, b = clf.predict_waveform(wave, sr), clf.predict_waveform(stereo_48k, 48000)
    for head in clf.heads:
        assert abs(sum(a[head]["probs"].values()) - 1) < 1e-5 and a[head]["top5"][0] == a[head]["pred"]
        assert abs(a[head]["prob"] - b[head]["prob"]) < 0.05  # resampled and mixed down like training
    features = clf.embed([path, path])
    assert features.shape == (2, Discriminator.from_run(run).out_channels * 16)
    np.testing.assert_allclose(features[0], features[1])


def test_bad_files_are_named_and_skipped(run, tiny_corpus, tmp_path):
    good = next(tiny_corpus.parent.rglob("*.wav"))
    (tmp_path / "empty.wav").write_bytes(b"")
    (tmp_path / "text.wav").write_text("not audio")
    sf.write(tmp_path / "short.wav", np.zeros(100, np.float32) + 0.1, 16000)
    shutil.copy(good, tmp_path / "good.wav")
    frame, rejected, _ = Classifier.from_run(run).run(sorted(str(p) for p in tmp_path.iterdir()))
    assert frame["path"].str.endswith("good.wav").tolist() == [True]
    reasons = dict(zip(rejected["path"].str.rsplit("/", n=1).str[-1], rejected["reason"]))
    assert set(reasons) == {"empty.wav", "text.wav", "short.wav"}
    assert "empty" in reasons["empty.wav"] and "too short" in reasons["short.wav"]


def test_cli_writes_a_new_file_and_refuses_to_overwrite(run, tiny_corpus, tmp_path):
    out = tmp_path / "preds.csv"
    folder = next(p for p in tiny_corpus.parent.iterdir() if p.is_dir())
    cmd = [sys.executable, "-m", "voxlib.predict", "--run-dir", str(run), str(folder), "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    frame = pd.read_csv(out)
    assert len(frame) == len(list(folder.glob("*.wav"))) and {"speaker_pred", "sex_top5"} <= set(frame.columns)
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert again.returncode != 0 and "exists" in again.stderr and len(again.stderr.strip().splitlines()) == 1


def test_evaluating_another_corpus_counts_unknown_labels(run, tmp_path):
    """A second corpus: new recordings of four training speakers (north0/1, south0/1) and two speakers
    of a birthplace the run never saw, as a voice-conversion manifest labelled with target labels."""
    manifest = make_tiny_corpus(tmp_path / "other", birthplaces=("north", "south", "atlantis"),
                                speakers_per_birthplace=2, utterances=3, seed=5)
    folder = evaluate_manifest(Classifier.from_run(run), manifest, tmp_path / "eval", progress=False)
    scores = pd.read_csv(folder / "scores.csv").set_index(["head", "split"])
    assert scores["n"].to_dict() == {("speaker", "seen_test"): 12, ("birthplace", "seen_test"): 12,
                                     ("sex", "seen_test"): 12, ("sex", "unseen_test"): 6}
    assert scores.loc[("speaker", "seen_test"), "chance"] == pytest.approx(1 / 9)  # 9 training speakers
    unknown = pd.read_csv(folder / "unknown_labels.csv").set_index(["head", "label"])["utterances"]
    assert unknown.to_dict() == {("speaker", "atlantis0"): 3, ("speaker", "atlantis1"): 3, ("birthplace", "atlantis"): 6}
    loaded = runfolder.load_run(folder)  # the evaluation folder follows the run-folder contract
    table = evaluate.accuracy_table(loaded, splits=["unseen_test"])
    assert table[["head", "n", "unscored"]].values.tolist() == [["sex", 6, 0]]
    assert (folder / "per_class_birthplace.csv").is_file() and (folder / "summary.json").is_file()
    with pytest.raises(Exception, match="not empty and was not made by vox"):
        evaluate_manifest(Classifier.from_run(run), manifest, tmp_path / "other", progress=False)


def test_a_run_without_a_birthplace_head(tiny_corpus, tmp_path):
    run = train(Config(**SETTINGS, manifest=str(tiny_corpus), cache_dir=str(tmp_path / "cache"),
                       labels="speaker,sex", run_dir=str(tmp_path / "run")))
    clf = Classifier.from_run(run)
    assert clf.heads == ["speaker", "sex"]
    frame = clf.predict([next(tiny_corpus.parent.rglob("*.wav"))])
    assert not any(c.startswith("birthplace") for c in frame.columns)
