"""The merged-weight contract: while merged, the base weight holds W0 + Δ, and nothing may ever make a forward,
a gradient or a checkpoint silently wrong.

* every write into a weight bumps its version counter, so autograd raises rather than use rewritten values;
* a reference forward under ``ftcore.disable`` never writes, and gives the base layer's output;
* a change of Δ is seen whatever wrote it (any optimizer, an engine stepping a copy), once per optimizer step:
  not between two forwards before one backward, not between micro-batches;
* state dicts, partial loads, deep copies and pickles keep W0.
"""

import copy
import io
import pickle

import pytest
import torch
from torch import nn

import ftcore
from ftcore import SparseDeltaLinear, StructuredSparseLinear


def sparse(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return SparseDeltaLinear(nn.Linear(8, 4, bias=True).to(dtype), torch.arange(0, 32, 3))


def structured(dtype=torch.float32, rows=False, seed=0):
    torch.manual_seed(seed)
    return StructuredSparseLinear(nn.Linear(8, 4, bias=True).to(dtype), torch.tensor([1, 2] if rows else [1, 6]), rows=rows)


LAYERS = {"sparse": sparse, "columns": structured, "rows": lambda dtype=torch.float32, seed=0: structured(dtype, True, seed)}


def with_delta(layer, value=0.5):
    with torch.no_grad():
        layer.delta.fill_(value)
    return layer


def base_weight(make):
    """W0 of a freshly made layer (the layers are made with fixed seeds)."""
    return make().base_layer.weight.detach().clone()


def dense_delta(layer):
    """Δ as a dense (out, in) tensor."""
    d = torch.zeros(layer.out_features, layer.in_features, dtype=torch.float64)
    if isinstance(layer, SparseDeltaLinear):
        d.view(-1)[layer.indices.long()] = layer.values.detach().double()
    elif layer.rows:
        d[layer.index] = layer.block.detach().double()
    else:
        d[:, layer.index] = layer.block.detach().double()
    return d


def expected_output(layer, w0, x):
    return (x.double() @ (w0.double() + dense_delta(layer)).t() + layer.bias.double()).to(x.dtype)


# ---- 1. writes bump the version: autograd raises instead of using a rewritten weight -------------------------


def test_the_in_place_ops_bump_the_written_tensors_version():
    w = torch.zeros(4, 8)
    v = w._version
    ftcore.ops.sparse_delta_scatter_(w, torch.tensor([1, 5]), torch.ones(2), 1.0)
    assert w._version > v
    v = w._version
    ftcore.ops.structured_block_scatter_(w.t(), torch.tensor([0, 2]), torch.ones(8, 2), 1.0)  # through a view
    assert w._version > v
    v = w._version
    torch.ops.ftcore.sparse_delta_scatter_.default(w, torch.tensor([3]), torch.ones(1), 1.0, None)  # raw op too
    assert w._version > v


@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_a_reference_forward_between_forward_and_backward_keeps_the_gradient_right(kind):
    """The KL / DPO / GRPO pattern: policy forward, reference forward under ftcore.disable, then backward."""
    make = LAYERS[kind]
    layer, w0 = with_delta(make()), base_weight(make)
    x = torch.randn(5, 8, requires_grad=True)
    y = layer(x)
    with ftcore.disable(nn.Sequential(layer)), torch.no_grad():
        reference = layer(x)
    torch.testing.assert_close(reference, x.detach() @ w0.t() + layer.bias.detach(), rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y)
    y.backward(g)
    torch.testing.assert_close(x.grad, g @ (w0 + dense_delta(layer).float()), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_a_bf16_reference_forward_never_carries_the_delta(kind):
    make = LAYERS[kind]
    layer, w0 = with_delta(make(torch.bfloat16), 0.25), base_weight(lambda: make(torch.bfloat16))
    x = torch.randn(64, 8, dtype=torch.bfloat16)
    layer(x)  # merged
    with ftcore.disable(nn.Sequential(layer)), torch.no_grad():
        reference = layer(x).float()
    base = nn.functional.linear(x, w0, layer.bias).float()  # what the base layer gives, one bf16 GEMM
    scale = base.abs().max()
    # one GEMM's rounding: a bf16 ulp of the output's scale, where the delta would move outputs by about 0.25·|x|
    assert (reference - base).abs().max() <= scale * 2**-7
    assert (layer(x).float() - base).abs().max() > 0.1  # and the adapted output does differ


@pytest.mark.parametrize("kind", sorted(LAYERS))
@pytest.mark.parametrize("write", ["unmerge", "set_merged", "set_delta"])
def test_any_rewrite_of_a_saved_weight_before_backward_raises(kind, write):
    layer = with_delta(LAYERS[kind]())
    x = torch.randn(5, 8, requires_grad=True)
    y = layer(x)
    if write == "unmerge":
        ftcore.unmerge(nn.Sequential(layer))
    elif write == "set_merged":
        layer.set_merged(False)
    elif isinstance(layer, SparseDeltaLinear):
        layer.set_delta(torch.arange(1, 32, 3))
    else:
        layer.set_block(torch.tensor([0, 3]))
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()
