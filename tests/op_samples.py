"""Small valid calls of every op in the op table, in the schema's argument order, for tests/test_op_table.py.

SAMPLES[name](dtype) returns a list of argument tuples, floating tensors in `dtype`. An op of the table without
an entry here fails the table test by name. Shapes are small (gradcheck runs on them in float64) but reach the
paths that matter: leading token dims, repeated sparse positions, int32 and int64 indices, both block modes,
a Hadamard size with K > 1, groups."""

import math
from typing import Callable, Dict, List

import torch

from ftcore import reference
from ftcore.hadamard import hadamard_factors, hadamard_k_on

SAMPLES: Dict[str, Callable[[torch.dtype], List[tuple]]] = {}


def sample(name):
    def register(fn):
        SAMPLES[name] = fn
        return fn

    return register


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _rand(*shape, dtype, seed):
    return torch.randn(*shape, generator=_gen(seed), dtype=torch.float64).to(dtype)


OUT, IN = 4, 5
# Sorted flat positions of a 4 × 5 weight, one repeated (repeats add up), and a distinct set.
REPEATED = torch.tensor([0, 3, 3, 7, 12, 19])
DISTINCT = torch.tensor([1, 6, 8, 13, 18], dtype=torch.int32)


@sample("sparse_delta_grad")
def _(dtype):
    g, x = _rand(2, 3, OUT, dtype=dtype, seed=1), _rand(2, 3, IN, dtype=dtype, seed=2)
    return [(g, x, REPEATED), (g, x, DISTINCT)]


@sample("sparse_delta_linear")
def _(dtype):
    x = _rand(2, 3, IN, dtype=dtype, seed=3)
    return [(x, REPEATED, _rand(6, dtype=dtype, seed=4), OUT), (x, DISTINCT, _rand(5, dtype=dtype, seed=5), OUT)]


@sample("sparse_delta_linear_transpose")
def _(dtype):
    g = _rand(2, 3, OUT, dtype=dtype, seed=6)
    return [(g, REPEATED, _rand(6, dtype=dtype, seed=7), IN), (g, DISTINCT, _rand(5, dtype=dtype, seed=8), IN)]


@sample("sparse_delta_scatter_")
def _(dtype):
    w = _rand(OUT, IN, dtype=dtype, seed=9)
    strided = _rand(IN, OUT, dtype=dtype, seed=10).t()  # the logical view of a GPT-2 Conv1D weight
    return [
        (w, REPEATED, _rand(6, dtype=dtype, seed=11), 0.5, None),
        (w, DISTINCT, _rand(5, dtype=dtype, seed=12), 1.0, _rand(5, dtype=dtype, seed=13)),
        (strided, DISTINCT, _rand(5, dtype=dtype, seed=14), 0.0, _rand(5, dtype=dtype, seed=15)),
    ]


@sample("sparse_delta_gather")
def _(dtype):
    w = _rand(OUT, IN, dtype=dtype, seed=16)
    return [(w, REPEATED), (_rand(IN, OUT, dtype=dtype, seed=17).t(), DISTINCT)]


@sample("sparse_delta_topk")
def _(dtype):
    g, x = _rand(2, 3, OUT, dtype=dtype, seed=18), _rand(2, 3, IN, dtype=dtype, seed=19)
    return [(g, x, 3, None, 0), (g, x, 4, DISTINCT, 1)]


COLUMNS = torch.tensor([0, 2, 5])
ROWS = torch.tensor([1, 3], dtype=torch.int32)


@sample("gather_columns")
def _(dtype):
    return [(_rand(2, 3, 6, dtype=dtype, seed=20), COLUMNS)]


@sample("scatter_columns")
def _(dtype):
    return [(_rand(2, 3, 3, dtype=dtype, seed=21), COLUMNS, 6)]


@sample("structured_block_grad")
def _(dtype):
    g, x = _rand(2, 3, OUT, dtype=dtype, seed=22), _rand(2, 3, 6, dtype=dtype, seed=23)
    return [(g, x, ROWS, COLUMNS), (g, x, None, COLUMNS), (g, x, None, None)]


@sample("structured_block_scatter_")
def _(dtype):
    w = _rand(OUT, 6, dtype=dtype, seed=24)
    return [
        (w, COLUMNS, _rand(OUT, 3, dtype=dtype, seed=25), 0.5, None, False),
        (w, ROWS, _rand(2, 6, dtype=dtype, seed=26), 1.0, _rand(2, 6, dtype=dtype, seed=27), True),
    ]


@sample("structured_block_gather")
def _(dtype):
    w = _rand(OUT, 6, dtype=dtype, seed=28)
    return [(w, COLUMNS, False), (w, ROWS, True)]


@sample("multi_adapter_linear")
def _(dtype):
    x, w, b = _rand(3, 2, 6, dtype=dtype, seed=29), _rand(OUT, 6, dtype=dtype, seed=30), _rand(OUT, dtype=dtype, seed=31)
    ids = torch.tensor([0, -1, 1])
    columns, column_blocks = torch.tensor([0, 2, 1, 4, 5]), _rand(OUT, 5, dtype=dtype, seed=32)
    rows, row_blocks = torch.tensor([1, 0, 3]), _rand(3, 6, dtype=dtype, seed=33)
    offsets = torch.tensor([0, 2, 5]), torch.tensor([0, 1, 3])
    return [(x, w, b, ids, columns, offsets[0], column_blocks, False), (x, w, None, ids, rows, offsets[1], row_blocks, True)]


def _signs(n, seed):
    return (torch.randint(0, 2, (n,), generator=_gen(seed)) * 2 - 1).float()


@sample("hadamard_transform")
def _(dtype):
    hk = hadamard_k_on(hadamard_factors(24)[0], torch.device("cpu"))  # K = 12
    return [
        (_rand(3, 8, dtype=dtype, seed=34), None, _signs(8, 35), 0.3, False),
        (_rand(2, 2, 24, dtype=dtype, seed=36), hk, None, 1 / math.sqrt(24), True),
    ]


@sample("fake_quantize")
def _(dtype):
    x = _rand(3, 8, dtype=dtype, seed=37)
    scale = (_rand(3, 1, dtype=torch.float32, seed=38).abs() + 0.1) / 4
    return [(x, None, 4, True, 0, 1.0), (x, None, 3, False, 4, 0.9), (x, scale, 4, True, 0, 1.0), (x, None, 8, True, -1, 1.0)]


@sample("fake_quantize_backward")
def _(dtype):
    x, grad = _rand(3, 8, dtype=dtype, seed=39), _rand(3, 8, dtype=dtype, seed=40)
    calls = []
    for bits, symmetric, group_size, clip, scale_grad in ((4, True, 0, 0.8, True), (3, False, 4, 1.0, False)):
        _, scale, zero = reference.fake_quantize(x, None, bits, symmetric, group_size, clip)
        calls.append((grad, x, scale, zero, bits, symmetric, group_size, scale_grad))
    return calls


@sample("rotate_fake_quantize")
def _(dtype):
    hk = hadamard_k_on(hadamard_factors(24)[0], torch.device("cpu"))
    return [
        (_rand(3, 8, dtype=dtype, seed=41), None, _signs(8, 42), 1 / math.sqrt(8), 4, True, 0, 1.0),
        (_rand(2, 24, dtype=dtype, seed=43), hk, None, 0.2, 3, False, 8, 0.9),
    ]


@sample("rotate_fake_quantize_backward")
def _(dtype):
    x, grad, signs = _rand(3, 8, dtype=dtype, seed=44), _rand(3, 8, dtype=dtype, seed=45), _signs(8, 46)
    mask = reference.rotate_fake_quantize(x, None, signs, 0.5, 3, True, 0, 0.7)[3]
    return [(grad, mask, None, signs, 0.5)]


def _int4(dtype, group_size, symmetric):
    return reference.quantize_int4(_rand(OUT, 16, dtype=torch.float32, seed=47), group_size, symmetric, 1.0)


@sample("quantize_int4")
def _(dtype):
    w = _rand(OUT, 16, dtype=dtype, seed=48)
    return [(w, 0, True, 1.0), (w, 8, False, 0.9)]


@sample("pack_int4")
def _(dtype):
    return [(torch.randint(0, 16, (3, 8), generator=_gen(49), dtype=torch.uint8),)]


@sample("unpack_int4")
def _(dtype):
    return [(torch.randint(0, 256, (3, 4), generator=_gen(50), dtype=torch.uint8),)]


@sample("dequantize_int4")
def _(dtype):
    return [(*_int4(dtype, 8, False), 8, dtype), (*_int4(dtype, 0, True), 0, torch.bfloat16)]


@sample("int4_linear")
def _(dtype):
    x = _rand(2, 3, 16, dtype=dtype, seed=51)
    return [(x, *_int4(dtype, 8, False), 8, _rand(OUT, dtype=dtype, seed=52)), (x, *_int4(dtype, 0, True), 0, None)]


@sample("linear_cross_entropy")
def _(dtype):
    # Tokens (2, 3) over a vocabulary of 7, one ignored label; chunks of 2 tokens reach the chunk loop's seams.
    # Only the weightings with an exact gradient are gradchecked here (dft and talr weights are not
    # differentiated by definition: tests/test_linear_cross_entropy.py checks them against the reference).
    h, w = _rand(2, 3, IN, dtype=dtype, seed=40), _rand(7, IN, dtype=dtype, seed=41)
    labels = torch.tensor([[3, -100, 0], [6, 2, 2]])
    given = _rand(2, 3, dtype=dtype, seed=42)
    return [
        (h, w, labels, None, -100, "none", 1.0, 0.0, True, True, 2),
        (h, w, labels.int(), given, -100, "given", 1.0, 4.0, True, True, 0),
    ]
