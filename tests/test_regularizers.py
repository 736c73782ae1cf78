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


def _per_example_mse(model, batch):
    x, y = batch
    return ((model(x) - y) ** 2).mean(dim=tuple(range(1, y.dim())))


@pytest.mark.parametrize("kind", ["sparse", "structured"])
@pytest.mark.parametrize("tokens", [False, True])
def test_fisher_is_the_mean_of_per_example_squared_gradients_at_the_delta(kind, tokens):
    model, _ = _model(kind)
    torch.manual_seed(1)
    shape = (5, 3) if tokens else (5,)
    batches = [(torch.randn(*shape, 8), torch.randn(*shape, 6)) for _ in range(2)]
    for p in ftcore.trainable_parameters(model):
        p.grad = torch.full_like(p, 7.0)  # left as it was
    fisher = ftcore.DiagonalFisher.estimate(model, batches, _per_example_mse)
    assert fisher.examples == 10
    for p in ftcore.trainable_parameters(model):
        assert torch.equal(p.grad, torch.full_like(p, 7.0))
    # Reference: each example alone, its gradient with respect to the delta, squared, averaged.
    layers = {"0": model[0], "2": model[2]}
    want = {name: torch.zeros_like(layer.delta) for name, layer in layers.items()}
    for x, y in batches:
        for i in range(x.shape[0]):
            grads = torch.autograd.grad(_per_example_mse(model, (x[i : i + 1], y[i : i + 1])).sum(),
                                        [layer.delta for layer in layers.values()])
            for name, g in zip(layers, grads):
                want[name] += g.pow(2)
    for name, layer in layers.items():
        positions, values = fisher.values[name]
        assert torch.equal(positions, getattr(layer, layer.index_name))
        torch.testing.assert_close(values, want[name] / 10, rtol=1e-4, atol=1e-7)


def test_ewc_penalty_and_moved_positions():
    model, _ = _model("sparse")
    batches = [(torch.randn(4, 8), torch.randn(4, 6))]
    fisher = ftcore.DiagonalFisher.estimate(model, batches, _per_example_mse)
    penalty = ftcore.ewc_penalty(model, fisher, strength=2.0)
    want = sum((fisher.values[n][1] * m.values.detach() ** 2).sum() for n, m in (("0", model[0]), ("2", model[2])))
    torch.testing.assert_close(penalty, 2.0 * want)
    penalty.backward()
    torch.testing.assert_close(model[0].values.grad, 2.0 * 2 * fisher.values["0"][1] * model[0].values.detach())
    # Regrowth moved two positions of layer 0: the kept one keeps its estimate, the new ones get zero.
    old = model[0].indices.clone()
    free = [i for i in range(model[0].weight.numel()) if i not in old.tolist()][:2]
    moved = torch.sort(torch.cat([old[:1], torch.tensor(free, dtype=old.dtype)])).values
    model[0].set_delta(moved, torch.ones(3))
    aligned = fisher.aligned("0", model[0])
    expect = torch.tensor([fisher.values["0"][1][0] if int(p) == int(old[0]) else 0.0 for p in moved])
    torch.testing.assert_close(aligned, expect)


def test_fisher_refuses_what_it_cannot_count_right():
    model, _ = _model("sparse")
    x, y = torch.randn(4, 3, 8), torch.randn(4, 3, 6)
    flattened = lambda m, b: ((m(b[0].reshape(-1, 8)) - b[1].reshape(-1, 6)) ** 2).view(4, -1).mean(1)
    with pytest.raises(ValueError, match="must see the batch on dim 0"):
        ftcore.DiagonalFisher.estimate(model, [(x, y)], flattened)
    twice = lambda m, b: _per_example_mse(m, b) + _per_example_mse(m, b)
    with pytest.raises(ValueError, match="ran twice in one forward"):
        ftcore.DiagonalFisher.estimate(model, [(x, y)], twice)

    def with_a_reference_pass(m, b):
        with torch.no_grad():
            m(b[0])
        return _per_example_mse(m, b)

    with pytest.raises(ValueError, match="ran without autograd"):
        ftcore.DiagonalFisher.estimate(model, [(x, y)], with_a_reference_pass)
    with pytest.raises(ValueError, match="one loss per example"):
        ftcore.DiagonalFisher.estimate(model, [(x, y)], lambda m, b: _per_example_mse(m, b).mean())
    model.is_gradient_checkpointing = True
    with pytest.raises(ValueError, match="gradient checkpointing off"):
        ftcore.DiagonalFisher.estimate(model, [(x, y)], _per_example_mse)
    for layer in (model[0], model[2]):
        assert not layer._forward_hooks  # removed on every refusal
