"""Rotation and quantization ops against their pure-PyTorch references and explicit matrices, opcheck, float64
gradcheck, error statistics, int4 bit-exactness, and bad input."""

import math

import pytest
import scipy.linalg
import torch

import ftcore
from ftcore import hadamard, ops, reference

from conftest import FLOAT_DTYPES, assert_close

OPCHECK_TESTS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")

# The orders the issue names; every one must be constructible.
REQUIRED_ORDERS = [1, 2, 12, 20, 28, 36, 40, 52, 60, 76, 108, 140, 148, 156, 172]
LLM_SIZES = [896, 1536, 3072, 3584, 4864, 8960, 11008, 13824, 14336, 18944, 28672]


def explicit(n, signs=None, scale=None, dtype=torch.float64):
    """The n×n matrix the transform applies: scale · H · diag(signs)."""
    k, _ = hadamard.hadamard_factors(n)
    h = reference.hadamard_dense(hadamard.hadamard_matrix(k) if k > 1 else None, n, dtype)
    if signs is not None:
        h = h * signs.to(dtype)
    return h * (1 / math.sqrt(n) if scale is None else scale)


# ---- Hadamard matrices ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", REQUIRED_ORDERS)
def test_required_orders_are_hadamard(k):
    h = hadamard.hadamard_matrix(k).double()
    assert set(h.unique().tolist()) <= {-1.0, 1.0}
    assert torch.equal(h @ h.T, k * torch.eye(k, dtype=torch.float64))


def test_every_listed_order_is_hadamard():
    for k in hadamard.supported_orders(200):
        h = hadamard.hadamard_matrix(k).double()
        assert torch.equal(h @ h.T, k * torch.eye(k, dtype=torch.float64)), k


@pytest.mark.parametrize("n", LLM_SIZES)
def test_llm_sizes_are_supported_in_one_transform(n):
    k, p = hadamard.hadamard_factors(n)
    assert k * p == n and p & (p - 1) == 0 and k <= 172


@pytest.mark.parametrize("n", [1, 2, 4, 64, 1024])
def test_powers_of_two_match_scipy(n):
    h = ops.hadamard_transform(torch.eye(n, dtype=torch.float64), 1.0)
    assert torch.equal(h, torch.tensor(scipy.linalg.hadamard(n), dtype=torch.float64))


# ---- hadamard_transform ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [8, 12, 40, 96, 448, 1536, 4864, 18944])
@pytest.mark.parametrize("with_signs", [False, True])
def test_transform_matches_explicit_matrix(device, n, with_signs):
    signs = hadamard.random_signs(n, seed=n) if with_signs else None
    x = torch.randn(3, n, dtype=torch.float64)
    m = explicit(n, signs)
    y = ops.hadamard_transform(x.to(device), signs=signs)
    torch.testing.assert_close(y.cpu(), x @ m.T, rtol=1e-12, atol=1e-12)
    back = ops.hadamard_transform(y, signs=signs, transpose=True)
    torch.testing.assert_close(back.cpu(), x, rtol=1e-12, atol=1e-12)  # orthonormal: the transpose inverts


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_transform_dtypes_against_reference(device, dtype, cpu_isa):
    n = 3584  # 28 · 128
    k, _ = hadamard.hadamard_factors(n)
    hk, signs = hadamard.hadamard_matrix(k), hadamard.random_signs(n, 7)
    x = torch.randn(2, 5, n).to(device, dtype)
    for transpose in (False, True):
        y = ops.hadamard_transform(x, 0.5, signs=signs, transpose=transpose)
        ref = reference.hadamard_transform(x.cpu(), hk, signs, 0.5, transpose)
        assert y.dtype == dtype and y.shape == x.shape
        assert_close(y.cpu(), ref, dtype, scale=8)


def test_transform_strided_and_leading_shapes(device):
    n = 96
    base = torch.randn(n, 4, 6, device=device)
    x = base.permute(1, 2, 0)[:, ::2]  # (4, 3, 96), last dim strided
    assert not x.is_contiguous()
    torch.testing.assert_close(ops.hadamard_transform(x), ops.hadamard_transform(x.contiguous()), rtol=0, atol=0)
    assert ops.hadamard_transform(torch.randn(0, n, device=device)).shape == (0, n)


def test_transform_keeps_norms():
    x = torch.randn(64, 4864, dtype=torch.float64)
    torch.testing.assert_close(ops.hadamard_transform(x).norm(dim=-1), x.norm(dim=-1))


def test_block_diagonal_mode():
    n = 47 * 4  # no Hadamard matrix of order 188 = 4·47 is built here
    with pytest.raises(ValueError, match="block_size"):
        ops.hadamard_transform(torch.randn(2, n))
    x = torch.randn(2, n, dtype=torch.float64)
    signs = hadamard.random_signs(n, 1)
    y = ops.hadamard_transform(x, signs=signs, block_size=4)
    m = torch.block_diag(*[explicit(4)] * 47) * signs.double()
    torch.testing.assert_close(y, x @ m.T)
    torch.testing.assert_close(ops.hadamard_transform(y, signs=signs, block_size=4, transpose=True), x)


def test_gradcheck_float64():
    x = torch.randn(2, 3, 24, dtype=torch.float64, requires_grad=True)
    signs = hadamard.random_signs(24, 3)
    for transpose in (False, True):
        fn = lambda t: ops.hadamard_transform(t, 0.3, signs=signs, transpose=transpose)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (x,))
        assert torch.autograd.gradgradcheck(fn, (x,))


def test_compiles_without_graph_breaks():
    def f(x):
        return ops.fake_quantize(ops.hadamard_transform(x), 4, granularity="group", group_size=16) + ops.rotate_fake_quantize(x, 4)

    x = torch.randn(4, 48)
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), f(x))


# ---- fake_quantize -------------------------------------------------------------------------------------------------

GROUPINGS = [("tensor", None), ("token", None), ("channel", None), ("group", 16)]


@pytest.mark.parametrize("granularity,group_size", GROUPINGS)
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_fake_quantize_matches_reference(device, granularity, group_size, symmetric, bits):
    x = (torch.randn(3, 5, 64) * torch.rand(3, 5, 1) * 4).to(device)
    x[0, 0] = 0  # an all-zero row
    gs = ops._group_size(granularity, group_size)
    out, scale, zero = ops.fake_quantize(x, bits, symmetric, granularity, group_size, 0.9, return_params=True)
    ref = reference.fake_quantize(x.cpu(), None, bits, symmetric, gs, 0.9)
    for a, b in zip((out, scale, zero), ref):
        assert torch.equal(a.cpu(), b)
    # backward: the straight-through mask
    xr = x.clone().requires_grad_()
    g = torch.randn_like(x)
    ops.fake_quantize(xr, bits, symmetric, granularity, group_size, 0.9).backward(g)
    ref_dx, _ = reference.fake_quantize_backward(g.cpu(), x.cpu(), scale.cpu(), zero.cpu(), bits, symmetric, gs, False)
    assert torch.equal(xr.grad.cpu(), ref_dx)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_fake_quantize_dtypes(device, dtype):
    x = torch.randn(4, 128).to(device, dtype)
    out = ops.fake_quantize(x, 4, granularity="group", group_size=32)
    ref, _, _ = reference.fake_quantize(x.cpu(), None, 4, True, 32, 1.0)
    assert out.dtype == dtype
    assert torch.equal(out.cpu(), ref)


def test_fake_quantize_error_is_bounded():
    """Inside the range the error is at most half a step; over Gaussian data its mean square is about
    step²/12 (uniform rounding error)."""
    x = torch.randn(512, 256, dtype=torch.float64)
    for symmetric in (True, False):
        out, scale, _ = ops.fake_quantize(x, 4, symmetric, "group", 64, return_params=True)
        step = scale.repeat_interleave(64, dim=1).double()
        err = (out - x).abs()
        assert bool((err <= step / 2 * (1 + 1e-9)).all())
        ratio = float((err**2 / step**2).mean())
        assert 1 / 12 * 0.8 < ratio < 1 / 12 * 1.2


def test_clipped_values_get_no_gradient():
    x = torch.tensor([[-4.0, -1.0, 0.5, 1.0, 4.0]], requires_grad=True)
    out = ops.fake_quantize(x, 4, True, "token", clip_ratio=0.25)  # scale = 4·0.25/7: ±4 are far outside
    out.sum().backward()
    assert x.grad.tolist() == [[0.0, 1.0, 1.0, 1.0, 0.0]]


@pytest.mark.parametrize("granularity,group_size", [("tensor", None), ("token", None), ("group", 8)])
def test_learnable_scale_gets_the_lsq_gradient(device, granularity, group_size):
    x = torch.randn(6, 32, device=device)
    gs = ops._group_size(granularity, group_size)
    shape = (1, 1) if gs == -1 else (6, 32 // (gs or 32))
    scale = torch.full(shape, 0.2, device=device, requires_grad=True)
    xr = x.clone().requires_grad_()
    g = torch.randn_like(x)
    ops.fake_quantize(xr, 4, True, granularity, group_size, scale=scale).backward(g)
    # The oracle: autograd through the formula with a straight-through round.
    s = scale.detach().clone().requires_grad_()
    v = reference._grouped(x, gs)
    u = v / s[..., None]
    level = u + (torch.round(u) - u).detach()
    ref = (level.clamp(-8, 7) * s[..., None]).reshape(x.shape)
    ref.backward(g)
    torch.testing.assert_close(scale.grad, s.grad, rtol=1e-4, atol=1e-4)
    level = torch.round(v / s[..., None].detach())
    inside = (level >= -8) & (level <= 7)
    torch.testing.assert_close(xr.grad, torch.where(inside, reference._grouped(g, gs), 0).reshape(x.shape))


# ---- fused rotate + fake-quantize ---------------------------------------------------------------------------------


@pytest.mark.parametrize("n,granularity,group_size", [(64, "token", None), (896, "group", 128), (4864, "token", None)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_fused_matches_the_unfused_pair(device, n, granularity, group_size, dtype):
    signs = hadamard.random_signs(n, 5)
    x = torch.randn(3, 4, n).to(device, dtype)
    x[0, 0, :5] *= 30  # outliers
    gs = ops._group_size(granularity, group_size)
    k, _ = hadamard.hadamard_factors(n)
    hk = hadamard.hadamard_matrix(k) if k > 1 else None
    out, scale, zero = ops.rotate_fake_quantize(x, 4, True, granularity, group_size, signs=signs, return_params=True)
    # The fused op quantizes the rotation in the accumulation dtype (the unfused pair rounds it to bf16 first):
    # the oracle rotates in float32 / float64 too.
    wide = x.cpu().to(torch.float64 if dtype == torch.float64 else torch.float32)
    ref, ref_scale, ref_zero, ref_mask = reference.rotate_fake_quantize(wide, hk, signs, n**-0.5, 4, True, gs, 1.0)
    _, _, _, mask = torch.ops.ftcore.rotate_fake_quantize(x, None if hk is None else hk.to(device),
                                                          signs.to(device), n**-0.5, 4, True, gs, 1.0)
    assert mask.shape == ref_mask.shape and float((mask.cpu() != ref_mask).float().mean()) < 0.01
    if dtype == torch.float64:  # no last-bit differences from the butterfly: the bits agree exactly
        assert torch.equal(mask.cpu(), ref_mask)
    torch.testing.assert_close(scale.cpu(), ref_scale, rtol=1e-5, atol=0)
    # The rotated values may differ in the last bit from the reference butterfly, so a rare element may round
    # to the neighbouring level; everything else agrees up to the output's rounding.
    step = ref_scale.repeat_interleave(n if gs == 0 else gs, dim=1).view(x.shape).to(torch.float64)
    diff = (out.cpu().double() - ref.to(dtype).double()).abs()
    assert bool((diff <= step * 1.01).all())
    assert float((diff > step * 1e-2).float().mean()) < 0.01
    # Backward: the transposed rotation of the masked gradient, against autograd through the unfused ops.
    xa = x.clone().requires_grad_()
    xb = x.clone().requires_grad_()
    g = torch.randn_like(x)
    ops.rotate_fake_quantize(xa, 4, True, granularity, group_size, signs=signs).backward(g)
    ops.fake_quantize(ops.hadamard_transform(xb, signs=signs), 4, True, granularity, group_size).backward(g)
    assert_close(xa.grad.cpu(), xb.grad.cpu(), dtype, scale=4)


# ---- int4 ------------------------------------------------------------------------------------------------------------


def test_pack_unpack_are_bit_exact(device):
    packed = torch.randint(0, 256, (7, 33), dtype=torch.uint8, device=device)
    codes = ops.unpack_int4(packed)
    assert codes.shape == (7, 66) and int(codes.max()) <= 15
    assert torch.equal(ops.pack_int4(codes), packed)
    assert torch.equal(codes.cpu(), reference.unpack_int4(packed.cpu()))
    assert torch.equal(codes[:, 0::2], packed & 0xF) and torch.equal(codes[:, 1::2], packed >> 4)  # the layout


@pytest.mark.parametrize("group_size", [None, 32])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_int4_round_trip_equals_fake_quantize(device, group_size, symmetric, dtype):
    w = torch.randn(24, 96).to(device, dtype)
    packed, scale, zero = ops.quantize_int4(w, group_size, symmetric)
    ref = reference.quantize_int4(w.cpu(), group_size or 0, symmetric, 1.0)
    for a, b in zip((packed, scale, zero), ref):
        assert torch.equal(a.cpu(), b)
    deq = ops.dequantize_int4(packed, scale, zero, group_size, torch.float32)
    fq = ops.fake_quantize(w.float(), 4, symmetric, "group" if group_size else "channel", group_size)
    assert torch.equal(deq, fq)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int4_linear_matches_dequantized_matmul(device, dtype):
    w = torch.randn(300, 128, device=device)
    packed, scale, zero = ops.quantize_int4(w, 64)
    x = torch.randn(3, 7, 128, device=device, dtype=dtype)
    bias = torch.randn(300, device=device, dtype=dtype)
    y = ops.int4_linear(x, packed, scale, zero, 64, bias)
    ref = reference.int4_linear(x.cpu(), packed.cpu(), scale.cpu(), zero.cpu(), 64, bias.cpu())
    assert y.shape == (3, 7, 300) and y.dtype == dtype
    assert_close(y.cpu(), ref, dtype, scale=16)


# The CPU decode path (a few rows: a matrix-vector kernel that reads the packed weight once) against the float64
# reference and against the GEMM path that more rows take, in every CPU instruction-set build. The shapes reach
# its blocked layout (in % 128 == 0, group size % 8 == 0, with groups whole to a block or straddling one) and its
# element-by-element fallback (odd group sizes, in not a multiple of 128, per-channel groups).
@pytest.mark.parametrize(
    "out_features, in_features, group_size",
    [(40, 256, 128), (40, 256, 32), (40, 384, 24), (40, 512, 0), (33, 96, 3), (33, 100, 0), (33, 200, 8)],
)
@pytest.mark.parametrize("rows", [1, 5, 32])
def test_int4_linear_cpu_decode_path(cpu_isa, out_features, in_features, group_size, rows):
    g = torch.Generator().manual_seed(7)
    w = torch.randn(out_features, in_features, generator=g)
    packed, scale, zero = ops.quantize_int4(w, group_size or None, symmetric=False)
    x = torch.randn(rows + 40, in_features, generator=g)
    ref = x.double() @ ops.dequantize_int4(packed, scale, zero, group_size, torch.float64).t()
    decode = ops.int4_linear(x[:rows], packed, scale, zero, group_size)
    gemm = ops.int4_linear(x, packed, scale, zero, group_size)[:rows]  # 40 + rows rows: the GEMM path
    torch.testing.assert_close(decode.double(), ref[:rows], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(decode, gemm, rtol=1e-5, atol=1e-4)
    # A strided view of bf16 rows: converted once, the result rounded once to bf16.
    xb = x[:rows].to(torch.bfloat16).t().contiguous().t()
    yb = ops.int4_linear(xb, packed, scale, zero, group_size)
    assert yb.dtype == torch.bfloat16
    torch.testing.assert_close(yb.double(), xb.double() @ ops.dequantize_int4(packed, scale, zero, group_size, torch.float64).t(), rtol=1e-2, atol=1e-2)


# The CUDA rotation kernels keep a row of n values (2n when K > 1) in shared memory when it fits beside the
# kernel's static shared memory within the opt-in limit, and in a global workspace otherwise. The limits are the
# devices' (A100: 166,912 bytes, H100/H200: 232,448); 128 bytes is the static scratch of rotate_fake_quantize.
@pytest.mark.parametrize(
    "n, k, acc_bytes, optin, where",
    [
        (4096, 1, 4, 232448, "shared"),
        (28672, 28, 4, 232448, "shared"),   # Llama-3-70B's down_proj on an H100
        (28672, 28, 4, 166912, "global"),   # … on an A100
        (29056, 227, 4, 232448, "global"),  # exactly the limit, but the static scratch does not fit beside it
        (29040, 12, 4, 232448, "shared"),
        (29568, 924, 4, 232448, "global"),  # Qwen2-72B's intermediate size, everywhere
        (14336, 28, 8, 232448, "shared"),   # float64 needs twice the bytes: half the size fits on an H100 …
        (14336, 28, 8, 166912, "global"),   # … not on an A100
        (14336, 1, 8, 232448, "shared"),    # K = 1 needs one buffer, not two
    ],
)
def test_cuda_rotation_row_storage(n, k, acc_bytes, optin, where):
    assert ftcore._C.rotation_row_storage(n, k, acc_bytes, 128, optin) == where


# ---- opcheck ---------------------------------------------------------------------------------------------------------


def _op_samples(device):
    x = torch.randn(3, 40, device=device)
    hk = hadamard.hadamard_k_on(20, torch.device(device))
    signs = hadamard.random_signs(40, 2, device=device)
    w = torch.randn(6, 32, device=device)
    packed, scale, zero = ops.quantize_int4(w, 16)
    fq_scale = torch.full((3, 5), 0.1, device=device)
    return [
        (torch.ops.ftcore.hadamard_transform.default, (x.clone().requires_grad_(), hk, signs, 0.2, False)),
        (torch.ops.ftcore.hadamard_transform.default, (w.clone().requires_grad_(), None, None, 1.0, True)),
        (torch.ops.ftcore.fake_quantize.default, (x.clone().requires_grad_(), None, 4, True, 8, 1.0)),
        (torch.ops.ftcore.fake_quantize.default, (x.clone().requires_grad_(), None, 3, False, -1, 0.9)),
        (torch.ops.ftcore.fake_quantize.default, (x.clone().requires_grad_(), fq_scale.requires_grad_(), 4, True, 8, 1.0)),
        (torch.ops.ftcore.rotate_fake_quantize.default, (x.clone().requires_grad_(), hk, signs, 0.2, 4, True, 0, 1.0)),
        (torch.ops.ftcore.quantize_int4.default, (w, 16, True, 1.0)),
        (torch.ops.ftcore.pack_int4.default, (ops.unpack_int4(packed),)),
        (torch.ops.ftcore.unpack_int4.default, (packed,)),
        (torch.ops.ftcore.dequantize_int4.default, (packed, scale, zero, 16, torch.bfloat16)),
        (torch.ops.ftcore.int4_linear.default, (torch.randn(5, 32, device=device), packed, scale, zero, 16, None)),
    ]


@pytest.mark.parametrize("case", range(11))
def test_opcheck(device, case):
    op, args = _op_samples(device)[case]
    torch.library.opcheck(op, args, test_utils=OPCHECK_TESTS)


# ---- bad input -------------------------------------------------------------------------------------------------------


def test_errors_name_the_argument():
    x = torch.randn(2, 64)
    cases = [
        (lambda: ops.hadamard_transform(torch.randn(2, 47 * 4)), ValueError, "no Hadamard transform of size 188"),
        (lambda: ops.hadamard_transform(torch.randn(2, 6)), ValueError, "size 6"),
        (lambda: ops.hadamard_transform(torch.randint(0, 3, (2, 8))), TypeError, "input must be float32"),
        (lambda: ops.hadamard_transform(x, signs=torch.ones(8)), ValueError, "signs must be a tensor of shape"),
        (lambda: ops.hadamard_transform(x, block_size=48), ValueError, "block_size must be a positive divisor"),
        (lambda: torch.ops.ftcore.hadamard_transform(torch.randn(2, 24), torch.ones(5, 5), None, 1.0, False),
         ValueError, "multiple of K = 5"),
        (lambda: ops.fake_quantize(x, 1), ValueError, "bits must be an integer in"),
        (lambda: ops.fake_quantize(x, 9), ValueError, "bits must be an integer in"),
        (lambda: torch.ops.ftcore.fake_quantize(x, None, 12, True, 0, 1.0), ValueError, "bits must be in"),
        (lambda: ops.fake_quantize(x, 4, granularity="group", group_size=48), ValueError, "group_size 48 must divide"),
        (lambda: ops.fake_quantize(x, 4, granularity="row"), ValueError, "granularity must be"),
        (lambda: ops.fake_quantize(x, 4, granularity="group"), ValueError, "positive group_size"),
        (lambda: ops.fake_quantize(x, 4, clip_ratio=0.0), ValueError, "clip_ratio must be in"),
        (lambda: ops.fake_quantize(x.int(), 4), TypeError, "input must be float32"),
        (lambda: ops.fake_quantize(x, 4, scale=torch.ones(3, 1)), ValueError, r"scale must have shape \(2, 1\)"),
        (lambda: ops.fake_quantize(x, 4, False, scale=torch.ones(2, 1)), ValueError, "needs symmetric"),
        (lambda: ops.rotate_fake_quantize(x, 4, granularity="tensor"), ValueError, "per token or per group"),
        (lambda: ops.quantize_int4(torch.randn(4, 7)), ValueError, "even in_features"),
        (lambda: ops.pack_int4(torch.tensor([[3, 16]], dtype=torch.uint8)), ValueError, r"codes must be in \[0, 15\]"),
        (lambda: ops.pack_int4(torch.tensor([[3, 1]])), TypeError, "codes must be uint8"),
        (lambda: ops.dequantize_int4(torch.zeros(4, 8, dtype=torch.uint8), torch.ones(4, 2), torch.zeros(4, 2, dtype=torch.uint8), 5),
         ValueError, "group_size 5 must divide"),
        (lambda: ops.int4_linear(torch.randn(3, 10), *ops.quantize_int4(torch.randn(4, 16))), ValueError, "must equal the weight's in_features"),
    ]
    for fn, exc, pattern in cases:
        with pytest.raises(exc, match=pattern):
            fn()


@pytest.mark.parametrize("n,group_size", [(96, 0), (96, 12), (96, 24), (100, 0), (4864, 128)])
def test_fused_mask_bits_are_exact(n, group_size, cpu_isa):
    """The saved straight-through bits, against the levels of the op's own rotation (hadamard_transform shares
    its arithmetic bit for bit), in every CPU build (AVX-512 writes whole bytes, the others bit by bit)."""
    if n == 100:  # 100 = 4·25: no power-of-two factor beyond 4 — a K = 100 Paley II rotation, 13 mask bytes a row
        assert hadamard.hadamard_factors(100) == (100, 1)
    signs = hadamard.random_signs(n, 3)
    x = torch.randn(33, n) * torch.linspace(0.1, 9, n)
    k, _ = hadamard.hadamard_factors(n)
    hk = hadamard.hadamard_k_on(k, x.device)
    out, scale, zero, mask = torch.ops.ftcore.rotate_fake_quantize(x, hk, signs, 0.7, 3, True, group_size, 0.8)
    rotated = torch.ops.ftcore.hadamard_transform(x, hk, signs, 0.7, False)
    level = reference._levels(rotated, scale, zero, group_size).reshape(33, n)
    inside = (level >= -4) & (level <= 3)
    assert torch.equal(mask, reference.pack_bits(inside))
    assert torch.equal(out, reference.fake_quantize(rotated, None, 3, True, group_size, 0.8)[0])
