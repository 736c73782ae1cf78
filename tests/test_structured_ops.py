"""Structured-block ops against the reference, opcheck, float64 gradcheck, and bad input."""

import pytest
import torch
from conftest import FLOAT_DTYPES, assert_close

from ftcore import ops, reference

OPCHECK_TESTS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


def sorted_subset(n, k, seed=0, dtype=torch.int64, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return torch.sort(torch.randperm(n, generator=g)[:k]).values.to(device=device, dtype=dtype)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("lead", [(5,), (2, 7)])
def test_gather_and_scatter_columns(device, dtype, index_dtype, lead):
    x = torch.randn(*lead, 40, device=device).to(dtype)
    cols = sorted_subset(40, 9, dtype=index_dtype, device=device)
    got = ops.gather_columns(x, cols)
    assert got.is_contiguous() and torch.equal(got, reference.gather_columns(x, cols))
    strided = torch.randn(*lead, 80, device=device).to(dtype)[..., ::2]
    assert torch.equal(ops.gather_columns(strided, cols), reference.gather_columns(strided, cols))
    assert torch.equal(ops.scatter_columns(got, cols, 40), reference.scatter_columns(got, cols, 40))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("mode", ["columns", "rows", "both", "none"])
def test_block_grad_in_fp32(device, dtype, mode):
    g = torch.randn(3, 50, 24, device=device).to(dtype)
    x = torch.randn(3, 50, 40, device=device).to(dtype)
    rows = sorted_subset(24, 5, device=device) if mode in ("rows", "both") else None
    cols = sorted_subset(40, 7, seed=1, device=device) if mode in ("columns", "both") else None
    got = ops.structured_block_grad(g, x, rows, cols)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert got.dtype == acc
    # The oracle widens the same 16-bit values first: only summation order may differ.
    assert_close(got, reference.structured_block_grad(g, x, rows, cols), acc, scale=15)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("rows", [False, True])
@pytest.mark.parametrize("with_base", [False, True])
@pytest.mark.parametrize("transposed", [False, True])
def test_block_scatter_and_gather(device, dtype, rows, with_base, transposed):
    out_f, in_f = 12, 20
    storage = torch.randn(in_f, out_f, device=device) if transposed else torch.randn(out_f, in_f, device=device)
    weight = (storage.t() if transposed else storage).to(dtype)  # Conv1D: the logical view is strided
    if transposed:
        weight = weight.t().contiguous().t()
    index = sorted_subset(out_f if rows else in_f, 5, device=device)
    shape = (5, in_f) if rows else (out_f, 5)
    block = torch.randn(shape, device=device)
    base = torch.randn(shape, device=device).to(dtype) if with_base else None
    assert torch.equal(ops.structured_block_gather(weight, index, rows=rows), reference.structured_block_gather(weight, index, rows))
    expected = weight.clone()
    reference.structured_block_scatter_(expected, index, block, 0.5, base, rows)
    ops.structured_block_scatter_(weight, index, block, 0.5, base, rows=rows)
    assert torch.equal(weight, expected)


def test_block_restore_is_bit_exact(device):
    weight = torch.randn(16, 16, device=device).bfloat16()
    original = weight.clone()
    index = sorted_subset(16, 4, device=device)
    base = ops.structured_block_gather(weight, index)
    ops.structured_block_scatter_(weight, index, torch.randn(16, 4, device=device), 1.0, base)
    assert not torch.equal(weight, original)
    ops.structured_block_scatter_(weight, index, torch.full((16, 4), float("nan"), device=device), 0.0, base)
    assert torch.equal(weight.view(torch.int16), original.view(torch.int16))


@pytest.mark.parametrize("rows", [False, True])
def test_multi_adapter_linear(device, rows):
    g = torch.Generator().manual_seed(0)
    out_f, in_f = 10, 14
    x = torch.randn(5, 3, in_f, generator=g).to(device)
    weight = torch.randn(out_f, in_f, generator=g).to(device)
    bias = torch.randn(out_f, generator=g).to(device)
    limit = out_f if rows else in_f
    idx = [sorted_subset(limit, k, seed=s) for k, s in ((3, 1), (4, 2), (2, 3))]
    index = torch.cat(idx).to(device)
    offsets = torch.tensor([0, 3, 7, 9])
    blocks = torch.cat([torch.randn((len(i), in_f) if rows else (out_f, len(i)), generator=g) for i in idx], dim=0 if rows else 1).to(device)
    ids = torch.tensor([2, -1, 0, 2, 1], device=device)
    got = ops.multi_adapter_linear(x, weight, bias, ids, index, offsets, blocks, rows=rows)
    expected = reference.multi_adapter_linear(x, weight, bias, ids, index, offsets, blocks, rows)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(IndexError, match=r"adapter_ids must be in \[-1, 3\)"):
        ops.multi_adapter_linear(x, weight, bias, torch.tensor([3, 0, 0, 0, 0]), index, offsets, blocks, rows=rows)


def _samples(device):
    x = torch.randn(2, 6, 10, device=device)
    g = torch.randn(2, 6, 8, device=device)
    cols = torch.tensor([1, 4, 7], device=device)
    rows = torch.tensor([0, 5], device=device)
    w = torch.randn(8, 10, device=device)
    return [
        (torch.ops.ftcore.gather_columns.default, (x.clone().requires_grad_(), cols)),
        (torch.ops.ftcore.scatter_columns.default, (torch.randn(2, 6, 3, device=device, requires_grad=True), cols, 10)),
        (torch.ops.ftcore.structured_block_grad.default, (g.clone().requires_grad_(), x.clone().requires_grad_(), rows, cols)),
        (torch.ops.ftcore.structured_block_grad.default, (g, x, None, None)),
        (torch.ops.ftcore.structured_block_gather.default, (w.clone().requires_grad_(), rows, True)),
        (torch.ops.ftcore.structured_block_scatter_.default, (w.clone(), cols, torch.randn(8, 3, device=device), 1.0, None, False)),
        (torch.ops.ftcore.multi_adapter_linear.default, (x, w, None, torch.tensor([0, -1], device=device), cols, torch.tensor([0, 3]), torch.randn(8, 3, device=device), False)),
    ]


@pytest.mark.parametrize("case", range(7))
def test_opcheck(device, case):
    op, args = _samples(device)[case]
    torch.library.opcheck(op, args, test_utils=OPCHECK_TESTS)


def test_gradcheck_float64():
    g = torch.randn(3, 4, 6, dtype=torch.float64, requires_grad=True)
    x = torch.randn(3, 4, 7, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, 7, dtype=torch.float64, requires_grad=True)
    cols, rows = torch.tensor([0, 3, 6]), torch.tensor([1, 2, 5])
    checks = [
        (lambda a: ops.gather_columns(a, cols), (x,)),
        (lambda a: ops.scatter_columns(a, cols, 9), (torch.randn(2, 3, dtype=torch.float64, requires_grad=True),)),
        (lambda a, b: ops.structured_block_grad(a, b, rows, cols), (g, x)),
        (lambda a, b: ops.structured_block_grad(a, b), (g, x)),
        (lambda a: ops.structured_block_gather(a, rows, rows=True), (w,)),
        (lambda a: ops.structured_block_gather(a, cols), (w,)),
    ]
    for fn, inputs in checks:
        assert torch.autograd.gradcheck(fn, inputs)
        assert torch.autograd.gradgradcheck(fn, inputs)


def test_errors_name_the_argument():
    x = torch.randn(4, 10)
    w = torch.randn(6, 10)
    with pytest.raises(IndexError, match=r"columns\[1\] = 10 is out of range \[0, 10\)"):
        ops.gather_columns(x, torch.tensor([2, 10]))
    with pytest.raises(ValueError, match="columns must be strictly increasing"):
        ops.gather_columns(x, torch.tensor([3, 3]))
    with pytest.raises(TypeError, match="columns must be int32 or int64"):
        ops.gather_columns(x, torch.tensor([1.0]))
    with pytest.raises(ValueError, match="must equal the number of columns"):
        ops.scatter_columns(torch.randn(4, 2), torch.tensor([1, 2, 3]), 10)
    with pytest.raises(ValueError, match="block must be 6x2 for this weight and index"):
        ops.structured_block_scatter_(w, torch.tensor([1, 2]), torch.randn(2, 6))
    with pytest.raises(IndexError, match=r"index\[0\] = 6 is out of range \[0, 6\)"):
        ops.structured_block_gather(w, torch.tensor([6]), rows=True)
    with pytest.raises(ValueError, match="base shares memory with weight"):
        ops.structured_block_scatter_(w, torch.tensor([0, 1]), torch.randn(6, 2), 1.0, w[:, 2:4])
    with pytest.raises(TypeError, match="grad_output is BFloat16 but input is Float"):
        ops.structured_block_grad(torch.randn(4, 6).bfloat16(), x)
    with pytest.raises(IndexError, match=r"rows\[0\] = 7 is out of range"):
        ops.structured_block_grad(torch.randn(4, 6), x, rows=torch.tensor([7]))
