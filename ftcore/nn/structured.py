"""StructuredSparseLinear: a frozen linear layer plus one trainable dense block, S²FT's "select sparsely,
compute densely", without permuting the weight.

* columns mode (the S²FT default, for o_proj / down_proj / GPT-2 c_proj): Δ = W[:, S], out × k. Backward keeps
  only the compact slice x[..., S] (k of the in features) and forms dΔ = Gᵀ·x_S in fp32.
* rows mode (v_proj / up_proj / gate_proj): Δ = W[R, :], k × in; dΔ = G[..., R]ᵀ·x needs the whole input.

The block is an fp32 ``nn.Parameter``; merged (default) the base weight holds W0 + Δ and a forward is the
layer's one GEMM; unmerged the block's product is added. Frozen layers around it compute only input gradients
and autograd stops below the lowest trainable layer: that is partial backpropagation.
"""

from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops import check_delta_indices
from .. import ops
from .base import DeltaLinear, delta_dtype_for, grad_matmul, index_dtype_for


class _StructuredSparseLinearFunction(torch.autograd.Function):
    """y = x · (W0 + Δ)ᵀ + b with Δ a block at columns (or rows) `index` of W. Merged: `weight` already holds
    W0 + Δ. Saves the compact x[..., S] for a column block, x for a row block, and nothing of x when the block
    is frozen (then only the input gradient is computed). The layer's index was proven when it was set
    (StructuredSparseLinear.check_index), so the hot path passes checked=True."""

    @staticmethod
    def forward(ctx, x, block, weight, bias, index, rows, merged, train_block):
        y = F.linear(x, weight, bias)
        if rows:
            if not merged:
                y = y.index_add(-1, index, F.linear(x, block.to(x.dtype)).to(y.dtype))
            kept = x if train_block else None
        else:
            x_s = ops.gather_columns(x, index, checked=True) if (train_block or not merged) else None
            if not merged:
                y = y + F.linear(x_s, block.to(x_s.dtype)).to(y.dtype)
            kept = x_s if train_block else None
        ctx.save_for_backward(kept, block, weight, index)
        ctx.rows, ctx.merged, ctx.x_dtype, ctx.in_features = rows, merged, x.dtype, x.shape[-1]
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        kept, block, weight, index = ctx.saved_tensors
        dx = d_block = None
        if ctx.needs_input_grad[0]:
            dx = grad_matmul(g, weight)
            if not ctx.merged:
                blk = block.to(g.dtype)
                if ctx.rows:
                    dx = dx + ops.gather_columns(g, index, checked=True).matmul(blk).to(dx.dtype)
                else:
                    dx = dx + ops.scatter_columns(g.matmul(blk), index, ctx.in_features, checked=True).to(dx.dtype)
            dx = dx.to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            x = kept if kept.dtype == g.dtype else kept.to(g.dtype)
            rows = index if ctx.rows else None
            d_block = ops.structured_block_grad(g, x, rows, None, checked=True).to(block.dtype)
        return dx, d_block, None, None, None, None, None, None


class StructuredSparseLinear(DeltaLinear):
    """Drop-in for an ``nn.Linear`` or GPT-2 ``Conv1D`` with one trainable dense block (see the module docstring).

    Args:
        base_layer: the layer to wrap; kept as ``base_layer`` and frozen.
        index: sorted, distinct input columns (columns mode) or output rows (rows=True) of the logical weight.
        rows: rows mode instead of columns mode.
        block: initial block (default zeros, so the output equals the base layer's).
        merged: merged (one GEMM a forward, the default) or unmerged.
    """

    method = "structured_sparse"
    adapter_tensors = ("index", "block")
    index_name, base_name = "index", "base_block"

    def __init__(self, base_layer: nn.Module, index: Tensor, *, rows: bool = False, block: Optional[Tensor] = None, merged: bool = True):
        super().__init__(base_layer, merged=merged)
        weight = self._weight()
        self.rows = rows
        self.block = nn.Parameter(torch.zeros(0, 0, dtype=delta_dtype_for(weight), device=weight.device))
        self.register_buffer("index", torch.zeros(0, dtype=torch.int64, device=weight.device))
        self.register_buffer("base_block", torch.zeros(0, 0, dtype=weight.dtype, device=weight.device))
        self.set_block(index, block)
        self._adopt_parameters()

    @property
    def delta(self) -> nn.Parameter:
        return self.block

    @property
    def num_index(self) -> int:
        return self.index.numel()

    def block_shape(self, k: int) -> Tuple[int, int]:
        return (k, self.in_features) if self.rows else (self.out_features, k)

    @torch.no_grad()
    def set_block(self, index: Tensor, block: Optional[Tensor] = None) -> None:
        """Moves the block to new columns/rows (with a new block, zeros by default), W0 untouched: W0 goes back
        under the old block and the new block is written, nothing else. When the shape is unchanged the
        Parameter is updated in place, so an optimizer holding it can go on; its per-entry state belongs to the
        old block and is the caller's to reset. The gradient of the old block is dropped."""
        self.refuse_moving_when_sharded()
        weight = self._weight()
        self.check_index(index)
        limit = self.out_features if self.rows else self.in_features
        index = index.to(device=weight.device, dtype=index_dtype_for(limit))
        shape = self.block_shape(index.numel())
        if block is None:
            block = torch.zeros(shape, dtype=self.block.dtype, device=weight.device)
        if tuple(block.shape) != shape:
            raise ValueError(f"block must be {shape[0]}x{shape[1]} for this index, got shape {tuple(block.shape)}")
        self.restore_base()
        self.index = index
        self._gather_base()
        block = block.to(device=weight.device, dtype=self.block.dtype)
        if block.shape == self.block.shape:
            self.block.copy_(block)
        else:
            self.block.data = block.clone()
        self.block.grad = None

    def check_index(self, index: Tensor) -> None:
        """Raises unless `index` is a valid block index of this weight (strictly increasing rows or columns, in
        range): run when the layer sets its index and when a state dict brings a new one, so the hot paths below
        need not."""
        check_delta_indices(index, self.out_features if self.rows else self.in_features, name="index", strict=True)

    def delta_grad(self, grad_output: Tensor, input: Tensor) -> Tensor:
        """The gradient of the block (block-shaped, fp32) for this grad_output and input, as backward forms it."""
        rows, columns = (self.index, None) if self.rows else (None, self.index)
        return ops.structured_block_grad(grad_output, input.to(grad_output.dtype), rows, columns, checked=True).float()

    # The merged refresh and the gathers run on self.index, proven when set (check_index): checked=True.
    def _write_merged(self) -> None:
        ops.structured_block_scatter_(self._weight(), self.index, self.block, 1.0, self.base_block, rows=self.rows, checked=True)

    def _write_base(self) -> None:
        ops.structured_block_scatter_(self._weight(), self.index, self.block, 0.0, self.base_block, rows=self.rows, checked=True)

    def _values_at(self, weight: Tensor, index: Tensor) -> Tensor:
        return ops.structured_block_gather(weight, index, rows=self.rows, checked=True)

    def _gather_base(self) -> None:
        self.base_block = self._values_at(self._weight(), self.index)

    def _subtract_merged_difference(self, y: Tensor, x: Tensor) -> Tensor:
        weight = self._weight()
        acc = torch.float64 if weight.dtype == torch.float64 else torch.float32  # fp32 would round a float64 model
        difference = self._values_at(weight, self.index).to(acc) - self.base_block.to(acc)
        if self.rows:
            return y.index_add(-1, self.index, F.linear(x.to(acc), difference).to(y.dtype), alpha=-1)
        return y - F.linear(ops.gather_columns(x, self.index, checked=True).to(acc), difference).to(y.dtype)

    def _delta_forward(self, x: Tensor) -> Tensor:
        # Under no_grad (evaluation, generation) nothing is kept, so the compact slice is not even gathered.
        train_block = self.block.requires_grad and torch.is_grad_enabled()
        return _StructuredSparseLinearFunction.apply(
            x, self.block, self._weight(), self.base_layer.bias, self.index, self.rows, self.merged, train_block
        )

    # ---- adapter files ------------------------------------------------------------------------------------

    def adapter_record(self) -> Tuple[dict, Dict[str, Tensor]]:
        return {"mode": "rows" if self.rows else "columns", "num_index": self.num_index}, {"index": self.index, "block": self.block}

    @classmethod
    def check_adapter_record(cls, shape: Tuple[int, int], meta: dict, tensors: Dict[str, Tensor]) -> None:
        mode = meta.get("mode")
        if mode not in ("rows", "columns"):
            raise ValueError(f"mode must be 'rows' or 'columns', got {mode!r}")
        index, block = tensors["index"], tensors["block"]
        try:
            check_delta_indices(index, shape[0] if mode == "rows" else shape[1], name="index", strict=True)
        except (TypeError, IndexError) as exc:
            raise ValueError(str(exc)) from exc
        expected = (index.numel(), shape[1]) if mode == "rows" else (shape[0], index.numel())
        if block.dtype != torch.float32 or tuple(block.shape) != expected:
            raise ValueError(f"block must be float32 of shape {expected}, got {block.dtype} of shape {tuple(block.shape)}")
        if index.numel() != meta.get("num_index"):
            raise ValueError(f"{index.numel()} indices; the config says {meta.get('num_index')}")

    @classmethod
    def from_adapter_record(cls, base_layer: nn.Module, meta: dict, tensors: Dict[str, Tensor], *, merged: bool) -> "StructuredSparseLinear":
        return cls(base_layer, tensors["index"], rows=meta["mode"] == "rows", block=tensors["block"], merged=merged)

    def extra_repr(self) -> str:
        what = "rows" if self.rows else "columns"
        total = self.out_features if self.rows else self.in_features
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, {what}={self.num_index}/{total}, "
            f"merged={self.merged}"
        )
