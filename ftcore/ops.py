"""Typed wrappers over ``torch.ops.ftcore.*``: the ops layer, the one place in ftcore that calls the compiled ops
(with ``_autograd.py``, whose formulas call them in backward). Each wrapper is bound to its op's entry in the op
table (``_op_table.py``), which appends the op's schema to its docstring.

A sparse delta Δ of a logical ``out × in`` weight is a pair of 1-D tensors: ``indices`` (int32 or int64 flat
row-major positions, sorted, each in ``[0, out·in)``) and ``values``. Entry t sits at row ``indices[t] // in``,
column ``indices[t] % in``; repeated positions add up. Activations are ``(..., features)`` tensors.

Validation (``_validate.py``, the same on CPU and CUDA): every call checks shapes and dtypes (in the kernels'
argument checks) and the index values (:func:`check_delta_indices`: one host sync on CUDA). ``checked=True``
skips the index values for a caller that proved them already, as the modules do when they set their indices;
a bad index that slips through is still stopped by the kernels' memory guard, never read or written out of bounds.
"""

import math
from typing import Optional, Tuple

import torch
from torch import Tensor

from ._loader import OPS
from ._op_table import wraps_op
from ._validate import check_delta_indices
from .reference import token_loss_weights

# The *_backward ops serve the autograd formulas (ftcore/_autograd.py); they have no wrapper here.
__all__ = [*(op for op in OPS if not op.endswith("_backward")), "check_delta_indices"]


def _check(indices: Optional[Tensor], limit: int, checked: bool, name: str = "indices", strict: bool = False) -> None:
    # A negative size is the op's to report (its argument checks name it); shapes come before values.
    if indices is not None and not checked and limit >= 0:
        check_delta_indices(indices, limit, name=name, strict=strict)


@wraps_op("sparse_delta_grad")
def sparse_delta_grad(grad_output: Tensor, input: Tensor, indices: Tensor, *, checked: bool = False) -> Tensor:
    """Weight gradient of a linear layer at the k delta positions only.

    grad_output: (..., out); input: (..., in), same leading dims and dtype; indices: (k,).
    Returns (k,) float32 (float64 for float64 inputs). Same as
    ``(grad_output.reshape(-1, out).T @ input.reshape(-1, in)).flatten()[indices]`` accumulated in fp32,
    without ever forming the out × in gradient.
    """
    _check(indices, grad_output.shape[-1] * input.shape[-1], checked)
    return torch.ops.ftcore.sparse_delta_grad.default(grad_output, input, indices)


@wraps_op("sparse_delta_linear")
def sparse_delta_linear(
    input: Tensor, indices: Tensor, values: Tensor, out_features: int, *, checked: bool = False
) -> Tensor:
    """``input @ Δᵀ`` for Δ of shape (out_features, in): (..., in) -> (..., out_features), in input's dtype.

    Same as ``F.linear(input, delta_dense)`` where ``delta_dense.flatten().index_add_(0, indices, values)``,
    except that positions outside Δ contribute nothing at all (a dense product would turn inf · 0 into NaN).
    """
    _check(indices, out_features * input.shape[-1], checked)
    return torch.ops.ftcore.sparse_delta_linear.default(input, indices, values, out_features)


@wraps_op("sparse_delta_linear_transpose")
def sparse_delta_linear_transpose(
    grad_output: Tensor, indices: Tensor, values: Tensor, in_features: int, *, checked: bool = False
) -> Tensor:
    """``grad_output @ Δ`` for Δ of shape (out, in_features): (..., out) -> (..., in_features).

    The input gradient of :func:`sparse_delta_linear`.
    """
    _check(indices, grad_output.shape[-1] * in_features, checked)
    return torch.ops.ftcore.sparse_delta_linear_transpose.default(grad_output, indices, values, in_features)


@wraps_op("sparse_delta_scatter_")
def sparse_delta_scatter_(
    weight: Tensor,
    indices: Tensor,
    values: Tensor,
    alpha: float = 1.0,
    base: Optional[Tensor] = None,
    *,
    checked: bool = False,
) -> None:
    """In place on the 2-D logical (out, in) weight (any strides; pass ``conv1d.weight.t()`` for GPT-2)::

        weight.flat[i] = start + alpha * sum(values[t] for t with indices[t] == i)
        start = base[t] if base is given else weight.flat[i]

    computed in fp32 (fp64 for float64 weights) and rounded once. ``alpha == 0`` with ``base`` writes ``base``
    exactly without reading ``values`` (bit-exact unmerge). Not differentiable.
    """
    _check(indices, weight.numel(), checked)
    torch.ops.ftcore.sparse_delta_scatter_.default(weight, indices, values, float(alpha), base)


@wraps_op("sparse_delta_gather")
def sparse_delta_gather(weight: Tensor, indices: Tensor, *, checked: bool = False) -> Tensor:
    """``weight.flat[indices]`` of the 2-D logical (out, in) weight (any strides), in weight's dtype."""
    _check(indices, weight.numel(), checked)
    return torch.ops.ftcore.sparse_delta_gather.default(weight, indices)


@wraps_op("sparse_delta_topk")
def sparse_delta_topk(
    grad_output: Tensor,
    input: Tensor,
    k: int,
    *,
    candidates: Optional[Tensor] = None,
    exclude: Optional[Tensor] = None,
    chunk_rows: int = 0,
    checked: bool = False,
) -> Tuple[Tensor, Tensor]:
    """The k weight positions with the largest dense-gradient magnitude ``|grad_outputᵀ · input|``.

    Over the whole out × in matrix (minus `exclude`), rows of the gradient are formed `chunk_rows` at a time
    (0 picks about 2^22 entries a chunk), so memory stays O(chunk_rows · in + k). Over a `candidates` set, the
    exact gradient is taken there with :func:`sparse_delta_grad` (`checked` applies to `candidates`). Returns (indices int64 sorted, magnitudes fp32).
    """
    if candidates is not None:
        if exclude is not None:
            raise ValueError("pass either candidates or exclude, not both")
        scores = sparse_delta_grad(grad_output, input, candidates, checked=checked).abs().float()
        if not 0 <= k <= scores.numel():
            raise ValueError(f"k must be in [0, {scores.numel()}] (the number of candidates), got {k}")
        top = torch.topk(scores, k, sorted=False)
        chosen, order = torch.sort(candidates.long()[top.indices])
        return chosen, top.values[order]
    # `exclude` is checked by the op itself, on either device: it synchronises once per call anyway.
    return torch.ops.ftcore.sparse_delta_topk.default(grad_output, input, k, exclude, chunk_rows)


# ---- structured blocks ---------------------------------------------------------------------------------------
#
# A block is a dense submatrix of a logical (out, in) weight addressed by a sorted, distinct index: columns
# (block out × k, the S²FT default for o_proj / down_proj inputs) or rows (block k × in, for v_proj / up_proj
# outputs). Blocks are gathered and scattered by index: the weight's layout never changes.


@wraps_op("gather_columns")
def gather_columns(input: Tensor, columns: Tensor, *, checked: bool = False) -> Tensor:
    """``input[..., columns]`` as a compact contiguous tensor: the only activation a column block keeps."""
    _check(columns, input.shape[-1], checked, "columns", strict=True)
    return torch.ops.ftcore.gather_columns.default(input, columns)


@wraps_op("scatter_columns")
def scatter_columns(values: Tensor, columns: Tensor, features: int, *, checked: bool = False) -> Tensor:
    """(..., features) zeros with ``values[..., j]`` at column ``columns[j]``: the adjoint of gather_columns."""
    _check(columns, features, checked, "columns", strict=True)
    return torch.ops.ftcore.scatter_columns.default(values, columns, features)


@wraps_op("structured_block_grad")
def structured_block_grad(
    grad_output: Tensor,
    input: Tensor,
    rows: Optional[Tensor] = None,
    columns: Optional[Tensor] = None,
    *,
    checked: bool = False,
) -> Tensor:
    """A block's weight gradient: ``grad_output[..., rows]ᵀ · input[..., columns]`` summed over the tokens, in
    float32 (float64 for float64 inputs) whatever the activations' dtype. Either index may be omitted (all).

    Column block: ``structured_block_grad(g, gather_columns(x, S))`` (out × k). Row block:
    ``structured_block_grad(g, x, rows=R)`` (k × in). Same as ``F.linear``'s weight gradient restricted to the block.
    """
    _check(rows, grad_output.shape[-1], checked, "rows", strict=True)
    _check(columns, input.shape[-1], checked, "columns", strict=True)
    return torch.ops.ftcore.structured_block_grad.default(grad_output, input, rows, columns)


@wraps_op("structured_block_scatter_")
def structured_block_scatter_(
    weight: Tensor,
    index: Tensor,
    block: Tensor,
    alpha: float = 1.0,
    base: Optional[Tensor] = None,
    *,
    rows: bool = False,
    checked: bool = False,
) -> None:
    """In place on the 2-D logical (out, in) weight (any strides): ``weight[:, index]`` (or ``[index, :]`` with
    rows=True) ``= start + alpha * block``, start = `base` if given else the current block, computed in fp32 and
    rounded once. ``alpha == 0`` with `base` writes `base` exactly (bit-exact unmerge). Not differentiable."""
    _check(index, weight.shape[0 if rows else 1], checked, "index", strict=True)
    torch.ops.ftcore.structured_block_scatter_.default(weight, index, block, float(alpha), base, rows)


@wraps_op("structured_block_gather")
def structured_block_gather(weight: Tensor, index: Tensor, *, rows: bool = False, checked: bool = False) -> Tensor:
    """``weight[:, index]`` (or ``weight[index, :]``) of the 2-D logical weight, contiguous, in weight's dtype."""
    _check(index, weight.shape[0 if rows else 1], checked, "index", strict=True)
    return torch.ops.ftcore.structured_block_gather.default(weight, index, rows)


@wraps_op("multi_adapter_linear")
def multi_adapter_linear(
    input: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    adapter_ids: Tensor,
    index: Tensor,
    offsets: Tensor,
    blocks: Tensor,
    *,
    rows: bool = False,
    checked: bool = False,
) -> Tensor:
    """Serves many structured adapters in one batch without merging any (forward only).

    input (B, ..., in) against the base weight (out, in); batch row b adds adapter ``adapter_ids[b]``'s block
    product (-1: base model only). Adapter a's index is ``index[offsets[a]:offsets[a+1]]`` and its block the same
    slice of `blocks`, stacked along dim 1 (columns: out × Σk) or dim 0 (rows: Σk × in).
    """
    if not checked and isinstance(weight, Tensor) and weight.dim() == 2:
        _check_adapter_indices(index, offsets, weight.shape[0 if rows else 1])
    return torch.ops.ftcore.multi_adapter_linear.default(input, weight, bias, adapter_ids, index, offsets, blocks, rows)


def _check_adapter_indices(index: Tensor, offsets: Tensor, limit: int) -> None:
    """Each adapter's slice of `index` strictly increasing within [0, limit): one check of the whole index (two
    host syncs, offsets and index), the per-adapter search only to name a failure. Malformed offsets and ids are
    the op's to report."""
    if not isinstance(index, Tensor) or not isinstance(offsets, Tensor) or index.dim() != 1 or index.numel() == 0:
        return
    bounds = offsets.tolist()
    if not bounds or bounds[0] != 0 or bounds[-1] != index.numel() or any(b > c for b, c in zip(bounds, bounds[1:])):
        return
    idx = index.long()
    rising = idx[1:] > idx[:-1]
    starts = torch.tensor([b - 1 for b in bounds[1:-1] if 0 < b < index.numel()], dtype=torch.long, device=idx.device)
    rising[starts] = True  # a new adapter's slice may start anywhere
    if bool(((idx >= 0) & (idx < limit)).all() & rising.all()):
        return
    for a, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
        check_delta_indices(index[lo:hi], limit, name=f"index of adapter {a}", strict=True)


# ---- rotations and quantizers ----------------------------------------------------------------------------------
#
# Contract and formulas: csrc/include/ftcore/quant.h. The Hadamard matrix of size n = K·2^m is H_K ⊗ H_{2^m};
# ftcore.hadamard picks K and builds H_K. Quantization groups run along the last dim: group_size -1 is the
# whole tensor, 0 one group per row (an activation's token, a weight's output channel), g > 0 groups of g.

_GRANULARITY = {"tensor": -1, "token": 0, "channel": 0}


def _group_size(granularity: str, group_size: Optional[int]) -> int:
    if granularity == "group":
        if not isinstance(group_size, int) or group_size <= 0:
            raise ValueError(f"granularity='group' needs a positive group_size, got {group_size!r}")
        return group_size
    if granularity not in _GRANULARITY:
        raise ValueError(
            f"granularity must be 'tensor', 'channel', 'token' or 'group', got {granularity!r} ('channel' and "
            "'token' both mean one scale per row of the last dim: a weight's output channel, an activation's token)"
        )
    if group_size is not None:
        raise ValueError(f"group_size is only used with granularity='group' (got granularity={granularity!r})")
    return _GRANULARITY[granularity]


def _check_bits(bits, name: str = "bits") -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"{name} must be an integer in [2, 8], got {bits!r}")
    return bits


def _rotation_args(x: Tensor, signs: Optional[Tensor], scale: Optional[float]):
    """(H_K on x's device or None, signs on x's device, the scale: 1/√n unless given)."""
    from .hadamard import hadamard_factors, hadamard_k_on

    if not isinstance(x, Tensor):
        raise TypeError(f"input must be a tensor, got {type(x).__name__}")
    if x.dim() == 0:
        raise ValueError("input must have at least 1 dim (the transform runs along the last)")
    n = x.shape[-1]
    k, _ = hadamard_factors(n)
    if signs is not None:
        if not isinstance(signs, Tensor) or signs.shape != (n,):
            raise ValueError(f"signs must be a tensor of shape ({n},), got {getattr(signs, 'shape', signs)}")
        signs = signs.to(x.device)
    return hadamard_k_on(k, x.device), signs, 1.0 / math.sqrt(n) if scale is None else float(scale)


@wraps_op("hadamard_transform")
def hadamard_transform(
    x: Tensor,
    scale: Optional[float] = None,
    *,
    signs: Optional[Tensor] = None,
    transpose: bool = False,
    block_size: Optional[int] = None,
) -> Tensor:
    """``scale · H · diag(signs) · x`` along the last dim, H the n×n Hadamard matrix of n = K·2^m (any leading
    shape, any strides; float32/float64/bfloat16/float16, accumulated in float32 or float64). scale defaults to
    1/√n, which makes the transform orthonormal; ``transpose=True`` applies its transpose
    ``scale · diag(signs) · Hᵀ``, the inverse at the default scale. Differentiable (the gradient is the
    transposed transform), in one pass over memory.

    A size with no known Hadamard matrix raises ValueError, unless ``block_size`` asks for the block-diagonal
    rotation: each run of block_size elements (a supported size dividing n) is transformed on its own, with scale
    defaulting to 1/√block_size.
    """
    if block_size is not None:
        n = x.shape[-1]
        if not isinstance(block_size, int) or block_size < 1 or n % block_size:
            raise ValueError(f"block_size must be a positive divisor of the last dim ({n}), got {block_size!r}")
        if signs is not None and not transpose:
            x = x * signs.to(x)
        y = hadamard_transform(x.unflatten(-1, (n // block_size, block_size)), scale, transpose=transpose)
        y = y.flatten(-2)
        return y * signs.to(y) if signs is not None and transpose else y
    hadamard_k, signs, scale = _rotation_args(x, signs, scale)
    return torch.ops.ftcore.hadamard_transform.default(x, hadamard_k, signs, scale, bool(transpose))


@wraps_op("fake_quantize")
def fake_quantize(
    x: Tensor,
    bits: int,
    symmetric: bool = True,
    granularity: str = "token",
    group_size: Optional[int] = None,
    clip_ratio: float = 1.0,
    *,
    scale: Optional[Tensor] = None,
    return_params: bool = False,
):
    """Quantize-dequantize ``x`` to `bits` (2–8) with a straight-through gradient: inside the clip range the
    gradient passes unchanged, outside it is zero.

    granularity: 'tensor' (one scale), 'token' / 'channel' (one per row of the last dim), 'group' (runs of
    group_size along the last dim). Scales are ``clip_ratio · max|x| / (2^(bits-1) − 1)`` (symmetric) or span
    ``[clip·min(x, 0), clip·max(x, 0)]`` with an integer zero point (asymmetric).

    scale: a learnable float32 scale of shape (rows, groups) ((1, 1) for 'tensor'), symmetric only; its gradient
    is LSQ's (Esser et al.): Σ dx̂ · (q − x/scale) inside the range, Σ dx̂ · q outside, without LSQ's gradient
    scale factor (apply it to the parameter, as RotatedQuantLinear does).

    Returns x̂ (x's dtype and shape), or (x̂, scale, zero_point) with return_params.
    """
    gs = _group_size(granularity, group_size)
    out, qscale, zero = torch.ops.ftcore.fake_quantize.default(
        x, scale, _check_bits(bits), bool(symmetric), gs, float(clip_ratio)
    )
    return (out, qscale, zero) if return_params else out


@wraps_op("rotate_fake_quantize")
def rotate_fake_quantize(
    x: Tensor,
    bits: int,
    symmetric: bool = True,
    granularity: str = "token",
    group_size: Optional[int] = None,
    clip_ratio: float = 1.0,
    *,
    signs: Optional[Tensor] = None,
    scale: Optional[float] = None,
    return_params: bool = False,
):
    """``fake_quantize(hadamard_transform(x, scale, signs=signs), ...)`` per token or group in one pass: the
    rotated tensor is never written, and all that is saved for backward is one bit an element (where the
    straight-through gradient passes). The online activation rotation of a down_proj-like layer."""
    gs = _group_size(granularity, group_size)
    if gs < 0:
        raise ValueError("rotate_fake_quantize quantizes per token or per group, not per tensor")
    hadamard_k, signs, scale = _rotation_args(x, signs, scale)
    out, qscale, zero, _ = torch.ops.ftcore.rotate_fake_quantize.default(
        x, hadamard_k, signs, scale, _check_bits(bits), bool(symmetric), gs, float(clip_ratio)
    )
    return (out, qscale, zero) if return_params else out


@wraps_op("quantize_int4")
def quantize_int4(
    weight: Tensor, group_size: Optional[int] = None, symmetric: bool = True, clip_ratio: float = 1.0
) -> Tuple[Tensor, Tensor, Tensor]:
    """(packed, scale, zero_point) of a 2-D (out, in) weight at 4 bits: packed uint8 (out, in/2), two codes a
    byte (layout in csrc/include/ftcore/quant.h), float32 scale and uint8 zero point per output channel
    (group_size None) or per group of group_size columns. Rounds exactly as
    ``fake_quantize(weight, 4, symmetric, ...)``, so ``dequantize_int4`` reproduces it."""
    return torch.ops.ftcore.quantize_int4.default(weight, group_size or 0, bool(symmetric), float(clip_ratio))


@wraps_op("pack_int4")
def pack_int4(codes: Tensor) -> Tensor:
    """uint8 codes in [0, 15] (..., 2c) -> packed uint8 (..., c): code 2j in the low nibble of byte j."""
    if isinstance(codes, Tensor) and codes.numel() and int(codes.max()) > 15:
        raise ValueError(f"pack_int4: codes must be in [0, 15], found {int(codes.max())}")
    return torch.ops.ftcore.pack_int4.default(codes)


@wraps_op("unpack_int4")
def unpack_int4(packed: Tensor) -> Tensor:
    """The inverse of :func:`pack_int4`, bit for bit."""
    return torch.ops.ftcore.unpack_int4.default(packed)


@wraps_op("dequantize_int4")
def dequantize_int4(
    packed: Tensor, scale: Tensor, zero_point: Tensor, group_size: Optional[int] = None, dtype=torch.float32
) -> Tensor:
    """The (out, in) weight an int4 triple stands for, ``(code − zero_point) · scale``, in `dtype`."""
    return torch.ops.ftcore.dequantize_int4.default(packed, scale, zero_point, group_size or 0, dtype)


@wraps_op("int4_linear")
def int4_linear(
    input: Tensor,
    packed: Tensor,
    scale: Tensor,
    zero_point: Tensor,
    group_size: Optional[int] = None,
    bias: Optional[Tensor] = None,
) -> Tensor:
    """``input · dequantize_int4(...)ᵀ + bias`` with the weight dequantized a block of rows at a time (about a
    million weights), never whole; the GEMM runs in input's dtype. Forward only (inference of an exported layer)."""
    return torch.ops.ftcore.int4_linear.default(input, packed, scale, zero_point, group_size or 0, bias)


_REDUCTIONS = ("mean", "sum", "none")


def _check_labels(labels: Tensor, vocab: int, ignore_index: int) -> None:
    """Every label is ignore_index or in [0, vocab): one host sync; skipped under torch.compile (the kernel's
    gather still refuses an address out of range)."""
    if labels.numel() == 0 or torch.compiler.is_compiling():
        return
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
    if bool(bad.any()):
        t = tuple(int(i) for i in bad.nonzero()[0])
        raise IndexError(f"labels{list(t)} = {int(labels[t])} is neither ignore_index ({ignore_index}) nor in [0, {vocab})")


@wraps_op("linear_cross_entropy")
def linear_cross_entropy(
    hidden: Tensor,
    lm_head_weight: Tensor,
    labels: Tensor,
    *,
    ignore_index: int = -100,
    weighting: str = "none",
    token_weights: Optional[Tensor] = None,
    tau: float = 1.0,
    reduction: str = "mean",
    num_items_in_batch=None,
    chunk_tokens: int = 0,
    checked: bool = False,
) -> Tensor:
    """Cross-entropy of ``hidden @ lm_head_weight.T`` against `labels` (same leading dims as hidden, not shifted:
    label t is the target of hidden t) without the (tokens × vocab) logits ever existing whole, forward or
    backward. Loss = Σ_t w_t · nll_t / divisor over the tokens whose label is not `ignore_index`:

    - weighting ``"none"``: w_t = 1; ``"given"``: w_t = token_weights[t] (any sign: token pruning, FAIT-style
      weights, negative "forgetting" tokens); ``"dft"``: w_t = p(y_t) (Dynamic Fine-Tuning); ``"talr"``:
      w_t = N · softmax_t(log p(y_t) / tau) over the N counted tokens of this call (Token-Adaptive Loss
      Reweighting: w_t ∝ p(y_t)^(1/tau), mean weight 1; under gradient accumulation each micro-batch is
      normalised on its own). dft and talr weights are not differentiated.
    - reduction ``"mean"``: divisor = the number of counted tokens, as ``CrossEntropyLoss`` (NaN when there is
      none, as there); ``num_items_in_batch`` given (the HF Trainer's count under gradient accumulation): that
      number. ``"sum"``: divisor 1. ``"none"``: the per-token w_t · nll_t (no gradient).

    The gradients are computed in this call, chunk by chunk (3 GEMMs a chunk: logits, d_hidden, d_weight; the
    weight's only when ``lm_head_weight.requires_grad``); the GEMMs run in the input dtype, the logsumexp, the
    weights and the sums in fp32 (fp64 for float64); backward scales them. float16 training is refused for now. Gradients exist only for hidden and lm_head_weight (not token_weights). Labels are
    checked on every call (one host sync) unless ``checked=True``.
    """
    # weighting and its token_weights are checked by the op's argument checks (one place for both devices)
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not math.isfinite(tau) or tau <= 0:
        raise ValueError(f"tau must be a finite number > 0, got {tau!r}")
    divisor = 0.0
    if num_items_in_batch is not None:
        if reduction != "mean":
            raise ValueError(f'num_items_in_batch is the divisor of reduction="mean", not of {reduction!r}')
        divisor = float(num_items_in_batch.item() if isinstance(num_items_in_batch, Tensor) else num_items_in_batch)
        if not math.isfinite(divisor) or divisor <= 0:
            raise ValueError(f"num_items_in_batch must be > 0, got {num_items_in_batch!r}")
    elif reduction == "sum":
        divisor = 1.0
    if not isinstance(labels, Tensor) or labels.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"labels must be an int64 or int32 tensor, got {getattr(labels, 'dtype', type(labels))}")
    if not checked and isinstance(lm_head_weight, Tensor) and lm_head_weight.dim() == 2:
        _check_labels(labels, lm_head_weight.shape[0], ignore_index)
    grad = torch.is_grad_enabled()
    grad_hidden = grad and hidden.requires_grad
    grad_weight = grad and lm_head_weight.requires_grad
    if hidden.dtype == torch.float16 and (grad_hidden or grad_weight):
        # The per-row gradient coef · (softmax − onehot) is rounded to fp16 before the GEMMs and scaled by the
        # loss scale only in backward: entries under fp16's range (coef = 1/tokens) flush to zero. Not fixed yet.
        raise ValueError(
            "linear_cross_entropy: float16 training is refused for now (its gradients would underflow before a "
            "GradScaler's scale is applied); use bfloat16 or float32 (float16 without gradients is fine)"
        )
    if reduction == "none":
        if grad_hidden or grad_weight:
            raise ValueError(
                'reduction="none" has no gradient here (each token\'s own upstream gradient would need its own '
                'weight-gradient pass); use "mean" or "sum" to train, "none" under torch.no_grad() to inspect'
            )
    loss, nll, _, _ = torch.ops.ftcore.linear_cross_entropy.default(
        hidden, lm_head_weight, labels, token_weights, ignore_index, weighting, float(tau), divisor,
        grad_hidden, grad_weight, chunk_tokens,
    )
    if reduction == "none":
        valid = labels != ignore_index
        return token_loss_weights(nll, valid, weighting, token_weights, tau) * nll
    return loss
