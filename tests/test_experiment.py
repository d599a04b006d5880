"""The fold and seed runner: K member run folders inside one pooled folder, disjoint unseen speakers
that cover every eligible speaker once, pooled files equal to the members' rows, resume after an
interruption, and pooled numbers computed correctly on constructed run folders."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import voxlib.record as record
from conftest import LogLines, hooked
from run_folder_factory import make_run_folder
from voxlib import experiment, runfolder
from voxlib.pooled import pooled_over_folds
from voxlib.config import Config, ConfigError
from voxlib.corpora.source import default_run_dir
from voxlib.train import train

FOLDS = 3
POOLED_FILES = (runfolder.POOLED_PREDICTIONS, runfolder.MEMBER_SCORES, runfolder.POOLED)


@pytest.fixture(scope="module")
def settings(tiny_corpus, tmp_path_factory) -> dict:
    cache = tmp_path_factory.mktemp("cache")
    return dict(manifest=str(tiny_corpus), cache_dir=str(cache), width=1 / 16, batch_size=8, epochs=2, threads=2,
                eval_crops=1, grad_log_every=0, precision="fp32", folds=FOLDS)


@pytest.fixture(scope="module")
def pooled(settings, tmp_path_factory) -> Path:
    """One uninterrupted 3-fold experiment (2 epochs per fold) on the tiny corpus."""
    return train(Config(**settings, run_dir=str(tmp_path_factory.mktemp("pooled") / "run")))


def unseen_speakers(run: Path) -> set[str]:
    splits = pd.read_csv(run / runfolder.SPLITS_FILE, keep_default_na=False)
    return set(splits.loc[splits["split"].str.startswith("unseen"), "speaker"])


def test_folds_are_complete_runs_whose_unseen_speakers_cover_every_speaker_once(pooled, tiny_corpus):
    members = [pooled / f"fold{k}" for k in range(FOLDS)]
    assert sorted(p.name for p in pooled.iterdir() if p.is_dir()) == [m.name for m in members]
    held = []
    for k, member in enumerate(members):
        assert (member / runfolder.SUMMARY).is_file() and (member / runfolder.MARKER).is_file()
        config = json.loads((member / runfolder.CONFIG).read_text())
        assert (config["folds"], config["fold"], config["seeds"], config["seed"]) == (FOLDS, k, 1, 0)
        held.append(unseen_speakers(member))
    everyone = set(pd.read_csv(tiny_corpus)["speaker"])  # every class has 4 speakers: all are eligible
    assert sum(len(h) for h in held) == len(everyone) == 12
    assert set().union(*held) == everyone
    assert all(len(h) == 4 for h in held)  # 12 speakers dealt evenly over 3 folds
    assert (pooled / runfolder.MARKER).is_file() and runfolder.is_pooled(pooled)


def test_pooled_predictions_are_the_members_unseen_rows_and_pooled_numbers_follow(pooled):
    stored = pd.read_csv(pooled / runfolder.POOLED_PREDICTIONS, keep_default_na=False)
    parts = []
    for k in range(FOLDS):
        rows = pd.read_csv(pooled / f"fold{k}" / runfolder.PREDICTIONS, keep_default_na=False)
        rows = rows[rows["split"].str.startswith("unseen")]
        parts.append(rows.assign(fold=k, seed=0)[["fold", "seed", *rows.columns]])
    pd.testing.assert_frame_equal(stored, pd.concat(parts, ignore_index=True))
    assert stored["speaker"].nunique() == 12 and stored.groupby("speaker")["fold"].nunique().max() == 1
    summary = json.loads((pooled / runfolder.POOLED).read_text())
    for head in ("birthplace", "sex"):
        expected = pooled_over_folds(stored, head)
        got = summary[head]["unseen"]
        assert got["accuracy"] == pytest.approx(expected["accuracy"])
        assert (got["low"], got["high"], got["n"], got["speakers"]) == \
            (pytest.approx(expected["low"]), pytest.approx(expected["high"]), 72, 12)
        fold_accuracy = [m["accuracy"] for m in got["members"]]
        assert fold_accuracy == pytest.approx([expected["fold_accuracy"][k] for k in range(FOLDS)])
    assert "unseen" not in summary["speaker"]  # an unseen speaker is not a class of the speaker head


def test_an_interrupted_fold_resumes_and_ends_identical(pooled, settings, tmp_path):
    run_dir = tmp_path / "run"
    seen = {"summaries": 0, "fold1_epochs": 0}

    def interrupt(point, detail):
        if point == "write" and detail == runfolder.SUMMARY:
            seen["summaries"] += 1
        elif point == "write" and detail == runfolder.LAST and seen["summaries"] == 1:
            seen["fold1_epochs"] += 1
        elif point == "step" and seen["fold1_epochs"] == 1:
            raise KeyboardInterrupt("stopped during fold 1, epoch 2")

    with hooked(record.FAULT_HOOKS, interrupt), pytest.raises(KeyboardInterrupt):
        train(Config(**settings, run_dir=str(run_dir)))
    assert (run_dir / "fold0" / runfolder.SUMMARY).is_file()
    assert not (run_dir / "fold1" / runfolder.SUMMARY).is_file() and not (run_dir / "fold2").exists()
    assert not (run_dir / runfolder.POOLED).exists()
    fold0_before = (run_dir / "fold0" / runfolder.CHECKPOINTS / runfolder.LAST).stat().st_mtime_ns
    train(Config(**settings, run_dir=str(run_dir)))
    assert (run_dir / "fold0" / runfolder.CHECKPOINTS / runfolder.LAST).stat().st_mtime_ns == fold0_before  # skipped
    for name in POOLED_FILES:
        assert (run_dir / name).read_bytes() == (pooled / name).read_bytes(), name


def test_a_pooled_folder_refuses_other_folds_and_a_single_run_folder_refuses_folds(pooled, settings, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(pooled, copy, ignore=shutil.ignore_patterns("fold*"))
    with pytest.raises(ConfigError, match=r"folds: 3 -> 2"):
        experiment.check_pooled_folder(copy, Config(**settings | {"folds": 2}))
    single = make_run_folder(tmp_path / "single")
    with pytest.raises(ConfigError, match="holds a single run"):
        experiment.check_pooled_folder(single, Config(**settings))


def test_member_names_and_seeds():
    cfg = Config(folds=2, seeds=3, seed=5, run_dir="/r")
    named = [(name, m.fold, m.seed, m.seeds, m.run_dir) for name, m in experiment.members(cfg)]
    assert named[:4] == [("fold0-seed5", 0, 5, 1, "/r/fold0-seed5"), ("fold0-seed6", 0, 6, 1, "/r/fold0-seed6"),
                         ("fold0-seed7", 0, 7, 1, "/r/fold0-seed7"), ("fold1-seed5", 1, 5, 1, "/r/fold1-seed5")]
    assert [n for n, _ in experiment.members(Config(folds=1, seeds=2, run_dir="/r"))] == ["seed0", "seed1"]
    assert [n for n, _ in experiment.members(Config(folds=2, run_dir="/r"))] == ["fold0", "fold1"]
    with pytest.raises(ValueError, match="single run folder"):
        runfolder.member_name(0, 0, 1, 1)


# --- pooled numbers on constructed members whose answer is known -------------------------------------
def constructed_member(root: Path, name: str, fold: int, **accuracies) -> Path:
    """A factory run folder whose unseen speakers carry the fold in their name (folds are disjoint)."""
    folder = make_run_folder(root / name, speakers=(4, 4, 4), unseen=1, utterances=10, held_out=2, **accuracies)
    for file in (runfolder.SPLITS_FILE, runfolder.PREDICTIONS):
        path = folder / file
        path.write_text(path.read_text().replace("_u4", f"_f{fold}u4"))
    (folder / runfolder.MARKER).write_text("vox\n")
    return folder


def test_pooled_unseen_accuracy_and_fold_spread_on_constructed_folds(tmp_path):
    root = runfolder.claim(tmp_path / "pooled")
    cfg = Config(folds=2, run_dir=str(root))
    plan = experiment.members(cfg)
    # 3 unseen speakers x 10 utterances per fold; birthplace right on exactly 10 of 30, then 20 of 30
    constructed_member(root, "fold0", 0, birthplace_unseen=1 / 3, sex_unseen=1.0)
    constructed_member(root, "fold1", 1, birthplace_unseen=2 / 3, sex_unseen=0.6)
    experiment.pool(root, plan)
    summary = json.loads((root / runfolder.POOLED).read_text())
    birthplace = summary["birthplace"]["unseen"]
    assert birthplace["accuracy"] == pytest.approx(30 / 60)
    assert [m["accuracy"] for m in birthplace["members"]] == pytest.approx([1 / 3, 2 / 3])
    assert birthplace["fold_std"] == pytest.approx(np.std([1 / 3, 2 / 3], ddof=1))
    assert (birthplace["n"], birthplace["speakers"], birthplace["folds"], birthplace["seeds"]) == (60, 6, 2, 1)
    assert birthplace["low"] < 0.5 < birthplace["high"]
    assert summary["sex"]["unseen"]["accuracy"] == pytest.approx(48 / 60)  # 30 + 2 x 9 of 60
    assert summary["birthplace"]["seen"]["accuracy"] == 1.0 and summary["birthplace"]["seen"]["std"] is None
    stored = pd.read_csv(root / runfolder.POOLED_PREDICTIONS, keep_default_na=False)
    interval = pooled_over_folds(stored, "birthplace")
    assert (birthplace["low"], birthplace["high"]) == (pytest.approx(interval["low"]), pytest.approx(interval["high"]))


def test_seen_accuracy_over_seeds_is_the_mean_with_its_spread(tmp_path):
    root = runfolder.claim(tmp_path / "pooled")
    cfg = Config(seeds=2, run_dir=str(root))
    plan = experiment.members(cfg)
    # 12 training speakers x 2 held-out utterances in each of seen_val and seen_test: 48 seen rows
    constructed_member(root, "seed0", 0, birthplace_seen=1.0)
    constructed_member(root, "seed1", 0, birthplace_seen=0.5)
    experiment.pool(root, plan)
    seen = json.loads((root / runfolder.POOLED).read_text())["birthplace"]["seen"]
    assert seen["accuracy"] == pytest.approx(0.75) and seen["n"] == 96 and seen["seeds"] == 2
    assert seen["std"] == pytest.approx(np.std([1.0, 0.5], ddof=1))
    assert seen["per_seed"] == {"0": 1.0, "1": 0.5}
    scores = pd.read_csv(root / runfolder.MEMBER_SCORES, keep_default_na=False)
    mine = scores[(scores["head"] == "birthplace") & (scores["group"] == "seen")]
    assert mine["accuracy"].tolist() == [1.0, 0.5] and mine["member"].tolist() == ["seed0", "seed1"]


def test_reference_baselines_pool_every_fold_on_its_own_split(pooled):
    from voxlib.baselines import pooled_reference_baselines, reference_baselines
    from voxlib.runfolder import load_run

    runs = [load_run(pooled / f"fold{k}") for k in range(FOLDS)]
    table = pooled_reference_baselines(runs, encoder=False).table.set_index(["representation", "head", "split"])
    each = pd.concat([reference_baselines(r, encoder=False).table for r in runs])
    unseen = each[(each["head"] == "birthplace") & (each["split"] == "unseen")]
    row = table.loc[("mfcc", "birthplace", "unseen")]
    assert row["n"] == unseen["n"].sum() == 72  # every speaker unseen once: all 72 of their utterances
    assert row["accuracy"] == pytest.approx((unseen["accuracy"] * unseen["n"]).sum() / 72)
    assert ("mfcc", "speaker", "unseen") not in table.index


def pooled_folder(root: Path, unseen: tuple[float, float]) -> runfolder.Pooled:
    """A constructed 2-fold pooled folder: birthplace right on exactly unseen[k] of fold k's 30 unseen rows."""
    cfg = Config(folds=2, epochs=10, run_dir=str(runfolder.claim(root)))  # the factory trains 10 epochs
    plan = experiment.members(cfg)
    for k, accuracy in enumerate(unseen):
        constructed_member(root, f"fold{k}", k, birthplace_unseen=accuracy, birthplace_seen=1.0)
    runfolder.write_json(root, runfolder.EXPERIMENT, {"config": cfg.to_dict(),
                                                      "members": [{"name": n, "fold": m.fold, "seed": m.seed}
                                                                  for n, m in plan]})
    experiment.pool(root, plan)
    return runfolder.load_pooled(root)


def test_the_verdict_uses_the_pooled_numbers_and_interval(tmp_path):
    from voxlib.verdict import measures, verdict_from_measures

    strong = pooled_folder(tmp_path / "strong", (0.8, 1.0))  # chance and majority are 1/3
    m = measures(strong.member(0), pooled=strong, probe=False)
    u = strong.summary["birthplace"]["unseen"]
    assert (m["accuracy_unseen"], m["unseen_low"], m["unseen_high"]) == (u["accuracy"], u["low"], u["high"])
    assert m["accuracy_unseen"] == pytest.approx(54 / 60) and m["speakers_unseen"] == 6 and m["n_unseen"] == 60
    assert m["gap"] == pytest.approx(1.0 - 54 / 60)
    lines = verdict_from_measures(m)
    assert lines[0].startswith("unseen-speaker birthplace is pooled over 2 folds x 1 seed(s)")
    assert f"[{u['low']:.1%}, {u['high']:.1%}]" in lines[0]
    assert any("the whole interval is above majority" in line for line in lines)
    weak = pooled_folder(tmp_path / "weak", (1 / 3, 0.4))
    lines = verdict_from_measures(measures(weak.member(0), pooled=weak, probe=False))
    assert any("little birthplace signal generalises" in line for line in lines)


def test_a_single_run_is_refused_in_a_pooled_folder_and_defaults_never_share_a_folder(tiny_corpus, tmp_path):
    from voxlib.record import TrainingError
    from voxlib.train import train_run

    assert default_run_dir(Config(folds=3)).name == default_run_dir(Config()).name + "-folds3"
    assert default_run_dir(Config(folds=2, seeds=2)).name.endswith("-folds2-seeds2")
    folder = runfolder.claim(tmp_path / "pooled")
    runfolder.write_json(folder, runfolder.EXPERIMENT, {"config": Config(folds=2).to_dict(), "members": []})
    with pytest.raises(TrainingError, match="is a pooled folder"):
        train_run(Config(manifest=str(tiny_corpus), cache_dir=str(tmp_path / "cache"), run_dir=str(folder)))
    assert not (folder / runfolder.CONFIG).exists()


def test_folds_are_refused_for_a_manifest_with_its_own_splits(tiny_corpus, tmp_path):
    table = pd.read_csv(tiny_corpus)
    manifest = tmp_path / "manifest.csv"
    table.assign(path=[str(tiny_corpus.parent / p) for p in table["path"]], split="train").to_csv(manifest, index=False)
    with pytest.raises(ConfigError, match="assigns its own splits"):
        train(Config(manifest=str(manifest), folds=2, run_dir=str(tmp_path / "run")))
    assert not (tmp_path / "run").exists()
    experiment.refuse_fixed_splits(Config(manifest=str(tiny_corpus), folds=2))  # no split column: fine


# --- complete members only; an extension says what it extends and keeps the earlier results ----------
def copy_pooled(pooled: Path, to: Path) -> Path:
    return Path(shutil.copytree(pooled, to, ignore=shutil.ignore_patterns(".vox-run.lock*")))


def test_a_member_missing_a_file_is_completed_before_pooling_and_one_that_cannot_be_is_refused(pooled, settings,
                                                                                               tmp_path):
    run_dir = copy_pooled(pooled, tmp_path / "run")
    (run_dir / "fold1" / runfolder.PREDICTIONS).unlink()
    (run_dir / "fold2" / runfolder.LABELS).write_text("{}")
    (run_dir / "fold0" / runfolder.EMBEDDINGS).write_bytes(b"PK\x03\x04 truncated")
    train(Config(**settings, run_dir=str(run_dir)))
    for member in ("fold0", "fold1", "fold2"):
        assert runfolder.contract_problems(run_dir / member) == {}
    for name in POOLED_FILES:
        assert (run_dir / name).read_bytes() == (pooled / name).read_bytes(), name
    (run_dir / "fold1" / runfolder.METRICS).unlink()
    (run_dir / "fold2" / "checkpoints" / "best.pt").write_bytes(b"\x00" * 100)
    with pytest.raises(runfolder.RunError, match=r"fold1/metrics\.csv: missing; it cannot be rebuilt without "
                                                 r"training again: move .*fold1 away"):
        train(Config(**settings, run_dir=str(run_dir)))
    for name in POOLED_FILES:  # never rewritten from an incomplete member
        assert (run_dir / name).read_bytes() == (pooled / name).read_bytes(), name


def test_raising_epochs_says_what_it_extends_and_keeps_the_pooled_results_until_every_member_is_done(
        pooled, settings, tmp_path):
    run_dir = copy_pooled(pooled, tmp_path / "run")
    longer = Config(**settings | {"epochs": 3}, run_dir=str(run_dir))

    def stop(point, detail):
        if point == "step":
            raise KeyboardInterrupt("stopped in fold0's third epoch")

    with hooked(record.FAULT_HOOKS, stop), LogLines() as lines, pytest.raises(KeyboardInterrupt):
        train(longer)
    assert any(f"extending the finished experiment {run_dir} from 2 to 3 epochs per member (3 trainings)" in line
               for line in lines), lines
    assert any(f"extending finished run {run_dir / 'fold0'} from 2 to 3 epochs" in line for line in lines), lines
    for name in POOLED_FILES:
        assert (run_dir / name).read_bytes() == (pooled / name).read_bytes(), name
    kept = (run_dir / runfolder.POOLED).stat().st_mtime_ns
    for file in (runfolder.SUMMARY, runfolder.PREDICTIONS):
        assert (run_dir / "fold0" / file).read_bytes() == (pooled / "fold0" / file).read_bytes(), file
    with pytest.raises(runfolder.UnfinishedRunError, match=r"extension to 3 epochs per member is not finished "
                                                           r"\(fold0 has 2\)"):
        runfolder.load_pooled(run_dir)
    assert runfolder.load_pooled(run_dir, allow_unfinished=True).summary == runfolder.load_pooled(pooled).summary
    train(longer)  # the same command finishes the extension, then pools the 3-epoch members
    finished = runfolder.load_pooled(run_dir)
    assert all(json.loads((m / runfolder.SUMMARY).read_text())["epochs_trained"] == 3 for m in finished.members)
    assert (run_dir / runfolder.POOLED).stat().st_mtime_ns > kept  # pooled again, from the extended members
