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


def _scale_shape(x, group_size):
    n = x.shape[-1]
    if group_size == -1:
        return (1, 1)
    return (x.numel() // n if n else 0, n // group_size if group_size > 0 else 1)


@torch.library.register_fake("ftcore::hadamard_transform")
def _hadamard_transform(input, hadamard_k, signs, scale, transpose):
    return torch.empty_like(input, memory_format=torch.contiguous_format)


@torch.library.register_fake("ftcore::fake_quantize")
def _fake_quantize(input, scale, bits, symmetric, group_size, clip_ratio):
    shape = _scale_shape(input, group_size)
    out = torch.empty_like(input, memory_format=torch.contiguous_format)
    return out, input.new_empty(shape, dtype=torch.float32), input.new_empty(shape, dtype=torch.float32)


@torch.library.register_fake("ftcore::fake_quantize_backward")
def _fake_quantize_backward(grad, input, scale, zero_point, bits, symmetric, group_size, scale_grad):
    d_scale = input.new_empty(_scale_shape(input, group_size) if scale_grad else (0,), dtype=torch.float32)
    return torch.empty_like(input, memory_format=torch.contiguous_format), d_scale


@torch.library.register_fake("ftcore::rotate_fake_quantize")
def _rotate_fake_quantize(input, hadamard_k, signs, scale, bits, symmetric, group_size, clip_ratio):
    out, qscale, zero = _fake_quantize(input, None, bits, symmetric, group_size, clip_ratio)
    n = input.shape[-1]
    mask = input.new_empty((input.numel() // n if n else 0, (n + 7) // 8), dtype=torch.uint8)
    return out, qscale, zero, mask


@torch.library.register_fake("ftcore::rotate_fake_quantize_backward")
def _rotate_fake_quantize_backward(grad, mask, hadamard_k, signs, scale):
    return torch.empty_like(grad, memory_format=torch.contiguous_format)


@torch.library.register_fake("ftcore::quantize_int4")
def _quantize_int4(weight, group_size, symmetric, clip_ratio):
    out, n = weight.shape
    groups = n // group_size if group_size > 0 else 1
    return (
        weight.new_empty((out, n // 2), dtype=torch.uint8),
        weight.new_empty((out, groups), dtype=torch.float32),
        weight.new_empty((out, groups), dtype=torch.uint8),
    )


@torch.library.register_fake("ftcore::pack_int4")
def _pack_int4(codes):
    return codes.new_empty((*codes.shape[:-1], codes.shape[-1] // 2))


@torch.library.register_fake("ftcore::unpack_int4")
def _unpack_int4(packed):
    return packed.new_empty((*packed.shape[:-1], packed.shape[-1] * 2))


@torch.library.register_fake("ftcore::dequantize_int4")
def _dequantize_int4(packed, scale, zero_point, group_size, dtype):
    return packed.new_empty((packed.shape[0], packed.shape[1] * 2), dtype=dtype)


@torch.library.register_fake("ftcore::int4_linear")
def _int4_linear(input, packed, scale, zero_point, group_size, bias):
    return input.new_empty((*input.shape[:-1], packed.shape[0]))
