"""Whole-model rotated quantization-aware fine-tuning (RoSTE): one call turns a transformers causal LM into a
WxAyKVz QAT model with rotations R1–R4, picks R2/R3/R4 per layer from calibration errors when asked, and exports
it to packed int4.

    R1  residual stream, offline (ftcore.tuners.rotation): untie, fuse norms, rotate embeddings/readers/writers
    R2  per head on V → O, offline, per layer
    R3  per head on Q and K after RoPE, online, per layer (ftcore.nn.attention)
    R4  over intermediate_size at down_proj's input, online, per layer (RotatedQuantLinear's online rotation)

Every quantized linear becomes a RotatedQuantLinear with an fp32 master; every parameter of the model trains
(full QAT, as RoSTE), with the norms' γ = 1 after fusion; the Hadamard signs are buffers.
"""

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from ..nn.attention import ATTENTION, AttentionQuant, KVCodec, attach_coded_cache, register
from ..nn.quant import QuantErrorLog, RotatedQuantLinear, optional_bits
from . import rotation as rot
from .targets import set_submodule

ROTATIONS = ("none", "r1", "full", "adaptive")
FLAGS = ("r2", "r3", "r4")


@dataclass
class QuantConfig:
    """Whole-model quantization-aware fine-tuning.

    w_bits / a_bits / kv_bits: bits of the linears' weights (per output channel, or per w_group_size columns),
        their input activations (per token, or per a_group_size) and the attention's K and V (per token and
        head); 2–8, or 16 / None for full precision.
    rotation: "none"; "r1" (the residual stream only); "full" (R1 and R2/R3/R4 in every layer); "adaptive" (R1,
        then R2/R3/R4 per layer where calibration shows they lower the quantization error; needs calibration);
        or a per-layer dict {layer: {"r2": bool, "r3": bool, "r4": bool}} (with R1; missing layers or flags
        are off).
    *_symmetric, *_clip_ratio: as ops.fake_quantize (asymmetric min/max clipped to 0.95, as RoSTE).
    w_learnable_scale: learn each linear's weight scale (LSQ; needs w_symmetric=True), off by default as RoSTE.
    rotation_block_size: for a rotated size with no full Hadamard matrix (hidden_size for R1, head_dim for R2/R3,
        intermediate_size for R4), a block-diagonal rotation, H_b on each run of b; sizes that have one keep it.
    seed: the Hadamard sign diagonals (R1: seed, R2: seed + 1, R4: seed + 2).
    quantize_lm_head: lm_head quantized too (the embeddings always stay full precision).
    """

    w_bits: Optional[int] = 4
    a_bits: Optional[int] = 4
    kv_bits: Optional[int] = 4
    rotation: Union[str, Dict[int, Dict[str, bool]]] = "full"
    w_symmetric: bool = False
    a_symmetric: bool = False
    kv_symmetric: bool = False
    w_clip_ratio: float = 0.95
    a_clip_ratio: float = 0.95
    kv_clip_ratio: float = 0.95
    w_group_size: Optional[int] = None
    a_group_size: Optional[int] = None
    w_learnable_scale: bool = False
    rotation_block_size: Optional[int] = None
    seed: int = 42
    quantize_lm_head: bool = False

    method = "quantization"

    def __post_init__(self):
        self.w_bits = optional_bits(self.w_bits, "w_bits")
        self.a_bits = optional_bits(self.a_bits, "a_bits")
        self.kv_bits = optional_bits(self.kv_bits, "kv_bits")
        for name in ("w_clip_ratio", "a_clip_ratio", "kv_clip_ratio"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
                raise ValueError(f"{name} must be a number in (0, 1], got {value!r}")
        for name in ("w_group_size", "a_group_size", "rotation_block_size"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
        for name in ("w_symmetric", "a_symmetric", "kv_symmetric", "quantize_lm_head", "w_learnable_scale"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if self.w_learnable_scale and (self.w_bits is None or not self.w_symmetric):
            raise ValueError("w_learnable_scale needs quantized, symmetric weights (w_symmetric=True): LSQ learns a "
                             "scale, not a zero point")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        if isinstance(self.rotation, dict):
            self.rotation = {_layer_key(k): _layer_flags(k, v) for k, v in self.rotation.items()}
        elif self.rotation not in ROTATIONS:
            raise ValueError(f"rotation must be one of {ROTATIONS} or a per-layer dict, got {self.rotation!r}")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        if isinstance(self.rotation, dict):
            d["rotation"] = {str(k): v for k, v in self.rotation.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "QuantConfig":
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown QuantConfig fields {sorted(unknown)}")
        return cls(**d)


def _layer_key(key) -> int:
    if isinstance(key, str) and key.isdigit():
        key = int(key)
    if isinstance(key, bool) or not isinstance(key, int) or key < 0:
        raise ValueError(f"rotation: per-layer keys are layer indices (non-negative integers), got {key!r}")
    return key


def _layer_flags(key, flags) -> Dict[str, bool]:
    if not isinstance(flags, dict) or set(flags) - set(FLAGS) or not all(isinstance(v, bool) for v in flags.values()):
        raise ValueError(f"rotation[{key!r}] must be a dict of bools with keys among {FLAGS}, got {flags!r}")
    return {name: flags.get(name, False) for name in FLAGS}


@dataclass
class RotationPlan:
    """Where the rotations are: R1 for the whole model, R2/R3/R4 per layer, and for an adaptive plan the
    quantization errors (mean squared, off and on) each per-layer choice was made from."""

    r1: bool
    layers: List[Dict[str, bool]]
    errors: Dict[int, Dict[str, Tuple[float, float]]] = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"R1 (residual stream): {'on' if self.r1 else 'off'}"]
        head = f"{'layer':>5}  " + "  ".join(f"{f.upper():>3}" for f in FLAGS)
        if self.errors:
            head += "  " + "  ".join(f"{f.upper() + ' err off':>12} {'on':>10}" for f in FLAGS)
        lines.append(head)
        for i, flags in enumerate(self.layers):
            row = f"{i:>5}  " + "  ".join(f"{'on' if flags[f] else 'off':>3}" for f in FLAGS)
            if i in self.errors:
                row += "  " + "  ".join(f"{self.errors[i][f][0]:>12.4e} {self.errors[i][f][1]:>10.4e}" for f in FLAGS)
            lines.append(row)
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"r1": self.r1, "layers": self.layers,
                "errors": {str(i): {f: list(e) for f, e in errs.items()} for i, errs in self.errors.items()}}

    @classmethod
    def from_dict(cls, d: dict) -> "RotationPlan":
        errors = {int(i): {f: tuple(e) for f, e in errs.items()} for i, errs in d.get("errors", {}).items()}
        return cls(bool(d["r1"]), [_layer_flags(i, f) for i, f in enumerate(d["layers"])], errors)


def quant_state(model: nn.Module) -> Optional[dict]:
    """What apply_quantization recorded on the model (None for a model it did not change)."""
    return getattr(model, "_ftcore_quant", None)


# ---- validation: everything is checked before the model changes ------------------------------------------------


def _requested_plan(config: QuantConfig, arch: rot.Architecture) -> Tuple[bool, Optional[List[Dict[str, bool]]]]:
    """(R1, per-layer flags), the flags None when they are to be chosen adaptively."""
    n = len(arch.blocks)
    if config.rotation == "adaptive":
        return True, None
    if isinstance(config.rotation, dict):
        outside = [k for k in config.rotation if k >= n]
        if outside:
            raise ValueError(f"rotation names layers {outside} but the model has {n} layers")
        off = dict.fromkeys(FLAGS, False)
        return True, [dict(config.rotation.get(i, off)) for i in range(n)]
    on = config.rotation == "full"
    return config.rotation != "none", [dict.fromkeys(FLAGS, on) for _ in range(n)]


def _check(config: QuantConfig, arch: rot.Architecture, r1: bool, flags, calibration) -> None:
    b = config.rotation_block_size
    if r1:
        rot.check_rotation_size(arch.hidden_size, "R1: hidden_size", b)
    wanted = set(FLAGS) if flags is None else {f for layer in flags for f, on in layer.items() if on}
    if wanted & {"r2", "r3"}:
        rot.check_rotation_size(arch.head_dim, "R2/R3: head_dim", b)
    if "r4" in wanted:
        rot.check_rotation_size(arch.intermediate_size, "R4: intermediate_size", b)
    if flags is None and calibration is None:
        raise ValueError("rotation='adaptive' chooses R2/R3/R4 from calibration errors: pass calibration=batches")
    for name, group in (("w_group_size", config.w_group_size), ("a_group_size", config.a_group_size)):
        for size, what in ((arch.hidden_size, "hidden_size"), (arch.intermediate_size, "intermediate_size"),
                           (arch.num_heads * arch.head_dim, "heads·head_dim")):
            if group is not None and size % group:
                raise ValueError(f"{name} ({group}) must divide every quantized linear's input: {what} is {size}")


# ---- building the QAT model ------------------------------------------------------------------------------------


def _embeddings(model: nn.Module) -> Tensor:
    """The input embedding's weight: where the model's dtype and device are read (it stays full precision, while
    lm_head may become an Int4Linear, which has no weight)."""
    return model.get_input_embeddings().weight


def _linear_settings(config: QuantConfig) -> dict:
    return dict(w_bits=config.w_bits, a_bits=config.a_bits, w_group_size=config.w_group_size,
                a_group_size=config.a_group_size, w_symmetric=config.w_symmetric, a_symmetric=config.a_symmetric,
                w_clip_ratio=config.w_clip_ratio, a_clip_ratio=config.a_clip_ratio,
                w_learnable_scale=config.w_learnable_scale)


def _prepare(model: nn.Module, r1: bool, config: QuantConfig) -> rot.Architecture:
    """The changes every plan shares: fp32 masters, GPT-2's Conv1D as nn.Linear, R1, the ftcore attention."""
    if any(p.dtype in (torch.float16, torch.bfloat16) for p in model.parameters()):
        model.float()  # the fp32 master weights (never fold a rotation into bf16)
    arch = rot.describe(model)
    if arch.model_type == "gpt2":
        for block in arch.blocks:
            for path in block.attention_readers + block.mlp_readers + [block.o_proj, block.down_proj]:
                set_submodule(block.layer, path, rot.conv1d_to_linear(block.get(path)))
    if r1:
        rot.untie(model)
        rot.fuse_norms(model, arch)
        rot.rotate_residual(model, arch, rot.residual_signs(arch, config.seed, _embeddings(model).device),
                            rot.block_for(arch.hidden_size, config.rotation_block_size))
    register()
    model.set_attn_implementation(ATTENTION)
    return rot.describe(model)


def _build(model: nn.Module, arch: rot.Architecture, config: QuantConfig, flags: List[Dict[str, bool]]) -> None:
    """R2 folded, the linears swapped for RotatedQuantLinear (R4 on down_proj where asked), the attention's
    R3 and K/V quantization set, per layer."""
    device = _embeddings(model).device
    head_signs = rot.head_signs(arch, config.seed, device)
    settings = _linear_settings(config)
    head_block = rot.block_for(arch.head_dim, config.rotation_block_size)
    r4_block = rot.block_for(arch.intermediate_size, config.rotation_block_size)
    for block, layer_flags in zip(arch.blocks, flags):
        if layer_flags["r2"]:
            rot.rotate_values(block, arch, head_signs, head_block)
        for path in block.attention_readers + block.mlp_readers + [block.o_proj, block.down_proj]:
            online = layer_flags["r4"] and path == block.down_proj
            linear = RotatedQuantLinear.from_linear(block.get(path), online_rotation=online,
                                                    rotation_seed=config.seed + 2,
                                                    rotation_block_size=r4_block if online else None, **settings)
            if path in (block.o_proj, block.down_proj):
                linear.error_name = (block.index, "o_proj" if path == block.o_proj else "down_proj")
            set_submodule(block.layer, path, linear)
        block.attention.ftcore_attention = AttentionQuant(
            getattr(block.attention, "layer_idx", block.index), r3=layer_flags["r3"], kv_bits=config.kv_bits,
            kv_symmetric=config.kv_symmetric, kv_clip_ratio=config.kv_clip_ratio,
            rotation_block_size=head_block if layer_flags["r3"] else None,
        )
    if config.quantize_lm_head:
        rot.untie(model)  # (done already with R1) lm_head gets its own weight, and the config says so
        model.lm_head = RotatedQuantLinear.from_linear(model.lm_head, **settings)


def _inputs(batch) -> dict:
    if isinstance(batch, torch.Tensor):
        return {"input_ids": batch}
    if isinstance(batch, dict):
        return {k: v for k, v in batch.items() if k != "labels"}
    raise TypeError(f"calibration batches must be input_ids tensors or dicts of model inputs, got {type(batch).__name__}")


def _to(inputs: dict, device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}


def rotation_errors(log: QuantErrorLog, layer: int) -> Dict[str, float]:
    """One layer's quantization errors by the rotation they decide (RoSTE): R2 W_o + X_o + V, R3 K,
    R4 W_down + X_down (each a mean squared error; 0 for a side that is not quantized)."""

    def mean(*name):
        return log.mean(name) if name in log.sums else 0.0

    return {
        "r2": mean(layer, "o_proj", "weight") + mean(layer, "o_proj", "input") + mean(layer, "v"),
        "r3": mean(layer, "k"),
        "r4": mean(layer, "down_proj", "weight") + mean(layer, "down_proj", "input"),
    }


def measure(model: nn.Module, batches: List[dict], desc: str) -> QuantErrorLog:
    """The quantization errors of a QAT model over the calibration batches (no gradients, eval mode)."""
    from tqdm.auto import tqdm

    device = _embeddings(model).device
    was_training = model.training
    model.eval()
    log = QuantErrorLog()
    try:
        with torch.no_grad(), log.recording():
            for batch in tqdm(batches, desc=desc, leave=False):
                model(**_to(batch, device), use_cache=False)
    finally:
        model.train(was_training)
    return log


def _choose(model: nn.Module, config: QuantConfig, batches: List[dict]) -> RotationPlan:
    """RoSTE's lower level: one pass with every R2/R3/R4 off and one with every one on, on copies of the
    model; per layer a rotation is on iff its error is strictly lower with it (ties: off)."""
    n = len(rot.describe(model).blocks)
    errors: Dict[bool, List[Dict[str, float]]] = {}
    for on in (False, True):
        trial = copy.deepcopy(model)
        _build(trial, rot.describe(trial), config, [dict.fromkeys(FLAGS, on) for _ in range(n)])
        log = measure(trial, batches, f"ftcore adaptive rotation ({'on' if on else 'off'})")
        errors[on] = [rotation_errors(log, i) for i in range(n)]
        del trial
    layers = [{f: errors[True][i][f] < errors[False][i][f] for f in FLAGS} for i in range(n)]
    table = {i: {f: (errors[False][i][f], errors[True][i][f]) for f in FLAGS} for i in range(n)}
    return RotationPlan(True, layers, table)


def apply_quantization(model: nn.Module, config: QuantConfig, calibration: Optional[Iterable] = None) -> nn.Module:
    """Turns a supported causal LM into a quantization-aware model, in place; returns it. Every check runs
    before the model changes. The chosen rotations are ``model.ftcore_rotation_plan``."""
    if quant_state(model) is not None:
        raise ValueError("the model is already quantized by ftcore.apply(QuantConfig)")
    arch = rot.describe(model)  # an unsupported architecture fails here, untouched
    r1, flags = _requested_plan(config, arch)
    _check(config, arch, r1, flags, calibration)
    batches = None
    if flags is None:
        batches = [_inputs(b) for b in calibration]
        if not batches:
            raise ValueError("calibration is empty: rotation='adaptive' needs at least one batch")
    arch = _prepare(model, r1, config)
    plan = RotationPlan(r1, flags) if flags is not None else _choose(model, config, batches)
    _build(model, arch, config, plan.layers)
    for p in model.parameters():
        p.requires_grad_(True)
    model._ftcore_quant = {"config": config, "plan": plan, "exported": False, "hooks": []}
    model.ftcore_rotation_plan = plan
    return model


# ---- export --------------------------------------------------------------------------------------------------


def attach_coded_caches(model: nn.Module) -> None:
    state = quant_state(model)
    dtype = _embeddings(model).dtype
    for module in model.modules():
        spec = getattr(module, "ftcore_attention", None)
        if spec is not None and spec.kv_bits is not None:
            spec.coded_cache = True
            state["hooks"].append(attach_coded_cache(module, spec, module.head_dim, dtype))


def export_int4(model: nn.Module) -> nn.Module:
    """The packed inference model, in place (same transformers class; returns it): every RotatedQuantLinear
    becomes an Int4Linear (the same weights bit for bit, the same online rotation and activation quantization),
    and the attention stores K and V coded in the cache (kv_bits a value plus a float32 scale and a uint8 zero
    a (token, head)). Checked whole before anything changes."""
    state = quant_state(model)
    if state is None:
        raise ValueError("export_int4 needs a model from ftcore.apply(model, QuantConfig(...))")
    if state["exported"]:
        raise ValueError("the model is already exported")
    layers = {name: m for name, m in model.named_modules() if isinstance(m, RotatedQuantLinear)}
    bad = [name for name, m in layers.items() if m.w_bits != 4 or m.in_features % 2]
    if bad:
        raise ValueError(f"export_int4 packs 4-bit weights with an even in_features; not so for {bad[:3]} "
                         f"(w_bits={state['config'].w_bits})")
    for module in model.modules():
        spec = getattr(module, "ftcore_attention", None)
        if spec is not None and spec.kv_bits is not None:
            KVCodec(spec, module.head_dim, torch.float32)  # refuses an odd head_dim at ≤ 4 bits
    for name, layer in layers.items():
        set_submodule(model, name, layer.export())
    attach_coded_caches(model)
    state["exported"] = True
    model.requires_grad_(False)
    return model


def kv_cache_bytes_per_token(model: nn.Module) -> int:
    """Bytes the cache holds a token, over all layers (K and V): coded for an exported model."""
    total = 0
    for module in model.modules():
        spec = getattr(module, "ftcore_attention", None)
        if spec is None:
            continue
        kv_heads = module.config.num_key_value_heads if hasattr(module.config, "num_key_value_heads") else module.num_heads
        per_vector = (KVCodec(spec, module.head_dim, torch.float32).bytes_per_vector()
                      if spec.coded_cache else module.head_dim * _embeddings(model).element_size())
        total += 2 * kv_heads * per_vector
    return total


__all__ = ["QuantConfig", "RotationPlan", "apply_quantization", "export_int4", "quant_state"]
