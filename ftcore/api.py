"""The public, model-level API: apply / trainable_parameters / save_adapter / load_adapter / merge / unmerge /
compose / disable. Each call works on any model that ``ftcore.apply`` changed, whatever the method."""

import contextlib
from typing import Iterator, List, Optional, Sequence

import torch
from torch import nn

from .nn.sparse_delta import SparseDeltaLinear, logical_weight
from .tuners import adapter as adapter_files
from .tuners.sparse_delta import SparseDeltaConfig, apply_sparse_delta, sparse_delta_layers
from .tuners.targets import set_submodule


def apply(model: nn.Module, config: SparseDeltaConfig, *, calibration: Optional[Sequence] = None) -> nn.Module:
    """Swaps the layers `config` targets for ftcore modules, in place, freezing everything else; returns the
    model. `calibration` (batches with labels) is for gradient-based selection."""
    if sparse_delta_layers(model):
        raise ValueError("the model already carries an ftcore adapter; merge, unmerge or save it first")
    if isinstance(config, SparseDeltaConfig):
        return apply_sparse_delta(model, config, calibration)
    raise TypeError(f"ftcore.apply takes a SparseDeltaConfig, got {type(config).__name__}")


def trainable_parameters(model: nn.Module) -> List[nn.Parameter]:
    """The parameters to hand the optimizer: after ``apply``, the delta values (plus anything you unfroze)."""
    return [p for p in model.parameters() if p.requires_grad]


def _layers_or_raise(model: nn.Module):
    layers = sparse_delta_layers(model)
    if not layers:
        raise ValueError("the model carries no ftcore adapter: call ftcore.apply or ftcore.load_adapter first")
    return layers


def _base_model_info(model: nn.Module) -> dict:
    config = getattr(model, "config", None)
    return {
        "class": type(model).__name__,
        "model_type": getattr(config, "model_type", None),
        "name_or_path": getattr(config, "_name_or_path", None) or None,
    }


def save_adapter(model: nn.Module, path: str, *, overwrite: bool = False) -> None:
    """Writes ``adapter_config.json`` + ``adapter_model.safetensors`` (8 bytes a delta) to directory `path`.
    Refuses to replace an adapter already there unless ``overwrite=True``."""
    layers = _layers_or_raise(model)
    state = getattr(model, "_ftcore_state", None) or {}
    config = state.get("config")
    deltas = {
        name: adapter_files.LayerDelta((m.out_features, m.in_features), m.indices, m.values) for name, m in layers.items()
    }
    adapter_files.save(
        path, "sparse_delta", config.to_dict() if config is not None else {}, deltas, _base_model_info(model), overwrite
    )


def load_adapter(model: nn.Module, path: str, *, merged: Optional[bool] = None, trainable: bool = True) -> nn.Module:
    """Validates the adapter at `path` against `model` (names, shapes, dtypes, index ranges, checksum), then
    applies it: the layers become SparseDeltaLinear holding the saved deltas. Returns the model. On any
    error the model is left untouched. `trainable=False` freezes the delta values too."""
    saved = adapter_files.read(path)
    if saved.method != "sparse_delta":
        raise ValueError(f"{path} holds a {saved.method!r} adapter; this ftcore loads 'sparse_delta' adapters")
    if sparse_delta_layers(model):
        raise ValueError("the model already carries an ftcore adapter; merge or unmerge it before loading another")
    targets = adapter_files.match_model(model, saved, allow_wrapped=False)
    try:
        config = SparseDeltaConfig.from_dict(saved.config) if saved.config else None
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{path}: the recorded config is invalid: {exc}") from exc
    if merged is None:
        merged = config.merged if config is not None else True
    requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for name, layer in targets:
        delta = saved.layers[name]
        module = SparseDeltaLinear(layer, delta.indices, delta.values, merged=merged)
        module.values.requires_grad_(trainable)
        set_submodule(model, name, module)
    model._ftcore_state = {"config": config, "requires_grad": requires_grad}
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
    _restore_requires_grad(model)
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Restores every base weight to W0 bit for bit and keeps the deltas live on the exact unmerged path
    (forward adds the sparse product). ``module.set_merged(True)`` goes back. Returns the model."""
    for module in _layers_or_raise(model).values():
        module.set_merged(False)
    return model


def compose(model: nn.Module, *adapters: str, scale: float = 1.0) -> nn.Module:
    """Adds saved sparse-delta adapters into the base weights (LT-SFT's composition: e.g. a language adapter
    plus a task adapter). Works on a plain model and under a live adapter, whose trainable deltas then sit on
    the composed base. ``scale=-1`` subtracts. All adapters are checked before any weight changes."""
    if not adapters:
        raise ValueError("compose needs at least one adapter path")
    plans = []
    for path in adapters:
        saved = adapter_files.read(path)
        if saved.method != "sparse_delta":
            raise ValueError(f"{path} holds a {saved.method!r} adapter; only sparse-delta adapters compose")
        plans.append((saved, adapter_files.match_model(model, saved, allow_wrapped=True)))
    with torch.no_grad():
        for saved, targets in plans:
            for name, module in targets:
                delta = saved.layers[name]
                if isinstance(module, SparseDeltaLinear):
                    module.add_to_base(delta.indices, delta.values, scale)
                else:
                    weight = logical_weight(module)
                    torch.ops.ftcore.sparse_delta_scatter_(
                        weight, delta.indices.to(weight.device), delta.values.to(weight.device), float(scale), None
                    )
    return model


@contextlib.contextmanager
def disable(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block the model computes as its base (W0, no delta); on exit the deltas come back."""
    layers = _layers_or_raise(model).values()
    previous = [m.disabled for m in layers]
    for m in layers:
        m.disabled = True
    try:
        yield model
    finally:
        for m, was in zip(layers, previous):
            m.disabled = was
