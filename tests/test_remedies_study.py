"""python -m voxlib.remedies: variants on the same speaker folds, a table beside the baselines, resumable."""
from __future__ import annotations

import json

import pandas as pd
import pytest

from voxlib import index_page, remedies, runfolder, verdict
from voxlib.notebook import prepare
from voxlib.config import ACCENT_PRESET, Config, ConfigError
from voxlib.train import train

SETTINGS = dict(width=1 / 16, batch_size=8, lr=1e-4, epochs=1, threads=2, grad_log_every=0, eval_crops=2,
                precision="fp32")


def test_each_remedy_alone_takes_the_presets_value_and_the_preset_comes_last():
    found = {name: changes for name, _, changes in remedies.variants()}
    assert list(found)[0] == "seed" and found["seed"] == {} and found["accent"] == {"preset": "accent"}
    for name, value in ACCENT_PRESET.items():  # every part of the preset is also studied alone, at its value
        assert any(changes.get(name) == value for v, changes in found.items() if v not in ("seed", "accent")), name
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
    table = pd.read_csv(root / runfolder.STUDY_CSV, keep_default_na=False)
    assert list(table["variant"]) == ["seed", "accent", "baseline:mfcc"]
    variants = table[~table["variant"].str.startswith("baseline:")]
    for column in ("seen_speaker", "seen_birthplace", "unseen_birthplace", "unseen_low", "unseen_high", "unseen_sex"):
        values = pd.to_numeric(variants[column])
        assert values.between(0, 1).all(), column
    assert (pd.to_numeric(variants["unseen_low"]) <= pd.to_numeric(variants["unseen_birthplace"])).all()
    assert (pd.to_numeric(variants["train_minutes"]) > 0).all()
    assert int(variants["unseen_speakers"].iloc[0]) == 12  # every speaker of the corpus, once
    assert "pooled_heads=birthplace" in variants.set_index("variant").loc["accent", "changes"]
    markdown = (root / runfolder.STUDY_MD).read_text()
    assert "preset accent" in markdown and "MFCC statistics + logistic regression" in markdown and "%" in markdown
    assert (root / runfolder.STUDY_PNG).read_bytes()[:4] == b"\x89PNG"
    record = json.loads((root / runfolder.STUDY).read_text())
    assert record["folds"] == 2 and record["variants"]["accent"]["preset"] == "accent"
    # the same speakers are held out in each fold of both variants
    for fold in ("fold0", "fold1"):
        unseen = [set(pd.read_csv(root / v / fold / runfolder.SPLITS_FILE).query("split.str.startswith('unseen')",
                                                                                  engine="python")["speaker"])
                  for v in ("seed", "accent")]
        assert unseen[0] == unseen[1] and unseen[0]
    # the reports read it: findings, the table and the figure in index.html; notebook 03's prepare checks it
    study = runfolder.load_study(root)
    findings = verdict.study_findings(study.table)
    assert findings[0].startswith("birthplace on unseen speakers (pooled over the study's folds): preset accent")
    assert any("MFCC statistics + logistic regression reaches" in line for line in findings)
    page = index_page.study_html(str(root))
    assert "What makes birthplace hold on new voices" in page and "data:image/png;base64," in page
    assert page.count("<tr>") == 1 + len(table)
    # the accent head reads a network of its own: the verdict leaves out the shared trunk's probe and gradients
    own = verdict.verdict_from_measures(verdict.measures(root / "accent" / "fold0"))
    assert any("reads a birthplace network of its own (accent_branch 6)" in line for line in own)
    assert not any(line.startswith("the linear probe") or "of the gradient reaching the trunk" in line for line in own)
    assert not verdict.measures(root / "seed" / "fold0")["own_network"]
    # a second run finds every member complete: nothing is trained again
    stamps = {p: p.stat().st_mtime_ns for p in root.rglob("last.pt")}
    remedies.run_study(base, folds=2, root=root, chosen=["seed", "accent"], encoder=False)
    assert {p: p.stat().st_mtime_ns for p in root.rglob("last.pt")} == stamps
    # make demo's report trains preset accent into the study's folder with the same flags: found complete
    assert train(base.replace(preset="accent", folds=2, run_dir=str(root / "accent"))) == root / "accent"
    assert {p: p.stat().st_mtime_ns for p in root.rglob("last.pt")} == stamps


def test_the_command_refuses_a_preset_for_its_base(capsys):
    status = remedies.run_command(remedies.main, ["--preset", "accent"])
    assert status == 2 and "the study sets each variant's preset itself" in capsys.readouterr().err


def test_study_findings_say_whether_the_gap_closed():
    def table(accent_unseen, accent_low, accent_high, accent_speaker):
        rows = [("seed", "seed discriminator", 0.98, 0.25, 0.17, 0.35, 0.99, 0.985),
                ("accent", "preset accent", accent_speaker, accent_unseen, accent_low, accent_high, 0.99, 0.98),
                ("baseline:mfcc", "MFCC statistics + logistic regression", 0.98, 0.60, None, None, 0.97, None)]
        return pd.DataFrame([{"variant": v, "label": lab, "seen_speaker": sp, "unseen_birthplace": u, "unseen_low": lo,
                              "unseen_high": hi, "unseen_sex": sx, "sex_low": sl, "sex_high": None}
                             for v, lab, sp, u, lo, hi, sx, sl in rows])

    closed = verdict.study_findings(table(0.64, 0.55, 0.72, 0.975))
    assert "the intervals do not overlap" in closed[0]
    assert "preset accent is 4.0 percentage points above it: the gap is closed" in closed[2]
    assert "the seed discriminator is 35.0 percentage points below it: the gap is not closed" in closed[1]
    assert "(within 2.0 percentage points of the seed discriminator)" in closed[3]
    noisy = verdict.study_findings(table(0.55, 0.45, 0.62, 0.94))
    assert "closed within the noise" in noisy[2] and "beyond 2.0 percentage points" in noisy[3]
    overlapping = verdict.study_findings(table(0.33, 0.24, 0.42, 0.98))
    assert "the intervals overlap" in overlapping[0] and "the gap is not closed" in overlapping[2]


def test_a_study_folder_must_be_finished_to_be_shown(tmp_path, trained_run):
    unfinished = tmp_path / "study"
    unfinished.mkdir()
    with pytest.raises(ConfigError, match="parameter 'study_dir': .*not a finished remedies study"):
        prepare(Config(run_dir=str(trained_run), study_dir=str(unfinished)), need="run")
    assert "not a finished remedies study" in index_page.study_html(str(unfinished))
    with pytest.raises(ConfigError, match="at least 2"):
        remedies.run_study(Config(**SETTINGS), folds=1, root=tmp_path / "one")
