"""The speaker adversary: strips voice identity from what the birthplace head reads (training only).

A birthplace head trained on a few speakers per class can score perfectly by recognising the
training voices, and then has nothing to say about a new voice. The adversary is a small network
that tries to tell the speaker from the birthplace head's input; a gradient-reversal layer
(Ganin & Lempitsky 2015) in front of it hands the features the *negative* of its gradient, so
whatever helps to recognise the speaker is trained out of them while the adversary itself keeps
learning normally.

With ``scope="accent"`` the adversary only asks "which of this accent's training speakers is it"
(its logits are masked to the speakers of the utterance's true birthplace). That question carries no
accent information, so reversing it removes voice identity without pushing against the accent
itself. With ``scope="all"`` it picks among every training speaker, and since the accent narrows
that choice, reversal also erodes the accent cues the birthplace head needs.

The adversary reads the birthplace head's own branch (``Discriminator(accent_branch=k)``), not the
shared trunk, so the speaker head that StarGAN needs keeps its voice features. Prediction never
needs this module: it is not part of the discriminator's state dict.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

HIDDEN = 256  # the adversary's hidden layer: a linear adversary is too weak to be a fair opponent


class GradientReversal(torch.autograd.Function):
    """Identity forward; the backward multiplies the gradient by ``-weight``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: float) -> torch.Tensor:
        ctx.weight = float(weight)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return -ctx.weight * grad, None


def reverse_gradient(x: torch.Tensor, weight: float) -> torch.Tensor:
    return GradientReversal.apply(x, weight)


def adversary_weight(weight: float, warmup_epochs: float, epochs_done: float) -> float:
    """The reversal weight after ``epochs_done`` (fractional) epochs: a linear rise over ``warmup_epochs``.

    The ramp lets the heads and the adversary learn something first; reversing the gradient of an
    adversary that is still guessing only adds noise to the features.
    """
    if warmup_epochs <= 0:
        return float(weight)
    return float(weight) * min(1.0, max(0.0, epochs_done) / warmup_epochs)


class SpeakerAdversary(nn.Module):
    """``loss = adversary(features, speaker_targets, accent_targets, weight)``.

    ``speaker_accent[s]`` is the accent (birthplace class index) of training speaker ``s``; the
    speaker head's class order. The loss is the adversary's cross-entropy (mean over rows with a
    speaker target); back-propagated, it trains the adversary with the ordinary gradient and hands the
    features ``-weight`` times theirs.
    """

    def __init__(self, in_features: int, speaker_accent: Sequence[int], scope: str = "accent",
                 hidden: int = HIDDEN):
        super().__init__()
        if scope not in ("accent", "all"):
            raise ValueError(f"scope must be 'accent' or 'all', got {scope!r}")
        accents = torch.as_tensor(list(speaker_accent), dtype=torch.int64)
        self.scope = scope
        self.net = nn.Sequential(nn.Linear(in_features, hidden), nn.LeakyReLU(0.2), nn.Linear(hidden, len(accents)))
        n_accents = int(accents.max()) + 1 if len(accents) else 0
        # allowed[a, s]: speaker s may be chosen for an utterance of accent a
        self.register_buffer("allowed", accents[None, :] == torch.arange(n_accents)[:, None], persistent=False)

    def forward(self, features: torch.Tensor, speaker_targets: torch.Tensor, accent_targets: torch.Tensor,
                weight: float) -> torch.Tensor:
        valid = speaker_targets >= 0
        if self.scope == "accent":
            valid = valid & (accent_targets >= 0)
        if not bool(valid.any()):
            return features.sum() * 0.0  # keeps the graph (and DDP's bookkeeping) whole
        logits = self.net(reverse_gradient(features.float(), weight))[valid]
        if self.scope == "accent":
            logits = logits.masked_fill(~self.allowed[accent_targets[valid]], float("-inf"))
        return F.cross_entropy(logits, speaker_targets[valid])


def speaker_accents(speakers: Sequence[str], accent_classes: Sequence[str], table) -> list[int]:
    """The accent class index of each training speaker (the speaker head's order), from the manifest
    table's ``speaker`` and ``birthplace`` columns."""
    lookup = {c: i for i, c in enumerate(accent_classes)}
    accent_of = table.drop_duplicates("speaker").set_index("speaker")["birthplace"].astype(str)
    return [lookup[accent_of[s]] for s in speakers]
