"""The speaker adversary: reversed gradient into the features, ordinary gradient into itself.

The defining property of gradient reversal is checked against the same adversary without it: the
features receive exactly ``-weight`` times the gradient an ordinary speaker classifier would give
them, the adversary's own weights the ordinary gradient, whatever the weight. The accent-scoped
adversary never considers a speaker of another accent, so knowing the accent cannot lower its loss.
"""
from __future__ import annotations

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from voxlib.adversary import SpeakerAdversary, adversary_weight, reverse_gradient, speaker_accents

# six training speakers: three of accent 0, two of accent 1, one of accent 2
SPEAKER_ACCENT = [0, 0, 1, 2, 1, 0]
SPEAKERS = torch.tensor([0, 1, 2, 3, 4, 5, 2, 0])
ACCENTS = torch.tensor([SPEAKER_ACCENT[s] for s in SPEAKERS.tolist()])


def plain_loss(adversary: SpeakerAdversary, features: torch.Tensor) -> torch.Tensor:
    """The adversary's loss with no reversal in front of it (the ordinary speaker classifier)."""
    logits = adversary.net(features)
    if adversary.scope == "accent":
        logits = logits.masked_fill(~adversary.allowed[ACCENTS], float("-inf"))
    return F.cross_entropy(logits, SPEAKERS)


@pytest.mark.parametrize("scope", ["accent", "all"])
@pytest.mark.parametrize("weight", [0.25, 2.0])
def test_reversal_flips_and_scales_the_feature_gradient_and_leaves_the_adversary_s_own(scope, weight):
    torch.manual_seed(0)
    adversary = SpeakerAdversary(10, SPEAKER_ACCENT, scope=scope, hidden=16)
    features = torch.randn(len(SPEAKERS), 10, requires_grad=True)

    loss = adversary(features, SPEAKERS, ACCENTS, weight)
    reversed_grads = torch.autograd.grad(loss, [features, *adversary.parameters()])
    ordinary = plain_loss(adversary, features)
    ordinary_grads = torch.autograd.grad(ordinary, [features, *adversary.parameters()])

    torch.testing.assert_close(loss, ordinary)  # the forward is untouched
    assert ordinary_grads[0].abs().sum() > 0
    torch.testing.assert_close(reversed_grads[0], -weight * ordinary_grads[0])
    for mine, plain in zip(reversed_grads[1:], ordinary_grads[1:]):
        torch.testing.assert_close(mine, plain)


def test_a_zero_weight_passes_no_gradient_to_the_features():
    features = torch.randn(3, 4, requires_grad=True)
    reverse_gradient(features, 0.0).sum().backward()
    assert torch.equal(features.grad, torch.zeros(3, 4))


def test_the_weight_rises_linearly_over_the_warm_up():
    assert [adversary_weight(0.8, 2, e) for e in (0.0, 0.5, 1.0, 2.0, 7.0)] == [0.0, 0.2, 0.4, 0.8, 0.8]
    assert adversary_weight(0.8, 0, 0.0) == 0.8


def test_the_accent_scoped_adversary_only_chooses_among_the_accent_s_speakers():
    torch.manual_seed(0)
    adversary = SpeakerAdversary(10, SPEAKER_ACCENT, scope="accent", hidden=16)
    features = torch.randn(len(SPEAKERS), 10)
    logits = adversary.net(features).masked_fill(~adversary.allowed[ACCENTS], float("-inf"))
    probs = logits.softmax(1)
    others = torch.tensor(SPEAKER_ACCENT)[None, :] != ACCENTS[:, None]
    assert torch.equal(probs[others], torch.zeros(int(others.sum())))
    # the one speaker of accent 2 is a certain guess: its rows add nothing to the loss
    lone = ACCENTS == 2
    assert torch.allclose(probs[lone, 3], torch.ones(int(lone.sum())))
    everyone = SpeakerAdversary(10, SPEAKER_ACCENT, scope="all", hidden=16)
    everyone.load_state_dict(adversary.state_dict())
    assert adversary(features, SPEAKERS, ACCENTS, 1.0) < everyone(features, SPEAKERS, ACCENTS, 1.0)


def test_rows_without_a_speaker_target_are_ignored():
    torch.manual_seed(0)
    adversary = SpeakerAdversary(10, SPEAKER_ACCENT, hidden=16)
    features = torch.randn(len(SPEAKERS), 10, requires_grad=True)
    unseen = SPEAKERS.clone()
    unseen[:3] = -1
    loss = adversary(features, unseen, ACCENTS, 1.0)
    kept = adversary(features[3:], SPEAKERS[3:], ACCENTS[3:], 1.0)
    torch.testing.assert_close(loss, kept)
    loss.backward()
    assert torch.equal(features.grad[:3], torch.zeros(3, 10))
    none = adversary(features, torch.full_like(SPEAKERS, -1), ACCENTS, 1.0)
    assert none.item() == 0.0 and none.requires_grad


def test_speaker_accents_follow_the_speaker_head_s_order():
    table = pd.DataFrame({"speaker": ["b1", "a1", "a2", "b1", "c1"], "birthplace": ["b", "a", "a", "b", "c"]})
    assert speaker_accents(["a1", "a2", "b1", "c1"], ["a", "b", "c"], table) == [0, 0, 1, 2]
    assert speaker_accents(["c1", "b1"], ["c", "b"], table) == [0, 1]
