"""Pure-PyTorch reference of every ftcore op: the oracle the tests compare the kernels with, and the naive
baseline the benchmarks measure against. Clarity over speed: these form dense out × in tensors freely."""

from typing import Optional, Tuple

import torch
from torch import Tensor


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _rows(t: Tensor) -> Tensor:
    return t.reshape(-1, t.shape[-1])


def dense_delta(indices: Tensor, values: Tensor, out_features: int, in_features: int, dtype=None) -> Tensor:
    """The out × in matrix Δ with `values` added at `indices` (repeats add up)."""
    dtype = dtype or values.dtype
    delta = torch.zeros(out_features * in_features, dtype=dtype, device=values.device)
    delta.index_add_(0, indices.long(), values.to(dtype))
    return delta.view(out_features, in_features)


def sparse_delta_grad(grad_output: Tensor, input: Tensor, indices: Tensor) -> Tensor:
    """The dense weight gradient ``grad_outputᵀ · input``, then the entries at `indices` (SpIEL's way)."""
    acc = _acc(input.dtype)
    dense = _rows(grad_output).to(acc).t() @ _rows(input).to(acc)
    return dense.flatten()[indices.long()]


def sparse_delta_linear(input: Tensor, indices: Tensor, values: Tensor, out_features: int) -> Tensor:
    acc = _acc(input.dtype)
    delta = dense_delta(indices, values, out_features, input.shape[-1], acc)
    return (input.to(acc) @ delta.t()).to(input.dtype)


def sparse_delta_linear_transpose(grad_output: Tensor, indices: Tensor, values: Tensor, in_features: int) -> Tensor:
    acc = _acc(grad_output.dtype)
    delta = dense_delta(indices, values, grad_output.shape[-1], in_features, acc)
    return (grad_output.to(acc) @ delta).to(grad_output.dtype)


def sparse_delta_scatter_(
    weight: Tensor, indices: Tensor, values: Tensor, alpha: float = 1.0, base: Optional[Tensor] = None
) -> None:
    acc = _acc(weight.dtype)
    out_features, in_features = weight.shape
    flat_index = indices.long()
    unique, first = _run_starts(flat_index)
    rows, cols = unique // in_features, unique % in_features
    start = base.to(acc)[first] if base is not None else weight[rows, cols].to(acc)
    if alpha != 0:
        sums = dense_delta(flat_index, values.to(acc), out_features, in_features, acc).flatten()[unique]
        start = start + alpha * sums
    weight[rows, cols] = start.to(weight.dtype)


def _run_starts(sorted_index: Tensor) -> Tuple[Tensor, Tensor]:
    """The distinct positions of a sorted index tensor and where each first appears."""
    unique, counts = torch.unique_consecutive(sorted_index, return_counts=True)
    first = torch.cumsum(counts, 0) - counts
    return unique, first


def sparse_delta_gather(weight: Tensor, indices: Tensor) -> Tensor:
    in_features = weight.shape[1]
    flat_index = indices.long()
    return weight[flat_index // in_features, flat_index % in_features]


def sparse_delta_topk(
    grad_output: Tensor, input: Tensor, k: int, exclude: Optional[Tensor] = None, chunk_rows: int = 0
) -> Tuple[Tensor, Tensor]:
    """The dense gradient's k largest magnitudes, whole (chunk_rows only bounds the kernel's memory)."""
    acc = _acc(input.dtype)
    scores = (_rows(grad_output).to(acc).t() @ _rows(input).to(acc)).abs().flatten().float()
    if exclude is not None:
        scores[exclude.long()] = -1.0
    top = torch.topk(scores, k)
    chosen, order = torch.sort(top.indices)
    return chosen, top.values[order]


# ---- structured blocks ---------------------------------------------------------------------------------------


def gather_columns(input: Tensor, columns: Tensor) -> Tensor:
    return input[..., columns.long()].contiguous()


def scatter_columns(values: Tensor, columns: Tensor, features: int) -> Tensor:
    out = values.new_zeros((*values.shape[:-1], features))
    out[..., columns.long()] = values
    return out


def structured_block_grad(grad_output: Tensor, input: Tensor, rows: Optional[Tensor] = None, columns: Optional[Tensor] = None) -> Tensor:
    acc = _acc(input.dtype)
    g = _rows(grad_output).to(acc)
    x = _rows(input).to(acc)
    if rows is not None:
        g = g[:, rows.long()]
    if columns is not None:
        x = x[:, columns.long()]
    return g.t() @ x


def structured_block_gather(weight: Tensor, index: Tensor, rows: bool = False) -> Tensor:
    return (weight[index.long()] if rows else weight[:, index.long()]).contiguous()


def structured_block_scatter_(
    weight: Tensor, index: Tensor, block: Tensor, alpha: float = 1.0, base: Optional[Tensor] = None, rows: bool = False
) -> None:
    acc = _acc(weight.dtype)
    start = (base if base is not None else structured_block_gather(weight, index, rows)).to(acc)
    new = start if alpha == 0 else start + alpha * block.to(acc)
    if rows:
        weight[index.long()] = new.to(weight.dtype)
    else:
        weight[:, index.long()] = new.to(weight.dtype)


def multi_adapter_linear(input, weight, bias, adapter_ids, index, offsets, blocks, rows=False) -> Tensor:
    """Each batch row computed on its own: the base weight with that row's adapter block added, densely."""
    out = []
    for b in range(input.shape[0]):
        w = weight.clone()
        a = int(adapter_ids[b])
        if a >= 0:
            lo, hi = int(offsets[a]), int(offsets[a + 1])
            block = blocks[lo:hi] if rows else blocks[:, lo:hi]
            structured_block_scatter_(w, index[lo:hi], block, 1.0, None, rows)
        out.append(torch.nn.functional.linear(input[b : b + 1], w, bias))
    return torch.cat(out)


# ---- rotations and quantizers (formulas in csrc/include/ftcore/quant.h) -----------------------------------------


def sylvester(p: int, dtype=torch.float64) -> Tensor:
    """The p×p Sylvester Hadamard matrix (p a power of two), entry (i, j) = (−1)^popcount(i & j)."""
    i = torch.arange(p)
    bits = torch.bitwise_and(i[:, None], i[None, :])
    parity = torch.zeros_like(bits)
    while bool(bits.any()):
        parity ^= bits & 1
        bits = bits >> 1
    return (1 - 2 * parity).to(dtype)


def hadamard_dense(hadamard_k: Optional[Tensor], n: int, dtype=torch.float64) -> Tensor:
    """The n×n matrix H = H_K ⊗ H_P the transform applies."""
    k = 1 if hadamard_k is None else hadamard_k.shape[0]
    hk = torch.ones(1, 1, dtype=dtype) if hadamard_k is None else hadamard_k.cpu().to(dtype)
    return torch.kron(hk, sylvester(n // k, dtype))


def hadamard_transform(
    x: Tensor, hadamard_k: Optional[Tensor], signs: Optional[Tensor], scale: float, transpose: bool
) -> Tensor:
    """The pure-PyTorch butterfly: log2(P) stages over the whole tensor, then the K×K mix as a matmul, in the
    accumulation dtype. The baseline the Hadamard benchmark measures against."""
    n = x.shape[-1]
    k = 1 if hadamard_k is None else hadamard_k.shape[0]
    p = n // k
    v = x.to(_acc(x.dtype))
    if signs is not None and not transpose:
        v = v * signs.to(v)
    lead = v.shape[:-1]
    v = v.reshape(-1, k, p)
    h = 1
    while h < p:
        pairs = v.view(-1, k, p // (2 * h), 2, h)
        a, b = pairs[..., 0, :], pairs[..., 1, :]
        v = torch.stack((a + b, a - b), dim=-2).view(-1, k, p)
        h *= 2
    if hadamard_k is not None:
        hk = hadamard_k.to(v)
        v = torch.matmul(hk.t() if transpose else hk, v)
    v = v.reshape(*lead, n) * scale
    if signs is not None and transpose:
        v = v * signs.to(v)
    return v.to(x.dtype)


def _grouped(x: Tensor, group_size: int) -> Tensor:
    """x as (rows, groups, group_len); the whole tensor as (1, 1, numel) for group_size −1."""
    n = x.shape[-1]
    if group_size == -1:
        return x.reshape(1, 1, -1)
    g = n if group_size == 0 else group_size
    return x.reshape(-1, n // g, g)


def quant_params(x: Tensor, bits: int, symmetric: bool, group_size: int, clip_ratio: float) -> Tuple[Tensor, Tensor]:
    """float32 (scale, zero_point) of shape (rows, groups) ((1, 1) for the whole tensor)."""
    v = _grouped(x, group_size).float()
    clip = torch.tensor(clip_ratio, dtype=torch.float32)
    if symmetric:
        qmax = 2.0 ** (bits - 1) - 1
        scale = clip * v.abs().amax(-1) / qmax
        zero = torch.zeros_like(scale)
    else:
        qmax = 2.0**bits - 1
        lo = clip * v.amin(-1).clamp(max=0)
        hi = clip * v.amax(-1).clamp(min=0)
        scale = (hi - lo) / qmax
        zero = torch.where(scale > 0, torch.round(-lo / scale).clamp(0, qmax), torch.zeros_like(scale))
    scale = torch.where((scale > 0) & (scale < float("inf")), scale, torch.ones_like(scale))
    return scale, zero


def _range(bits: int, symmetric: bool) -> Tuple[float, float]:
    return (-(2.0 ** (bits - 1)), 2.0 ** (bits - 1) - 1) if symmetric else (0.0, 2.0**bits - 1)


def _levels(x: Tensor, scale: Tensor, zero: Tensor, group_size: int) -> Tensor:
    v = _grouped(x, group_size).to(_acc(x.dtype))
    return torch.round(v / scale[..., None].to(v)) + zero[..., None].to(v)


def fake_quantize(
    x: Tensor, scale: Optional[Tensor], bits: int, symmetric: bool, group_size: int, clip_ratio: float
) -> Tuple[Tensor, Tensor, Tensor]:
    if scale is None:
        scale, zero = quant_params(x, bits, symmetric, group_size, clip_ratio)
    else:
        zero = torch.zeros_like(scale)
    qmin, qmax = _range(bits, symmetric)
    level = _levels(x, scale, zero, group_size)
    out = (level.clamp(qmin, qmax) - zero[..., None].to(level)) * scale[..., None].to(level)
    return out.reshape(x.shape).to(x.dtype), scale.clone(), zero


def fake_quantize_backward(
    grad: Tensor, x: Tensor, scale: Tensor, zero: Tensor, bits: int, symmetric: bool, group_size: int, scale_grad: bool
) -> Tuple[Tensor, Tensor]:
    qmin, qmax = _range(bits, symmetric)
    level = _levels(x, scale, zero, group_size).double()
    inside = (level >= qmin) & (level <= qmax)
    g = _grouped(grad, group_size)
    d_input = torch.where(inside, g, torch.zeros_like(g)).reshape(x.shape)
    if not scale_grad:
        return d_input, grad.new_empty(0, dtype=torch.float32)
    v = _grouped(x, group_size).double()
    z = zero[..., None].double()
    dq_ds = torch.where(inside, (level - z) - v / scale[..., None].double(), level.clamp(qmin, qmax) - z)
    return d_input, (g.double() * dq_ds).sum(-1).float()


def rotate_fake_quantize(x, hadamard_k, signs, scale, bits, symmetric, group_size, clip_ratio):
    """The unfused pair: rotate, then fake-quantize the rotated tensor; plus the straight-through bits."""
    rotated = hadamard_transform(x, hadamard_k, signs, scale, False)
    out, qscale, zero = fake_quantize(rotated, None, bits, symmetric, group_size, clip_ratio)
    qmin, qmax = _range(bits, symmetric)
    level = _levels(rotated, qscale, zero, group_size)
    inside = ((level >= qmin) & (level <= qmax)).reshape(-1, x.shape[-1])
    return out, qscale, zero, pack_bits(inside)


def pack_bits(inside: Tensor) -> Tensor:
    """(rows, n) bool -> uint8 (rows, ceil(n/8)), element 8j + b in bit b of byte j."""
    n = inside.shape[-1]
    padded = torch.nn.functional.pad(inside.to(torch.uint8), (0, (-n) % 8)).view(inside.shape[0], -1, 8)
    return (padded << torch.arange(8, dtype=torch.uint8)).sum(-1, dtype=torch.uint8)


def unpack_bits(mask: Tensor, n: int) -> Tensor:
    """The inverse of pack_bits: uint8 (rows, ceil(n/8)) -> bool (rows, n)."""
    bits = (mask[..., None] >> torch.arange(8, dtype=torch.uint8, device=mask.device)) & 1
    return bits.flatten(-2)[..., :n].bool()


def rotate_fake_quantize_backward(grad, mask, hadamard_k, signs, scale) -> Tensor:
    """The straight-through bits applied to the gradient, then the transposed rotation."""
    inside = unpack_bits(mask, grad.shape[-1]).reshape(grad.shape)
    return hadamard_transform(torch.where(inside, grad, torch.zeros_like(grad)), hadamard_k, signs, scale, True)


def pack_int4(codes: Tensor) -> Tensor:
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).to(torch.uint8)


def unpack_int4(packed: Tensor) -> Tensor:
    return torch.stack((packed & 0xF, packed >> 4), dim=-1).flatten(-2)


def quantize_int4(weight: Tensor, group_size: int, symmetric: bool, clip_ratio: float) -> Tuple[Tensor, Tensor, Tensor]:
    scale, zero = quant_params(weight, 4, symmetric, group_size, clip_ratio)
    qmin, qmax = _range(4, symmetric)
    offset = 8.0 if symmetric else 0.0
    codes = (_levels(weight, scale, zero, group_size).clamp(qmin, qmax) + offset).reshape(weight.shape)
    return pack_int4(codes.to(torch.uint8)), scale, (zero + offset).to(torch.uint8)


def dequantize_int4(packed: Tensor, scale: Tensor, zero: Tensor, group_size: int, dtype) -> Tensor:
    codes = unpack_int4(packed).float()
    out = (_grouped(codes, group_size) - zero[..., None].float()) * scale[..., None]
    return out.reshape(codes.shape).to(dtype)


def int4_linear(input, packed, scale, zero, group_size, bias=None) -> Tensor:
    weight = dequantize_int4(packed, scale, zero, group_size, input.dtype)
    return torch.nn.functional.linear(input, weight, bias)


# ---- linear cross-entropy (contract in csrc/include/ftcore/linear_cross_entropy.h) ----------------------------

WEIGHTINGS = ("none", "given", "dft", "talr")


def token_loss_weights(nll: Tensor, valid: Tensor, weighting: str, token_weights: Optional[Tensor], tau: float) -> Tensor:
    """Each token's loss weight w_t (0 where not counted), never differentiated: 1 ("none"), token_weights
    ("given"), p(y_t) = exp(−nll_t) ("dft"), or N · softmax_t(log p(y_t) / tau) over the N counted tokens
    ("talr": w_t ∝ p(y_t)^(1/tau), mean weight 1)."""
    nll = nll.detach()
    if weighting == "none":
        w = valid.to(nll.dtype)
    elif weighting == "given":
        w = torch.where(valid, token_weights.detach().reshape(nll.shape).to(nll.dtype), 0.0)
    elif weighting == "dft":
        w = torch.where(valid, torch.exp(-nll), 0.0)
    elif weighting == "talr":
        a = torch.where(valid, -nll / tau, float("-inf"))
        w = torch.where(valid, torch.softmax(a.reshape(-1), 0).reshape(a.shape) * valid.sum(), 0.0)
    else:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    return w


def linear_cross_entropy(hidden, weight, labels, token_weights, ignore_index, weighting, tau, divisor,
                         grad_hidden, grad_weight, chunk_tokens):
    """(loss, nll, d_hidden, d_weight): loss = Σ w_t · nll_t / divisor (divisor 0: the counted tokens), nll per
    token (0 where labels == ignore_index), and the loss's gradients (empty when not asked), all from the whole
    logits in the accumulation type. chunk_tokens only shapes the kernel's work and is ignored here."""
    acc = _acc(hidden.dtype)
    h = hidden.detach().to(acc).requires_grad_(grad_hidden)
    w_ = weight.detach().to(acc).requires_grad_(grad_weight)
    y = labels.reshape(-1).long()
    valid = y != ignore_index
    with torch.enable_grad():
        logits = h.reshape(-1, h.shape[-1]) @ w_.T
        nll = torch.nn.functional.cross_entropy(logits, torch.where(valid, y, 0), reduction="none")
        nll = torch.where(valid, nll, 0.0)
        w = token_loss_weights(nll, valid, weighting, token_weights, tau)
        div = torch.tensor(float(divisor), dtype=acc) if divisor > 0 else valid.sum().to(acc)
        loss = (w * nll).sum() / div
        wanted = [t for t, want in ((h, grad_hidden), (w_, grad_weight)) if want]
        grads = list(torch.autograd.grad(loss, wanted)) if wanted else []
    d_hidden = grads.pop(0).to(hidden.dtype) if grad_hidden else hidden.new_empty(0)
    d_weight = grads.pop(0).to(weight.dtype) if grad_weight else weight.new_empty(0)
    return loss.detach(), nll.detach().reshape(labels.shape), d_hidden, d_weight
