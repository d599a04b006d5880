"""The generalisation remedies in the model do what they claim, and off they leave the seed model alone.

Each remedy is tested for its defining property (not only that it runs): utterance normalisation
makes the output blind to a fixed per-bin gain; the time-pooled head gives the same logits for a map
and that map repeated in time; the birthplace branch is read by the birthplace head alone; dropout
acts in training only; weight decay spares BatchNorm and biases; a remedied run reloads for
prediction from its checkpoint's settings alone.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter1d
from scipy.signal import find_peaks
from torch import nn

from voxlib import runfolder
from voxlib.checkpoint import save_checkpoint
from voxlib.config import Config, ConfigError
from voxlib.features import spectrogram
from voxlib.model import (Discriminator, StatsHead, count_flops, decay_groups, envelope_projection,
                          load_discriminator, model_options, time_statistics, utterance_norm)
from voxlib.perturb import split_source_filter

HEADS = {"speaker": 6, "birthplace": 3, "sex": 2}
WIDTH = 1 / 16
REMEDIED = dict(utterance_norm=True, input_lifter=0, pooled_heads=("birthplace",), accent_branch=2, accent_width=0.0,
                dropout=0.2)


def test_remedies_off_build_the_seed_model_with_the_same_initial_weights_and_rng_use():
    options = model_options(Config().to_dict())
    assert options == {"width": 0.25, "utterance_norm": False, "input_lifter": 0, "pooled_heads": (),
                       "accent_branch": 0, "accent_width": 0.0, "dropout": 0.0}
    torch.manual_seed(3)
    seed = Discriminator(HEADS, WIDTH)
    after_seed = torch.get_rng_state()
    torch.manual_seed(3)
    off = Discriminator(HEADS, **{**options, "width": WIDTH})
    assert torch.equal(torch.get_rng_state(), after_seed)  # the same random draws, so training continues alike
    assert [type(m) for m in off.modules()] == [type(m) for m in seed.modules()]
    assert list(off.state_dict()) == list(seed.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(off.state_dict().values(), seed.state_dict().values()))
    x = torch.rand(2, 1, 256, 256)
    assert all(torch.equal(a, b) for a, b in zip(off.eval()(x).values(), seed.eval()(x).values()))


def test_settings_written_before_the_remedies_existed_give_the_seed_model():
    assert model_options({"width": 0.5}) == {"width": 0.5, "utterance_norm": False, "input_lifter": 0,
                                             "pooled_heads": (), "accent_branch": 0, "accent_width": 0.0,
                                             "dropout": 0.0}
    remedied = Config(utterance_norm=True, pooled_heads="birthplace", accent_branch=2, trunk_dropout=0.2,
                      width=WIDTH).to_dict()
    assert model_options(remedied) == {"width": WIDTH, **REMEDIED}


def test_utterance_norm_makes_the_output_blind_to_a_fixed_gain_per_frequency_bin():
    torch.manual_seed(0)
    x = torch.rand(2, 1, 256, 256) * 0.5 + 0.2
    gain = torch.linspace(-0.15, 0.2, 256).reshape(1, 1, 256, 1)  # a filter: a constant dB offset per bin
    normed = utterance_norm(x)
    torch.testing.assert_close(normed.mean(-1), torch.zeros(2, 1, 256), atol=1e-5, rtol=0)
    torch.testing.assert_close(normed.std(-1, unbiased=False), torch.ones(2, 1, 256), atol=1e-3, rtol=0)
    for on in (True, False):
        torch.manual_seed(1)
        model = Discriminator(HEADS, WIDTH, utterance_norm=on).eval()
        same = [torch.allclose(a, b, rtol=1e-4, atol=1e-7) for a, b in zip(model(x).values(), model(x + gain).values())]
        assert all(same) if on else not any(same)  # without it the gain changes every head


def test_time_pooled_head_gives_the_same_logits_for_a_map_and_the_map_repeated_in_time():
    torch.manual_seed(0)
    head = StatsHead(channels=8, bands=4, n_classes=5)
    fmap = torch.randn(3, 8, 4, 4)
    tiled = torch.cat([fmap, fmap], dim=-1)  # the same sound, twice as long
    torch.testing.assert_close(head(tiled), head(fmap))
    conv = nn.Conv2d(8, 5, kernel_size=4)
    assert conv(tiled).shape[-1] != conv(fmap).shape[-1]  # the seed's head is tied to the 4 positions
    # statistics: per channel and band, the mean and the (population) standard deviation over time
    stats = time_statistics(fmap).reshape(3, 8, 4, 2)
    torch.testing.assert_close(stats[..., 0], fmap.mean(-1))
    torch.testing.assert_close(stats[..., 1], fmap.std(-1, unbiased=False), atol=1e-4, rtol=1e-4)


def test_a_model_with_pooled_heads_reads_crops_of_any_length():
    torch.manual_seed(0)
    model = Discriminator(HEADS, WIDTH, pooled_heads=("speaker", "birthplace", "sex")).eval()
    for frames in (256, 512):
        logits = model(torch.rand(2, 1, 256, frames))
        assert {h: tuple(v.shape) for h, v in logits.items()} == {h: (2, n) for h, n in HEADS.items()}


def test_the_accent_branch_is_read_by_the_birthplace_head_alone():
    torch.manual_seed(0)
    model = Discriminator(HEADS, WIDTH, accent_branch=2)
    assert model.split == 12 and len([m for m in model.branch if isinstance(m, nn.Conv2d)]) == 2
    x = torch.rand(4, 1, 256, 256)
    logits, trunk, accent = model(x, return_trunk=True, return_accent=True)
    assert trunk.shape == (4, 128, 4, 4) and accent.shape == (4, model.accent_features_dim) == (4, 128 * 16)
    shared = list(model.main[:12].parameters())
    tail = list(model.main[12:].parameters())
    branch = list(model.branch.parameters())
    for head, reads, ignores in (("birthplace", shared + branch, tail), ("speaker", shared + tail, branch)):
        grads = torch.autograd.grad(logits[head].sum(), reads + ignores, retain_graph=True, allow_unused=True)
        assert all(g is not None and g.abs().sum() > 0 for g in grads[: len(reads)]), head
        assert all(g is None for g in grads[len(reads):]), head


def test_dropout_acts_in_training_only():
    torch.manual_seed(0)
    model = Discriminator(HEADS, WIDTH, dropout=0.5)
    x = torch.rand(4, 1, 256, 256)
    model.eval()
    assert torch.equal(model(x)["sex"], model(x)["sex"])
    model.train()
    assert not torch.equal(model(x)["sex"], model(x)["sex"])


def test_weight_decay_applies_to_conv_and_linear_weights_only():
    model = Discriminator(HEADS, WIDTH, pooled_heads=("birthplace",), accent_branch=1)
    decay, plain = decay_groups(model, 1e-3)
    assert decay["weight_decay"] == 1e-3 and plain["weight_decay"] == 0.0
    weights = [m.weight for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert {id(p) for p in decay["params"]} == {id(p) for p in weights}
    assert len(decay["params"]) + len(plain["params"]) == len(list(model.parameters()))
    bn = [m.weight for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert {id(p) for p in bn} <= {id(p) for p in plain["params"]}


def test_flops_count_the_branch_and_the_pooled_head():
    seed = Discriminator(HEADS, WIDTH)
    model = Discriminator(HEADS, WIDTH, pooled_heads=("birthplace",), accent_branch=1)
    # the branch repeats the last block (8x8 -> 4x4, 64 -> 128 channels); the pooled head is one
    # linear layer of 128 channels x 4 bands x 2 statistics instead of a 4x4 conv over 128 channels
    extra = 4 * 4 * 128 * 64 * 16 + 3 * (128 * 4 * 2) - 3 * 128 * 16
    assert count_flops(model) - count_flops(seed) == 2 * extra


def test_pooled_heads_must_name_heads():
    assert Config(pooled_heads="birthplace").pooled_heads == "birthplace"
    with pytest.raises(ConfigError, match="pooled_heads"):
        Config(pooled_heads="accent")


def test_a_remedied_checkpoint_reloads_for_prediction_from_its_settings(tmp_path):
    cfg = Config(width=WIDTH, utterance_norm=True, pooled_heads="birthplace", accent_branch=2, trunk_dropout=0.2,
                 speaker_adversary=0.5)
    torch.manual_seed(0)
    model = Discriminator(HEADS, **model_options(cfg.to_dict()))
    labels = {h: [f"{h}{i}" for i in range(n)] for h, n in HEADS.items()}
    runfolder.write_json(tmp_path, runfolder.LABELS, labels)
    runfolder.write_json(tmp_path, runfolder.CONFIG, cfg.to_dict())
    (tmp_path / runfolder.CHECKPOINTS).mkdir()
    save_checkpoint({"epoch": 1, "model": model.state_dict(), "head_sizes": HEADS, "width": WIDTH,
                     "settings": cfg.values("learning")}, tmp_path / runfolder.CHECKPOINTS / runfolder.LAST)
    loaded, record = load_discriminator(tmp_path, allow_unfinished=True)  # a checkpoint, no finished run around it
    assert isinstance(loaded.heads["birthplace"], StatsHead) and loaded.branch_blocks == 2 and loaded.normalise_input
    x = torch.rand(2, 1, 256, 256)
    model.eval()
    for head, logits in loaded(x).items():
        torch.testing.assert_close(logits, model(x)[head])


def test_input_lifter_keeps_the_envelope_and_drops_the_harmonics():
    sr, f0 = 16000, 180.0
    t = torch.arange(int(2.2 * sr)) / sr
    wave = sum((math.exp(-0.5 * ((k * f0 - 700.0) / 250.0) ** 2) + 0.01) * torch.sin(2 * torch.pi * k * f0 * t)
               for k in range(1, 43))
    spec = spectrogram((0.5 * wave / wave.abs().max()).numpy(), Config())[:, :, 20:276]  # (1, 256, 256)
    model = Discriminator(HEADS, WIDTH, input_lifter=30)
    envelope = model.prepare(spec[None])[0, 0].mean(1).numpy()
    raw = spec[0].mean(1).numpy()
    harmonics, _ = find_peaks(raw[:64], prominence=0.05)
    assert len(harmonics) >= 9  # a peak per harmonic below 2 kHz (every 5.7 bins)
    peaks, _ = find_peaks(envelope[:64], prominence=0.05)
    assert len(peaks) <= 2  # the harmonic ripple is gone
    smooth = gaussian_filter1d(raw, sigma=6)  # the envelope as a smoothed spectrum sees it
    assert np.corrcoef(smooth, envelope)[0, 1] > 0.95
    expected, _ = split_source_filter(spec[0].numpy(), 30)  # the same split the voice perturbation uses
    torch.testing.assert_close(torch.matmul(envelope_projection(256, 30), spec[0]), torch.from_numpy(expected),
                               atol=1e-5, rtol=0)


def test_a_birthplace_network_of_its_own_alone_reads_the_envelope():
    torch.manual_seed(0)
    own = Discriminator(HEADS, WIDTH, accent_branch=6, input_lifter=30).eval()
    assert own.split == 0 and len([m for m in own.branch if isinstance(m, nn.Conv2d)]) == 6
    plain = Discriminator(HEADS, WIDTH, accent_branch=6).eval()
    plain.load_state_dict(own.state_dict())  # the same weights; the lifter holds no parameters
    x = torch.rand(2, 1, 256, 256)
    lifted, raw = own(x), plain(x)
    for head in ("speaker", "sex"):  # the shared trunk still reads the full spectrum
        torch.testing.assert_close(lifted[head], raw[head])
    assert not torch.allclose(lifted["birthplace"], raw["birthplace"], rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(own.trunk(x), plain.trunk(x))
    with_lifter_everywhere = Discriminator(HEADS, WIDTH, input_lifter=30).eval()
    with_lifter_everywhere.load_state_dict({k: v for k, v in own.state_dict().items() if not k.startswith("branch")})
    assert not torch.allclose(with_lifter_everywhere(x)["speaker"], raw["speaker"], rtol=1e-4, atol=1e-7)


def test_the_birthplace_network_may_be_narrower_than_the_trunk():
    model = Discriminator(HEADS, 1 / 8, accent_branch=6, accent_width=1 / 16, pooled_heads=("birthplace",))
    convs = [m for m in model.branch if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [4, 8, 16, 32, 64, 128]
    assert model.heads["birthplace"].linear.in_features == model.accent_features_dim == 128 * 4 * 2
    assert model.heads["speaker"].in_channels == 256
    logits, accent = model(torch.rand(2, 1, 256, 256), return_accent=True)
    assert logits["birthplace"].shape == (2, 3) and accent.shape == (2, 1024)
    assert model_options(Config(accent_branch=6, accent_width=0.125).to_dict())["accent_width"] == 0.125


def test_a_two_channel_batch_gives_the_perturbed_view_to_the_birthplace_network_alone():
    torch.manual_seed(0)
    model = Discriminator(HEADS, WIDTH, accent_branch=6, input_lifter=30).eval()
    recorded, voiced = torch.rand(2, 1, 256, 256), torch.rand(2, 1, 256, 256)
    both = model(torch.cat([recorded, voiced], dim=1))
    for head in ("speaker", "sex"):
        torch.testing.assert_close(both[head], model(recorded)[head])
    torch.testing.assert_close(both["birthplace"], model(voiced)["birthplace"])
    with pytest.raises(ValueError, match="accent_branch 6"):
        Discriminator(HEADS, WIDTH, accent_branch=2)(torch.cat([recorded, voiced], dim=1))
