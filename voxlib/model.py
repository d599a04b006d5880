"""The seed discriminator, used as a multi-head classifier of 1x256x256 spectrograms.

Six Conv(k4, s2, p1) + BatchNorm + LeakyReLU(0.2) blocks halve the map from 256 to 4 while the
channels double from 64 to 2048 (times ``width``); each label then gets its own Conv(k4, s1, p0)
head that sees the whole 4x4 map and emits one logit per class. Every head shares the trunk, which
is what lets the birthplace analysis ask how much of the trunk each head's gradient shapes.

A birthplace head on that trunk learns the training voices rather than the accent (it fails on new
speakers), so the model also carries the remedies of the "generalisation" settings, each off by
default: input normalisation per utterance, time-pooled heads, a birthplace branch of its own and
dropout (see :class:`Discriminator`). The speaker adversary that acts on the branch is training-only
and lives in ``adversary.py``; :func:`model_options` maps a run's settings to the model's shape.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from voxlib import runfolder
from voxlib.checkpoint import CheckpointError, load_checkpoint
from voxlib.config import ACCENT_HEAD, N_BLOCKS

log = logging.getLogger("voxlib.model")

INPUT_SIZE = 256
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


STATS_EPS = 1e-5  # variance floor of the pooled statistics and of the utterance normalisation


def utterance_norm(x: torch.Tensor, eps: float = STATS_EPS) -> torch.Tensor:
    """Each frequency bin of each crop to zero mean and unit variance over time.

    In the dB domain a fixed filter (microphone, room colour, a voice's average spectral tilt and
    formant levels) adds a constant per bin; subtracting the bin's mean over time removes it, and
    dividing by its spread removes a per-bin contrast change. What is left is how the spectrum moves
    over time, which is where pronunciation lives. Computed in float32 under autocast.
    """
    x = x.float()
    mean = x.mean(dim=-1, keepdim=True)
    var = x.var(dim=-1, keepdim=True, unbiased=False)
    return (x - mean) * torch.rsqrt(var + eps)


def envelope_projection(bins: int, keep: int) -> torch.Tensor:
    """(bins, bins) matrix that keeps the first ``keep`` DCT-II coefficients of a frame (cepstral liftering).

    A feature frame is a log spectrum (dB mapped linearly to [0, 1]); its low-quefrency part is the
    spectral envelope (formants, tilt), the rest the harmonic ripple of the pitch.
    """
    n = torch.arange(bins, dtype=torch.float64)
    k = torch.arange(keep, dtype=torch.float64)[:, None]
    dct = torch.cos(math.pi * (n + 0.5) * k / bins) * math.sqrt(2.0 / bins)
    dct[0] /= math.sqrt(2.0)
    return (dct.T @ dct).float()


def time_statistics(fmap: torch.Tensor, eps: float = STATS_EPS) -> torch.Tensor:
    """(B, C, F, T) -> (B, C*F*2): mean and standard deviation over time of every channel and band.

    The statistics of a sequence do not change when it is repeated, so a head reading them does not
    depend on the crop's length or on where in the crop a sound falls, unlike the 4x4 conv head,
    whose weights are tied to positions in time.
    """
    mean = fmap.mean(dim=-1)
    std = (fmap.var(dim=-1, unbiased=False) + eps).sqrt()
    return torch.stack([mean, std], dim=-1).flatten(1)


class StatsHead(nn.Module):
    """A time-pooled head: :func:`time_statistics` of the map, then one linear layer."""

    def __init__(self, channels: int, bands: int, n_classes: int):
        super().__init__()
        self.linear = nn.Linear(2 * channels * bands, n_classes)

    def pool(self, fmap: torch.Tensor) -> torch.Tensor:
        return time_statistics(fmap.float())

    def forward(self, fmap: torch.Tensor) -> torch.Tensor:
        return self.linear(self.pool(fmap))


def conv_block(in_ch: int, out_ch: int) -> list[nn.Module]:
    """Conv(k4, s2, p1) + BatchNorm + LeakyReLU(0.2): halves the map."""
    return [Conv2d(in_ch, out_ch, kernel_size=4, stride=2, padding=1), nn.BatchNorm2d(out_ch), nn.LeakyReLU(0.2)]


def model_options(settings: dict) -> dict:
    """Discriminator keyword arguments from a run's settings (Config values or a checkpoint's record).

    The one place that maps settings to the network's shape: training builds its model through it and
    ``load_discriminator`` rebuilds a trained one from the checkpoint's record alone. Settings written
    before a remedy existed lack its key and get the seed architecture's value.
    """
    pooled = settings.get("pooled_heads", "")
    return {"width": float(settings.get("width", 1.0)),
            "utterance_norm": bool(settings.get("utterance_norm", False)),
            "input_lifter": int(settings.get("input_lifter", 0)),
            "pooled_heads": tuple(h.strip() for h in pooled.split(",") if h.strip()),
            "accent_branch": int(settings.get("accent_branch", 0)),
            "accent_width": float(settings.get("accent_width", 0.0)),
            "dropout": float(settings.get("trunk_dropout", 0.0))}


class Discriminator(nn.Module):
    """The seed architecture with one classification head per label, and optional remedies.

    ``head_sizes`` maps a head name (speaker, birthplace, sex, ...) to its number of classes; the
    dict order is the head order everywhere (logits, checkpoints, labels.json).

    The remedies for a birthplace head that memorises voices (each off by default; off, the module
    list, the parameters and their initial values are the seed model's):

    - ``utterance_norm``: :func:`utterance_norm` on the input, so prediction applies it too;
    - ``pooled_heads``: these heads read :func:`time_statistics` of their map (:class:`StatsHead`)
      instead of a 4x4 conv;
    - ``accent_branch``: the birthplace head reads its own copy of the last ``accent_branch`` trunk
      blocks (``self.branch``), so a speaker adversary can strip voice identity from what it reads
      while the speaker head, which StarGAN needs, keeps the shared trunk; with all six blocks the
      birthplace head has a network of its own, and only that network reads the ``input_lifter``
      envelope (the other heads keep the pitch harmonics, which tell speakers apart);
    - ``input_lifter``: the input reduced to its spectral envelope (:func:`envelope_projection`);
    - ``dropout``: dropout on the maps the heads read, in training.
    """

    def __init__(self, head_sizes: dict[str, int], width: float = 1.0, *, utterance_norm: bool = False,
                 input_lifter: int = 0, pooled_heads: tuple[str, ...] = (), accent_branch: int = 0,
                 accent_width: float = 0.0, dropout: float = 0.0):
        super().__init__()
        if not head_sizes:
            raise ValueError("Discriminator needs at least one head")
        if not 0 <= accent_branch <= N_BLOCKS:
            raise ValueError(f"accent_branch must be in 0..{N_BLOCKS}, got {accent_branch}")
        self.head_sizes = dict(head_sizes)
        self.width = width
        self.normalise_input = utterance_norm
        self.input_lifter = input_lifter
        self.dropout = dropout
        channels = trunk_channels(width)
        layers: list[nn.Module] = []
        in_ch = 1
        for out_ch in channels:
            layers += conv_block(in_ch, out_ch)
            in_ch = out_ch
        self.main = nn.Sequential(*layers)
        self.out_channels = in_ch
        final = INPUT_SIZE // 2**N_BLOCKS  # 4: the head kernel covers the whole remaining map
        self.branch_blocks = accent_branch if ACCENT_HEAD in head_sizes else 0
        self.split = 3 * (N_BLOCKS - self.branch_blocks)  # main[:split] is shared by every head
        # a network of its own may be narrower than the trunk; a partial branch continues the trunk's channels
        branch_channels = trunk_channels(accent_width) if self.branch_blocks == N_BLOCKS and accent_width \
            else channels
        self.pooled_heads = tuple(h for h in head_sizes if h in pooled_heads)
        self.heads = nn.ModuleDict(
            {name: StatsHead(ch, final, n) if name in self.pooled_heads
             else Conv2d(ch, n, kernel_size=final, stride=1, padding=0)
             for name, n in head_sizes.items()
             for ch in [branch_channels[-1] if name == ACCENT_HEAD and self.branch_blocks else in_ch]}
        )
        # created after the seed's modules, so the seed's initial weights do not depend on it
        if self.branch_blocks:
            first = N_BLOCKS - self.branch_blocks
            self.branch = nn.Sequential(*[m for i in range(first, N_BLOCKS)
                                          for m in conv_block(branch_channels[i - 1] if i else 1, branch_channels[i])])
        if input_lifter:  # a constant of the settings: not part of the state dict
            self.register_buffer("envelope", envelope_projection(INPUT_SIZE, input_lifter), persistent=False)

    @classmethod
    def from_run(cls, run_dir, checkpoint: str = "best", allow_unfinished: bool = False) -> "Discriminator":
        """The trained discriminator of a finished run folder, e.g. to initialise a StarGAN discriminator."""
        return load_discriminator(run_dir, checkpoint, allow_unfinished)[0]

    @property
    def accent_features_dim(self) -> int:
        """Length of the vector :meth:`forward` returns with ``return_accent`` (the adversary's input)."""
        head = self.heads[ACCENT_HEAD]
        final = INPUT_SIZE // 2**N_BLOCKS
        return head.linear.in_features if isinstance(head, StatsHead) else head.in_channels * final * final

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        """Shared features (B, C, 4, 4): the embeddings, and (without a branch) where head gradients meet.

        ``compile=True`` compiles this method, so it is what the forward runs for the speaker and sex heads'
        trunk whenever the trunk is not split by a partial birthplace branch.
        """
        return self.main(self.prepare(x, envelope=self.branch_blocks < N_BLOCKS))

    def prepare(self, x: torch.Tensor, envelope: bool = True) -> torch.Tensor:
        """The input transforms of the settings (envelope, then normalisation); x itself when none."""
        if self.input_lifter and envelope:
            x = torch.matmul(self.envelope, x.float()).to(x.dtype)
        if self.normalise_input:
            x = utterance_norm(x).to(x.dtype)  # elementwise: keeps x's memory format
        return x

    def forward(self, x: torch.Tensor, return_trunk: bool = False, return_accent: bool = False,
                return_shared: bool = False):
        """Logits per head ``{name: (B, n_classes)}``, then, in this order, what the flags ask for:

        - ``return_trunk``: the trunk output (B, C, 4, 4) the speaker and sex heads read (embeddings);
        - ``return_accent``: what the birthplace head reads, flattened to (B, accent_features_dim),
          for a speaker adversary;
        - ``return_shared``: the last map the heads share, where their gradients meet: the trunk
          output, or with a partial birthplace branch the map it starts from (a birthplace network of
          its own shares nothing: its gradient never reaches the trunk).

        They are returned (not recomputed) so training can take gradients from the same graph. A
        training batch of two channels (``CropDataset(perturb_view=True)``) gives the recorded crop to
        the trunk and the perturbed one to the birthplace network of its own.
        """
        recorded, voiced = (x[:, :1], x[:, 1:]) if x.shape[1] == 2 else (x, x)
        if x.shape[1] == 2 and self.branch_blocks != N_BLOCKS:
            raise ValueError("a two-channel input (recorded and perturbed crop) needs accent_branch 6")
        if self.branch_blocks == N_BLOCKS:  # a network of its own, which reads the perturbed view if given
            shared = features = self.trunk(recorded)
            accent_map = self.branch(self.prepare(voiced))
        elif self.branch_blocks:
            shared = self.main[: self.split](self.prepare(x))
            features = self.main[self.split:](shared)
            accent_map = self.branch(shared)
        else:
            shared = features = accent_map = self.trunk(x)
        logits = {}
        for name, head in self.heads.items():
            fmap = accent_map if name == ACCENT_HEAD else features
            if self.dropout and self.training:
                fmap = F.dropout(fmap, self.dropout)
            logits[name] = head(fmap).flatten(1)
        extra = ([features] if return_trunk else []) + ([self._head_input(accent_map)] if return_accent else []) \
            + ([shared] if return_shared else [])
        return (logits, *extra) if extra else logits

    def _head_input(self, fmap: torch.Tensor) -> torch.Tensor:
        head = self.heads[ACCENT_HEAD]
        return head.pool(fmap) if isinstance(head, StatsHead) else fmap.flatten(1)


def decay_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Optimiser parameter groups: ``weight_decay`` on conv and linear weights, none on BatchNorm and biases.

    Decay shrinks weights the loss does not keep asking for, so a head cannot hold on to many small
    voice-specific features; BatchNorm scales and biases set operating points, and decaying them only
    shifts activations.
    """
    decay, plain = [], []
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            (decay if name == "weight" and isinstance(module, (nn.Conv2d, nn.Linear)) else plain).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]


def count_flops(model: Discriminator, batch: int = 1, training: bool = False) -> int:
    """Floating-point operations of one forward pass (2 per multiply-accumulate) from layer shapes.

    Only convolutions and linear layers are counted (BatchNorm, activations, pooling and biases add
    well under 1 %). A training step costs about 3x the forward (backward = 2x), which
    ``training=True`` returns.
    """
    size = INPUT_SIZE
    macs = 0
    sizes = []
    for conv in (m for m in model.main if isinstance(m, nn.Conv2d)):
        size = (size + 2 * conv.padding[0] - conv.kernel_size[0]) // conv.stride[0] + 1
        sizes.append(size)
        macs += size * size * conv.out_channels * conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
    if model.branch_blocks:
        convs = [m for m in model.branch if isinstance(m, nn.Conv2d)]
        for conv, out in zip(convs, sizes[-len(convs):]):
            macs += out * out * conv.out_channels * conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
    for head in model.heads.values():
        if isinstance(head, StatsHead):
            macs += head.linear.in_features * head.linear.out_features
            continue
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
    settings = {**(state.get("settings") or {}), "width": state["width"]}
    net = Discriminator(sizes, **model_options(settings))
    net.load_state_dict(state["model"])
    net.eval()
    record = {k: state.get(k) for k in ("epoch", "precision", "settings", "width", "voxlib_version")}
    record["path"] = str(path)
    return net, record
