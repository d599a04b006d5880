"""predict on a pooled folder: every member as an ensemble, or one named member; and predict's command line.

The folder ``make demo`` prints is a pooled one (folds=3), so predict, ``Classifier.from_run`` and the
evaluation of a manifest take it: each member scores the clip, and the probabilities are averaged over
members on the union of their classes (a class a member never trained on counts 0 for it). The
command line has the other commands' help and errors (did-you-mean, one line, exit status),
``--overwrite`` for a file predict wrote, and decides whether a reused speaker name is the same voice.
"""
from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import make_tiny_corpus
from voxlib import predict, runfolder
from voxlib.config import Config
from voxlib.model import Discriminator
from voxlib.predict import Classifier, Clip, PredictError, check_target, evaluate_manifest, written_by_predict
from voxlib.train import train

ROOT = Path(__file__).resolve().parent.parent


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "voxlib.predict", *args], capture_output=True, text=True,
                          timeout=300, cwd=ROOT)


@pytest.fixture(scope="module")
def pooled(tiny_corpus, tmp_path_factory) -> Path:
    """A finished 2-fold experiment, one epoch per fold."""
    root = tmp_path_factory.mktemp("pooled")
    return train(Config(width=1 / 16, batch_size=8, epochs=1, threads=2, grad_log_every=0, eval_crops=2,
                        precision="fp32", folds=2, manifest=str(tiny_corpus), cache_dir=str(root / "cache"),
                        run_dir=str(root / "run")))


@pytest.fixture(scope="module")
def clips(tiny_corpus) -> list[str]:
    return [str(p) for p in sorted(tiny_corpus.parent.rglob("*.wav"))[::9]]


def test_a_pooled_folder_is_an_ensemble_averaging_its_members(pooled, clips):
    clf = Classifier.from_run(pooled)
    members = [Classifier.from_run(pooled, member=name) for name in ("fold0", "fold1")]
    assert [m.name for m in clf.members] == ["fold0", "fold1"]
    speakers = [set(m.vocab["speaker"]) for m in members]
    assert speakers[0] != speakers[1] and set(clf.vocab["speaker"]) == speakers[0] | speakers[1]
    frame, _, _ = clf.run(clips)
    for head in clf.heads:  # the ensemble's probability of its top class, rebuilt from the members' own
        expected = np.zeros((len(clips), len(clf.vocab[head])))
        for m in members:
            x = torch_probs(m, clips)[head]
            for k, name in enumerate(m.vocab[head]):
                expected[:, clf.vocab[head].index(name)] += x[:, k] / 2
        top = expected.argmax(1)
        assert frame[f"{head}_pred"].tolist() == [clf.vocab[head][k] for k in top], head
        np.testing.assert_allclose(frame[f"{head}_prob"], expected[np.arange(len(clips)), top], atol=1e-6)
    one = Classifier.from_run(pooled / "fold1").predict(clips)
    pd.testing.assert_frame_equal(members[1].predict(clips), one)


def torch_probs(clf: Classifier, paths: list[str]) -> dict[str, np.ndarray]:
    """Every class's crop-averaged probability for one network (run() keeps only the top five)."""
    x = torch.stack([clf._load(Clip(p))[0] for p in paths])
    with torch.inference_mode():
        probs, _ = clf._forward(x, False)
    return {h: v.numpy() for h, v in probs.items()}


def test_members_are_named_and_what_an_ensemble_cannot_do_is_said(pooled, clips, trained_run):
    with pytest.raises(PredictError, match=r"no member 'fodl1' \(did you mean fold1\?\); its members are fold0, fold1"):
        Classifier.from_run(pooled, member="fodl1")
    with pytest.raises(PredictError, match="--member names a member of a pooled folder"):
        Classifier.from_run(trained_run, member="fold0")
    with pytest.raises(PredictError, match="trunk features belong to one network, and this is an ensemble of 2"):
        Classifier.from_run(pooled).embed(clips[:1])
    assert Classifier.from_run(pooled, member="fold0").embed(clips[:1]).shape[0] == 1
    with pytest.raises(runfolder.RunError, match=r"a pooled folder holds one discriminator per member \(fold0, fold1\)"):
        Discriminator.from_run(pooled)
    with pytest.raises(runfolder.RunError, match="a pooled folder .* read it with load_pooled"):
        runfolder.load_run(pooled)


def test_the_command_line_takes_a_pooled_folder_and_a_member(pooled, clips, tiny_corpus, tmp_path):
    everyone = cli("--run-dir", str(pooled), *clips)
    assert everyone.returncode == 0, everyone.stderr
    table = pd.read_csv(io.StringIO(everyone.stdout), keep_default_na=False)
    expected = Classifier.from_run(pooled).predict(clips)
    assert table["speaker_pred"].tolist() == expected["speaker_pred"].tolist() and len(table) == len(clips)
    one = cli("--run-dir", str(pooled), "--member", "fold1", *clips)
    assert one.returncode == 0
    direct = Classifier.from_run(pooled / "fold1").predict(clips)
    assert pd.read_csv(io.StringIO(one.stdout), keep_default_na=False)["speaker_pred"].tolist() == \
        direct["speaker_pred"].tolist()
    corpus = pd.read_csv(tiny_corpus).iloc[::6]  # a labelled corpus scored by the ensemble
    (tmp_path / "corpus").mkdir()
    for rel in corpus["path"]:
        (tmp_path / "corpus" / rel).parent.mkdir(exist_ok=True)
        shutil.copy(tiny_corpus.parent / rel, tmp_path / "corpus" / rel)
    corpus.to_csv(tmp_path / "corpus" / "manifest.csv", index=False)
    folder = evaluate_manifest(Classifier.from_run(pooled), tmp_path / "corpus" / "manifest.csv", tmp_path / "eval",
                               progress=False)
    record = runfolder.read_json(folder / runfolder.CONFIG)["evaluation"]
    assert record["members"] == ["fold0", "fold1"] and len(record["checkpoint"]) == 2
    scores = pd.read_csv(folder / "scores.csv")
    assert scores["n"].gt(0).all() and set(scores["split"]) == {"seen_test"}  # every speaker was trained in a fold


def test_an_unfinished_pooled_folder_is_refused_and_a_missing_one_is_named_missing(pooled, tmp_path, clips):
    copy = Path(shutil.copytree(pooled, tmp_path / "copy", ignore=shutil.ignore_patterns(".vox-run.lock*")))
    (copy / runfolder.POOLED).unlink()
    proc = cli("--run-dir", str(copy), clips[0])
    assert proc.returncode == 1 and "unfinished run: its members are not all trained and pooled" in proc.stderr
    assert Classifier.from_run(copy, allow_unfinished=True).members
    gone = cli("--run-dir", str(tmp_path / "gone"), clips[0])
    assert gone.returncode == 1 and gone.stderr.strip() == f"error: {tmp_path / 'gone'}: no such folder"


# --- the command line: help, errors, overwrite ----------------------------------------------------------
def usage(capsys, *argv: str) -> tuple[int, str, str]:
    """predict's argument handling in this process: (exit status, stdout, stderr)."""
    with pytest.raises(SystemExit) as stopped:
        predict.main(list(argv))
    out = capsys.readouterr()
    return stopped.value.code, out.out, out.err


def test_help_and_unknown_flags_come_from_the_shared_machinery(trained_run, capsys):
    status, page, _ = usage(capsys, "--help")
    assert status == 0
    for text in ("--member NAME", "--allow-unfinished", "--overwrite", "--speakers {voice,name}", "exit status: 0",
                 "every command:"):
        assert text in page, text
    for typo, meant in (("--chekpoint", "--checkpoint"), ("--overwrit", "--overwrite"), ("--membr", "--member"),
                        ("--run_dir", "--run-dir")):
        status, _, err = usage(capsys, "--run-dir", str(trained_run), typo, "x", "a.wav")
        assert status == 2 and err.count("\n") == 1 and f"unknown flag {typo} (did you mean {meant}?)" in err, err
    for args, message in ((["--run-dir", str(trained_run), "--batch-size", "0", "a.wav"], "must be at least 1, got 0"),
                          (["a.wav"], "the following arguments are required: --run-dir")):
        status, _, err = usage(capsys, *args)
        assert status == 2 and message in err and err.count("\n") == 1, err
    proc = cli("--run-dir", str(trained_run))  # the whole command: run_command's one line and status
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "give audio PATHs or --manifest" in proc.stderr


def test_overwrite_replaces_only_a_file_predict_wrote(trained_run, clips, tmp_path):
    out, npz = tmp_path / "preds.csv", tmp_path / "trunk.npz"
    first = cli("--run-dir", str(trained_run), *clips, "--out", str(out), "--embeddings", str(npz))
    assert first.returncode == 0, first.stderr
    again = cli("--run-dir", str(trained_run), *clips[:1], "--out", str(out))
    assert again.returncode == 1 and again.stderr.count("\n") == 1
    assert f"error: {out} exists; pass --overwrite to replace a file predict wrote" in again.stderr
    assert written_by_predict(out) and written_by_predict(npz)
    mine = {tmp_path / "notes.csv": b"path,comment\na.wav,mine\n", tmp_path / "results.npz": b"PK\x03\x04 not ours",
            tmp_path / "table.csv": b"path,speaker_pred,comment\n", tmp_path / "bytes.csv": bytes(range(256))}
    for path, data in mine.items():
        path.write_bytes(data)
        with pytest.raises(PredictError, match="exists and is not a file predict wrote"):
            check_target(str(path), overwrite=True)
        assert path.read_bytes() == data
    (tmp_path / "folder.csv").mkdir()
    targets = [tmp_path / "folder.csv"]
    if hasattr(os, "mkfifo"):
        os.mkfifo(tmp_path / "pipe.csv")  # never opened: a reader would block
        targets.append(tmp_path / "pipe.csv")
    for path in targets:
        with pytest.raises(PredictError, match="is not a file predict wrote"):
            check_target(str(path), overwrite=True)
    foreign = cli("--run-dir", str(trained_run), clips[0], "--out", str(tmp_path / "notes.csv"), "--overwrite")
    assert foreign.returncode == 1 and "is not a file predict wrote" in foreign.stderr
    replaced = cli("--run-dir", str(trained_run), *clips[:1], "--out", str(out), "--embeddings", str(npz),
                   "--overwrite")
    assert replaced.returncode == 0, replaced.stderr
    assert len(pd.read_csv(out)) == 1 and np.load(npz)["features"].shape[0] == 1


# --- a corpus that reuses the training speakers' names ------------------------------------------------
@pytest.fixture(scope="module")
def voices(tmp_path_factory) -> Path:
    """A run that knows its four voices: 2 birthplaces x 2 speakers, 16 utterances each, 6 epochs."""
    root = tmp_path_factory.mktemp("voices")
    manifest = make_tiny_corpus(root / "corpus", birthplaces=("north", "south"), speakers_per_birthplace=2,
                                utterances=16, seconds=1.2)
    return train(Config(width=1 / 16, batch_size=8, lr=1e-3, epochs=6, threads=2, grad_log_every=0, eval_crops=1,
                        precision="fp32", manifest=str(manifest), cache_dir=str(root / "cache"),
                        run_dir=str(root / "run")))


def relabelled(run: Path, folder: Path, rename: dict[str, str]) -> Path:
    """A manifest of the run's own held-out recordings with speaker names replaced (birthplace, sex kept)."""
    rows = pd.read_csv(run / runfolder.PREDICTIONS, keep_default_na=False)
    rows = rows[rows["split"].str.startswith("seen")]
    folder.mkdir()
    for path in rows["path"]:  # a corpus of its own: the files inside its folder
        shutil.copy(path, folder / Path(path).name)
    table = pd.DataFrame({"path": [Path(p).name for p in rows["path"]], "speaker": rows["speaker"].map(lambda s: rename.get(s, s)),
                          "birthplace": rows["birthplace_true"], "sex": rows["sex_true"]})
    table.to_csv(folder / "manifest.csv", index=False)
    return folder / "manifest.csv"


def test_a_reused_name_is_judged_by_voice(voices, tmp_path):
    own = pd.read_csv(voices / runfolder.PREDICTIONS, keep_default_na=False)
    seen = own[own["split"].str.startswith("seen")]
    assert (seen["speaker_pred"] == seen["speaker"]).mean() >= 0.75  # the run does recognise its voices
    clf = Classifier.from_run(voices)
    same = evaluate_manifest(clf, relabelled(voices, tmp_path / "same", {}), tmp_path / "eval_same", progress=False)
    scores = pd.read_csv(same / "scores.csv").set_index(["head", "split"])
    assert ("speaker", "seen_test") in scores.index and ("sex", "unseen_test") not in scores.index
    swapped = {"north0": "south0", "south0": "north0", "north1": "south1", "south1": "north1"}  # other voices
    other = relabelled(voices, tmp_path / "other", swapped)
    proc = cli("--run-dir", str(voices), "--manifest", str(other), "--out-dir", str(tmp_path / "eval_other"),
               "--speakers", "voice")
    assert proc.returncode == 0, proc.stderr
    assert "4 speaker(s) share a name with a training speaker but the run does not recognise their voice: north0, " \
           "north1, south0, south1; scored as unseen speakers (by voice" in proc.stderr
    scores = pd.read_csv(tmp_path / "eval_other" / "scores.csv")
    assert set(scores["split"]) == {"unseen_test"} and "speaker" not in set(scores["head"])
    unknown = pd.read_csv(tmp_path / "eval_other" / "unknown_labels.csv")
    assert unknown.empty  # known names with other voices are not 'unknown labels'
    by_name = cli("--run-dir", str(voices), "--manifest", str(other), "--out-dir", str(tmp_path / "eval_name"))
    assert by_name.returncode == 0 and "4 speaker(s) share a name" in by_name.stderr  # the default: names, warned
    assert "scored as the training speakers by name" in by_name.stderr and "--speakers voice" in by_name.stderr
    named = pd.read_csv(tmp_path / "eval_name" / "scores.csv").set_index(["head", "split"])
    assert named.loc[("speaker", "seen_test"), "accuracy"] <= 0.25  # the names were wrong: low, and now visible


def test_an_undertrained_run_keeps_names_it_cannot_judge(trained_run, tmp_path):
    """The shared 1-epoch run barely tells its speakers apart: no name is judged, all stay seen."""
    manifest = make_tiny_corpus(tmp_path / "other", birthplaces=("north",), speakers_per_birthplace=4, utterances=2,
                                seed=9)
    folder = evaluate_manifest(Classifier.from_run(trained_run), manifest, tmp_path / "eval", progress=False,
                               speakers="voice")
    rows = pd.read_csv(folder / "predictions.csv", keep_default_na=False)
    trained = set(pd.read_csv(trained_run / runfolder.SPLITS_FILE).query("split == 'train'")["speaker"])
    named = rows["speaker"].isin(trained)
    assert named.sum() >= 6 and (rows.loc[named, "split"] == "seen_test").all()
