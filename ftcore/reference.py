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
    grad_output: Tensor, input: Tensor, k: int, exclude: Optional[Tensor] = None
) -> Tuple[Tensor, Tensor]:
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
