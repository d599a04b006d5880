"""python -m voxlib.remedies: variants on the same speaker folds, a table beside the baselines, resumable."""
from __future__ import annotations

import json

import pandas as pd
import pytest

from voxlib import remedies, runfolder
from voxlib.config import ACCENT_PRESET, Config, ConfigError

SETTINGS = dict(width=1 / 16, batch_size=8, lr=1e-4, epochs=1, threads=2, grad_log_every=0, eval_crops=2,
                precision="fp32")


def test_each_remedy_alone_takes_the_presets_value_and_the_preset_comes_last():
    found = {name: changes for name, _, changes in remedies.variants()}
    assert list(found)[0] == "seed" and found["seed"] == {} and found["accent"] == {"preset": "accent"}
    alone = {k: v for name, changes in found.items() if name not in ("seed", "accent") for k, v in changes.items()}
    for name, value in ACCENT_PRESET.items():
        assert alone[name] == value, name  # a remedy studied alone is the one the preset uses
    assert found["adversary"]["accent_branch"] >= 1  # the adversary acts on a branch of its own


def test_every_variant_starts_from_the_same_base_without_a_preset(tmp_path):
    base = Config(**SETTINGS, perturb_pitch=0.5)  # a remedy in the base is not kept: "seed" means none
    plan = remedies.study_configs(base, 2, tmp_path)
    seed = next(cfg for name, _, cfg in plan if name == "seed")
    accent = next(cfg for name, _, cfg in plan if name == "accent")
    assert seed.perturb_pitch == 0 and seed.preset == "" and seed.folds == 2 and seed.width == 1 / 16
    assert accent.preset == "accent" and all(getattr(accent, k) == v for k, v in ACCENT_PRESET.items())
    assert {cfg.run_dir for _, _, cfg in plan} == {str(tmp_path / name) for name, _, _ in remedies.variants()}
    with pytest.raises(ConfigError, match="unknown \\['nope'\\]"):
        remedies.study_configs(base, 2, tmp_path, ["seed", "nope"])


def test_a_study_trains_variants_on_the_same_folds_and_resumes(tiny_corpus, tmp_path):
    base = Config(**SETTINGS, manifest=str(tiny_corpus), cache_dir=str(tmp_path / "cache"))
    root = remedies.run_study(base, folds=2, root=tmp_path / "study", chosen=["seed", "accent"], encoder=False)
    table = pd.read_csv(root / remedies.STUDY_CSV, keep_default_na=False)
    assert list(table["variant"]) == ["seed", "accent", "baseline:mfcc"]
    variants = table[~table["variant"].str.startswith("baseline:")]
    for column in ("seen_speaker", "seen_birthplace", "unseen_birthplace", "unseen_low", "unseen_high", "unseen_sex"):
        values = pd.to_numeric(variants[column])
        assert values.between(0, 1).all(), column
    assert (pd.to_numeric(variants["unseen_low"]) <= pd.to_numeric(variants["unseen_birthplace"])).all()
    assert (pd.to_numeric(variants["train_minutes"]) > 0).all()
    assert int(variants["unseen_speakers"].iloc[0]) == 12  # every speaker of the corpus, once
    assert "pooled_heads=birthplace" in variants.set_index("variant").loc["accent", "changes"]
    markdown = (root / remedies.STUDY_MD).read_text()
    assert "preset accent" in markdown and "MFCC statistics + logistic regression" in markdown and "%" in markdown
    assert (root / remedies.STUDY_PNG).read_bytes()[:4] == b"\x89PNG"
    record = json.loads((root / remedies.STUDY_JSON).read_text())
    assert record["folds"] == 2 and record["variants"]["accent"]["preset"] == "accent"
    # the same speakers are held out in each fold of both variants
    for fold in ("fold0", "fold1"):
        unseen = [set(pd.read_csv(root / v / fold / runfolder.SPLITS_FILE).query("split.str.startswith('unseen')",
                                                                                  engine="python")["speaker"])
                  for v in ("seed", "accent")]
        assert unseen[0] == unseen[1] and unseen[0]
    # a second run finds every member complete: nothing is trained again
    stamps = {p: p.stat().st_mtime_ns for p in root.rglob("last.pt")}
    remedies.run_study(base, folds=2, root=root, chosen=["seed", "accent"], encoder=False)
    assert {p: p.stat().st_mtime_ns for p in root.rglob("last.pt")} == stamps


def test_the_command_refuses_a_preset_for_its_base(capsys):
    status = remedies.run_command(remedies.main, ["--preset", "accent"])
    assert status == 2 and "the study sets each variant's preset itself" in capsys.readouterr().err
