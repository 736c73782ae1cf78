"""What every ftcore drop-in linear layer shares: a frozen base layer (nn.Linear or GPT-2 Conv1D) plus a
trainable delta, an ordinary fp32 ``nn.Parameter``, that either lives merged in the base weight (W0 + Δ, one
GEMM a forward, the default) or beside it (unmerged: W0 exactly, the delta's product added).

The base weight's own values under the delta are kept, so unmerging restores W0 bit for bit. While merged,
the weight is refreshed from the delta before a forward whenever the delta may have changed: its version
counter moved (any in-place op), or an optimizer stepped it (caught by a global optimizer hook, so optimizers
that write raw memory, bitsandbytes' for one, are seen too). The refresh writes only the delta's positions.
Writing ``delta.data`` by hand outside an optimizer is invisible to both: call ``refresh()`` after it.

Keep the delta in fp32: ``model.to(torch.bfloat16)`` after ``apply`` would cast the master copy too.
"""

import weakref
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim.optimizer import register_optimizer_step_post_hook

def is_conv1d(module: nn.Module) -> bool:
    """transformers' Conv1D (GPT-2) or a subclass, which keep the weight as (in, out). Recognised by name, so
    that ftcore's ops and modules never import transformers (about a second and 20 MB)."""
    return any(c.__name__ == "Conv1D" and c.__module__.startswith("transformers.") for c in type(module).__mro__)


def is_linear_like(module: nn.Module) -> bool:
    """nn.Linear or transformers' Conv1D: the layers ftcore's modules can wrap."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def logical_weight(layer: nn.Module) -> Tensor:
    """The (out, in) view of a linear-like layer's weight (a transposed view for Conv1D, no copy)."""
    return layer.weight.t() if is_conv1d(layer) else layer.weight


def index_dtype_for(numel: int) -> torch.dtype:
    return torch.int32 if numel < 2**31 else torch.int64


def delta_dtype_for(weight: Tensor) -> torch.dtype:
    """Trainable deltas are an fp32 master (fp64 for a float64 base, e.g. in gradcheck)."""
    return torch.float64 if weight.dtype == torch.float64 else torch.float32


# Live layers by the id of their trainable Parameter, for the optimizer hook below.
_LAYERS_BY_DELTA: "weakref.WeakValueDictionary[int, DeltaLinear]" = weakref.WeakValueDictionary()


def _mark_stepped(optimizer, args, kwargs) -> None:
    """After any optimizer step: the layers whose deltas it holds refresh their merged weight before the next
    forward, even if the optimizer wrote the delta without moving its version counter."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            layer = _LAYERS_BY_DELTA.get(id(p))
            if layer is not None and layer.delta is p:
                layer.refresh()


register_optimizer_step_post_hook(_mark_stepped)


class DeltaLinear(nn.Module):
    """Base of SparseDeltaLinear and StructuredSparseLinear. Subclasses set ``method`` (the adapter-file name),
    ``adapter_tensors`` (the tensors they save), and implement the delta-specific hooks marked below."""

    method: str = ""
    adapter_tensors: Tuple[str, ...] = ()

    def __init__(self, base_layer: nn.Module, *, merged: bool = True):
        super().__init__()
        if not is_linear_like(base_layer):
            raise TypeError(f"{type(self).__name__} wraps nn.Linear or transformers Conv1D, got {type(base_layer).__name__}")
        self.base_layer = base_layer
        for p in base_layer.parameters():
            p.requires_grad_(False)
        self.out_features, self.in_features = logical_weight(base_layer).shape
        self.merged = merged
        self.disabled = False
        # The version of the delta that the base weight currently holds; None: it holds W0 exactly.
        self._merged_version: Optional[int] = None
        self._stale = False  # the delta may have changed behind its version counter
        # A state dict may replace the weight, the delta and the base values together: W0 goes back under the
        # old delta before, and under the new one after (the next forward merges again).
        self.register_load_state_dict_pre_hook(lambda module, *args: module.restore_base())
        self.register_load_state_dict_post_hook(lambda module, incompatible: module._reset_to_base())

    def _register_delta(self) -> None:
        """Subclasses call this once their delta Parameter exists."""
        _LAYERS_BY_DELTA[id(self.delta)] = self

    # ---- to implement -------------------------------------------------------------------------------------

    @property
    def delta(self) -> nn.Parameter:
        """The trainable Parameter."""
        raise NotImplementedError

    def _write_merged(self) -> None:
        """Writes W0 + Δ (rounded to the weight dtype) at the delta's positions of the base weight."""
        raise NotImplementedError

    def _write_base(self) -> None:
        """Writes W0 back at the delta's positions, bit for bit."""
        raise NotImplementedError

    def _delta_forward(self, x: Tensor) -> Tensor:
        """The layer's output (merged or not, per self.merged) with autograd reaching the delta."""
        raise NotImplementedError

    def _subtract_merged_difference(self, y: Tensor, x: Tensor) -> Tensor:
        """y minus x times (weight − W0): the difference the merged weight carries at the delta's positions,
        taken from the weight itself (its rounded W0 + Δ) and the stored W0 values, so the result is the base
        layer's output up to one rounding, whatever the weight dtype."""
        raise NotImplementedError

    def adapter_record(self) -> Tuple[dict, Dict[str, Tensor]]:
        """What the adapter file keeps of this layer: JSON metadata and tensors named by adapter_tensors."""
        raise NotImplementedError

    @classmethod
    def check_adapter_record(cls, shape: Tuple[int, int], meta: dict, tensors: Dict[str, Tensor]) -> None:
        """Raises ValueError unless a saved record is well-formed for a weight of `shape`."""
        raise NotImplementedError

    @classmethod
    def from_adapter_record(cls, base_layer: nn.Module, meta: dict, tensors: Dict[str, Tensor], *, merged: bool) -> "DeltaLinear":
        raise NotImplementedError

    # ---- shared -------------------------------------------------------------------------------------------

    @property
    def weight(self) -> Tensor:
        """The base layer's weight (holding W0 + Δ while merged), for code that reads ``layer.weight``."""
        return self.base_layer.weight

    @property
    def bias(self) -> Optional[Tensor]:
        return self.base_layer.bias

    def _weight(self) -> Tensor:
        return logical_weight(self.base_layer)

    @torch.no_grad()
    def restore_base(self) -> None:
        """Makes the base weight hold W0 exactly (no-op when it already does)."""
        if self._merged_version is not None:
            self._write_base()
            self._merged_version = None

    @torch.no_grad()
    def _reset_to_base(self) -> None:
        self._write_base()
        self._merged_version = None

    def refresh(self) -> None:
        """Makes the next forward re-merge the delta (after writing ``delta.data`` by hand)."""
        self._stale = True

    @torch.no_grad()
    def sync_merged(self) -> None:
        """Makes the base weight hold W0 + Δ for the current delta (no-op when it already does)."""
        if self._stale or self._merged_version != self.delta._version:
            self._write_merged()
            self._merged_version = self.delta._version
            self._stale = False

    def set_merged(self, merged: bool) -> None:
        """Switch between merged (W0 + Δ in the base weight) and unmerged (W0 exactly, the delta added)."""
        if not merged:
            self.restore_base()
        self.merged = merged

    def unwrap(self, *, with_delta: bool) -> nn.Module:
        """The base layer, holding W0 + Δ (with_delta) or W0 bit for bit; the delta is dropped."""
        if with_delta:
            self.sync_merged()
        else:
            self.restore_base()
        return self.base_layer

    # Runs eagerly even inside torch.compile: whether the weight must be refreshed depends on the optimizer
    # steps taken since the last call, which a traced graph would freeze (and an in-place write to a weight
    # inside a graph is copied back whole).
    @torch.compiler.disable
    def _prepare_weight(self) -> None:
        if self.disabled:
            return  # a disabled forward never writes: a live graph may hold this weight (see _base_forward)
        if self.merged:
            self.sync_merged()
        else:
            self.restore_base()

    def _base_forward(self, x: Tensor) -> Tensor:
        """The base layer's output (W0, no delta), computed without writing the weight: a reference forward
        (KL, DPO, GRPO) between a training forward and its backward must leave the saved merged weight alone."""
        if self._merged_version is None:
            return self.base_layer(x)
        return self._subtract_merged_difference(F.linear(x, self._weight(), self.bias), x)

    def forward(self, x: Tensor) -> Tensor:
        self._prepare_weight()
        if self.disabled:
            return self._base_forward(x)
        return self._delta_forward(x)


def grad_matmul(grad_output: Tensor, weight: Tensor) -> Tensor:
    """grad_output · weight, in grad_output's dtype: under autocast the forward GEMM ran in that dtype."""
    return grad_output.matmul(weight if weight.dtype == grad_output.dtype else weight.to(grad_output.dtype))
