"""What every ftcore drop-in linear layer shares: a frozen base layer (nn.Linear or GPT-2 Conv1D) plus a
trainable delta, an ordinary fp32 ``nn.Parameter``, that either lives merged in the base weight (W0 + Δ, one
GEMM a forward, the default) or beside it (unmerged: W0 exactly, the delta's product added).

The contract, in one place (this class): the base weight holds either W0 exactly or W0 + Δ for one state of
the delta, and only these transitions write it:

* ``sync_merged`` (before a merged forward): W0 → merged(Δ), or merged(Δ_old) → merged(Δ), when the delta
  changed since the weight took it;
* ``restore_base`` (unmerge, unmerged mode, a new delta position, a state-dict load): merged → W0.

Every write goes through ftcore's in-place ops, which bump the weight's version counter: a weight that
backward saved and something rewrote makes backward raise, never compute a wrong gradient. A disabled
(reference) forward writes nothing (``_base_forward``).

A change of the delta is detected from the delta itself, in O(1) a forward, whatever stepped it:
* its version counter or storage moved (any in-place update, ``.data`` replaced), or
* a gradient reached it (a post-accumulate-grad hook) and some optimizer has stepped since: every
  ``torch.optim`` optimizer counts (bitsandbytes', and those that engines such as DeepSpeed run on flat
  copies and write back through ``.data``).
So the weight is written once per optimizer step: not between two forwards before one backward (DPO's chosen
and rejected, checkpointing's recomputation), not between the micro-batches of gradient accumulation, and a
no-grad forward between backward and step (logging, evaluation) leaves the step to be seen at the next one.
Writing ``delta.data`` by hand outside any optimizer and outside autograd is invisible: call ``refresh()``.

Under an engine that shards the weight (FSDP1, FSDP2, DeepSpeed ZeRO-3: see ftcore.engines) a write into it
would be lost at the engine's next gather, so such layers run unmerged: W0 is read in forward, where the engine
has gathered it, and nothing writes the weight (merged mode asked for warns once and falls back). ZeRO-1/2 keep
the weight whole and stay merged: their optimizer step is seen like any other.

Keep the delta in fp32: ``model.to(torch.bfloat16)`` after ``apply`` would cast the master copy too.
"""

import warnings
import weakref
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from .. import distributed, engines

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


_optimizer_steps = 0  # optimizer steps taken in this process, by any torch.optim optimizer


# What _sharded_by reports when the layer's Parameters were replaced by something not known to be FSDP2
# (DataParallel replicas, torch.func.functional_call, offloading hooks): merged mode cannot follow.
SWAPPED = "swapped"


def _sharded_merge_error(engine: str) -> RuntimeError:
    if engine == SWAPPED:
        return RuntimeError(
            "ftcore: this layer's Parameters were replaced since it was built (DataParallel replicas, "
            "torch.func.functional_call, an offloading hook, ...): merged mode writes into the weight it was built on "
            "and cannot follow. Use merged=False (the exact unmerged path)"
        )
    return RuntimeError(
        f"ftcore: merged mode cannot run on a weight that {engine} shards: the merge would be lost when the engine "
        "re-gathers the weight, and training would drift without an error. ftcore trains such layers on the exact "
        "unmerged path (merged=False); merging into the weight needs the model unwrapped (single process or DDP)"
    )


_warned_fallback = set()


def _warn_fallback_once(engine: str) -> None:
    if engine not in _warned_fallback:
        _warned_fallback.add(engine)
        warnings.warn(
            f"ftcore: {engine} shards the base weights, so merged mode (W0 + delta written into the weight) would "
            "be lost at the engine's re-gather; these layers run the exact unmerged path instead (W0 read through "
            "the engine, the delta's product added). Apply with merged=False to silence this warning",
            stacklevel=3,
        )


def _count_step(optimizer, args, kwargs) -> None:
    global _optimizer_steps
    _optimizer_steps += 1


register_optimizer_step_post_hook(_count_step)


class DeltaLinear(nn.Module):
    """Base of SparseDeltaLinear and StructuredSparseLinear. Subclasses set ``method`` (the adapter-file name),
    ``adapter_tensors`` (the tensors they save), and implement the delta-specific hooks marked below."""

    method: str = ""
    adapter_tensors: Tuple[str, ...] = ()
    index_name: str = ""  # the buffer of delta positions
    base_name: str = ""  # the buffer of W0's values at those positions
    # [True] while the adapted model's forward runs: its pre-hook has prepared every layer (see
    # prepare_model_layers), so a layer's own check can be skipped, which a compiled forward needs (no graph
    # break per layer). The list is shared by the model's layers; a layer outside a model has its own False.
    _model_prepared = (False,)

    def __init__(self, base_layer: nn.Module, *, merged: bool = True):
        super().__init__()
        if not is_linear_like(base_layer):
            raise TypeError(f"{type(self).__name__} wraps nn.Linear or transformers Conv1D, got {type(base_layer).__name__}")
        engine = engines.sharding_of(base_layer.weight)
        if engine in ("FSDP1", "FSDP2"):
            raise ValueError(
                f"{type(self).__name__}: {engine} already shards this layer's weight; adapt the model (ftcore.apply, "
                "ftcore.load_adapter) before the engine wraps it"
            )
        if engine is not None and base_layer.weight.numel() == 0:
            raise ValueError(
                f"{type(self).__name__}: DeepSpeed ZeRO-3 has partitioned this layer's weight; build the layer inside "
                "deepspeed.zero.GatheredParameters([weight]) (ftcore.apply and ftcore.load_adapter do)"
            )
        self.base_layer = base_layer
        for p in base_layer.parameters():
            p.requires_grad_(False)
        self.out_features, self.in_features = engines.logical_shape(base_layer)
        if merged and engine is not None:  # ZeRO-3 (here inside a gather): exact only unmerged
            _warn_fallback_once(engine)
            merged = False
        self.merged = merged
        self.disabled = False
        self._reset_state()
        self.register_load_state_dict_pre_hook(self._before_load)
        self.register_load_state_dict_post_hook(self._after_load)

    def _reset_state(self) -> None:
        # (version, storage) of the delta whose merge the base weight holds; None: it holds W0 exactly.
        self._merged_as: Optional[Tuple[int, int]] = None
        self._holds_merge = False  # _merged_as is not None (a bool: compiled code guards on it, not on versions)
        # The optimizer-step count when a gradient last reached the delta after its merge (None: none since).
        self._gradient_at: Optional[int] = None
        self._stale = False  # refresh() was called
        # Weak references to the (weight, delta) Parameters this layer was built on: an engine that replaces
        # them (FSDP2) must be able to free the originals.
        self._owned: tuple = ()
        self._hooked = False  # the delta carries our post-accumulate-grad hook
        self._fsdp2 = False  # the adapted model is an FSDP2 unit: a swap of Parameters is FSDP2's (see the pre-hook)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_owned"] = ()  # weak references do not pickle; a copy adopts its own Parameters
        return state

    def __setstate__(self, state) -> None:
        # A copy (deepcopy, pickle, torch.load) has new Parameters and no tensor hooks. Its weight still holds
        # what the original's held: a merge of an unknown version, which the next merged forward rewrites
        # (idempotent: W0's values are kept in the base buffer) and restore_base undoes.
        super().__setstate__(state)
        held = state.get("_merged_as") is not None
        self._reset_state()
        if held:
            self._set_merged_as((-1, -1))

    def _set_merged_as(self, token: Optional[Tuple[int, int]]) -> None:
        self._merged_as, self._holds_merge = token, token is not None

    def _on_gradient(self, param: Tensor) -> None:
        self._gradient_at = _optimizer_steps

    def _adopt_parameters(self) -> None:
        """Records the weight and delta Parameters this layer works on and hooks the delta's gradient. A later
        different Parameter in either place means an engine swapped them (see _sharded_by). Called at
        construction, on a copy, and after a load that may assign new ones."""
        weight, delta = self.base_layer._parameters["weight"], self.delta
        if self._owned and self._owned[1]() is not delta:
            self._hooked = False  # a new delta Parameter: it has no hook yet (the old one keeps its own)
        self._owned = (weakref.ref(weight), weakref.ref(delta))
        self._hook_gradient()

    def _hook_gradient(self) -> None:
        if not self._hooked and self.delta.requires_grad:
            self.delta.register_post_accumulate_grad_hook(self._on_gradient)
            self._hooked = True

    # ---- to implement -------------------------------------------------------------------------------------

    @property
    def delta(self) -> nn.Parameter:
        """The trainable Parameter."""
        raise NotImplementedError

    def delta_grad(self, grad_output: Tensor, input: Tensor) -> Tensor:
        """The gradient of the delta for one (grad_output, input) pair of this layer, delta-shaped, fp32."""
        raise NotImplementedError

    def check_index(self, index: Tensor) -> None:
        """Raises unless `index` holds valid delta positions of this weight. Runs where the positions are set (the
        constructor, set_delta/set_block, load_state_dict); the hot paths then skip the value checks."""
        raise NotImplementedError

    def _write_merged(self) -> None:
        """Writes W0 + Δ (rounded to the weight dtype) at the delta's positions of the base weight."""
        raise NotImplementedError

    def _write_base(self) -> None:
        """Writes W0 back at the delta's positions, bit for bit."""
        raise NotImplementedError

    def _values_at(self, weight: Tensor, index: Tensor) -> Tensor:
        """The entries of a logical (out, in) `weight` at the delta positions `index` (base-values shaped)."""
        raise NotImplementedError

    def _gather_base(self) -> None:
        """Takes the base values at the delta's positions from the weight, which holds W0."""
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

    @property
    def holds_merge(self) -> bool:
        """Whether the base weight holds W0 + Δ (else W0 exactly)."""
        return self._holds_merge

    def _sharded_by(self) -> Optional[str]:
        """The engine that shards this layer's weight or delta (or SWAPPED), or None when both are the whole
        Parameters it was built on (single process, DDP, ZeRO-1/2). Dictionary lookups only: it runs before
        every merged forward."""
        weight = self._modules["base_layer"]._parameters.get("weight")
        if weight is None:
            return "FSDP1"  # without use_orig_params FSDP1 removes the Parameters
        delta = self.delta
        engine = engines.sharding_of(weight) or engines.sharding_of(delta)
        owned = self._owned
        if engine is None and owned and (owned[0]() is not weight or owned[1]() is not delta):
            # inside a unit's forward FSDP2 swaps in unsharded Parameters, freed after it
            engine = "FSDP2" if self._fsdp2 else SWAPPED
        return engine

    def _engine_keeping_copies(self) -> Optional[str]:
        """_sharded_by, and also DeepSpeed ZeRO-1/2, which keeps the weight whole but steps flat fp32 copies of
        the delta."""
        engine = self._sharded_by()
        if engine is None and engines.needs_gather(self.delta):
            engine = "DeepSpeed ZeRO-1/2"
        return engine

    def refuse_moving_when_sharded(self) -> None:
        """Moving the delta (set_delta, set_block: SpIEL's regrowth) rewrites the delta Parameter and W0's
        values: not possible once an engine keeps copies of them (ZeRO-1/2's would overwrite the moved delta).
        Raises RuntimeError then."""
        engine = self._engine_keeping_copies()
        weight = self._modules["base_layer"]._parameters.get("weight")
        if engine == "DeepSpeed ZeRO-3" and not engines.is_zero3(self.delta) and weight.numel() > 0:
            engine = None  # building the layer inside a gather of its ZeRO-3 weight, before the engine starts
        if engine is not None:
            raise RuntimeError(
                f"ftcore: the delta cannot move to new positions under {engine}, which keeps its own copies of the delta "
                "(shards or fp32 masters); SpIEL regrowth and set_delta/set_block run on a single process or under DDP"
            )

    @torch.no_grad()
    def restore_base(self) -> None:
        """merged → W0: makes the base weight hold W0 exactly (no write when it already does)."""
        if self._holds_merge:
            engine = self._sharded_by()
            if engine is not None:
                took = "replaced its Parameters" if engine == SWAPPED else f"{engine} sharded it"
                raise RuntimeError(
                    f"ftcore: this layer's weight held W0 + delta (a merged forward ran) when {took}, and it cannot be "
                    "restored to W0 there. Call ftcore.unmerge(model) before the engine wraps the model, or apply with "
                    "merged=False"
                )
            self._write_base()
            self._set_merged_as(None)

    def refresh(self) -> None:
        """Makes the next forward re-merge the delta (after writing ``delta.data`` by hand)."""
        self._stale = True

    def delta_changed(self, delta: Optional[Tensor] = None) -> bool:
        """Whether the delta may differ from the one the weight holds (O(1); see the module docstring)."""
        delta = self.delta if delta is None else delta
        merged_as, gradient_at = self._merged_as, self._gradient_at
        return (
            merged_as is None
            or self._stale
            or merged_as[0] != delta._version
            or merged_as[1] != delta.data_ptr()
            or (gradient_at is not None and gradient_at != _optimizer_steps)
        )

    def sync_merged(self) -> None:
        """W0 or merged(Δ_old) → merged(Δ): the base weight holds W0 + Δ for the current delta (no write when it
        already does). Called before every merged forward: a few attribute reads when nothing changed."""
        engine = self._engine_before_merging()
        if engine is not None:
            raise _sharded_merge_error(engine)
        self._merge_if_changed()

    def _engine_before_merging(self) -> Optional[str]:
        if not self._owned:
            self._adopt_parameters()
        return self._sharded_by()

    def _merge_if_changed(self) -> None:
        delta = self.delta
        if not self._hooked and delta.requires_grad:
            self._hook_gradient()
        if self.delta_changed(delta):
            with torch.no_grad():
                if not self._holds_merge:
                    # W0 → merged: take W0's values from the weight now. An engine may have rewritten W0 since they
                    # were gathered (DDP broadcasts rank 0's weights when it wraps the model).
                    self._gather_base()
                self._write_merged()
            self._set_merged_as((delta._version, delta.data_ptr()))
            self._gradient_at = None
            self._stale = False

    # ---- state dicts --------------------------------------------------------------------------------------
    #
    # A state dict holds the weight as it is (merged or not), the delta, its positions and W0's values there:
    # together they give W0 back. A load may bring any part of that: W0 is never lost and the base values are
    # re-derived from W0 unless the weight, the positions and the base values arrive together.

    def _before_load(self, module, state_dict, prefix, *args) -> None:
        # Shapes and index values first: a failed load must not have written the weight (the weight would load,
        # the buffers not). The incoming index is proven here, once, as at construction: the hot paths trust it.
        for name in (self.index_name, self.base_name):
            incoming, mine = state_dict.get(prefix + name), getattr(self, name)
            if incoming is not None and tuple(incoming.shape) != tuple(mine.shape):
                raise ValueError(
                    f"{prefix or 'layer'}{name}: the state dict's shape {tuple(incoming.shape)} differs from this layer's "
                    f"{tuple(mine.shape)}: a different number of deltas is loaded with ftcore.load_adapter, not load_state_dict"
                )
        incoming_index = state_dict.get(prefix + self.index_name)
        if incoming_index is not None and engines.is_dtensor(incoming_index):
            self._index_unproven = True  # a shard: proven in _after_load, once it is this layer's whole buffer
        elif incoming_index is not None:
            try:
                self.check_index(incoming_index)
            except (TypeError, IndexError, ValueError) as exc:
                raise ValueError(f"{prefix or 'layer'}{self.index_name}: the state dict's {exc}") from exc
        self.restore_base()  # the weight holds W0 under the current delta
        has = {name: prefix + name in state_dict for name in ("base_layer.weight", self.index_name, self.base_name)}
        if has["base_layer.weight"] and has[self.base_name] and not has[self.index_name]:
            raise ValueError(
                f"{prefix or 'layer'}: the state dict holds the weight and {self.base_name!r} but not {self.index_name!r}: "
                "which of the weight's entries are W0 cannot be told; load all three, or the weight alone (as W0)"
            )
        # all three: the loaded weight may hold the loaded delta's merge, and the loaded base values undo it;
        # otherwise the weight is W0 (kept, or loaded as W0) and the base values are gathered from it
        self._loaded_merge = all(has.values())
        engine = self._sharded_by()
        if engine is not None and self._loaded_merge:
            self._refuse_a_merged_weight(engine, *(state_dict[prefix + n] for n in ("base_layer.weight", self.index_name, self.base_name)))

    def _refuse_a_merged_weight(self, engine: str, weight: Tensor, index: Tensor, base: Tensor) -> None:
        """A sharded layer runs unmerged on the weight it loads, which must then be W0: a state dict saved from a
        merged model holds W0 + Δ. A whole incoming weight is checked here; a DTensor (torch.distributed.checkpoint
        loads shards) is one the sharded, hence unmerged, run saved."""
        if engines.is_dtensor(weight) or weight.numel() == 0:
            return
        logical = weight.t() if is_conv1d(self.base_layer) else weight
        if not torch.equal(self._values_at(logical, index.to(logical.device)).to(base.dtype), base.to(logical.device)):
            raise ValueError(
                f"ftcore: the state dict's weight holds W0 + delta (it was saved from a merged model), but under {engine} "
                "this layer runs unmerged on W0. Save it after ftcore.unmerge(model), or load the adapter "
                "(ftcore.load_adapter) into the base model before wrapping"
            )

    @torch.no_grad()
    def _after_load(self, module, incompatible_keys) -> None:
        loaded_merge = self.__dict__.pop("_loaded_merge", False)
        if self.__dict__.pop("_index_unproven", False):
            self.check_index(getattr(self, self.index_name))  # before the writes below trust it
        if self._sharded_by() is not None:
            pass  # a sharded weight is never merged (see _prepare_weight): it holds W0, and its shards stay unread
        elif loaded_merge:
            self._write_base()
        else:
            self._gather_base()
        self._set_merged_as(None)  # W0 now; the next merged forward merges the (loaded) delta
        self._gradient_at = None
        self._adopt_parameters()  # load_state_dict(assign=True) puts new Parameters in place

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

    def _prepare_weight(self) -> None:
        if self.disabled:
            return  # a disabled forward never writes: a live graph may hold this weight (see _base_forward)
        if self.merged:
            engine = self._engine_before_merging()
            if engine is None:
                self._merge_if_changed()
                return
            if engine == SWAPPED:
                raise _sharded_merge_error(engine)
            _warn_fallback_once(engine)  # the same on every rank: they all run the same engine
            self.merged = False
        self.restore_base()

    def _base_forward(self, x: Tensor) -> Tensor:
        """The base layer's output (W0, no delta), computed without writing the weight: a reference forward
        (KL, DPO, GRPO) between a training forward and its backward must leave the saved merged weight alone."""
        if not self._holds_merge:
            return self.base_layer(x)
        return self._subtract_merged_difference(F.linear(x, self._weight(), self.bias), x)

    def _needs_preparation(self) -> bool:
        # Attribute reads only, so that torch.compile traces it: the unmerged path (W0 in the weight, nothing
        # to write) then compiles with fullgraph=True.
        return not self.disabled and (self.merged or self._holds_merge)

    def forward(self, x: Tensor) -> Tensor:
        if self._needs_preparation() and not self._model_prepared[0]:
            if torch.compiler.is_compiling():
                _prepare_eagerly([self])  # a layer called outside its model's forward: a graph break of its own
            else:
                self._prepare_weight()
        if self.disabled:
            return self._base_forward(x)
        return self._delta_forward(x)


# Runs eagerly even inside torch.compile: whether a weight must be refreshed depends on the optimizer steps
# taken since the last call, which a traced graph would freeze (and an in-place write to a weight inside a
# graph is copied back whole).
@torch.compiler.disable
def _prepare_eagerly(layers) -> None:
    for layer in layers:
        if layer._needs_preparation():
            layer._prepare_weight()


def _engine_of(layers) -> Optional[str]:
    """The engine (DDP, FSDP, DeepSpeed) running the model's forward on every rank now, or None."""
    if not distributed.active():
        return None
    if distributed.inside_ddp_forward():
        return "DDP"
    for layer in layers:
        engine = layer._engine_keeping_copies()
        if engine is not None and engine != SWAPPED:  # a swap alone may be one rank's functional_call: no collective
            return engine
    return None


def _check_ranks_once(model: nn.Module, layers) -> None:
    """At the model's first forward inside an engine that runs every rank's forward together (DDP, FSDP,
    DeepSpeed: a collective is safe there): every rank must hold the same delta positions and W0 values, since
    no engine broadcasts them, and under a sharding engine no rank's weight may hold a merge."""
    engine = _engine_of(layers)
    if engine is None:
        return
    if engine not in ("DDP", "DeepSpeed ZeRO-1/2") and not distributed.all_agree(not any(l._holds_merge for l in layers)):
        raise RuntimeError(
            f"ftcore: a merged forward ran on some rank before {engine} wrapped the model, so that rank's weights hold "
            "W0 + delta and the engine sharded them so. Call ftcore.unmerge(model) on every rank before wrapping"
        )
    distributed.check_same_on_every_rank(f"ftcore under {engine}", {
        f"layer {i} {buffer}": getattr(layer, buffer) for i, layer in enumerate(layers)
        for buffer in (layer.index_name, layer.base_name)})
    model.__dict__["_ftcore_ranks_checked"] = True


def prepare_model_layers(model: nn.Module, args) -> None:
    """The adapted model's forward pre-hook (installed by ftcore.apply and load_adapter): prepares every merged
    layer before the model's forward, so that the layers skip their own checks inside it. That makes a compiled
    model, a compiled ``model.forward`` or compiled blocks trace without a break per layer: the one break is
    here, outside them, or at the top of a compiled model (none when no layer is merged)."""
    layers = model.__dict__.get("_ftcore_layers", ())
    if not model.__dict__.get("_ftcore_fsdp2") and engines.is_fsdp2_module(model):
        # FSDP2 swaps this unit's Parameters before this hook runs: tell the layers that the swap is FSDP2's
        model.__dict__["_ftcore_fsdp2"] = True
        for layer in layers:
            layer._fsdp2 = True
    if not model.__dict__.get("_ftcore_ranks_checked", True) and not torch.compiler.is_compiling():
        _check_ranks_once(model, layers)
    if any(layer._needs_preparation() for layer in layers):
        _prepare_eagerly(layers)
    flag = model.__dict__.get("_ftcore_prepared")
    if flag is not None:
        flag[0] = True


def model_forward_done(model: nn.Module, args, output) -> None:
    """The adapted model's forward hook (always called, also on an exception): layers check themselves again."""
    flag = model.__dict__.get("_ftcore_prepared")
    if flag is not None:
        flag[0] = False


def grad_matmul(grad_output: Tensor, weight: Tensor) -> Tensor:
    """grad_output · weight, in grad_output's dtype: under autocast the forward GEMM ran in that dtype."""
    return grad_output.matmul(weight if weight.dtype == grad_output.dtype else weight.to(grad_output.dtype))
