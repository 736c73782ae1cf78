"""The op table: every ftcore op declared once.

An entry names the op, gives its schema and what it computes, and points at each of its parts: the fake (meta)
shape function in ``_fake.py``, the autograd formula in ``_autograd.py``, the pure-PyTorch reference in
``reference.py`` and the C++/CUDA files whose ``TORCH_LIBRARY_IMPL`` blocks register its kernels. Everything else
is derived from here:

- ``register()`` (run once by ``_loader`` when ``import ftcore`` loads the extension) defines every schema in the
  ``ftcore`` namespace, registers the fakes and the autograd formulas, and asks the extension to bump the
  version counter of each argument a schema marks written (``Tensor(a!)``), so a weight saved for backward and
  rewritten before it makes backward raise;
- ``_loader.OPS`` and ``check_registrations`` list the names from here;
- each public wrapper in ``ops.py`` is bound to its entry with ``@wraps_op`` (its docstring gains the schema);
- ``tests/test_op_table.py`` walks the table: reference, ``opcheck``, fake tensors, float64 gradcheck, one test
  per op and part, so an op missing a part fails by name.

The mutated arguments are read from the schema's ``(a!)`` annotations, not declared twice.
"""

from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch

from . import _autograd, _fake, reference

# How an op's gradient is defined: "exact" ops are checked with float64 gradcheck; "straight-through" ops (the
# quantizers) pass an estimator computed by their *_backward op, whose own entry holds its reference; None: no
# autograd formula (the in-place scatters, serving ops, the *_backward ops themselves).
EXACT, STRAIGHT_THROUGH = "exact", "straight-through"


@dataclass(frozen=True)
class Op:
    name: str
    schema: str  # "(arguments) -> returns", as torch.library writes it
    doc: str  # what it computes, in one or two sentences
    reference: Callable  # ftcore.reference's pure-PyTorch oracle, same arguments
    fake: Callable  # shapes and dtypes of the outputs (torch.compile, FakeTensor)
    kernels: Dict[str, str]  # dispatch key ("CPU", "CUDA") -> the source file that registers the kernel
    gradient: Optional[str] = None  # EXACT, STRAIGHT_THROUGH or None
    autograd: Optional[Tuple[Callable, Callable]] = None  # (backward, setup_context)
    grads: Tuple[str, ...] = ()  # the arguments the formula gives a gradient (the others get None)

    @property
    def qualname(self) -> str:
        return f"ftcore::{self.name}"

    @property
    def parsed(self) -> torch._C.FunctionSchema:
        return torch._C.parse_schema(self.qualname + self.schema)

    @property
    def mutates(self) -> Tuple[str, ...]:
        """The arguments the op writes in place (``Tensor(a!)`` in the schema)."""
        return tuple(a.name for a in self.parsed.arguments if a.alias_info is not None and a.alias_info.is_write)


def _kernels(cpu: str, cuda: Optional[str] = None) -> Dict[str, str]:
    return {"CPU": f"csrc/{cpu}", "CUDA": f"csrc/{cuda or cpu}"}


_SD = _kernels("cpu/sparse_delta.cpp", "cuda/sparse_delta.cu")
_ST = _kernels("cpu/structured.cpp", "cuda/structured.cu")
_Q = _kernels("cpu/quant.cpp", "cuda/quant.cu")
A = _autograd

TABLE: Tuple[Op, ...] = (
    # ---- sparse deltas: Δ of a logical out×in weight as sorted flat row-major `indices` and `values` ----------
    Op("sparse_delta_grad", "(Tensor grad_output, Tensor input, Tensor indices) -> Tensor",
       "dvalues[t] = Σ_n grad_output[n, row t] · input[n, col t], accumulated in fp32 (fp64 for float64): the "
       "weight gradient at the k delta positions only.",
       reference.sparse_delta_grad, _fake.sparse_delta_grad, _SD, EXACT, (A.grad_backward, A.grad_setup), ("grad_output", "input")),
    Op("sparse_delta_linear", "(Tensor input, Tensor indices, Tensor values, SymInt out_features) -> Tensor",
       "input · Δᵀ for Δ of shape out_features × input.size(-1): the unmerged forward.",
       reference.sparse_delta_linear, _fake.sparse_delta_linear, _SD, EXACT, (A.linear_backward, A.linear_setup), ("input", "values")),
    Op("sparse_delta_linear_transpose",
       "(Tensor grad_output, Tensor indices, Tensor values, SymInt in_features) -> Tensor",
       "grad_output · Δ for Δ of shape grad_output.size(-1) × in_features: the unmerged input gradient.",
       reference.sparse_delta_linear_transpose, _fake.sparse_delta_linear_transpose, _SD, EXACT,
       (A.transpose_backward, A.transpose_setup), ("grad_output", "values")),
    Op("sparse_delta_scatter_",
       "(Tensor(a!) weight, Tensor indices, Tensor values, float alpha, Tensor? base) -> ()",
       "weight.flat[i] = (base[t] if base else weight.flat[i]) + alpha · Σ values[t] over the t with indices[t] = i, "
       "on the 2-D logical out×in view (any strides). alpha = 0 leaves the start value exactly (values unread): with "
       "base, the bit-exact unmerge. Serves merge, unmerge and compose.",
       reference.sparse_delta_scatter_, _fake.returns_nothing, _SD),
    Op("sparse_delta_gather", "(Tensor weight, Tensor indices) -> Tensor",
       "weight.flat[indices] of the 2-D logical out×in view.",
       reference.sparse_delta_gather, _fake.sparse_delta_gather, _SD, EXACT, (A.gather_backward, A.gather_setup), ("weight",)),
    Op("sparse_delta_topk",
       "(Tensor grad_output, Tensor input, int k, Tensor? exclude=None, int chunk_rows=0) -> (Tensor, Tensor)",
       "The k positions (sorted, int64) with the largest |grad_outputᵀ · input|, and those magnitudes (fp32), "
       "skipping `exclude`; rows of the dense gradient are formed chunk_rows at a time (0 picks a size).",
       reference.sparse_delta_topk, _fake.sparse_delta_topk, _kernels("composite/sparse_delta_topk.cpp")),
    # ---- structured blocks: a dense submatrix addressed by a sorted, distinct index of columns or rows -------
    Op("gather_columns", "(Tensor input, Tensor columns) -> Tensor",
       "input[..., columns]: the compact slice a column block keeps for backward.",
       reference.gather_columns, _fake.gather_columns, _ST, EXACT,
       (A.gather_columns_backward, A.gather_columns_setup), ("input",)),
    Op("scatter_columns", "(Tensor values, Tensor columns, SymInt features) -> Tensor",
       "(..., features) zeros with values[..., j] at columns[j]: the adjoint of gather_columns.",
       reference.scatter_columns, _fake.scatter_columns, _ST, EXACT,
       (A.scatter_columns_backward, A.scatter_columns_setup), ("values",)),
    Op("structured_block_grad", "(Tensor grad_output, Tensor input, Tensor? rows=None, Tensor? columns=None) -> Tensor",
       "grad_output[..., rows]ᵀ · input[..., columns] over the tokens (either index optional), in fp32 (fp64 for "
       "float64): a block's weight gradient.",
       reference.structured_block_grad, _fake.structured_block_grad, _kernels("composite/structured.cpp"), EXACT,
       (A.block_grad_backward, A.block_grad_setup), ("grad_output", "input")),
    Op("structured_block_scatter_",
       "(Tensor(a!) weight, Tensor index, Tensor block, float alpha, Tensor? base, bool rows) -> ()",
       "weight[block] = (base if given else weight[block]) + alpha · block, in fp32, rounded once; alpha = 0 leaves "
       "the start value exactly (block unread): merge, bit-exact unmerge, adapter switch.",
       reference.structured_block_scatter_, _fake.returns_nothing, _ST),
    Op("structured_block_gather", "(Tensor weight, Tensor index, bool rows) -> Tensor",
       "weight[:, index] (columns) or weight[index, :] (rows), in weight's dtype.",
       reference.structured_block_gather, _fake.structured_block_gather, _ST, EXACT,
       (A.block_gather_backward, A.block_gather_setup), ("weight",)),
    Op("multi_adapter_linear",
       "(Tensor input, Tensor weight, Tensor? bias, Tensor adapter_ids, Tensor index, Tensor offsets, "
       "Tensor blocks, bool rows) -> Tensor",
       "Serving without merging: input · weightᵀ + bias, plus for each batch row b with adapter_ids[b] = a >= 0 the "
       "block product of adapter a; adapters' indices and blocks are concatenated, split by offsets (A + 1).",
       reference.multi_adapter_linear, _fake.multi_adapter_linear, _kernels("composite/structured.cpp")),
    # ---- rotations and quantizers (contract, formulas and the int4 layout in include/ftcore/quant.h) --------
    Op("hadamard_transform",
       "(Tensor input, Tensor? hadamard_k, Tensor? signs, float scale, bool transpose) -> Tensor",
       "y = scale · H · diag(signs) · x along the last dim (transpose: scale · diag(signs) · Hᵀ · x), H = H_K ⊗ H_P.",
       reference.hadamard_transform, _fake.hadamard_transform, _Q, EXACT, (A.hadamard_backward, A.hadamard_setup), ("input",)),
    Op("fake_quantize",
       "(Tensor input, Tensor? scale, int bits, bool symmetric, int group_size, float clip_ratio) -> "
       "(Tensor, Tensor, Tensor)",
       "(x̂, scale, zero_point): fake quantization by groups of the last dim (group_size -1 whole tensor, 0 per row); "
       "a given scale (learnable, symmetric) is used as is.",
       reference.fake_quantize, _fake.fake_quantize, _Q, STRAIGHT_THROUGH,
       (A.fake_quantize_backward, A.fake_quantize_setup), ("input", "scale")),
    Op("fake_quantize_backward",
       "(Tensor grad, Tensor input, Tensor scale, Tensor zero_point, int bits, bool symmetric, int group_size, "
       "bool scale_grad) -> (Tensor, Tensor)",
       "(d input, d scale): the straight-through gradient, and the LSQ scale gradient when scale_grad (else empty).",
       reference.fake_quantize_backward, _fake.fake_quantize_backward, _Q),
    Op("rotate_fake_quantize",
       "(Tensor input, Tensor? hadamard_k, Tensor? signs, float scale, int bits, bool symmetric, int group_size, "
       "float clip_ratio) -> (Tensor, Tensor, Tensor, Tensor)",
       "(x̂, scale, zero_point, mask): fake_quantize(hadamard_transform(x)) per token or group in one pass, the "
       "rotated tensor never stored; mask holds the straight-through bits (uint8 (rows, ceil(n/8)), bit b of byte j "
       "for element 8j + b, 1 inside the range): all that backward needs of the forward.",
       reference.rotate_fake_quantize, _fake.rotate_fake_quantize, _Q, STRAIGHT_THROUGH,
       (A.rotate_fake_quantize_backward, A.rotate_fake_quantize_setup), ("input",)),
    Op("rotate_fake_quantize_backward",
       "(Tensor grad, Tensor mask, Tensor? hadamard_k, Tensor? signs, float scale) -> Tensor",
       "The input gradient of rotate_fake_quantize: the transposed rotation of the masked gradient, one pass.",
       reference.rotate_fake_quantize_backward, _fake.rotate_fake_quantize_backward, _Q),
    Op("quantize_int4", "(Tensor weight, int group_size, bool symmetric, float clip_ratio) -> (Tensor, Tensor, Tensor)",
       "(packed, scale, zero_point) of a 2-D weight at 4 bits, rounding exactly as fake_quantize does.",
       reference.quantize_int4, _fake.quantize_int4, _Q),
    Op("pack_int4", "(Tensor codes) -> Tensor",
       "uint8 codes in [0, 15] (..., 2c) -> packed uint8 (..., c): code 2j in the low nibble of byte j.",
       reference.pack_int4, _fake.pack_int4, _Q),
    Op("unpack_int4", "(Tensor packed) -> Tensor", "The inverse of pack_int4, bit for bit.",
       reference.unpack_int4, _fake.unpack_int4, _Q),
    Op("dequantize_int4",
       "(Tensor packed, Tensor scale, Tensor zero_point, int group_size, ScalarType dtype) -> Tensor",
       "The (out, in) weight an int4 triple stands for, (code − zero_point) · scale, in dtype.",
       reference.dequantize_int4, _fake.dequantize_int4, _Q),
    Op("int4_linear",
       "(Tensor input, Tensor packed, Tensor scale, Tensor zero_point, int group_size, Tensor? bias) -> Tensor",
       "input · dequant(W)ᵀ + bias, the weight dequantized a block at a time (never whole).",
       reference.int4_linear, _fake.int4_linear, _kernels("composite/int4_linear.cpp")),
    # ---- losses (contract and formulas in include/ftcore/linear_cross_entropy.h) -----------------------------
    Op("linear_cross_entropy",
       "(Tensor hidden, Tensor weight, Tensor labels, Tensor? token_weights, int ignore_index, str weighting, "
       "float tau, float divisor, bool grad_hidden, bool grad_weight, int chunk_tokens) -> "
       "(Tensor, Tensor, Tensor, Tensor)",
       "(loss, nll, d_hidden, d_weight): Σ w_t · nll_t / divisor for logits = hidden · weightᵀ formed a chunk of "
       "tokens at a time, never whole; w_t by weighting (none, given, dft, talr; never differentiated); the "
       "gradients asked for are computed in the forward (3 GEMMs a chunk, 2 with a frozen weight).",
       reference.linear_cross_entropy, _fake.linear_cross_entropy, _kernels("composite/linear_cross_entropy.cpp"),
       EXACT, (A.linear_cross_entropy_backward, A.linear_cross_entropy_setup), ("hidden", "weight")),
)

BY_NAME: Dict[str, Op] = {op.name: op for op in TABLE}

_library = None  # the torch.library.Library holding the schemas; kept alive for the process


def register(extension) -> None:
    """Defines every op of the table and registers its fake, its autograd formula and, for ops that write an
    argument, the version-counter bump (a C++ kernel of the extension). Runs once, from _loader."""
    global _library
    if _library is not None:
        return
    _library = torch.library.Library("ftcore", "DEF")
    for op in TABLE:
        _library.define(op.name + op.schema)
        torch.library.register_fake(op.qualname, op.fake, lib=_library)
        if op.autograd is not None:
            backward, setup = op.autograd
            torch.library.register_autograd(op.qualname, backward, setup_context=setup, lib=_library)
        if op.mutates:
            extension.bump_version_after_write(op.name)


def wraps_op(name: str):
    """Binds a public wrapper of ops.py to its table entry: the docstring gains the op's schema."""
    op = BY_NAME[name]

    def bind(wrapper):
        wrapper.__doc__ = f"{wrapper.__doc__ or ''}\n\n    Op: ``{op.qualname}{op.schema}``\n"
        wrapper.op = op
        return wrapper

    return bind
