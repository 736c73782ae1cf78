"""Fake (meta) implementations: shapes and dtypes of every op's outputs, for torch.compile and FakeTensor.
The op table (_op_table.py) registers each one for its op."""

import torch


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def sparse_delta_grad(grad_output, input, indices):
    torch._check(grad_output.shape[:-1] == input.shape[:-1], lambda: "grad_output and input must share leading dims")
    return input.new_empty(indices.shape, dtype=_acc(input.dtype))


def sparse_delta_linear(input, indices, values, out_features):
    return input.new_empty((*input.shape[:-1], out_features))


def sparse_delta_linear_transpose(grad_output, indices, values, in_features):
    return grad_output.new_empty((*grad_output.shape[:-1], in_features))


def returns_nothing(*args):
    """The in-place scatters return nothing: they write their first argument."""
    return None


def sparse_delta_gather(weight, indices):
    return weight.new_empty(indices.shape)


def sparse_delta_topk(grad_output, input, k, exclude=None, chunk_rows=0):
    return input.new_empty((k,), dtype=torch.int64), input.new_empty((k,), dtype=torch.float32)


def gather_columns(input, columns):
    return input.new_empty((*input.shape[:-1], columns.shape[0]))


def scatter_columns(values, columns, features):
    return values.new_empty((*values.shape[:-1], features))


def structured_block_grad(grad_output, input, rows=None, columns=None):
    a = rows.shape[0] if rows is not None else grad_output.shape[-1]
    b = columns.shape[0] if columns is not None else input.shape[-1]
    return input.new_empty((a, b), dtype=_acc(input.dtype))


def structured_block_gather(weight, index, rows):
    return weight.new_empty((index.shape[0], weight.shape[1]) if rows else (weight.shape[0], index.shape[0]))


def multi_adapter_linear(input, weight, bias, adapter_ids, index, offsets, blocks, rows):
    return input.new_empty((*input.shape[:-1], weight.shape[0]))


def _scale_shape(x, group_size):
    n = x.shape[-1]
    if group_size == -1:
        return (1, 1)
    return (x.numel() // n if n else 0, n // group_size if group_size > 0 else 1)


def hadamard_transform(input, hadamard_k, signs, scale, transpose):
    return torch.empty_like(input, memory_format=torch.contiguous_format)


def fake_quantize(input, scale, bits, symmetric, group_size, clip_ratio):
    shape = _scale_shape(input, group_size)
    out = torch.empty_like(input, memory_format=torch.contiguous_format)
    return out, input.new_empty(shape, dtype=torch.float32), input.new_empty(shape, dtype=torch.float32)


def fake_quantize_backward(grad, input, scale, zero_point, bits, symmetric, group_size, scale_grad):
    d_scale = input.new_empty(_scale_shape(input, group_size) if scale_grad else (0,), dtype=torch.float32)
    return torch.empty_like(input, memory_format=torch.contiguous_format), d_scale


def rotate_fake_quantize(input, hadamard_k, signs, scale, bits, symmetric, group_size, clip_ratio):
    out, qscale, zero = fake_quantize(input, None, bits, symmetric, group_size, clip_ratio)
    n = input.shape[-1]
    mask = input.new_empty((input.numel() // n if n else 0, (n + 7) // 8), dtype=torch.uint8)
    return out, qscale, zero, mask


def rotate_fake_quantize_backward(grad, mask, hadamard_k, signs, scale):
    return torch.empty_like(grad, memory_format=torch.contiguous_format)


def quantize_int4(weight, group_size, symmetric, clip_ratio):
    out, n = weight.shape
    groups = n // group_size if group_size > 0 else 1
    return (
        weight.new_empty((out, n // 2), dtype=torch.uint8),
        weight.new_empty((out, groups), dtype=torch.float32),
        weight.new_empty((out, groups), dtype=torch.uint8),
    )


def pack_int4(codes):
    return codes.new_empty((*codes.shape[:-1], codes.shape[-1] // 2))


def unpack_int4(packed):
    return packed.new_empty((*packed.shape[:-1], packed.shape[-1] * 2))


def dequantize_int4(packed, scale, zero_point, group_size, dtype):
    return packed.new_empty((packed.shape[0], packed.shape[1] * 2), dtype=dtype)


def int4_linear(input, packed, scale, zero_point, group_size, bias):
    return input.new_empty((*input.shape[:-1], packed.shape[0]))


def linear_cross_entropy(hidden, weight, labels, token_weights, ignore_index, weighting, tau, divisor,
                         grad_hidden, grad_weight, chunk_tokens):
    torch._check(labels.shape == hidden.shape[:-1], lambda: "labels must have hidden's leading dims")
    acc = _acc(hidden.dtype)
    return (
        hidden.new_empty((), dtype=acc),
        hidden.new_empty(labels.shape, dtype=acc),
        hidden.new_empty(hidden.shape) if grad_hidden else hidden.new_empty(0),
        weight.new_empty(weight.shape) if grad_weight else weight.new_empty(0),
    )
