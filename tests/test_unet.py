"""debias.pipeline.unet: shapes, gradient flow, config round trip, depth, attention placement."""

from __future__ import annotations

import json
import math

import pytest
import torch

from debias.pipeline.unet import AttentionBlock, ResBlock, UNet, group_count, timestep_embedding

SMALL = dict(base_channels=16, channel_mult=(1, 2), num_res_blocks=1, num_head_channels=8)


def _perturb_zero_init(model: torch.nn.Module, seed: int = 0) -> None:
    """Gives the zero-initialised layers small random values so every path carries signal."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.copy_(0.05 * torch.randn(p.shape, generator=generator))


def _inputs(batch: int, channels: int, size: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, size, size, generator=generator)
    t = torch.randint(0, 1000, (batch,), generator=generator)
    return x, t


CASES = [
    # batch, image_size, in_channels, out_channels, num_classes, channel_mult, attention
    (1, 8, 1, None, None, (1, 2), (4,)),
    (3, 8, 3, None, None, (1, 2), (8, 4)),
    (3, 16, 1, 2, None, (1, 2, 2), (8,)),
    (1, 16, 3, None, 5, (1, 1, 2), ()),
    (3, 8, 1, None, 10, (1,), (8,)),
]


@pytest.mark.parametrize(
    "case", [pytest.param(c, id="B{}-S{}-C{}-O{}-K{}-M{}-A{}".format(*c)) for c in CASES]
)
def test_output_shape(case):
    batch, size, cin, cout, classes, mult, attn = case
    torch.manual_seed(0)
    model = UNet(
        image_size=size,
        in_channels=cin,
        out_channels=cout,
        base_channels=16,
        channel_mult=mult,
        num_res_blocks=1,
        attention_resolutions=attn,
        num_head_channels=8,
        num_classes=classes,
    )
    x, t = _inputs(batch, cin, size)
    y = None if classes is None else torch.arange(batch) % classes
    out = model(x, t, y)
    assert out.shape == (batch, cin if cout is None else cout, size, size)
    assert out.dtype == torch.float32
    # the last conv is zero-initialised, so an untrained model predicts exactly zero
    assert not out.any()
    _perturb_zero_init(model)
    out = model(x, t, y)
    assert out.abs().mean() > 0 and torch.isfinite(out).all()


def test_small_widths_use_divisor_groups():
    assert [group_count(c, 32) for c in (16, 24, 48, 64, 20, 40, 7)] == [16, 24, 24, 32, 20, 20, 7]
    model = UNet(image_size=8, base_channels=24, channel_mult=(1, 2), num_res_blocks=1)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert {(m.num_channels, m.num_groups) for m in norms} >= {(24, 24), (48, 24)}
    x, t = _inputs(2, 1, 8)
    assert model(x, t).shape == (2, 1, 8, 8)


def test_gradient_reaches_every_parameter():
    torch.manual_seed(0)
    model = UNet(image_size=8, num_classes=3, attention_resolutions=(8, 4), **SMALL)
    x, t = _inputs(3, 1, 8)
    y = torch.tensor([0, 1, 2])

    target = torch.randn(3, 1, 8, 8)

    # at init the output conv is zero, so only it gets a gradient
    (model(x, t, y) - target).square().mean().backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.any()}
    assert with_grad == {"out.2.weight", "out.2.bias"}

    # with every zero-initialised layer perturbed the gradient reaches all parameters
    model.zero_grad()
    _perturb_zero_init(model)
    (model(x, t, y) - target).square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()]
    assert missing == []


def test_one_training_step_moves_the_output():
    torch.manual_seed(0)
    model = UNet(image_size=8, **SMALL)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, t = _inputs(4, 1, 8)
    target = torch.randn(4, 1, 8, 8)
    before = torch.nn.functional.mse_loss(model(x, t), target)
    for _ in range(3):
        loss = torch.nn.functional.mse_loss(model(x, t), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = torch.nn.functional.mse_loss(model(x, t), target)
    assert after < before
    # by now the inner zero-initialised convs have left zero
    assert model.input_blocks[1][0].out_layers[-1].weight.any()


def test_config_round_trip():
    torch.manual_seed(0)
    model = UNet(
        image_size=16,
        in_channels=3,
        base_channels=16,
        channel_mult=(1, 2, 2),
        num_res_blocks=2,
        attention_resolutions=(8,),
        num_head_channels=8,
        dropout=0.1,
        num_classes=4,
        num_groups=8,
    )
    _perturb_zero_init(model)
    config = json.loads(json.dumps(model.config))
    assert config["out_channels"] == 3 and config["channel_mult"] == [1, 2, 2]
    rebuilt = UNet(**config)
    assert rebuilt.config == model.config
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    model.eval()
    rebuilt.eval()
    x, t = _inputs(3, 3, 16)
    y = torch.tensor([0, 3, 1])
    assert torch.equal(model(x, t, y), rebuilt(x, t, y))


@pytest.mark.parametrize("levels", [1, 2, 3])
def test_depth_knob(levels):
    mult = (1, 2, 2)[:levels]
    counts, params = [], []
    for depth in (1, 2, 3):
        model = UNet(image_size=8, base_channels=16, channel_mult=mult, num_res_blocks=depth)
        counts.append(sum(isinstance(m, ResBlock) for m in model.modules()))
        params.append(model.num_parameters())
        assert len(model.input_blocks) == 1 + depth * levels + levels - 1
        assert len(model.output_blocks) == (depth + 1) * levels
    assert counts == [(2 * depth + 1) * levels + 2 for depth in (1, 2, 3)]
    assert params[0] < params[1] < params[2]
    assert params[0] == sum(p.numel() for p in UNet(8, 1, None, 16, mult, 1).parameters())


def _attention_sides(model: UNet, x, t) -> list[int]:
    sides = []
    hooks = [
        m.register_forward_hook(lambda mod, inp, out: sides.append(inp[0].shape[-1]))
        for m in model.modules()
        if isinstance(m, AttentionBlock)
    ]
    model(x, t)
    for h in hooks:
        h.remove()
    return sides


@pytest.mark.parametrize(
    "attention, expected",
    [
        ((), []),
        ((16,), [16]),
        ((8,), [8]),
        ((16, 4), [16, 4]),
        ((32, 8, 1), [8]),  # sides the U-Net never reaches are ignored
    ],
)
def test_attention_at_requested_sides(attention, expected):
    depth = 2
    model = UNet(
        image_size=16,
        base_channels=16,
        channel_mult=(1, 2, 2),
        num_res_blocks=depth,
        attention_resolutions=attention,
        num_head_channels=8,
    )
    assert model.attention_sides == expected
    sides = _attention_sides(model, *_inputs(1, 1, 16))
    # R encoder + R + 1 decoder blocks at each requested side, and the middle block at 4
    want = {s: 2 * depth + 1 for s in expected}
    want[4] = want.get(4, 0) + 1
    assert {s: sides.count(s) for s in set(sides)} == want


def test_attention_heads_match_reference():
    torch.manual_seed(0)
    block = AttentionBlock(channels=24, num_head_channels=8, num_groups=32)
    assert block.num_heads == 3
    _perturb_zero_init(block)
    x = torch.randn(2, 24, 3, 5)
    b, c, h, w = x.shape
    qkv = block.qkv(block.norm(x).reshape(b, c, h * w))
    q, k, v = qkv.reshape(b, 3, 3, 8, h * w).unbind(1)  # [B, heads, d, T]
    weights = torch.softmax(torch.einsum("bhdt,bhds->bhts", q, k) / math.sqrt(8), dim=-1)
    mixed = torch.einsum("bhts,bhds->bhdt", weights, v).reshape(b, c, h * w)
    expected = x + block.proj_out(mixed).reshape(b, c, h, w)
    torch.testing.assert_close(block(x), expected, rtol=1e-5, atol=1e-5)
    # heads round down to a divisor of the width
    assert AttentionBlock(40, 16, 32).num_heads == 2
    assert AttentionBlock(12, 32, 32).num_heads == 1


def test_timestep_embedding_known_values():
    t = torch.tensor([0, 1, 500])
    emb = timestep_embedding(t, 8)
    freqs = torch.tensor([10000 ** (-i / 4) for i in range(4)])
    expected = torch.cat((torch.cos(t[:, None] * freqs), torch.sin(t[:, None] * freqs)), 1)
    torch.testing.assert_close(emb, expected)
    assert timestep_embedding(t, 7).shape == (3, 7) and not timestep_embedding(t, 7)[:, -1].any()


def test_conditioning_and_float_timesteps():
    torch.manual_seed(0)
    model = UNet(image_size=8, num_classes=3, **SMALL)
    _perturb_zero_init(model)
    x, t = _inputs(3, 1, 8)
    out = model(x, t, torch.tensor([0, 1, 2]))
    assert torch.equal(out, model(x, t.float(), torch.tensor([0, 1, 2])))
    other = model(x, t, torch.tensor([2, 1, 0]))
    assert torch.equal(other[1], out[1]) and not torch.equal(other[0], out[0])
    assert not torch.equal(model(x, t + 1, torch.tensor([0, 1, 2])), out)


def test_determinism():
    def build(seed):
        torch.manual_seed(seed)
        return UNet(image_size=8, **SMALL)

    a, b, c = build(3), build(3), build(4)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), name
    pairs = zip(a.parameters(), c.parameters(), strict=True)
    assert any(not torch.equal(pa, pc) for pa, pc in pairs)
    _perturb_zero_init(a)
    _perturb_zero_init(b)
    x, t = _inputs(2, 1, 8)
    assert torch.equal(a(x, t), b(x, t))


def test_constructor_errors():
    with pytest.raises(ValueError, match=r"image_size=12.*channel_mult"):
        UNet(image_size=12, channel_mult=(1, 2, 2, 2))
    with pytest.raises(ValueError, match="image_size"):
        UNet(image_size=0)
    with pytest.raises(TypeError, match="image_size"):
        UNet(image_size=8.0)
    for name in ("in_channels", "base_channels", "num_res_blocks", "num_head_channels"):
        with pytest.raises(ValueError, match=name):
            UNet(image_size=8, **{name: 0})
    for name in ("out_channels", "num_classes", "num_groups"):
        with pytest.raises(ValueError, match=name):
            UNet(image_size=8, **{name: -1})
    with pytest.raises(TypeError, match="num_groups"):
        UNet(image_size=8, num_groups=True)
    with pytest.raises(ValueError, match="channel_mult"):
        UNet(image_size=8, channel_mult=())
    with pytest.raises(ValueError, match="channel_mult"):
        UNet(image_size=8, channel_mult=(1, 0))
    with pytest.raises(TypeError, match="channel_mult"):
        UNet(image_size=8, channel_mult=(1, 1.5))
    with pytest.raises(ValueError, match="attention_resolutions"):
        UNet(image_size=8, attention_resolutions=(-8,))
    with pytest.raises(TypeError, match="attention_resolutions"):
        UNet(image_size=8, attention_resolutions=8)
    for bad in (1.0, -0.1):
        with pytest.raises(ValueError, match="dropout"):
            UNet(image_size=8, dropout=bad)
    with pytest.raises(TypeError, match="dropout"):
        UNet(image_size=8, dropout="0.1")


def test_forward_errors():
    model = UNet(image_size=8, **SMALL)
    x, t = _inputs(2, 1, 8)
    for bad in (torch.zeros(2, 3, 8, 8), torch.zeros(2, 1, 16, 16), torch.zeros(1, 8, 8)):
        with pytest.raises(ValueError, match="x must"):
            model(bad, t)
    for bad in (torch.zeros(3), torch.zeros(2, 1), torch.tensor(5)):
        with pytest.raises(ValueError, match="t must"):
            model(x, bad)
    with pytest.raises(ValueError, match="y was given"):
        model(x, t, torch.tensor([0, 1]))
    conditional = UNet(image_size=8, num_classes=3, **SMALL)
    with pytest.raises(ValueError, match="y must"):
        conditional(x, t)
    with pytest.raises(ValueError, match="y must"):
        conditional(x, t, torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="y must"):
        conditional(x, t, torch.tensor([0, 1, 2]))
