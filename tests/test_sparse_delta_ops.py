"""Every sparse-delta op against its pure-PyTorch reference, opcheck, float64 gradcheck, and bad input."""

import math

import pytest
import torch
from conftest import FLOAT_DTYPES, assert_close, random_indices

import ftcore
from ftcore import ops, reference

OPCHECK_TESTS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")

# (out, in, leading token shape, k): tiny, odd and chunk-crossing sizes
SHAPES = [
    (3, 5, (1,), 4),
    (17, 33, (7,), 60),
    (64, 48, (2, 45), 300),
    (40, 300, (333,), 500),
]


def make(out, in_, lead, k, dtype, index_dtype=torch.int64, device="cpu", duplicates=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, in_, generator=g).to(device=device, dtype=dtype)
    grad = torch.randn(*lead, out, generator=g).to(device=device, dtype=dtype)
    idx = random_indices(out * in_, k, dtype=index_dtype, device=device, duplicates=duplicates, seed=seed)
    values = torch.randn(k, generator=g).to(device)
    return x, grad, idx, values


def bits(t):
    """The raw bits of a float tensor, for bit-for-bit comparisons."""
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_grad_matches_reference(cpu_isa, device, shape, dtype, index_dtype):
    out, in_, lead, k = shape
    x, grad, idx, _ = make(out, in_, lead, k, dtype, index_dtype, device, duplicates=True)
    got = ops.sparse_delta_grad(grad, x, idx)
    assert got.dtype == acc_dtype(dtype) and got.shape == (k,)
    tokens = math.prod(lead)
    assert_close(got, reference.sparse_delta_grad(grad, x, idx), acc_dtype(dtype), scale=math.sqrt(tokens))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_products_match_reference(cpu_isa, device, shape, dtype, index_dtype):
    out, in_, lead, k = shape
    x, grad, idx, values = make(out, in_, lead, k, dtype, index_dtype, device, duplicates=True)
    y = ops.sparse_delta_linear(x, idx, values, out)
    assert y.dtype == dtype and y.shape == (*lead, out)
    assert_close(y, reference.sparse_delta_linear(x, idx, values, out), dtype, scale=4)
    z = ops.sparse_delta_linear_transpose(grad, idx, values, in_)
    assert z.dtype == dtype and z.shape == (*lead, in_)
    assert_close(z, reference.sparse_delta_linear_transpose(grad, idx, values, in_), dtype, scale=4)


def test_non_contiguous_inputs(cpu_isa, device):
    out, in_, k = 24, 40, 90
    base_x = torch.randn(50, 2 * in_, device=device)
    base_g = torch.randn(out, 50, device=device)
    x, grad = base_x[:, ::2], base_g.t()  # strided columns; transposed rows
    assert not x.is_contiguous() and not grad.is_contiguous()
    idx = random_indices(out * in_, k, device=device)
    values = torch.randn(k, device=device)
    assert_close(ops.sparse_delta_grad(grad, x, idx), reference.sparse_delta_grad(grad, x, idx), torch.float32, 8)
    assert_close(ops.sparse_delta_linear(x, idx, values, out), reference.sparse_delta_linear(x, idx, values, out), torch.float32, 8)
    assert_close(
        ops.sparse_delta_linear_transpose(grad, idx, values, in_),
        reference.sparse_delta_linear_transpose(grad, idx, values, in_),
        torch.float32,
        8,
    )


def test_empty_delta_and_no_tokens(device):
    x = torch.randn(0, 8, device=device)
    grad = torch.randn(0, 4, device=device)
    idx = torch.tensor([1, 7], device=device)
    assert ops.sparse_delta_grad(grad, x, idx).tolist() == [0.0, 0.0]
    none = torch.empty(0, dtype=torch.int64, device=device)
    x = torch.randn(5, 8, device=device)
    assert ops.sparse_delta_grad(torch.randn(5, 4, device=device), x, none).shape == (0,)
    assert torch.equal(ops.sparse_delta_linear(x, none, torch.empty(0, device=device), 4), torch.zeros(5, 4, device=device))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("with_base", [False, True])
@pytest.mark.parametrize("transposed", [False, True])
def test_scatter_matches_reference(device, dtype, with_base, transposed):
    out, in_, k = 30, 20, 120
    storage = torch.randn(in_, out, device=device).to(dtype) if transposed else torch.randn(out, in_, device=device).to(dtype)
    weight = storage.t() if transposed else storage  # GPT-2 Conv1D layout: the logical (out, in) view is strided
    idx = random_indices(out * in_, k, device=device, duplicates=not with_base)
    values = torch.randn(k, device=device)
    base = torch.randn(k, device=device).to(dtype) if with_base else None
    expected = weight.clone()
    reference.sparse_delta_scatter_(expected, idx, values, 0.5, base)
    ops.sparse_delta_scatter_(weight, idx, values, 0.5, base)
    torch.testing.assert_close(weight, expected, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_scatter_alpha_zero_restores_base_exactly(device, dtype):
    weight = torch.randn(16, 16, device=device).to(dtype)
    original = weight.clone()
    idx = random_indices(256, 40, device=device)
    base = ops.sparse_delta_gather(weight, idx)
    values = torch.full((40,), float("inf"), device=device)  # never read when alpha == 0
    ops.sparse_delta_scatter_(weight, idx, values, 1.0, base)
    assert not torch.equal(weight, original)
    ops.sparse_delta_scatter_(weight, idx, values, 0.0, base)
    assert torch.equal(bits(weight), bits(original))


def test_scatter_tiny_alpha_is_not_zero(device):
    # alpha is tested for zero in double: 1e-50 is an update (0 in fp32), not an exact restore.
    weight = torch.full((1, 2), -0.0, device=device)
    expected = weight.clone()
    values = torch.tensor([1.0, 2.0], device=device)
    reference.sparse_delta_scatter_(expected, torch.tensor([0, 1], device=device), values, 1e-50)
    ops.sparse_delta_scatter_(weight, torch.tensor([0, 1], device=device), values, 1e-50)
    assert torch.equal(torch.signbit(weight), torch.signbit(expected))  # -0.0 + 0.0 = +0.0, as in the reference


def test_scatter_long_runs_of_duplicates(cpu_isa, device):
    # Runs that straddle the ranges the parallel loop hands to threads must still be summed once.
    weight = torch.zeros(4, 5, device=device)
    idx = torch.sort(torch.cat([torch.full((9000,), 3), torch.full((9000,), 11), torch.arange(20)])).values.to(device)
    values = torch.ones(idx.numel(), device=device)
    ops.sparse_delta_scatter_(weight, idx, values)
    expected = torch.ones(20, device=device)
    expected[3] += 9000
    expected[11] += 9000
    assert torch.equal(weight.flatten(), expected)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_gather(device, dtype):
    storage = torch.randn(12, 9, device=device).to(dtype)
    for weight in (storage, storage.t()):
        idx = random_indices(weight.numel(), 30, device=device, dtype=torch.int32)
        assert torch.equal(ops.sparse_delta_gather(weight, idx), reference.sparse_delta_gather(weight, idx))


@pytest.mark.parametrize("chunk_rows", [0, 1, 7])
@pytest.mark.parametrize("with_exclude", [False, True])
def test_topk_matches_reference(device, chunk_rows, with_exclude):
    out, in_, k = 37, 29, 50
    x, grad, _, _ = make(out, in_, (64,), 1, torch.float64, device=device)
    exclude = random_indices(out * in_, 200, device=device) if with_exclude else None
    idx, scores = ops.sparse_delta_topk(grad, x, k, exclude=exclude, chunk_rows=chunk_rows)
    ref_idx, ref_scores = reference.sparse_delta_topk(grad, x, k, exclude)
    assert torch.equal(idx, ref_idx)
    torch.testing.assert_close(scores, ref_scores)
    if exclude is not None:
        assert not torch.isin(idx, exclude).any()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_topk_scores_16_bit_inputs_in_fp32(device, dtype):
    big = torch.full((1, 2), 256.0, device=device, dtype=dtype)  # |GᵀX| = 65536: past float16's range
    idx, scores = ops.sparse_delta_topk(big, big, 1)
    assert torch.isfinite(scores).all() and scores.item() == 65536.0
    g = torch.tensor([[1.0], [1.0]], device=device, dtype=dtype)
    x = torch.tensor([[1.0, 1.0], [0.0, 0.001]], device=device, dtype=dtype)  # 1.0 vs 1.001: equal in bf16
    assert ops.sparse_delta_topk(g, x, 1)[0].tolist() == reference.sparse_delta_topk(g, x, 1)[0].tolist() == [1]


def test_topk_over_candidates(device):
    x, grad, cand, _ = make(20, 30, (40,), 100, torch.float64, device=device)
    idx, scores = ops.sparse_delta_topk(grad, x, 10, candidates=cand)
    dense = reference.sparse_delta_grad(grad, x, cand).abs()
    assert torch.equal(idx, torch.sort(cand[torch.topk(dense, 10).indices]).values)
    assert torch.all(scores >= dense.sort().values[-10] - 1e-12)


def test_topk_takes_everything_not_excluded(device):
    x, grad, _, _ = make(3, 4, (10,), 1, torch.float32, device=device)
    exclude = torch.tensor([0, 5, 6], device=device)
    idx, _ = ops.sparse_delta_topk(grad, x, 9, exclude=exclude)
    assert idx.tolist() == [1, 2, 3, 4, 7, 8, 9, 10, 11]


# ---- opcheck and gradcheck -----------------------------------------------------------------------------------


def _op_samples(device):
    x, grad, idx, values = make(12, 10, (3, 5), 25, torch.float32, device=device)
    idx32 = idx.int()
    weight = torch.randn(12, 10, device=device)
    return [
        (torch.ops.ftcore.sparse_delta_grad.default, (grad.requires_grad_(), x.requires_grad_(), idx)),
        (torch.ops.ftcore.sparse_delta_linear.default, (x, idx32, values.clone().requires_grad_(), 12)),
        (torch.ops.ftcore.sparse_delta_linear_transpose.default, (grad, idx, values.clone().requires_grad_(), 10)),
        (torch.ops.ftcore.sparse_delta_gather.default, (weight.clone().requires_grad_(), idx)),
        (torch.ops.ftcore.sparse_delta_scatter_.default, (weight.clone(), idx, values, 0.5, None)),
        (torch.ops.ftcore.sparse_delta_scatter_.default, (weight.clone(), idx, values, 1.0, torch.randn(25, device=device))),
        (torch.ops.ftcore.sparse_delta_topk.default, (grad.detach(), x.detach(), 7, idx, 3)),
    ]


@pytest.mark.parametrize("case", range(7))
def test_opcheck(device, case):
    op, args = _op_samples(device)[case]
    torch.library.opcheck(op, args, test_utils=OPCHECK_TESTS)


def test_gradcheck_float64():
    g = torch.Generator().manual_seed(3)
    out, in_, k = 6, 7, 15
    idx = random_indices(out * in_, k, duplicates=True)
    x = torch.randn(2, 4, in_, dtype=torch.float64, generator=g, requires_grad=True)
    grad = torch.randn(2, 4, out, dtype=torch.float64, generator=g, requires_grad=True)
    values = torch.randn(k, dtype=torch.float64, generator=g, requires_grad=True)
    weight = torch.randn(out, in_, dtype=torch.float64, generator=g, requires_grad=True)
    checks = [
        (lambda a, b: ops.sparse_delta_grad(a, b, idx), (grad, x)),
        (lambda a, v: ops.sparse_delta_linear(a, idx, v, out), (x, values)),
        (lambda a, v: ops.sparse_delta_linear_transpose(a, idx, v, in_), (grad, values)),
        (lambda w: ops.sparse_delta_gather(w, idx), (weight,)),
    ]
    for fn, inputs in checks:
        assert torch.autograd.gradcheck(fn, inputs)
        assert torch.autograd.gradgradcheck(fn, inputs)


# ---- bad input -----------------------------------------------------------------------------------------------


def test_errors_name_the_argument():
    x = torch.randn(4, 6)
    grad = torch.randn(4, 3)
    idx = torch.tensor([0, 5, 17])
    with pytest.raises(TypeError, match="input must be float32, float64, bfloat16 or float16"):
        ops.sparse_delta_grad(grad, x.long(), idx)
    with pytest.raises(TypeError, match="grad_output is BFloat16 but input is Float"):
        ops.sparse_delta_grad(grad.bfloat16(), x, idx)
    with pytest.raises(ValueError, match="must share their leading"):
        ops.sparse_delta_grad(torch.randn(5, 3), x, idx)
    with pytest.raises(TypeError, match="indices must be int32 or int64"):
        ops.sparse_delta_grad(grad, x, idx.float())
    with pytest.raises(ValueError, match="indices must be 1-D"):
        ops.sparse_delta_grad(grad, x, idx.view(3, 1))
    with pytest.raises(IndexError, match=r"indices\[2\] = 18 is out of range"):
        ops.sparse_delta_grad(grad, x, torch.tensor([0, 5, 18]))
    with pytest.raises(IndexError, match="out of range"):
        ops.sparse_delta_grad(grad, x, torch.tensor([-1, 5, 6]))
    with pytest.raises(ValueError, match="must be sorted"):
        ops.sparse_delta_grad(grad, x, torch.tensor([5, 0, 6]))
    with pytest.raises(ValueError, match="values must be 1-D with one entry per index"):
        ops.sparse_delta_linear(x, idx, torch.randn(4), 3)
    with pytest.raises(ValueError, match="out_features must be >= 0"):
        ops.sparse_delta_linear(x, idx, torch.randn(3), -1)
    with pytest.raises(IndexError, match="out of range"):
        ops.sparse_delta_linear(x, idx, torch.randn(3), 2)  # 17 >= 2 * 6
    weight = torch.randn(3, 6)
    with pytest.raises(ValueError, match="weight must be the 2-D"):
        ops.sparse_delta_gather(weight.view(3, 2, 3), idx)
    with pytest.raises(TypeError, match="base is Float but weight is BFloat16"):
        ops.sparse_delta_scatter_(weight.bfloat16(), idx, torch.randn(3), 1.0, torch.randn(3))
    with pytest.raises(ValueError, match="base must be 1-D with one entry per index"):
        ops.sparse_delta_scatter_(weight, idx, torch.randn(3), 1.0, torch.randn(2))
    with pytest.raises(ValueError, match="share memory"):
        ops.sparse_delta_scatter_(torch.randn(6).expand(3, 6), idx, torch.randn(3))
    with pytest.raises(ValueError, match="values share memory with weight"):
        ops.sparse_delta_scatter_(weight, torch.tensor([0, 1, 2]), weight[0, :3])
    with pytest.raises(ValueError, match="base shares memory with weight"):
        ops.sparse_delta_scatter_(weight, torch.tensor([0, 1, 2]), torch.randn(3), 1.0, weight[1, :3])
    with pytest.raises(ValueError, match="exclude must be sorted"):
        ops.sparse_delta_topk(grad, x, 2, exclude=torch.tensor([5, 1]))
    with pytest.raises(IndexError, match="exclude holds 18, out of range"):
        ops.sparse_delta_topk(grad, x, 2, exclude=torch.tensor([1, 18]))
    with pytest.raises(ValueError, match=r"k must be in \[0, 18\]"):
        ops.sparse_delta_topk(grad, x, 19)
    with pytest.raises(ValueError, match=r"k must be in \[0, 15\]"):
        ops.sparse_delta_topk(grad, x, 16, exclude=idx)


def test_cpu_isa_switch():
    names = ftcore._C.available_cpu_isas()
    assert names[0] == "generic" and ftcore._C.cpu_isa() in names
    assert not ftcore._C.set_cpu_isa("no-such-isa")
