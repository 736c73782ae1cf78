"""SparseDeltaLinear: a frozen linear layer plus a trainable sparse delta, W = W0 + Δ.

Δ has k entries at fixed flat positions of the logical (out, in) weight; their values are an fp32
``nn.Parameter`` (fp64 for a float64 base), so any optimizer, gradient accumulation and clipping just work.
Two ways to run it, the same function either way:

* merged (default): the base weight holds W0 + Δ (rounded once to its dtype), refreshed from the fp32 values
  after each optimizer step. Forward is the base layer's one GEMM; backward is the input-gradient GEMM plus
  ``sparse_delta_grad`` at the k positions. No weight copy per forward, no dense dW: a training step costs
  about what a frozen layer's does.
* unmerged: the base weight stays W0 exactly; forward adds ``sparse_delta_linear(x, Δ)``.

W0's own values at the k positions are kept (``base_values``), so unmerging restores W0 bit for bit.
"""

from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import distributed, ops
from ..ops import check_delta_indices
from .base import DeltaLinear, delta_dtype_for, grad_matmul, index_dtype_for


class GradientProbe:
    """Finds, during backward passes, the largest entries of a layer's dense weight gradient without forming it.

    The first batch it sees picks `num_candidates` positions by |GᵀX| with the chunked top-k (skipping
    `exclude`); every batch it sees, that one included, adds the exact gradient at those candidates. `best(n)`
    then returns the n candidates with the largest accumulated |gradient|: SpIEL's accumulated-gradient
    criterion, at O(chunk·in + candidates) memory.

    Under torch.distributed the candidates are the union of every rank's (one all-gather, at the first batch)
    and the accumulated gradients are summed over the ranks before choosing: every rank chooses the same
    positions, by the gradient of the whole batch.
    """

    def __init__(self, num_candidates: int, exclude: Optional[Tensor] = None):
        self.num_candidates = int(num_candidates)
        self.exclude = exclude
        self.candidates: Optional[Tensor] = None
        self.accumulated: Optional[Tensor] = None
        self.batches = 0
        self._reduced = False

    @torch.no_grad()
    def observe(self, grad_output: Tensor, input: Tensor) -> None:
        if input.dtype != grad_output.dtype:
            input = input.to(grad_output.dtype)
        if self.candidates is None:
            numel = grad_output.shape[-1] * input.shape[-1]
            excluded = 0 if self.exclude is None else self.exclude.numel()
            n = min(self.num_candidates, numel - excluded)
            chosen, _ = ops.sparse_delta_topk(grad_output, input, n, exclude=self.exclude)
            self.candidates = distributed.union_over_ranks(chosen).to(index_dtype_for(numel))
            n = self.candidates.numel()
            self.accumulated = torch.zeros(n, dtype=torch.float32, device=input.device)
        # the candidates are the op's own sorted, in-range output (their union over ranks keeps both)
        self.accumulated += ops.sparse_delta_grad(grad_output, input, self.candidates, checked=True).float()
        self.batches += 1

    def best(self, n: int) -> Tensor:
        """The (at most) n candidates with the largest accumulated |gradient|, sorted."""
        if self.candidates is None:
            raise RuntimeError("the gradient probe saw no backward pass: run forward and backward first")
        if not self._reduced:  # once: the sum over the ranks' batches
            distributed.all_reduce_sum_(self.accumulated)
            self._reduced = True
        n = min(n, self.candidates.numel())
        top = torch.topk(self.accumulated.abs(), n, sorted=False).indices
        return torch.sort(self.candidates[top]).values


class _SparseDeltaLinearFunction(torch.autograd.Function):
    """y = x · (W0 + Δ)ᵀ + b. In merged mode `weight` already holds W0 + Δ; otherwise it holds W0 and the
    sparse product is added. Backward: dx by one GEMM (+ the sparse transpose product when unmerged),
    dvalues by sparse_delta_grad. Saves x only when values need a gradient (or a probe watches). The layer's
    indices were proven when it set them (SparseDeltaLinear.check_index), so the hot path passes checked=True."""

    @staticmethod
    def forward(ctx, x, values, weight, bias, indices, merged, probe):
        y = F.linear(x, weight, bias)
        if not merged:
            y = y + ops.sparse_delta_linear(x, indices, values, weight.shape[0], checked=True).to(y.dtype)
        keep_x = values.requires_grad or probe is not None
        ctx.save_for_backward(x if keep_x else None, values, weight, indices)
        ctx.merged, ctx.probe, ctx.x_dtype = merged, probe, x.dtype
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        x, values, weight, indices = ctx.saved_tensors
        g = grad_output
        dx = dvalues = None
        if ctx.needs_input_grad[0]:
            dx = grad_matmul(g, weight)
            if not ctx.merged:
                dx = dx + ops.sparse_delta_linear_transpose(g, indices, values, weight.shape[1], checked=True).to(dx.dtype)
            dx = dx.to(ctx.x_dtype)
        if ctx.needs_input_grad[1] or ctx.probe is not None:
            xg = x if x.dtype == g.dtype else x.to(g.dtype)
            if ctx.needs_input_grad[1]:
                dvalues = ops.sparse_delta_grad(g, xg, indices, checked=True).to(values.dtype)
            if ctx.probe is not None:
                ctx.probe.observe(g, xg)
        return dx, dvalues, None, None, None, None, None


class SparseDeltaLinear(DeltaLinear):
    """Drop-in for an ``nn.Linear`` or GPT-2 ``Conv1D`` with a trainable sparse delta (see the module docstring).

    Args:
        base_layer: the layer to wrap; kept as ``base_layer`` and frozen.
        indices: sorted, distinct flat positions in the logical (out, in) weight.
        values: initial delta values (default zeros, so the output equals the base layer's).
        merged: run merged (one GEMM a forward, the default) or unmerged (exact W0 + sparse product).
    """

    method = "sparse_delta"
    adapter_tensors = ("indices", "values")
    index_name, base_name = "indices", "base_values"

    def __init__(self, base_layer: nn.Module, indices: Tensor, values: Optional[Tensor] = None, *, merged: bool = True):
        super().__init__(base_layer, merged=merged)
        weight = self._weight()
        self.values = nn.Parameter(torch.zeros(0, dtype=delta_dtype_for(weight), device=weight.device))
        self.register_buffer("indices", torch.zeros(0, dtype=index_dtype_for(weight.numel()), device=weight.device))
        self.register_buffer("base_values", torch.zeros(0, dtype=weight.dtype, device=weight.device))
        self.probe: Optional[GradientProbe] = None
        self.set_delta(indices, values)
        self._adopt_parameters()

    @property
    def delta(self) -> nn.Parameter:
        return self.values

    @property
    def num_deltas(self) -> int:
        return self.indices.numel()

    @torch.no_grad()
    def set_delta(self, indices: Tensor, values: Optional[Tensor] = None) -> None:
        """Moves the delta to new positions (with new values, zeros by default), W0 untouched.

        When the count is unchanged the values Parameter is updated in place, so an optimizer holding it can
        go on; its per-entry state (Adam's moments) belongs to the old positions and is the caller's to remap,
        as SparseDeltaScheduler does. The gradient of the old positions is dropped.
        """
        self.refuse_moving_when_sharded()
        weight = self._weight()
        self.check_index(indices)
        indices = indices.to(device=weight.device, dtype=index_dtype_for(weight.numel()))
        if values is None:
            values = torch.zeros(indices.numel(), dtype=self.values.dtype, device=weight.device)
        if values.shape != indices.shape:
            raise ValueError(f"values must have one entry per index ({indices.numel()}), got shape {tuple(values.shape)}")
        self.restore_base()
        self.indices = indices
        self._gather_base()
        values = values.to(device=weight.device, dtype=self.values.dtype)
        if values.shape == self.values.shape:
            self.values.copy_(values)
        else:
            self.values.data = values.clone()
        self.values.grad = None

    def check_index(self, indices: Tensor) -> None:
        """Raises unless `indices` are valid positions of this weight (strictly increasing, in range): run when
        the layer sets its indices and when a state dict brings new ones, so the hot paths below need not."""
        check_delta_indices(indices, self.out_features * self.in_features, strict=True)

    def delta_grad(self, grad_output: Tensor, input: Tensor) -> Tensor:
        """The gradient of the delta (values-shaped, fp32) for this grad_output and input, as backward forms it."""
        return ops.sparse_delta_grad(grad_output, input.to(grad_output.dtype), self.indices, checked=True).float()

    # The merged refresh and the gathers run on self.indices, proven when set (check_index): checked=True.
    def _write_merged(self) -> None:
        ops.sparse_delta_scatter_(self._weight(), self.indices, self.values, 1.0, self.base_values, checked=True)

    def _write_base(self) -> None:
        ops.sparse_delta_scatter_(self._weight(), self.indices, self.values, 0.0, self.base_values, checked=True)

    def _values_at(self, weight: Tensor, indices: Tensor) -> Tensor:
        return ops.sparse_delta_gather(weight, indices, checked=True)

    def _gather_base(self) -> None:
        self.base_values = self._values_at(self._weight(), self.indices)

    @torch.no_grad()
    def add_to_base(self, indices: Tensor, values: Tensor, alpha: float = 1.0) -> None:
        """Adds another (frozen) sparse delta into W0 itself, e.g. to compose adapters; the trainable delta
        stays on top of the new base."""
        self.restore_base()
        weight = self._weight()
        ops.sparse_delta_scatter_(weight, indices.to(weight.device), values.to(weight.device), alpha, None)
        self.base_values = self._values_at(weight, self.indices)

    def _subtract_merged_difference(self, y: Tensor, x: Tensor) -> Tensor:
        weight = self._weight()
        acc = torch.float64 if weight.dtype == torch.float64 else torch.float32  # fp32 would round a float64 model
        difference = self._values_at(weight, self.indices).to(acc) - self.base_values.to(acc)
        return y - ops.sparse_delta_linear(x, self.indices, difference, self.out_features, checked=True).to(y.dtype)

    def _delta_forward(self, x: Tensor) -> Tensor:
        return _SparseDeltaLinearFunction.apply(
            x, self.values, self._weight(), self.base_layer.bias, self.indices, self.merged, self.probe
        )

    # ---- adapter files ------------------------------------------------------------------------------------

    def adapter_record(self) -> Tuple[dict, Dict[str, Tensor]]:
        return {"num_deltas": self.num_deltas}, {"indices": self.indices, "values": self.values}

    @classmethod
    def check_adapter_record(cls, shape: Tuple[int, int], meta: dict, tensors: Dict[str, Tensor]) -> None:
        indices, values = tensors["indices"], tensors["values"]
        if values.dtype != torch.float32 or values.dim() != 1:
            raise ValueError(f"values must be 1-D float32, got {values.dtype} of shape {tuple(values.shape)}")
        try:
            check_delta_indices(indices, shape[0] * shape[1], strict=True)
        except (TypeError, IndexError) as exc:
            raise ValueError(str(exc)) from exc
        if not indices.numel() == values.numel() == meta.get("num_deltas"):
            raise ValueError(f"{indices.numel()} indices and {values.numel()} values; the config says {meta.get('num_deltas')}")

    @classmethod
    def from_adapter_record(cls, base_layer: nn.Module, meta: dict, tensors: Dict[str, Tensor], *, merged: bool) -> "SparseDeltaLinear":
        return cls(base_layer, tensors["indices"], tensors["values"], merged=merged)

    def extra_repr(self) -> str:
        density = self.num_deltas / max(self.out_features * self.in_features, 1)
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, num_deltas={self.num_deltas} "
            f"({density:.3%}), merged={self.merged}"
        )
