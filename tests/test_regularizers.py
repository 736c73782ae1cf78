"""Pulls toward the base: AdamW's decoupled decay on ftcore's deltas, and l2_to_base."""

import pytest
import torch
from torch import nn

import ftcore


def _model(kind):
    torch.manual_seed(0)
    first, second = nn.Linear(8, 12), nn.Linear(12, 6)
    base = [first.weight.detach().clone(), second.weight.detach().clone()]
    if kind == "sparse":
        wrap = lambda layer, n: ftcore.SparseDeltaLinear(layer, torch.sort(torch.randperm(layer.weight.numel())[:n]).values)
    else:
        wrap = lambda layer, n: ftcore.StructuredSparseLinear(layer, torch.sort(torch.randperm(layer.in_features)[:n]).values)
    model = nn.Sequential(wrap(first, 3), nn.ReLU(), wrap(second, 3))
    with torch.no_grad():
        for p in ftcore.trainable_parameters(model):
            p.normal_()
    return model, base


@pytest.mark.parametrize("kind", ["sparse", "structured"])
def test_l2_to_base_is_the_squared_distance_of_the_weight_to_w0(kind):
    model, base = _model(kind)
    penalty = ftcore.l2_to_base(model, strength=0.5)
    model(torch.randn(1, 8))
    distance = sum(((m.base_layer.weight.double() - w0.double()) ** 2).sum() for m, w0 in zip((model[0], model[2]), base))
    torch.testing.assert_close(penalty.double(), 0.5 * distance, rtol=1e-5, atol=1e-6)
    penalty.backward()
    for p in ftcore.trainable_parameters(model):
        torch.testing.assert_close(p.grad, 2 * 0.5 * p.detach())


@pytest.mark.parametrize("kind", ["sparse", "structured"])
def test_adamw_decay_on_the_delta_pulls_the_weight_back_to_w0(kind):
    """Decay-only steps (zero gradient) shrink W − W0 by (1 − lr·λ) a step: the pull is toward the base."""
    model, base = _model(kind)
    lr, decay, steps = 0.1, 0.5, 3
    before = [p.detach().clone() for p in ftcore.trainable_parameters(model)]
    optimizer = torch.optim.AdamW(ftcore.trainable_parameters(model), lr=lr, weight_decay=decay)
    for _ in range(steps):
        for p in ftcore.trainable_parameters(model):
            p.grad = torch.zeros_like(p)
        optimizer.step()
    model(torch.randn(1, 8))
    factor = (1 - lr * decay) ** steps
    for p, b in zip(ftcore.trainable_parameters(model), before):
        torch.testing.assert_close(p.detach(), b * factor)
    for m, w0 in zip((model[0], model[2]), base):
        assert (m.base_layer.weight - w0).abs().max() > 0  # still merged with the (shrunk) delta
    ftcore.unmerge(model)
    for m, w0 in zip((model[0], model[2]), base):
        assert torch.equal(m.base_layer.weight, w0)


def test_l2_to_base_refuses_bad_input():
    model, _ = _model("sparse")
    with pytest.raises(ValueError, match="strength must be a number >= 0"):
        ftcore.l2_to_base(model, strength=-1.0)
    with pytest.raises(ValueError, match="carries no ftcore adapter"):
        ftcore.l2_to_base(nn.Linear(3, 3))


def test_l2_to_base_refuses_a_sharded_delta():
    model, _ = _model("sparse")
    model[0].values.__dict__["ds_id"] = 7  # how DeepSpeed ZeRO-3 marks a partitioned Parameter
    with pytest.raises(ValueError, match="sharded by DeepSpeed ZeRO-3; use AdamW's weight_decay"):
        ftcore.l2_to_base(model)
