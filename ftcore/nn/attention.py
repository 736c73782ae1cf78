"""The online half of whole-model rotation, inside transformers' attention: R3 (Q and K rotated per head after
RoPE, which it does not commute with) and the K/V quantization per (token, head); and the exported model's
coded KV cache.

ftcore registers an attention function and its mask function under the name "ftcore" (both: without the mask
function transformers would pass no causal mask). The function reads each attention module's
``ftcore_attention`` (an AttentionQuant) and then runs torch's scaled-dot-product attention as transformers'
"sdpa" does. A module without one attends exactly as sdpa does.

During quantization-aware training the cache (when there is one) holds K and V in full precision, and the
whole K/V is rotated and quantized at every step. Each quantizer reads one token's vector, so this equals
quantizing before the cache, and nothing is quantized twice. An exported model stores K and V coded in the
cache instead (``kv_bits`` a code plus a float32 scale and a uint8 zero point a (token, head)), which is what
makes its KV memory shrink.
"""

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn

from .. import ops
from .quant import QuantErrorLog

ATTENTION = "ftcore"


def register() -> None:
    """Registers the "ftcore" attention and mask functions with transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION, attention_forward)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)


@dataclass
class AttentionQuant:
    """What one attention module does to Q, K and V before attending.

    r3: rotate Q and K per head by the orthonormal Hadamard of head_dim (QKᵀ unchanged); block-diagonal with
        rotation_block_size (for a head_dim with no Hadamard matrix).
    kv_bits: K and V fake-quantized per (token, head) with a straight-through gradient (None: full precision).
    coded_cache: the exported model's mode: K and V come from a cache that already rotated and coded them.
    """

    layer: int
    r3: bool = False
    kv_bits: Optional[int] = None
    kv_symmetric: bool = False
    kv_clip_ratio: float = 1.0
    rotation_block_size: Optional[int] = None
    coded_cache: bool = False
    cache_in_use: bool = False  # set before every forward of an exported model (see attach_coded_cache)

    def quantize(self, x: Tensor) -> Tensor:
        return ops.fake_quantize(x, self.kv_bits, self.kv_symmetric, "token", None, self.kv_clip_ratio)

    def rotate(self, x: Tensor) -> Tensor:
        return ops.hadamard_transform(x, block_size=self.rotation_block_size)

    def rotate_key(self, key: Tensor) -> Tensor:
        return self.rotate(key) if self.r3 else key

    def quantize_kv(self, key: Tensor, value: Tensor):
        """K (already rotated) and V fake-quantized per (token, head), their errors logged."""
        if self.kv_bits is None:
            return key, value
        key_q, value_q = self.quantize(key), self.quantize(value)
        log = QuantErrorLog.active
        if log is not None:
            log.add((self.layer, "k"), key, key_q)
            log.add((self.layer, "v"), value, value_q)
        return key_q, value_q

    def __call__(self, query: Tensor, key: Tensor, value: Tensor):
        if self.r3:
            query = self.rotate(query)
        if self.coded_cache and self.cache_in_use:  # the coded cache rotated and quantized them on the way in
            return query, key, value
        key, value = self.quantize_kv(self.rotate_key(key), value)
        return query, key, value


def attention_forward(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask, **kwargs):
    """transformers' attention-interface signature: q (b, heads, Tq, d) after RoPE, k and v (b, kv_heads, Tk,
    d) with the cache's past; returns (out (b, Tq, heads, d), None)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    spec = getattr(module, "ftcore_attention", None)
    if spec is not None:
        query, key, value = spec(query, key, value)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


# ---- the exported model's coded cache ---------------------------------------------------------------------------


class KVCodec:
    """One (token, head) vector of d values as bytes: the codes (two a byte at ≤ 4 bits), then the float32
    scale (4 bytes), then the uint8 zero point. The cache stores and concatenates these byte rows like any other
    tensor, so its windowing, cropping and beam reordering work unchanged."""

    def __init__(self, spec: AttentionQuant, head_dim: int, dtype: torch.dtype):
        self.spec, self.head_dim, self.dtype = spec, head_dim, dtype
        self.packed = spec.kv_bits <= 4
        if self.packed and head_dim % 2:
            raise ValueError(f"coded KV at {spec.kv_bits} bits packs two codes a byte: head_dim must be even, got {head_dim}")
        self.code_bytes = head_dim // 2 if self.packed else head_dim

    def bytes_per_vector(self) -> int:
        return self.code_bytes + 5

    def encode(self, x: Tensor) -> Tensor:
        spec = self.spec
        bits = spec.kv_bits
        _, scale, zero = ops.fake_quantize(x, bits, spec.kv_symmetric, "token", None, spec.kv_clip_ratio,
                                           return_params=True)
        shape = x.shape[:-1]
        scale, zero = scale.reshape(*shape, 1), zero.reshape(*shape, 1)
        # In the fake quantizer's own precision (float32, float64 for a float64 model), so the codes round alike.
        xa = x.to(torch.promote_types(x.dtype, torch.float32))
        if spec.kv_symmetric:
            offset, top = 2.0 ** (bits - 1), 2.0**bits - 1
            codes = (torch.round(xa / scale) + offset).clamp(0, top)
            zero = torch.full_like(zero, offset)
        else:
            codes = (torch.round(xa / scale) + zero).clamp(0, 2.0**bits - 1)
        codes = codes.to(torch.uint8)
        if self.packed:
            codes = ops.pack_int4(codes.reshape(-1, self.head_dim)).reshape(*shape, self.code_bytes)
        scale_bytes = scale.contiguous().view(torch.uint8)
        return torch.cat((codes, scale_bytes, zero.to(torch.uint8)), -1)

    def decode(self, rows: Tensor) -> Tensor:
        shape = rows.shape[:-1]
        codes = rows[..., : self.code_bytes]
        if self.packed:
            codes = ops.unpack_int4(codes.reshape(-1, self.code_bytes)).reshape(*shape, self.head_dim)
        scale = rows[..., self.code_bytes : self.code_bytes + 4].contiguous().view(torch.float32)
        acc = torch.promote_types(self.dtype, torch.float32)
        zero = rows[..., self.code_bytes + 4 :].to(acc)
        return ((codes.to(acc) - zero) * scale).to(self.dtype)


class _CodedCache:
    """Mixed into a transformers Cache's class by attach_coded_cache: update() codes K and V of the layers that
    have a codec, hands the cache the byte rows, and decodes what it returns."""

    def update(self, key_states: Tensor, value_states: Tensor, layer_idx: int, *args, **kwargs):
        codec = self._ftcore_codecs.get(layer_idx)
        if codec is None:
            return super().update(key_states, value_states, layer_idx, *args, **kwargs)
        key_states = codec.spec.rotate_key(key_states)  # coded from the unquantized values: quantized once
        keys, values = super().update(codec.encode(key_states), codec.encode(value_states), layer_idx, *args, **kwargs)
        return codec.decode(keys), codec.decode(values)


_CODED_CLASSES: dict = {}


def _coded_class(cls: type) -> type:
    if cls not in _CODED_CLASSES:
        _CODED_CLASSES[cls] = type(f"Coded{cls.__name__}", (_CodedCache, cls), {})
    return _CODED_CLASSES[cls]


def _find_cache(args, kwargs):
    from transformers.cache_utils import Cache

    for value in (kwargs.get("cache"), kwargs.get("past_key_values"), *args):
        if isinstance(value, Cache):
            return value
    return None


def attach_coded_cache(attention: nn.Module, spec: AttentionQuant, head_dim: int, dtype: torch.dtype):
    """Makes an exported model's attention store its K/V coded: a forward pre-hook turns the cache the model is
    given (or creates) into its coded variant the first time it is seen. Returns the hook's handle."""
    from transformers.cache_utils import StaticLayer

    codec = KVCodec(spec, head_dim, dtype) if spec.kv_bits is not None else None

    def before_forward(module, args, kwargs):
        cache = _find_cache(args, kwargs)
        spec.cache_in_use = cache is not None and codec is not None
        if cache is None or codec is None:
            return None
        if not isinstance(cache, _CodedCache):
            if any(isinstance(layer, StaticLayer) for layer in getattr(cache, "layers", ())):
                raise ValueError("the exported int4 model stores its K/V coded in a dynamic cache; a static cache "
                                 "(cache_implementation='static') is not supported")
            if cache.get_seq_length() > 0:
                raise ValueError("the exported int4 model was given a cache that already holds full-precision "
                                 "K/V; start generation from an empty cache")
            cache.__class__ = _coded_class(type(cache))
            cache._ftcore_codecs = {}
        cache._ftcore_codecs[spec.layer] = codec
        return None

    return attention.register_forward_pre_hook(before_forward, with_kwargs=True)
