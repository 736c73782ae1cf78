"""SparseDeltaLinear against the layer it replaces and against dense fine-tuning of the same entries."""

import pytest
import torch
from conftest import assert_close, compare_with_dense, random_indices
from torch import nn
from transformers.pytorch_utils import Conv1D

from ftcore import SparseDeltaLinear, reference
from ftcore.nn.sparse_delta import _SparseDeltaLinearFunction


def bits(t):
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def make_layer(kind, in_features=24, out_features=16, dtype=torch.float32, device="cpu", seed=0):
    torch.manual_seed(seed)
    if kind == "linear":
        layer = nn.Linear(in_features, out_features)
    else:
        layer = Conv1D(out_features, in_features)  # GPT-2 keeps the weight as (in, out)
        nn.init.normal_(layer.weight, std=0.2)
        nn.init.normal_(layer.bias, std=0.2)
    return layer.to(device=device, dtype=dtype)


def logical(layer):
    return layer.weight.t() if isinstance(layer, Conv1D) else layer.weight


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("merged", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_output_at_init_equals_base(device, kind, merged, dtype):
    base = make_layer(kind, dtype=dtype, device=device)
    reference_layer = make_layer(kind, dtype=dtype, device=device)
    module = SparseDeltaLinear(base, random_indices(16 * 24, 40, device=device), merged=merged)
    x = torch.randn(3, 5, 24, device=device, dtype=dtype)
    assert torch.equal(module(x), reference_layer(x))
    assert module.values.dtype == torch.float32 and module.values.requires_grad
    assert not any(p.requires_grad for p in module.base_layer.parameters())


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("merged", [True, False])
def test_gradients_equal_dense_finetuning_restricted_to_the_delta(device, kind, merged):
    base = make_layer(kind, device=device)
    dense = make_layer(kind, device=device)  # the same weights, fully trainable
    idx = random_indices(16 * 24, 50, device=device)
    module = SparseDeltaLinear(base, idx, merged=merged)
    with torch.no_grad():
        module.values.copy_(torch.randn(50) * 0.1)
        w = logical(dense)  # Conv1D: written through the transposed view
        w.copy_(w + reference.dense_delta(idx, module.values, 16, 24))
    dense_weight_grad = compare_with_dense(module, dense, torch.randn(2, 7, 24, device=device))
    torch.testing.assert_close(module.values.grad, dense_weight_grad.flatten()[idx.long()], rtol=1e-5, atol=1e-5)


def test_merged_and_unmerged_agree_and_track_optimizer_steps(device):
    idx = random_indices(16 * 24, 60, device=device)
    a = SparseDeltaLinear(make_layer("linear", device=device), idx, merged=True)
    b = SparseDeltaLinear(make_layer("linear", device=device), idx, merged=False)
    opt_a = torch.optim.AdamW([a.values], lr=0.05)
    opt_b = torch.optim.AdamW([b.values], lr=0.05)
    x = torch.randn(32, 24, device=device)
    target = torch.randn(32, 16, device=device)
    for _ in range(5):
        for module, opt in ((a, opt_a), (b, opt_b)):
            loss = ((module(x) - target) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    torch.testing.assert_close(a.values, b.values, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a(x), b(x), rtol=1e-5, atol=1e-5)
    assert a.values.abs().sum() > 0  # it trained


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_unmerge_restores_base_weight_bit_for_bit(device, dtype):
    layer = make_layer("linear", dtype=dtype, device=device)
    original = layer.weight.detach().clone()
    module = SparseDeltaLinear(layer, random_indices(16 * 24, 80, device=device))
    opt = torch.optim.SGD([module.values], lr=0.5)
    x = torch.randn(8, 24, device=device, dtype=dtype)
    for _ in range(3):
        module(x).float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    module(x)
    assert not torch.equal(bits(layer.weight), bits(original))  # merged: the delta is in the weight
    module.set_merged(False)
    assert torch.equal(bits(layer.weight), bits(original))
    unmerged_out = module(x)
    module.set_merged(True)
    torch.testing.assert_close(module(x), unmerged_out, **({} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}))
    assert torch.equal(bits(module.unwrap(with_delta=False).weight), bits(original))


def test_fp32_master_keeps_updates_bf16_would_lose(device):
    layer = make_layer("linear", dtype=torch.bfloat16, device=device)
    with torch.no_grad():
        layer.weight.fill_(1.0)
    module = SparseDeltaLinear(layer, torch.tensor([0, 1], device=device))
    for _ in range(100):  # each step far below bf16's resolution at 1.0 (2^-8)
        with torch.no_grad():
            module.values += 1e-4
    assert abs(module.values[0].item() - 0.01) < 1e-5  # the fp32 master saw every step
    module(torch.randn(1, 24, device=device, dtype=torch.bfloat16))
    assert layer.weight[0, 0].item() == pytest.approx(1.0 + 0.01, abs=4e-3)


def test_gradient_accumulation_and_partial_backprop(device):
    module = SparseDeltaLinear(make_layer("linear", device=device), random_indices(16 * 24, 30, device=device))
    x1, x2 = torch.randn(4, 24, device=device), torch.randn(4, 24, device=device)
    module(x1).sum().backward()
    first = module.values.grad.clone()
    module(x2).sum().backward()
    module.values.grad -= first
    fresh = SparseDeltaLinear(make_layer("linear", device=device), module.indices)
    fresh(x2).sum().backward()
    torch.testing.assert_close(module.values.grad, fresh.values.grad)


def test_saves_only_what_backward_needs(device):
    module = SparseDeltaLinear(make_layer("linear", in_features=64, out_features=32, device=device), random_indices(64 * 32, 20, device=device))
    x = torch.randn(16, 64, device=device)

    def saved_bytes(fn):
        total = []

        def pack(t):
            total.append(t.numel() * t.element_size() if t.data_ptr() != module.base_layer.weight.data_ptr() else 0)
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn()
        return sum(total)

    # Trainable delta: the input is kept (for sparse_delta_grad), no weight copy.
    assert saved_bytes(lambda: module(x)) <= x.numel() * 4 + module.values.numel() * 4 + module.indices.numel() * 4
    # Frozen delta, frozen input (a frozen layer above the lowest trainable one): no activation kept.
    module.values.requires_grad_(False)
    assert saved_bytes(lambda: module(x)) < x.numel() * 4


def test_autocast_bfloat16_cpu():
    module = SparseDeltaLinear(make_layer("linear"), random_indices(16 * 24, 30))
    x = torch.randn(6, 24, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = module(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert module.values.grad.dtype == torch.float32 and x.grad.dtype == torch.float32
    assert torch.isfinite(module.values.grad).all()


def test_function_gradcheck_float64_unmerged():
    layer = make_layer("linear", in_features=7, out_features=5, dtype=torch.float64)
    idx = random_indices(35, 12)
    x = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    values = torch.randn(12, dtype=torch.float64, requires_grad=True)

    def f(x, values):
        return _SparseDeltaLinearFunction.apply(x, values, layer.weight, layer.bias, idx, False, None)

    assert torch.autograd.gradcheck(f, (x, values))


def test_set_delta_validates_indices():
    module = SparseDeltaLinear(make_layer("linear"), random_indices(16 * 24, 10))
    with pytest.raises(ValueError, match="strictly increasing"):
        module.set_delta(torch.tensor([3, 3, 5]))
    with pytest.raises(IndexError, match="out of range"):
        module.set_delta(torch.tensor([3, 16 * 24]))
    with pytest.raises(TypeError, match="int32 or int64"):
        module.set_delta(torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="one entry per index"):
        module.set_delta(torch.tensor([1, 2]), torch.zeros(3))
    with pytest.raises(TypeError, match="wraps nn.Linear"):
        SparseDeltaLinear(nn.Conv2d(3, 3, 1), torch.tensor([0]))


def test_reference_dense_delta_matches_module_delta():
    layer = make_layer("linear")
    idx = random_indices(16 * 24, 25)
    module = SparseDeltaLinear(layer, idx)
    with torch.no_grad():
        module.values.normal_()
    x = torch.randn(5, 24)
    expected = torch.nn.functional.linear(x, make_layer("linear").weight + reference.dense_delta(idx, module.values, 16, 24), layer.bias)
    assert_close(module(x), expected, torch.float32, scale=4)
