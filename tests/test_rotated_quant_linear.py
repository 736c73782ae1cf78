"""RotatedQuantLinear against the layer it replaces and against the ops it is built from; its int4 export; and
quantization-aware training of a real transformers model's down_proj layers."""

import pytest
import torch
from torch import nn

from ftcore import ops
from ftcore.nn import quant as quant_module
from ftcore.nn import Int4Linear, RotatedQuantLinear

from models import batch, tiny_llama

CONFIGS = [
    dict(online_rotation=False),
    dict(online_rotation=True),
    dict(online_rotation=True, w_group_size=32, a_group_size=24),
    dict(online_rotation=True, rotation_seed=None, w_symmetric=False, a_symmetric=False, a_clip_ratio=0.9),
]


def linear(in_features=96, out_features=40, bias=True, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(in_features, out_features, bias=bias)


@pytest.mark.parametrize("config", CONFIGS)
def test_forward_is_the_quantized_product(device, config):
    """y = fq_a(R·x) · fq_w(W·Rᵀ)ᵀ + b, composed here from the ops and the explicit rotation."""
    lin = linear().to(device)
    layer = RotatedQuantLinear.from_linear(lin, **config)
    x = torch.randn(3, 5, 96, device=device)
    w_rot = lin.weight.detach()
    if config["online_rotation"]:
        w_rot = ops.hadamard_transform(w_rot, signs=layer.rotation_signs)
        x_in = ops.hadamard_transform(x, signs=layer.rotation_signs)
    else:
        x_in = x
    a_gran = "group" if config.get("a_group_size") else "token"
    xq = ops.fake_quantize(x_in, 4, config.get("a_symmetric", True), a_gran, config.get("a_group_size"),
                           config.get("a_clip_ratio", 1.0))
    w_gran = "group" if config.get("w_group_size") else "channel"
    wq = ops.fake_quantize(w_rot, 4, config.get("w_symmetric", True), w_gran, config.get("w_group_size"))
    expected = nn.functional.linear(xq, wq, lin.bias)
    # The fused op rounds the rotation once where the composition rounds it twice: compare at one level's width.
    torch.testing.assert_close(layer(x), expected, rtol=0.05, atol=0.05)


def test_high_precision_layer_matches_the_linear_it_replaces(device):
    lin = linear().to(device)
    x = torch.randn(4, 96, device=device)
    for rotate in (False, True):
        layer = RotatedQuantLinear.from_linear(lin, w_bits=8, a_bits=None, online_rotation=rotate)
        torch.testing.assert_close(layer.unrotated_weight(), lin.weight.detach(), rtol=1e-5, atol=1e-6)
        rel = (layer(x) - lin(x)).norm() / lin(x).norm()
        assert float(rel) < 0.01


def test_rotation_is_folded_once_not_per_step(monkeypatch):
    layer = RotatedQuantLinear.from_linear(linear(), online_rotation=True)
    calls = []
    original = quant_module.ops.hadamard_transform
    monkeypatch.setattr(quant_module.ops, "hadamard_transform", lambda *a, **k: calls.append(1) or original(*a, **k))
    x = torch.randn(8, 96, requires_grad=True)
    for _ in range(3):
        layer(x).square().mean().backward()
    assert calls == []  # the weight is never re-rotated; the input rotation is fused with its fake-quant
    assert layer.weight.dtype == torch.float32 and layer.weight.grad.dtype == torch.float32


def test_weight_gradient_is_straight_through():
    layer = RotatedQuantLinear.from_linear(linear(), online_rotation=True, w_clip_ratio=0.8)
    x = torch.randn(6, 96)
    g = torch.randn(6, 40)
    layer(x).backward(g)
    xq = layer.quantizer(x, layer.rotation_signs)
    dense = g.t() @ xq  # the gradient of the quantized weight
    _, scale, zero = ops.fake_quantize(layer.weight.detach(), 4, True, "channel", None, 0.8, return_params=True)
    level = torch.round(layer.weight.detach() / scale)
    inside = (level >= -8) & (level <= 7)
    torch.testing.assert_close(layer.weight.grad, torch.where(inside, dense, 0), rtol=1e-5, atol=1e-5)
    assert 0 < int((~inside).sum())  # the clip ratio made some weights fall outside


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_export_matches_the_fake_quant_layer(device, config, dtype):
    layer = RotatedQuantLinear.from_linear(linear().to(device, dtype), **config)
    exported = layer.export()
    assert isinstance(exported, Int4Linear)
    assert exported.packed.dtype == torch.uint8 and exported.packed.shape == (40, 48)
    w = ops.dequantize_int4(exported.packed, exported.scale, exported.zero_point, exported.group_size)
    assert torch.equal(w, layer.quantized_weight().detach())  # the weights are bit-identical
    x = torch.randn(2, 7, 96, device=device, dtype=dtype)
    with torch.no_grad():
        expected = layer(x)
        got = exported(x)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got, expected, rtol=tol, atol=tol)
    # The packed weight is 4 bits a weight plus the scales.
    packed_bytes = sum(b.numel() * b.element_size() for b in (exported.packed, exported.scale, exported.zero_point))
    assert packed_bytes < layer.weight.numel() * 4 / 6


def test_bad_configuration_is_refused():
    cases = [
        (lambda: RotatedQuantLinear(188, 8, online_rotation=True), ValueError, "no Hadamard transform of size 188"),
        (lambda: RotatedQuantLinear(96, 8, w_bits=9), ValueError, "w_bits must be an integer in"),
        (lambda: RotatedQuantLinear(96, 8, a_bits=1), ValueError, "a_bits must be an integer in"),
        (lambda: RotatedQuantLinear(96, 8, w_group_size=40), ValueError, "w_group_size .40. must divide"),
        (lambda: RotatedQuantLinear(96, 8, w_bits=3).export(), ValueError, "export.. packs 4-bit weights"),
        (lambda: RotatedQuantLinear(95, 8).export(), ValueError, "even in_features"),
        (lambda: RotatedQuantLinear.from_linear(nn.Conv1d(3, 3, 1)), TypeError, "needs an nn.Linear"),
    ]
    for fn, exc, pattern in cases:
        with pytest.raises(exc, match=pattern):
            fn()


def swap_down_proj(model, **config):
    for layer in model.model.layers:
        layer.mlp.down_proj = RotatedQuantLinear.from_linear(layer.mlp.down_proj, **config)
    return model


def test_quantization_aware_training_on_llama():
    """W4A4 down_proj (intermediate 96 = 12·8: a non-power-of-two rotation) in a real Llama: the model trains,
    and the exported int4 model gives the same logits as the fake-quant one."""
    model = swap_down_proj(tiny_llama(), online_rotation=True).train()
    data = batch(seed=1, size=4, length=24)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(12):
        loss = model(**data).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    assert losses[-1] < losses[0] * 0.8
    model.eval()
    with torch.no_grad():
        fake = model(**data).logits
        for layer in model.model.layers:
            layer.mlp.down_proj = layer.mlp.down_proj.export()
        packed = model(**data).logits
    torch.testing.assert_close(packed, fake, rtol=1e-4, atol=1e-4)


# ---- the learnable weight scale (LSQ) ------------------------------------------------------------------------------


@pytest.mark.parametrize("group_size", [None, 16])
def test_learnable_scale_starts_as_the_min_max_scale_and_learns(group_size):
    torch.manual_seed(0)
    linear = nn.Linear(32, 12)
    plain = RotatedQuantLinear.from_linear(linear, w_group_size=group_size, online_rotation=True)
    lsq = RotatedQuantLinear.from_linear(linear, w_group_size=group_size, online_rotation=True, w_learnable_scale=True)
    assert plain.weight_scale is None and "weight_scale" not in dict(plain.named_parameters())
    assert lsq.weight_scale.shape == (12, 1 if group_size is None else 2)
    x = torch.randn(5, 32)
    torch.testing.assert_close(lsq(x), plain(x), rtol=0, atol=1e-6)  # the same scale to start with
    lsq(x).square().sum().backward()
    assert lsq.weight_scale.grad is not None and lsq.weight_scale.grad.abs().sum() > 0
    assert lsq.weight.grad is not None
    before = lsq.weight_scale.detach().clone()
    opt = torch.optim.SGD(lsq.parameters(), lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        lsq(x).square().sum().backward()
        opt.step()
    assert not torch.equal(lsq.weight_scale.detach(), before)
    # The export packs with the learned scale: the same outputs as the fake-quant layer.
    exported = lsq.export()
    assert torch.equal(exported.scale, lsq._weight_scale().detach())
    torch.testing.assert_close(exported(x), lsq(x).detach(), rtol=1e-5, atol=1e-5)


def test_a_learnable_scale_stepped_below_zero_still_gets_a_gradient():
    torch.manual_seed(1)
    lsq = RotatedQuantLinear.from_linear(nn.Linear(16, 4), w_learnable_scale=True)
    with torch.no_grad():
        lsq.weight_scale[0] = -1e-3  # where a large optimizer step can put it
    y = lsq(torch.randn(3, 16))
    assert y.isfinite().all()
    y.square().sum().backward()
    assert lsq.weight_scale.grad[0].abs().item() > 0  # the floor is straight-through: the channel can recover


def test_learnable_scale_needs_symmetric_quantized_weights():
    with pytest.raises(ValueError, match="w_learnable_scale needs"):
        RotatedQuantLinear(16, 4, w_symmetric=False, w_learnable_scale=True)
    with pytest.raises(ValueError, match="w_learnable_scale needs"):
        RotatedQuantLinear(16, 4, w_bits=None, w_learnable_scale=True)
    import ftcore

    with pytest.raises(ValueError, match="w_learnable_scale needs"):
        ftcore.QuantConfig(w_learnable_scale=True)  # the default weights are asymmetric
    assert ftcore.QuantConfig(w_symmetric=True, w_learnable_scale=True).w_learnable_scale
