"""Fake (meta) implementations: shapes and dtypes of every op's outputs, for torch.compile and FakeTensor."""

import torch


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.register_fake("ftcore::sparse_delta_grad")
def _sparse_delta_grad(grad_output, input, indices):
    torch._check(grad_output.shape[:-1] == input.shape[:-1], lambda: "grad_output and input must share leading dims")
    return input.new_empty(indices.shape, dtype=_acc(input.dtype))


@torch.library.register_fake("ftcore::sparse_delta_linear")
def _sparse_delta_linear(input, indices, values, out_features):
    return input.new_empty((*input.shape[:-1], out_features))


@torch.library.register_fake("ftcore::sparse_delta_linear_transpose")
def _sparse_delta_linear_transpose(grad_output, indices, values, in_features):
    return grad_output.new_empty((*grad_output.shape[:-1], in_features))


@torch.library.register_fake("ftcore::sparse_delta_scatter_")
def _sparse_delta_scatter_(weight, indices, values, alpha, base):
    return None


@torch.library.register_fake("ftcore::sparse_delta_gather")
def _sparse_delta_gather(weight, indices):
    return weight.new_empty(indices.shape)


@torch.library.register_fake("ftcore::sparse_delta_topk")
def _sparse_delta_topk(grad_output, input, k, exclude=None, chunk_rows=0):
    return input.new_empty((k,), dtype=torch.int64), input.new_empty((k,), dtype=torch.float32)


@torch.library.register_fake("ftcore::gather_columns")
def _gather_columns(input, columns):
    return input.new_empty((*input.shape[:-1], columns.shape[0]))


@torch.library.register_fake("ftcore::scatter_columns")
def _scatter_columns(values, columns, features):
    return values.new_empty((*values.shape[:-1], features))


@torch.library.register_fake("ftcore::structured_block_grad")
def _structured_block_grad(grad_output, input, rows=None, columns=None):
    a = rows.shape[0] if rows is not None else grad_output.shape[-1]
    b = columns.shape[0] if columns is not None else input.shape[-1]
    return input.new_empty((a, b), dtype=_acc(input.dtype))


@torch.library.register_fake("ftcore::structured_block_scatter_")
def _structured_block_scatter_(weight, index, block, alpha, base, rows):
    return None


@torch.library.register_fake("ftcore::structured_block_gather")
def _structured_block_gather(weight, index, rows):
    return weight.new_empty((index.shape[0], weight.shape[1]) if rows else (weight.shape[0], index.shape[0]))


@torch.library.register_fake("ftcore::multi_adapter_linear")
def _multi_adapter_linear(input, weight, bias, adapter_ids, index, offsets, blocks, rows):
    return input.new_empty((*input.shape[:-1], weight.shape[0]))
