"""Crop-averaged class probabilities and trunk features: the one evaluation path.

Training (validation each epoch, predictions.csv at the end) and ``voxlib.predict`` both run a
discriminator through here, so a prediction made later from a run folder is the prediction the run
itself reported. A clip is scored on ``eval_crops`` fixed, evenly spaced 256-frame crops; their
softmax probabilities are averaged, as are the trunk features.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterable, Iterator

import torch
from torch import nn


def autocast_for(precision: str, device: torch.device) -> Callable[[], contextlib.AbstractContextManager]:
    """The autocast context of a resolved precision ("bf16" or "fp32")."""
    if precision == "bf16":
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


@torch.no_grad()
def crop_averaged(net: nn.Module, batches: Iterable[tuple[torch.Tensor, object]], device: torch.device,
                  precision: str = "fp32", channels_last: bool = False, features: bool = False
                  ) -> Iterator[tuple[object, dict[str, torch.Tensor], torch.Tensor | None]]:
    """For each ``(x, extra)`` with x ``(n, crops, 1, 256, 256)``: ``(extra, probs, trunk)``.

    ``probs[head]`` is ``(n, classes)`` on the CPU (float32, crop-averaged); ``trunk`` the
    crop-averaged flattened trunk output ``(n, C*4*4)`` when ``features`` is set, else None.
    """
    net.eval()
    autocast = autocast_for(precision, device)
    for x, extra in batches:
        n, crops = x.shape[:2]
        x = x.flatten(0, 1).to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast():
            logits, trunk = net(x, return_trunk=True)
        probs = {h: v.float().softmax(1).reshape(n, crops, -1).mean(1).cpu() for h, v in logits.items()}
        kept = trunk.float().reshape(n, crops, -1).mean(1).cpu() if features else None
        yield extra, probs, kept
