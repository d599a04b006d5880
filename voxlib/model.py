"""The seed discriminator, used as a multi-head classifier of 1x256x256 spectrograms.

Six Conv(k4, s2, p1) + BatchNorm + LeakyReLU(0.2) blocks halve the map from 256 to 4 while the
channels double from 64 to 2048 (times ``width``); each label then gets its own Conv(k4, s1, p0)
head that sees the whole 4x4 map and emits one logit per class. Every head shares the trunk, which
is what lets the birthplace analysis ask how much of the trunk each head's gradient shapes.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from voxlib import runfolder
from voxlib.checkpoint import CheckpointError, load_checkpoint

log = logging.getLogger("voxlib.model")

INPUT_SIZE = 256
N_BLOCKS = 6
MATMUL_MAX_POSITIONS = 16  # output maps of at most 4x4 are computed as one matrix product on CPU


def trunk_channels(width: float) -> list[int]:
    """Output channels of the six blocks: round(64 * width * 2**i), at least 1."""
    return [max(1, round(64 * width * 2**i)) for i in range(N_BLOCKS)]


class Conv2d(nn.Conv2d):
    """nn.Conv2d that runs as one matrix product (im2col + GEMM) on CPU when its output map is small.

    oneDNN's CPU convolutions are tuned for large maps: for the last block (8x8 -> 4x4) and the heads
    (4x4 -> 1x1) they ran 2-4x below the machine's matmul speed, mostly in the backward pass, and
    those layers hold most of the seed model's weights. Gathering the patches and calling one GEMM
    gives the same values at near-matmul speed. Parameters, state dict, hooks and FLOPs are those of
    nn.Conv2d; on other devices cuDNN's own choice is kept.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (kh, kw), (sh, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
        positions = ((x.shape[-2] + 2 * ph - kh) // sh + 1) * ((x.shape[-1] + 2 * pw - kw) // sw + 1)
        plain = self.groups == 1 and self.dilation == (1, 1) and self.padding_mode == "zeros"
        if x.device.type == "cpu" and plain and positions <= MATMUL_MAX_POSITIONS:
            return conv_as_matmul(self, x)
        return super().forward(x)


def conv_as_matmul(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """The convolution ``conv(x)`` as patches @ weight.T; the result is channels_last.

    The patch vector is ordered like the weight's memory (C,kh,kw or, for a channels_last weight,
    kh,kw,C) so the weight is only viewed, never copied.
    """
    (kh, kw), (sh, sw), (ph, pw) = conv.kernel_size, conv.stride, conv.padding
    if ph or pw:
        x = F.pad(x, (pw, pw, ph, ph))
    patches = x.unfold(2, kh, sh).unfold(3, kw, sw)  # (B, C, Ho, Wo, kh, kw)
    batch, _, rows, cols = patches.shape[:4]
    weight = conv.weight
    if not weight.is_contiguous() and weight.is_contiguous(memory_format=torch.channels_last):
        patches = patches.permute(0, 2, 3, 4, 5, 1)
        weight = weight.permute(0, 2, 3, 1)
    else:
        patches = patches.permute(0, 2, 3, 1, 4, 5)
    patches = patches.reshape(batch * rows * cols, -1)
    weight = weight.reshape(len(weight), -1)
    out = patches @ weight.t() if conv.bias is None else torch.addmm(conv.bias, patches, weight.t())
    return out.view(batch, rows, cols, -1).permute(0, 3, 1, 2)


class Discriminator(nn.Module):
    """The seed architecture with one classification head per label.

    ``head_sizes`` maps a head name (speaker, birthplace, sex, ...) to its number of classes; the
    dict order is the head order everywhere (logits, checkpoints, labels.json).
    """

    def __init__(self, head_sizes: dict[str, int], width: float = 1.0):
        super().__init__()
        if not head_sizes:
            raise ValueError("Discriminator needs at least one head")
        self.head_sizes = dict(head_sizes)
        self.width = width
        layers: list[nn.Module] = []
        in_ch = 1
        for out_ch in trunk_channels(width):
            layers += [
                Conv2d(in_ch, out_ch, kernel_size=4, stride=2, padding=1),
                nn.BatchNorm2d(out_ch),
                nn.LeakyReLU(0.2),
            ]
            in_ch = out_ch
        self.main = nn.Sequential(*layers)
        self.out_channels = in_ch
        final = INPUT_SIZE // 2**N_BLOCKS  # 4: the head kernel covers the whole remaining map
        self.heads = nn.ModuleDict(
            {name: Conv2d(in_ch, n, kernel_size=final, stride=1, padding=0) for name, n in head_sizes.items()}
        )

    @classmethod
    def from_run(cls, run_dir, checkpoint: str = "best", allow_unfinished: bool = False) -> "Discriminator":
        """The trained discriminator of a finished run folder, e.g. to initialise a StarGAN discriminator."""
        return load_discriminator(run_dir, checkpoint, allow_unfinished)[0]

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        """Shared features (B, C, 4, 4): the embeddings and the point where head gradients meet."""
        return self.main(x)

    def forward(self, x: torch.Tensor, return_trunk: bool = False):
        """Logits per head ``{name: (B, n_classes)}``; with ``return_trunk`` also the trunk output.

        The trunk output is returned (not recomputed) so the training loop can measure each head's
        gradient with respect to it from the same graph.
        """
        features = self.trunk(x)
        logits = {name: head(features).flatten(1) for name, head in self.heads.items()}
        return (logits, features) if return_trunk else logits


def count_flops(model: Discriminator, batch: int = 1, training: bool = False) -> int:
    """Floating-point operations of one forward pass (2 per multiply-accumulate) from layer shapes.

    Only convolutions are counted (BatchNorm, activations and biases add well under 1 %). A
    training step costs about 3x the forward (backward = 2x), which ``training=True`` returns.
    """
    size = INPUT_SIZE
    macs = 0
    for conv in (m for m in model.main if isinstance(m, nn.Conv2d)):
        size = (size + 2 * conv.padding[0] - conv.kernel_size[0]) // conv.stride[0] + 1
        macs += size * size * conv.out_channels * conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
    for head in model.heads.values():
        out = size - head.kernel_size[0] + 1
        macs += out * out * head.out_channels * head.in_channels * head.kernel_size[0] * head.kernel_size[1]
    flops = 2 * macs * batch
    return 3 * flops if training else flops


def load_discriminator(run_dir, checkpoint: str = "best", allow_unfinished: bool = False
                       ) -> tuple[Discriminator, dict]:
    """The trained discriminator of a finished run folder (eval mode, CPU) and its checkpoint's record.

    Needs only the folder: labels.json gives the heads and their class order, the checkpoint the
    width and the weights. ``checkpoint`` is "best", "last" or a path to a .pt file. The record
    holds ``epoch``, ``precision`` and the ``settings`` that produced the weights. An unfinished run
    is refused (runfolder.require_finished) unless ``allow_unfinished``; then "best" means the latest
    checkpoint, last.pt: the weights as training holds them now, which best.pt may not yet reflect.
    """
    run_dir = Path(run_dir)
    if runfolder.is_pooled(run_dir):
        names = [p.name for p in runfolder.pooled_members(run_dir)]
        raise runfolder.RunError(
            f"{run_dir}: a pooled folder holds one discriminator per member ({', '.join(names)}); load one, "
            f"e.g. {run_dir / names[0]} (voxlib.predict.Classifier.from_run uses them all as an ensemble)")
    unfinished = runfolder.require_finished(run_dir, allow_unfinished)
    if unfinished and checkpoint == "best":
        checkpoint = "last"
    path = Path(checkpoint) if checkpoint not in ("best", "last") else \
        run_dir / runfolder.CHECKPOINTS / (runfolder.BEST if checkpoint == "best" else runfolder.LAST)
    if not path.is_file():
        if unfinished:
            raise CheckpointError(f"{path}: no checkpoint yet: the unfinished run {run_dir} has not saved an epoch")
        raise CheckpointError(f"{path}: checkpoint missing from the finished run {run_dir} (moved or deleted?)")
    labels = runfolder.read_labels(run_dir)
    state = load_checkpoint(path)
    sizes = {h: len(c) for h, c in labels.items()}
    if state.get("head_sizes") != sizes:
        raise CheckpointError(f"{path} has heads {state.get('head_sizes')}, {run_dir / runfolder.LABELS} {sizes}")
    best_epoch = runfolder.read_json(run_dir / runfolder.SUMMARY).get("best_epoch") \
        if checkpoint == "best" and (run_dir / runfolder.SUMMARY).is_file() else None
    if isinstance(best_epoch, int) and state.get("epoch") != best_epoch:
        raise CheckpointError(f"{path} holds epoch {state.get('epoch')}, but {run_dir / runfolder.SUMMARY} says the "
                              f"run's best epoch is {best_epoch}: the checkpoint was replaced after the run finished")
    if unfinished:
        log.warning("%s: using epoch %s of an unfinished run", path, state.get("epoch"))
    net = Discriminator(sizes, float(state["width"]))
    net.load_state_dict(state["model"])
    net.eval()
    record = {k: state.get(k) for k in ("epoch", "precision", "settings", "width", "voxlib_version")}
    record["path"] = str(path)
    return net, record
