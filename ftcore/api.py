"""The public, model-level API: apply / trainable_parameters / save_adapter / load_adapter / switch_adapter /
merge / unmerge / compose / disable. Each call works on any model that ``ftcore.apply`` changed, whatever the
method (sparse deltas or structured blocks)."""

import contextlib
import warnings
from typing import Dict, Iterator, List, Optional, Sequence, Union

import torch
import torch.distributed as dist
from torch import nn

from . import distributed, engines, ops
from .nn.base import DeltaLinear, logical_weight
from .nn.sparse_delta import SparseDeltaLinear
from .tuners import adapter as adapter_files
from .tuners.planner import BackpropPlan
from .tuners.quantize import QuantConfig, apply_quantization, quant_state
from .tuners.sparse_delta import SparseDeltaConfig, apply_sparse_delta
from .tuners.structured import StructuredSparseConfig, apply_structured
from .tuners.targets import install, set_submodule, track_layers, untrack_layers

CONFIGS = {cls.method: cls for cls in (SparseDeltaConfig, StructuredSparseConfig)}


def adapter_layers(model: nn.Module) -> Dict[str, DeltaLinear]:
    """The model's ftcore layers by name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, DeltaLinear)}


def apply(
    model: nn.Module,
    config: Union[SparseDeltaConfig, StructuredSparseConfig, BackpropPlan, QuantConfig],
    *,
    calibration: Optional[Sequence] = None,
) -> nn.Module:
    """Swaps the layers `config` targets for ftcore modules, in place, freezing everything else; returns the
    model. `calibration` (batches of model inputs, with labels where gradients are needed) serves the
    data-driven selections (and QuantConfig(rotation="adaptive")). A BackpropPlan from ``ftcore.plan_backprop``
    is applied as its config. A QuantConfig makes the whole model quantization-aware (see
    ftcore.tuners.quantize); it does not combine with the other methods yet."""
    if adapter_layers(model):
        raise ValueError("the model already carries an ftcore adapter; merge, unmerge or save it first")
    if quant_state(model) is not None:
        raise ValueError("the model is quantized by ftcore.apply(QuantConfig); combining quantization-aware "
                         "training with another ftcore method is not supported yet")
    if isinstance(config, QuantConfig):
        return apply_quantization(model, config, calibration)
    if isinstance(config, BackpropPlan):
        return apply_structured(model, config.config, layers=config.layers)
    if isinstance(config, SparseDeltaConfig):
        return apply_sparse_delta(model, config, calibration)
    if isinstance(config, StructuredSparseConfig):
        return apply_structured(model, config, calibration)
    raise TypeError(f"ftcore.apply takes a SparseDeltaConfig, StructuredSparseConfig, BackpropPlan or QuantConfig, got {type(config).__name__}")


def trainable_parameters(model: nn.Module) -> List[nn.Parameter]:
    """The parameters to hand the optimizer: after ``apply``, the deltas (plus anything you unfroze)."""
    return [p for p in model.parameters() if p.requires_grad]


def _layers_or_raise(model: nn.Module) -> Dict[str, DeltaLinear]:
    layers = adapter_layers(model)
    if not layers:
        raise ValueError("the model carries no ftcore adapter: call ftcore.apply or ftcore.load_adapter first")
    return layers


def _base_model_info(model: nn.Module) -> dict:
    config = getattr(model, "config", None)
    return {
        "class": engines.base_class(getattr(model, "_fsdp_wrapped_module", model)).__name__,
        "model_type": getattr(config, "model_type", None),
        "name_or_path": getattr(config, "_name_or_path", None) or None,
    }


def save_adapter(model: nn.Module, path: str, *, overwrite: bool = False) -> None:
    """Writes ``adapter_config.json`` + ``adapter_model.safetensors`` to directory `path`. Refuses to replace
    an adapter already there unless ``overwrite=True``. Values are saved in fp32 whatever the engine ran.

    Under torch.distributed rank 0 writes (the model may be wrapped: DDP, FSDP1, a DeepSpeed engine). Where an
    engine shards the deltas (FSDP1, FSDP2, DeepSpeed ZeRO, which also keeps their fp32 masters) this is a
    collective: every rank calls it, takes part in gathering them, and raises if rank 0 could not write; it
    returns once the files are there (its agreement runs over ftcore's ranks: see
    ftcore.distributed.set_data_parallel_group, whose group must include rank 0). Otherwise (single process,
    DDP) ranks other than 0 write nothing, and calling it on rank 0 alone is enough."""
    model = engines.unwrap(model)
    layers = {engines.clean_name(name): m for name, m in _layers_or_raise(model).items()}
    methods = {m.method for m in layers.values()}
    if len(methods) != 1:
        raise ValueError(f"the model mixes adapter methods {sorted(methods)}; an adapter file holds one")
    state = getattr(model, "_ftcore_state", None) or {}
    config = state.get("config")
    deltas = {id(m.delta) for m in layers.values()}
    left_out = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in deltas]
    if left_out:
        warnings.warn(
            f"save_adapter saves the ftcore deltas only; {len(left_out)} other trainable parameters "
            f"({', '.join(left_out[:3])}{', ...' if len(left_out) > 3 else ''}) are not in the adapter: save them yourself",
            stacklevel=2,
        )
    method, config = methods.pop(), config.to_dict() if config is not None else {}
    writer = not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
    if not any(engines.needs_gather(m.delta) for m in layers.values()):
        if writer:
            records = {name: adapter_files.record_of(m) for name, m in layers.items()}
            adapter_files.save(path, method, config, records, _base_model_info(model), overwrite)
        return
    # A collective from here: a refusal or a failure on rank 0 is raised on every rank, none is left waiting.
    if not distributed.all_agree(not writer or overwrite or not adapter_files.exists(path)):
        raise FileExistsError(adapter_files.refusal_to_overwrite(path))
    with engines.fsdp1_full_params(model):
        records = {name: adapter_files.record_of(m, engines.full_fp32) for name, m in layers.items()}
    failure = None
    if writer:
        try:
            adapter_files.save(path, method, config, records, _base_model_info(model), overwrite)
        except Exception as exc:  # noqa: BLE001  (re-raised below, after every rank has heard of it)
            failure = exc
    if not distributed.all_agree(failure is None):
        raise failure if failure is not None else RuntimeError(f"rank 0 could not write the adapter to {path}")


def _read_config(saved: adapter_files.Adapter):
    if not saved.config:
        return None
    try:
        return CONFIGS[saved.method].from_dict(saved.config)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{saved.path}: the recorded config is invalid: {exc}") from exc


def load_adapter(model: nn.Module, path: str, *, merged: Optional[bool] = None, trainable: bool = False) -> nn.Module:
    """Validates the adapter at `path` against `model` (names, shapes, dtypes, index ranges, checksum), then
    applies it. Returns the model. On any error the model is left untouched. The adapter is frozen, for
    inference, unless ``trainable=True`` (to go on training it), as in PEFT."""
    saved = adapter_files.read(path)
    if adapter_layers(model):
        raise ValueError("the model already carries an ftcore adapter; use ftcore.switch_adapter, or merge/unmerge it first")
    targets = adapter_files.match_model(model, saved, allow_wrapped=False)
    config = _read_config(saved)
    if merged is None:
        merged = config.merged if config is not None else True
    layer_class = adapter_files.LAYER_CLASSES[saved.method]

    def builder(name: str):
        def build(layer: nn.Module) -> DeltaLinear:
            record = saved.layers[name]
            module = layer_class.from_adapter_record(layer, record.meta, record.tensors, merged=merged)
            module.delta.requires_grad_(trainable)
            return module

        return build

    return install(model, config, {name: builder(name) for name, _ in targets})


def read_adapter(path: str) -> adapter_files.Adapter:
    """Reads and checks an adapter directory (checksum, dtypes, shapes, index ranges) without applying it: keep
    several in memory to switch between them with ``switch_adapter``."""
    return adapter_files.read(path)


def switch_adapter(model: nn.Module, adapter: Union[str, adapter_files.Adapter]) -> nn.Module:
    """Replaces the model's adapter with another of the same method (a path, or one from ``read_adapter``),
    moving only the adapters' bytes: each layer writes W0 back under the old delta and writes the new delta;
    nothing else of the weights is touched. The new adapter is checked in full first; on any error the model
    keeps its current adapter. Its deltas are new Parameters: an optimizer must be built after the switch."""
    layers = _layers_or_raise(model)
    for name, layer in layers.items():
        engine = layer._sharded_by()
        if engine is not None:
            raise ValueError(f"layer {name!r}: switch_adapter rebuilds the layers, which cannot be done under {engine}; "
                             "switch before the engine wraps the model")
    saved = adapter if isinstance(adapter, adapter_files.Adapter) else adapter_files.read(adapter)
    path = saved.path
    current = {m.method for m in layers.values()}
    if current != {saved.method}:
        raise ValueError(f"{path} holds a {saved.method!r} adapter; the model carries {sorted(current)}")
    targets = dict(adapter_files.match_model(model, saved, allow_wrapped=True))
    config = _read_config(saved)
    layer_class = adapter_files.LAYER_CLASSES[saved.method]
    first = next(iter(layers.values()))
    merged, trainable, disabled = first.merged, first.delta.requires_grad, first.disabled
    for name in set(layers) - set(targets):  # layers the new adapter leaves alone go back to W0
        set_submodule(model, name, layers[name].unwrap(with_delta=False))
    for name, module in targets.items():
        base = module.unwrap(with_delta=False) if isinstance(module, DeltaLinear) else module
        record = saved.layers[name]
        fresh = layer_class.from_adapter_record(base, record.meta, record.tensors, merged=merged)
        fresh.delta.requires_grad_(trainable)
        fresh.disabled = disabled  # a switch inside ftcore.disable() stays disabled
        if merged and not disabled:
            fresh.sync_merged()  # write the new delta now, not at the first forward
        set_submodule(model, name, fresh)
    model.__dict__.setdefault("_ftcore_state", {"requires_grad": {}})["config"] = config
    track_layers(model, adapter_layers(model))
    return model


def _restore_requires_grad(model: nn.Module) -> None:
    state = getattr(model, "_ftcore_state", None)
    if state:
        for name, p in model.named_parameters():
            p.requires_grad_(state["requires_grad"].get(name, True))
        del model._ftcore_state


def merge(model: nn.Module) -> nn.Module:
    """Folds every delta into its base weight and puts the original layer classes back: returns a plain
    transformers model (W0 + Δ, rounded once to the weight dtype), with its parameters' requires_grad as
    before ``apply``."""
    for name, module in _layers_or_raise(model).items():
        set_submodule(model, name, module.unwrap(with_delta=True))
    untrack_layers(model)
    _restore_requires_grad(model)
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Restores every base weight to W0 bit for bit and keeps the deltas live on the exact unmerged path.
    ``module.set_merged(True)`` goes back. Returns the model."""
    for module in _layers_or_raise(model).values():
        module.set_merged(False)
    return model


def compose(model: nn.Module, *adapters: str, scale: float = 1.0) -> nn.Module:
    """Adds saved sparse-delta adapters into the base weights (LT-SFT's composition: e.g. a language adapter
    plus a task adapter). Works on a plain model and under a live sparse-delta adapter, whose trainable deltas
    then sit on the composed base. ``scale=-1`` subtracts. All adapters are checked before any weight changes."""
    if not adapters:
        raise ValueError("compose needs at least one adapter path")
    plans = []
    for path in adapters:
        saved = adapter_files.read(path)
        if saved.method != "sparse_delta":
            raise ValueError(f"{path} holds a {saved.method!r} adapter; only sparse-delta adapters compose")
        targets = adapter_files.match_model(model, saved, allow_wrapped=True)
        for name, module in targets:
            if isinstance(module, DeltaLinear) and not isinstance(module, SparseDeltaLinear):
                raise ValueError(f"layer {name!r} carries a {module.method!r} adapter; compose adds into plain or sparse-delta layers")
            engine = engines.sharding_of(module.weight)
            if engine is not None:
                raise ValueError(f"layer {name!r}: {engine} shards its weight; compose adapters into the model before wrapping it")
        plans.append((saved, targets))
    with torch.no_grad():
        for saved, targets in plans:
            for name, module in targets:
                tensors = saved.layers[name].tensors
                if isinstance(module, SparseDeltaLinear):
                    module.add_to_base(tensors["indices"], tensors["values"], scale)
                else:
                    weight = logical_weight(module)
                    # the adapter's indices were proven when its file was read (check_adapter_record)
                    ops.sparse_delta_scatter_(
                        weight, tensors["indices"].to(weight.device), tensors["values"].to(weight.device), float(scale),
                        checked=True,
                    )
    return model


@contextlib.contextmanager
def disable(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block the model computes as its base (W0, no delta); on exit the deltas come back (also those
    of an adapter switched to inside the block). No weight is written: a reference forward between a training
    forward and its backward (KL, DPO, GRPO) leaves the weights that backward saved alone. A merged layer
    subtracts the product of what its weight carries beyond W0 (read from the weight itself), so outputs equal
    the base model's up to one rounding in the weight dtype."""
    for m in _layers_or_raise(model).values():
        m.disabled = True
    try:
        yield model
    finally:
        for m in adapter_layers(model).values():
            m.disabled = False
