"""Which modules of a model a method touches, with PEFT's conventions so users need not relearn them:

* ``target_modules``: a list of names or name suffixes (``["q_proj", "v_proj"]`` matches
  ``model.layers.0.self_attn.q_proj``), a regular expression string (full match on the module name), or
  ``"all-linear"`` (every linear layer except the output head).
* ``exclude_modules``: the same forms, removed from the match.
* ``layers_to_transform``: layer numbers (an int or a list), read from names such as ``layers.3.`` or ``h.3.``.
"""

import re
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Union

from torch import nn

from .. import engines
from ..nn.base import DeltaLinear, is_linear_like, model_forward_done, prepare_model_layers

Targets = Union[str, Sequence[str], None]

_LAYER_NUMBER = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)(?:\.|$)")


def _matches(name: str, spec: Targets) -> bool:
    if spec is None:
        return False
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == s or name.endswith("." + s) for s in spec)


def layer_number(name: str) -> Optional[int]:
    """The transformer block a module belongs to, from its name (``model.layers.7.mlp`` -> 7)."""
    found = _LAYER_NUMBER.search(name)
    return int(found.group(1)) if found else None


def _check_spec(spec: Targets, what: str) -> None:
    if spec is None or isinstance(spec, str):
        if isinstance(spec, str) and spec != "all-linear":
            try:
                re.compile(spec)
            except re.error as exc:
                raise ValueError(f"{what} {spec!r} is not a valid regular expression: {exc}") from exc
        return
    if not all(isinstance(s, str) for s in spec):
        raise TypeError(f"{what} must be a string or a list of strings, got {spec!r}")


def find_targets(
    model: nn.Module,
    target_modules: Targets = "all-linear",
    exclude_modules: Targets = None,
    layers_to_transform: Union[int, Iterable[int], None] = None,
) -> List[str]:
    """Names of the linear layers (nn.Linear, GPT-2 Conv1D) selected by the PEFT-style rules above.

    Raises ValueError when nothing matches, listing some linear layers the model has.
    """
    _check_spec(target_modules, "target_modules")
    _check_spec(exclude_modules, "exclude_modules")
    if target_modules is None:
        target_modules = "all-linear"
    if isinstance(layers_to_transform, int):
        layers_to_transform = [layers_to_transform]
    layers = None if layers_to_transform is None else set(layers_to_transform)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None

    candidates, chosen = [], []
    for name, module in model.named_modules():
        if isinstance(module, DeltaLinear) or ".base_layer" in f".{name}" or not is_linear_like(module):
            continue
        candidates.append(name)
        if target_modules == "all-linear":
            if module is head:
                continue
        elif not _matches(name, target_modules):
            continue
        if _matches(name, exclude_modules):
            continue
        if layers is not None and layer_number(name) not in layers:
            continue
        chosen.append(name)
    if not chosen:
        examples = ", ".join(candidates[:6]) or "none"
        raise ValueError(
            f"no linear layer matches target_modules={target_modules!r} (exclude_modules={exclude_modules!r}, "
            f"layers_to_transform={layers_to_transform!r}); the model's linear layers include: {examples}"
        )
    return chosen


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def install(
    model: nn.Module,
    config,
    builders: Dict[str, Callable[[nn.Module], DeltaLinear]],
    finish: Optional[Callable[[Dict[str, DeltaLinear]], None]] = None,
) -> nn.Module:
    """Freezes the model and swaps each named layer for what its builder makes of it, then runs `finish` on
    the new layers (e.g. placing deltas after calibration) and records the config and the parameters' former
    requires_grad (merge restores them). On any error everything is put back: the model is as it was."""
    requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    wrapped: Dict[str, DeltaLinear] = {}
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for name, build in builders.items():
            layer = model.get_submodule(name)
            with engines.gathered(layer.parameters()):  # W0 whole while the layer reads it (ZeRO-3; as PEFT does)
                wrapped[name] = build(layer)
            set_submodule(model, name, wrapped[name])
        if finish is not None:
            finish(wrapped)
        refuse_shared_merged_weights(model, wrapped)
    except BaseException:
        for name, module in wrapped.items():
            set_submodule(model, name, module.unwrap(with_delta=False))
        for name, p in model.named_parameters():
            p.requires_grad_(requires_grad[name])
        raise
    model._ftcore_state = {"config": config, "requires_grad": requires_grad}
    track_layers(model, wrapped)
    return model


def refuse_shared_merged_weights(model: nn.Module, layers: Dict[str, DeltaLinear]) -> None:
    """A merged layer writes W0 + Δ into its weight: if that storage is also another parameter (tied input and
    output embeddings) or the layer is used elsewhere too, those uses would change with it. Raises for those."""
    owners: Dict[int, List[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if p.numel() == 0:
            continue  # no storage to share (a ZeRO-3 partition, whose layers run unmerged anyway)
        owners.setdefault(p.untyped_storage().data_ptr(), []).append(name)
    for name, layer in layers.items():
        if not layer.merged:
            continue
        sharing = [n for n in owners.get(layer.base_layer.weight.untyped_storage().data_ptr(), [])
                   if n != f"{name}.base_layer.weight"]
        if sharing:
            raise ValueError(
                f"{name}: its weight is also {', '.join(sharing[:3])} (tied weights or a layer used twice): merged mode "
                "would write the delta into those too. Exclude the layer, or use merged=False"
            )


def track_layers(model: nn.Module, layers: Dict[str, DeltaLinear]) -> None:
    """Keeps the model's ftcore layers on it, with the forward pre-hook that prepares them all before each
    forward of the model and the flag that tells them so (see ftcore.nn.base.prepare_model_layers).

    Also keeps the delta positions and W0's values there out of DDP's buffer broadcast (DDP would copy rank 0's
    over every rank's at every forward: more bytes than the gradients' all-reduce). They are equal on every
    rank by construction; the model's first forward inside DDP checks that they are, and raises if not."""
    buffers = [f"{name}.{buffer}" for name, layer in layers.items() for buffer in (layer.index_name, layer.base_name)]
    ignored = set(getattr(model, "_ddp_params_and_buffers_to_ignore", ()))
    model._ddp_params_and_buffers_to_ignore = sorted(ignored | set(buffers))
    model.__dict__["_ftcore_ranks_checked"] = False
    model.__dict__.pop("_ftcore_fsdp2", None)  # the next forward's pre-hook tells the new layers again
    untrack_layers(model, keep_hooks=True)
    flag = model.__dict__.setdefault("_ftcore_prepared", [False])
    model.__dict__["_ftcore_layers"] = list(layers.values())
    for layer in layers.values():
        layer._model_prepared = flag
    if model.__dict__.get("_ftcore_hooks") is None:
        model.__dict__["_ftcore_hooks"] = (
            model.register_forward_pre_hook(prepare_model_layers),
            model.register_forward_hook(model_forward_done, always_call=True),
        )


def untrack_layers(model: nn.Module, keep_hooks: bool = False) -> None:
    for layer in model.__dict__.pop("_ftcore_layers", ()):
        layer.__dict__.pop("_model_prepared", None)
    if not keep_hooks:
        for handle in model.__dict__.pop("_ftcore_hooks", None) or ():
            handle.remove()
        model.__dict__.pop("_ftcore_prepared", None)
