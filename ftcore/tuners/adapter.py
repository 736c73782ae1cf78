"""Adapter files: ``adapter_config.json`` + ``adapter_model.safetensors``.

For each adapted layer ``name`` the safetensors file holds the tensors its layer class names: a sparse delta
``name.indices`` (int32, or int64 for weights of 2^31 entries or more) and ``name.values`` (float32), 8 bytes
per delta entry; a structured block ``name.index`` (int32) and ``name.block`` (float32). The JSON records the
method, its config, each layer's logical (out, in) shape with the class's metadata, and the SHA-256 of the
safetensors file, so a truncated, corrupted or swapped file is refused rather than half-applied.

Loading validates everything (names, shapes, dtypes, index ranges and order, checksum) before it touches the
model, so a failed load leaves the model unchanged. Saving never overwrites an adapter unless asked, and writes
each file under a temporary name first, so an interrupted save cannot leave a half-written file.
"""

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from typing import Callable, Dict, List, Tuple

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .._version import __version__
from .. import engines
from ..nn.base import DeltaLinear, is_linear_like
from ..nn.sparse_delta import SparseDeltaLinear
from ..nn.structured import StructuredSparseLinear

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
FORMAT_VERSION = 1
# The layer class of each method: it names, checks and builds its layers' records.
LAYER_CLASSES = {cls.method: cls for cls in (SparseDeltaLinear, StructuredSparseLinear)}


@dataclass
class LayerRecord:
    shape: Tuple[int, int]  # the logical (out, in) weight
    meta: dict  # the layer class's metadata (counts, mode)
    tensors: Dict[str, Tensor]  # named by the class's adapter_tensors


@dataclass
class Adapter:
    """An adapter read from disk and checked on its own (not yet against a model)."""

    path: str
    method: str
    config: dict
    layers: Dict[str, LayerRecord]


def record_of(layer: DeltaLinear, read: Callable[[Tensor], Tensor] = lambda t: t) -> LayerRecord:
    """The layer's record, each tensor through `read` (engines.full_fp32 gathers a sharded delta)."""
    meta, tensors = layer.adapter_record()
    return LayerRecord((layer.out_features, layer.in_features), meta, {k: read(t) for k, t in tensors.items()})


def exists(path: str) -> bool:
    """Whether an adapter (either of its files) is at `path`."""
    return any(os.path.exists(os.path.join(path, name)) for name in (CONFIG_NAME, WEIGHTS_NAME))


def _stored(t: Tensor) -> Tensor:
    """Indices as int32 where they fit (int64 otherwise), trainable values as float32, on the CPU."""
    t = t.detach().to("cpu")
    if t.is_floating_point():
        return t.float().contiguous()
    fits = t.numel() == 0 or int(t.max()) < 2**31
    return t.to(torch.int32 if fits else torch.int64).contiguous()


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_atomically(final_path: str, write) -> None:
    directory = os.path.dirname(final_path)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, final_path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save(path: str, method: str, config: dict, layers: Dict[str, LayerRecord], base_model: dict, overwrite: bool) -> None:
    os.makedirs(path, exist_ok=True)
    if exists(path) and not overwrite:
        raise FileExistsError(refusal_to_overwrite(path))
    tensors = {f"{name}.{key}": _stored(t) for name, layer in layers.items() for key, t in layer.tensors.items()}
    weights_path = os.path.join(path, WEIGHTS_NAME)
    _write_atomically(weights_path, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt", "method": method}))
    record = {
        "ftcore_version": __version__,
        "format_version": FORMAT_VERSION,
        "method": method,
        "config": config,
        "base_model": base_model,
        "layers": {name: {"shape": list(layer.shape), **layer.meta} for name, layer in layers.items()},
        "weights_sha256": _sha256(weights_path),
    }

    def write_json(tmp):
        with open(tmp, "w") as f:
            json.dump(record, f, indent=2, sort_keys=True)

    _write_atomically(os.path.join(path, CONFIG_NAME), write_json)


def refusal_to_overwrite(path: str) -> str:
    return f"an adapter exists at {path}; pass overwrite=True to replace it"


def read(path: str) -> Adapter:
    """Reads and checks an adapter directory on its own terms. Raises FileNotFoundError / ValueError."""
    config_path, weights_path = os.path.join(path, CONFIG_NAME), os.path.join(path, WEIGHTS_NAME)
    for p in (config_path, weights_path):
        if not os.path.isfile(p):
            raise FileNotFoundError(f"{p} not found: {path} is not an ftcore adapter directory")
    try:
        with open(config_path) as f:
            record = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{config_path} is not valid JSON (corrupted?): {exc}") from exc
    for key in ("format_version", "method", "layers", "weights_sha256"):
        if key not in record:
            raise ValueError(f"{config_path} lacks {key!r}: not an ftcore adapter config")
    if record["format_version"] != FORMAT_VERSION:
        raise ValueError(f"{config_path} has format_version {record['format_version']}; this ftcore reads {FORMAT_VERSION}")
    if _sha256(weights_path) != record["weights_sha256"]:
        raise ValueError(
            f"{weights_path} does not match the checksum in {CONFIG_NAME}: the file was truncated, corrupted "
            "or replaced; refusing to load it"
        )
    try:
        tensors = load_file(weights_path)
    except (SafetensorError, OSError, ValueError) as exc:
        raise ValueError(f"{weights_path} is not a readable safetensors file: {exc}") from exc

    layer_class = LAYER_CLASSES.get(record["method"])
    if layer_class is None:
        raise ValueError(f"{config_path}: unknown method {record['method']!r} (this ftcore reads {sorted(LAYER_CLASSES)})")
    layers = {}
    expected = set()
    for name, meta in record["layers"].items():
        meta = dict(meta)
        shape = tuple(meta.pop("shape", ()))
        if len(shape) != 2 or not all(isinstance(s, int) and s > 0 for s in shape):
            raise ValueError(f"{config_path}: layer {name!r} has an invalid shape {shape!r}")
        keys = {key: f"{name}.{key}" for key in layer_class.adapter_tensors}
        expected.update(keys.values())
        missing = [k for k in keys.values() if k not in tensors]
        if missing:
            raise ValueError(f"{weights_path} lacks {missing[0]!r} listed in {CONFIG_NAME}")
        layer_tensors = {key: tensors[stored] for key, stored in keys.items()}
        try:
            layer_class.check_adapter_record(shape, meta, layer_tensors)
        except ValueError as exc:
            raise ValueError(f"{weights_path}: layer {name!r}: {exc}") from exc
        layers[name] = LayerRecord(shape, meta, layer_tensors)
    unknown = sorted(set(tensors) - expected)
    if unknown:
        raise ValueError(f"{weights_path} holds tensors not listed in {CONFIG_NAME}: {unknown[:3]}")
    return Adapter(path, record["method"], record.get("config", {}), layers)


def match_model(model: nn.Module, adapter: Adapter, *, allow_wrapped: bool) -> List[Tuple[str, nn.Module]]:
    """The model's layer for each adapter layer, checked for kind and shape. `allow_wrapped` admits layers
    that already carry a sparse delta (composition onto a trained model)."""
    found = []
    for name, layer in adapter.layers.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"adapter {adapter.path} has layer {name!r}, which this model does not have") from None
        if isinstance(module, DeltaLinear):
            if not allow_wrapped:
                raise ValueError(f"layer {name!r} already carries an ftcore adapter; merge or unmerge it first")
            shape = (module.out_features, module.in_features)
        elif is_linear_like(module):
            shape = engines.logical_shape(module)
        else:
            raise ValueError(f"adapter layer {name!r} is a {type(module).__name__} in this model, not a linear layer")
        if shape != layer.shape:
            raise ValueError(f"adapter layer {name!r} is {layer.shape[0]}x{layer.shape[1]}, the model's is {shape[0]}x{shape[1]}")
        found.append((name, module))
    return found
