"""The discriminator matches the seed architecture; the FLOP count matches a hand computation."""
from __future__ import annotations

import torch
from torch import nn

from voxlib.model import Discriminator, count_flops, trunk_channels

SEED_HEADS = {"speaker": 1421, "birthplace": 53, "sex": 2}


def test_seed_parameter_count_is_exact():
    with torch.device("meta"):  # 93 M parameters: shapes only, no memory
        model = Discriminator(SEED_HEADS, width=1.0)
    assert sum(p.numel() for p in model.parameters()) == 93_075_716
    convs = [m for m in model.main if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [64, 128, 256, 512, 1024, 2048]
    assert all(c.kernel_size == (4, 4) and c.stride == (2, 2) and c.padding == (1, 1) for c in convs)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.main) == 6
    slopes = [m.negative_slope for m in model.main if isinstance(m, nn.LeakyReLU)]
    assert slopes == [0.2] * 6


def test_forward_shapes_and_trunk():
    torch.manual_seed(0)
    model = Discriminator({"speaker": 7, "sex": 2}, width=1 / 16).eval()
    x = torch.rand(3, 1, 256, 256)
    logits = model(x)
    assert list(logits) == ["speaker", "sex"]
    assert logits["speaker"].shape == (3, 7) and logits["sex"].shape == (3, 2)
    out, trunk = model(x, return_trunk=True)
    assert trunk.shape == (3, 128, 4, 4)
    assert torch.equal(trunk, model.trunk(x))
    assert torch.equal(out["sex"], logits["sex"])


def test_width_rounds_channels():
    assert trunk_channels(0.25) == [16, 32, 64, 128, 256, 512]
    assert trunk_channels(0.1) == [6, 13, 26, 51, 102, 205]


def test_count_flops_matches_hand_computation():
    model = Discriminator({"speaker": 10, "birthplace": 3, "sex": 2}, width=1 / 16)
    # blocks: output size^2 * out_ch * in_ch * 4*4 ; channels 4, 8, 16, 32, 64, 128
    macs = (
        128 * 128 * 4 * 1 * 16
        + 64 * 64 * 8 * 4 * 16
        + 32 * 32 * 16 * 8 * 16
        + 16 * 16 * 32 * 16 * 16
        + 8 * 8 * 64 * 32 * 16
        + 4 * 4 * 128 * 64 * 16
        + (10 + 3 + 2) * 128 * 16  # heads: 1x1 output, kernel 4x4 over 128 channels
    )
    assert count_flops(model) == 2 * macs
    assert count_flops(model, batch=5) == 10 * macs
    assert count_flops(model, batch=2, training=True) == 3 * 2 * 2 * macs


def test_count_flops_agrees_with_traced_shapes():
    """Cross-check the shape arithmetic against the shapes a real forward produces."""
    model = Discriminator({"a": 5, "b": 2}, width=0.1).eval()
    macs = []

    def hook(module, inputs, output):
        k = module.kernel_size[0] * module.kernel_size[1]
        macs.append(output.shape[2] * output.shape[3] * module.out_channels * module.in_channels * k)

    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            m.register_forward_hook(hook)
    with torch.no_grad():
        model(torch.zeros(1, 1, 256, 256))
    assert count_flops(model) == 2 * sum(macs)


def test_small_map_convolutions_as_matmul_equal_the_convolution():
    """The CPU matmul path of the last block and the heads gives nn.Conv2d's values and gradients."""
    from voxlib.model import Conv2d

    torch.manual_seed(0)
    for cin, cout, k, s, p, size in ((6, 5, 4, 2, 1, 8), (6, 3, 4, 1, 0, 4), (2, 4, 3, 2, 1, (7, 5))):
        size = size if isinstance(size, tuple) else (size, size)
        for fmt in (torch.contiguous_format, torch.channels_last):
            conv = Conv2d(cin, cout, k, stride=s, padding=p).to(memory_format=fmt)
            x = torch.randn(3, cin, *size).contiguous(memory_format=fmt).requires_grad_()
            out = conv(x)
            ref = torch.nn.functional.conv2d(x, conv.weight, conv.bias, stride=s, padding=p)
            assert out.shape == ref.shape and torch.allclose(out, ref, atol=1e-5)
            grads = torch.autograd.grad(out.square().sum(), (x, conv.weight, conv.bias))
            expected = torch.autograd.grad(ref.square().sum(), (x, conv.weight, conv.bias))
            for g, e in zip(grads, expected):
                assert torch.allclose(g, e, atol=1e-4)
    model = Discriminator({"a": 3}, width=1 / 16)
    assert all(type(m) is Conv2d for m in model.modules() if isinstance(m, nn.Conv2d))
