"""Property-based checks: for arbitrary shapes, token counts, densities, repeats and dtypes, every sparse-delta
op agrees with the reference (hypothesis picks the cases; shrinking reports the smallest failing one)."""

import math

import torch
from conftest import assert_close
from hypothesis import given, settings
from hypothesis import strategies as st

from ftcore import ops, reference


@st.composite
def cases(draw):
    out_f = draw(st.integers(1, 70))
    in_f = draw(st.integers(1, 70))
    lead = draw(st.lists(st.integers(1, 40), min_size=1, max_size=2))
    k = draw(st.integers(0, min(out_f * in_f, 300)))
    dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16]))
    index_dtype = draw(st.sampled_from([torch.int32, torch.int64]))
    repeats = draw(st.booleans())
    seed = draw(st.integers(0, 2**16))
    return out_f, in_f, lead, k, dtype, index_dtype, repeats, seed


@settings(max_examples=60, deadline=None)
@given(cases())
def test_ops_agree_with_reference(case):
    out_f, in_f, lead, k, dtype, index_dtype, repeats, seed = case
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, in_f, generator=g).to(dtype)
    grad = torch.randn(*lead, out_f, generator=g).to(dtype)
    idx = torch.randint(0, out_f * in_f, (k,), generator=g) if repeats else torch.randperm(out_f * in_f, generator=g)[:k]
    idx = torch.sort(idx).values.to(index_dtype)
    values = torch.randn(k, generator=g)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    scale = math.sqrt(math.prod(lead)) + 1

    assert_close(ops.sparse_delta_grad(grad, x, idx), reference.sparse_delta_grad(grad, x, idx), acc, scale)
    assert_close(ops.sparse_delta_linear(x, idx, values, out_f), reference.sparse_delta_linear(x, idx, values, out_f), dtype, scale)
    assert_close(
        ops.sparse_delta_linear_transpose(grad, idx, values, in_f),
        reference.sparse_delta_linear_transpose(grad, idx, values, in_f),
        dtype,
        scale,
    )
    weight = torch.randn(out_f, in_f, generator=g).to(dtype)
    expected = weight.clone()
    reference.sparse_delta_scatter_(expected, idx, values, -0.5)
    ops.sparse_delta_scatter_(weight, idx, values, -0.5)
    assert torch.equal(weight, expected)
    assert torch.equal(ops.sparse_delta_gather(weight, idx), reference.sparse_delta_gather(weight, idx))
