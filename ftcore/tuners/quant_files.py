"""Quantized-model files: ``config.json`` (the transformers config, untied) + ``model.safetensors`` (the whole
state: int4 codes, scales, zero points, fp32 masters or embeddings, Hadamard signs) + ``ftcore_quant.json``
(the QuantConfig, the rotation plan, each replaced module's constructor arguments, each attention's R3/KV
settings, and the safetensors file's SHA-256).

``load_quantized`` rebuilds the model in a fresh process from these alone: the transformers class from the
config, then every recorded module in place of the original, then a strict state load, so a missing, extra or
mis-shaped tensor and a corrupted file are refused.
"""

import json
import os
from typing import Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .._version import __version__
from ..nn.attention import ATTENTION, AttentionQuant, register
from ..nn.quant import Int4Linear, RotatedQuantLinear
from .adapter import _sha256, _write_atomically
from .quantize import QuantConfig, RotationPlan, attach_coded_caches, quant_state
from .targets import set_submodule

RECORD_NAME = "ftcore_quant.json"
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
FORMAT_VERSION = 1
_DTYPES = {str(d): d for d in (torch.float32, torch.float64, torch.float16, torch.bfloat16)}


def _module_record(module: nn.Module) -> Optional[dict]:
    """How to rebuild a module that ftcore put in place of an original (None for anything else)."""
    if isinstance(module, RotatedQuantLinear):
        return {"kind": "RotatedQuantLinear", "dtype": str(module.weight.dtype), **module.settings()}
    if isinstance(module, Int4Linear):
        dtype = module.bias.dtype if module.bias is not None else torch.float32
        return {"kind": "Int4Linear", "dtype": str(dtype), **module.settings()}
    if type(module) is nn.RMSNorm:  # a LayerNorm made RMSNorm by mean-centring
        return {"kind": "RMSNorm", "shape": list(module.normalized_shape), "eps": module.eps,
                "dtype": str(module.weight.dtype)}
    if type(module) is nn.Linear:  # GPT-2's Conv1D as a Linear, or a head given a bias by the norm fusion
        return {"kind": "Linear", "in_features": module.in_features, "out_features": module.out_features,
                "bias": module.bias is not None, "dtype": str(module.weight.dtype)}
    return None


def _build_module(record: dict) -> nn.Module:
    args = dict(record)
    kind, dtype = args.pop("kind"), _DTYPES[args.pop("dtype")]
    if kind == "RotatedQuantLinear":
        return RotatedQuantLinear(**args, dtype=dtype)
    if kind == "Int4Linear":
        return Int4Linear(**args, dtype=dtype)
    if kind == "RMSNorm":
        return nn.RMSNorm(args["shape"], eps=args["eps"], dtype=dtype)
    if kind == "Linear":
        return nn.Linear(args["in_features"], args["out_features"], bias=args["bias"], dtype=dtype)
    raise ValueError(f"unknown module kind {kind!r}")


def _attention_record(spec: AttentionQuant) -> dict:
    return {"layer": spec.layer, "r3": spec.r3, "kv_bits": spec.kv_bits, "kv_symmetric": spec.kv_symmetric,
            "kv_clip_ratio": spec.kv_clip_ratio, "rotation_block_size": spec.rotation_block_size}


def save_quantized(model: nn.Module, path: str, *, overwrite: bool = False) -> None:
    """Writes a quantized model (exported or still in training) to directory `path`. Refuses to replace a
    saved model unless ``overwrite=True``; each file is written under a temporary name first."""
    state = quant_state(model)
    if state is None:
        raise ValueError("save_quantized needs a model from ftcore.apply(model, QuantConfig(...))")
    os.makedirs(path, exist_ok=True)
    if not overwrite and any(os.path.exists(os.path.join(path, n)) for n in (RECORD_NAME, WEIGHTS_NAME, CONFIG_NAME)):
        raise FileExistsError(f"a model is saved at {path}; pass overwrite=True to replace it")
    tensors, seen = {}, set()
    for k, v in model.state_dict().items():
        v = v.detach().to("cpu").contiguous()
        if v.numel() and v.data_ptr() in seen:  # a tied weight (rotation="none"): safetensors wants its own copy
            v = v.clone()
        seen.add(v.data_ptr())
        tensors[k] = v
    weights_path = os.path.join(path, WEIGHTS_NAME)
    _write_atomically(weights_path, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    _write_atomically(os.path.join(path, CONFIG_NAME), model.config.to_json_file)
    record = {
        "ftcore_version": __version__,
        "format_version": FORMAT_VERSION,
        "model_class": type(model).__name__,
        "dtype": str(model.get_input_embeddings().weight.dtype),
        "config": state["config"].to_dict(),
        "plan": state["plan"].to_dict(),
        "exported": state["exported"],
        "modules": {n: r for n, m in model.named_modules() if (r := _module_record(m)) is not None},
        "attention": {n: _attention_record(m.ftcore_attention) for n, m in model.named_modules()
                      if getattr(m, "ftcore_attention", None) is not None},
        "weights_sha256": _sha256(weights_path),
    }

    def write_json(tmp):
        with open(tmp, "w") as f:
            json.dump(record, f, indent=2, sort_keys=True)

    _write_atomically(os.path.join(path, RECORD_NAME), write_json)


def load_quantized(path: str, *, device=None) -> nn.Module:
    """The model save_quantized wrote, rebuilt and checked (checksum, structure, a strict state load)."""
    import transformers

    for name in (RECORD_NAME, WEIGHTS_NAME, CONFIG_NAME):
        if not os.path.exists(os.path.join(path, name)):
            raise FileNotFoundError(f"{path} holds no ftcore quantized model: {name} is missing")
    with open(os.path.join(path, RECORD_NAME)) as f:
        record = json.load(f)
    if record.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: unknown format_version {record.get('format_version')!r} (this ftcore reads "
                         f"{FORMAT_VERSION})")
    weights_path = os.path.join(path, WEIGHTS_NAME)
    if _sha256(weights_path) != record["weights_sha256"]:
        raise ValueError(f"{weights_path} does not match the checksum in {RECORD_NAME}: corrupted or replaced")
    config = QuantConfig.from_dict(record["config"])
    plan = RotationPlan.from_dict(record["plan"])
    cls = getattr(transformers, record["model_class"], None)
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise ValueError(f"{path}: {record['model_class']!r} is not a transformers model class")
    hf_config = transformers.AutoConfig.from_pretrained(path)
    model = cls(hf_config).to(_DTYPES[record["dtype"]]).eval()
    for name, module_record in record["modules"].items():
        set_submodule(model, name, _build_module(module_record))
    register()
    model.set_attn_implementation(ATTENTION)
    for name, spec in record["attention"].items():
        model.get_submodule(name).ftcore_attention = AttentionQuant(**spec)
    try:
        tensors = load_file(weights_path)
    except SafetensorError as exc:
        raise ValueError(f"{weights_path} is not a readable safetensors file: {exc}") from None
    try:
        result = model.load_state_dict(tensors, strict=False)
    except RuntimeError as exc:  # a tensor of the wrong shape
        raise ValueError(f"{path} does not fit the rebuilt {record['model_class']}: {exc}") from None
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(f"{path} does not fit the rebuilt {record['model_class']}: missing "
                         f"{result.missing_keys[:3]}, unexpected {result.unexpected_keys[:3]}")
    model._ftcore_quant = {"config": config, "plan": plan, "exported": False, "hooks": []}
    model.ftcore_rotation_plan = plan
    if record["exported"]:
        attach_coded_caches(model)
        model._ftcore_quant["exported"] = True
    model.requires_grad_(not record["exported"])
    return model.to(device) if device is not None else model
