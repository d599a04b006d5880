"""A run with every generalisation remedy on trains through training's own step, resumes bit for bit,
and predicts from its run folder alone (the adversary is training only)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from voxlib.adversary import SpeakerAdversary
from voxlib.checkpoint import load_checkpoint
from voxlib.config import Config
from voxlib.data import load_run_data
from voxlib.distributed import Dist
from voxlib.model import StatsHead
from voxlib.predict import Classifier
from voxlib.step import Tally, build_parts
from voxlib.train import train

REMEDIES = dict(utterance_norm=True, pooled_heads="birthplace", accent_branch=2, speaker_adversary=0.5,
                adversary_warmup=1, perturb_formant=0.1, perturb_pitch=0.2, perturb_tempo=0.1, trunk_dropout=0.1,
                weight_decay=1e-4)


@pytest.fixture(scope="module")
def base(tiny_corpus, tmp_path_factory) -> dict:
    cache = tmp_path_factory.mktemp("cache")
    return dict(manifest=str(tiny_corpus), cache_dir=str(cache), width=1 / 16, batch_size=8, lr=1e-4, epochs=2,
                threads=2, grad_log_every=4, eval_crops=2, precision="fp32", **REMEDIES)


@pytest.fixture(scope="module")
def remedied(base, tmp_path_factory) -> Path:
    return train(Config(**base, run_dir=str(tmp_path_factory.mktemp("remedied") / "run")))


def test_the_remedied_run_trains_its_adversary_and_records_it(remedied):
    state = load_checkpoint(remedied / "checkpoints" / "last.pt")
    assert "adversary" in state and not any(k.startswith("adversary") for k in state["model"])
    assert any(k.startswith("branch.") for k in state["model"])  # the birthplace branch is part of the model
    metrics = pd.read_csv(remedied / "metrics.csv")
    adversary = metrics.query("metric == 'adversary_loss'")
    assert list(adversary["epoch"]) == [1, 2] and np.isfinite(adversary["value"]).all()
    assert (adversary["value"] > 0).all()
    assert state["settings"]["speaker_adversary"] == 0.5 and state["settings"]["pooled_heads"] == "birthplace"


def test_a_remedied_run_resumes_bit_for_bit(base, remedied, tmp_path):
    run = tmp_path / "resumed"
    train(Config(**{**base, "epochs": 1}, run_dir=str(run)))
    train(Config(**base, run_dir=str(run)))
    a, b = load_checkpoint(remedied / "checkpoints" / "last.pt"), load_checkpoint(run / "checkpoints" / "last.pt")
    for part in ("model", "adversary"):
        assert a[part].keys() == b[part].keys()
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), (part, key)
    assert (remedied / "predictions.csv").read_bytes() == (run / "predictions.csv").read_bytes()


def test_predict_rebuilds_the_remedied_model_without_the_adversary(remedied):
    stored = pd.read_csv(remedied / "predictions.csv", keep_default_na=False)
    clf = Classifier.from_run(remedied)
    assert isinstance(clf.net.heads["birthplace"], StatsHead) and clf.net.branch_blocks == 2
    assert clf.net.normalise_input
    fresh = clf.predict(stored["path"].tolist(), batch_size=5)
    for head in clf.heads:
        assert (fresh[f"{head}_pred"] == stored[f"{head}_pred"]).all(), head
        np.testing.assert_allclose(fresh[f"{head}_prob"], stored[f"{head}_prob"], atol=1e-4)


def test_the_step_hands_the_adversary_the_ramped_weight_and_its_features(base):
    cfg = Config(**{**base, "adversary_warmup": 2})
    data = load_run_data(cfg, progress=False)
    parts = build_parts(cfg, data, Dist(), "fp32")
    assert isinstance(parts.adversary, SpeakerAdversary) and parts.step.adversary is parts.adversary
    steps = len(parts.train_loader)
    seen = []
    original = parts.adversary.forward

    def spy(features, speakers, accents, weight):
        seen.append((tuple(features.shape), weight))
        return original(features, speakers, accents, weight)

    parts.adversary.forward = spy
    tally = Tally(len(data.heads))
    parts.net.train()
    for i, (x, y, _) in enumerate(parts.train_loader):
        parts.step(x, y, tally)
    assert [w for _, w in seen] == pytest.approx([0.5 * i / (2 * steps) for i in range(steps)])
    assert {shape for shape, _ in seen} == {(8, parts.net.accent_features_dim)}
    assert tally.adversary_steps == steps and tally.adversary > 0
    # every parameter the optimiser holds is the model's or the adversary's, once
    held = [p for group in parts.optimizer.param_groups for p in group["params"]]
    assert len(held) == len(list(parts.net.parameters())) + len(list(parts.adversary.parameters()))
    decayed = [g for g in parts.optimizer.param_groups if g["weight_decay"] > 0]
    assert decayed and all(p.dim() > 1 for g in decayed for p in g["params"])
