"""RotatedQuantLinear: quantization-aware fine-tuning of a linear layer (RoSTE / QuaRot style), and Int4Linear,
the packed layer it exports.

    y = fake_quant_a(R·x) · fake_quant_w(W·Rᵀ)ᵀ + b        R = H·diag(s)/√in (orthonormal), optional

With the online input rotation (the down_proj case) the activation is rotated and fake-quantized per token in
one fused op, and the weight's matching rotation W·Rᵀ is folded into the master weight once, when the layer is
built: R·x and W·Rᵀ multiply back to W·x, and nothing re-rotates the weight per step. The trainable weight is
that folded fp32 master; every forward fake-quantizes it (per output channel or per group) with a
straight-through gradient. ``export()`` packs the weight to int4 with the same rounding, so the exported layer
reproduces this one's outputs up to float rounding.
"""

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops
from ..hadamard import hadamard_factors, random_signs

__all__ = ["RotatedQuantLinear", "Int4Linear"]


def _granularity(name: str, group_size: Optional[int], per_row: str) -> tuple:
    """(granularity, group_size) for ops.fake_quantize: groups of group_size, else one scale per row."""
    if group_size is None:
        return per_row, None
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0:
        raise ValueError(f"{name} must be a positive integer or None, got {group_size!r}")
    return "group", group_size


class _Quantizer:
    """How activations are rotated and fake-quantized on the way in: shared by the training and the exported
    layer, so both see the same activation."""

    def __init__(self, in_features: int, a_bits, a_group_size, a_symmetric, a_clip_ratio, online_rotation):
        self.a_bits, self.a_symmetric, self.a_clip_ratio = a_bits, a_symmetric, a_clip_ratio
        self.a_granularity, self.a_group_size = _granularity("a_group_size", a_group_size, "token")
        if a_group_size is not None and in_features % a_group_size:
            raise ValueError(f"a_group_size ({a_group_size}) must divide in_features ({in_features})")
        self.online_rotation = online_rotation

    def __call__(self, x: Tensor, signs: Optional[Tensor]) -> Tensor:
        if self.online_rotation and self.a_bits is not None:
            return ops.rotate_fake_quantize(
                x, self.a_bits, self.a_symmetric, self.a_granularity, self.a_group_size, self.a_clip_ratio, signs=signs
            )
        if self.online_rotation:
            x = ops.hadamard_transform(x, signs=signs)
        if self.a_bits is not None:
            x = ops.fake_quantize(x, self.a_bits, self.a_symmetric, self.a_granularity, self.a_group_size, self.a_clip_ratio)
        return x


class RotatedQuantLinear(nn.Module):
    """Drop-in for ``nn.Linear`` in quantization-aware fine-tuning.

    w_bits / a_bits: weight / input-activation bits (2–8; a_bits=None leaves activations in full precision).
    w_group_size: None for one scale per output channel, else per group of that many input columns.
    a_group_size: None for one scale per token, else per group. *_symmetric, *_clip_ratio: as ops.fake_quantize.
    online_rotation: rotate the input by R = H·diag(s)/√in at run time (fused with its fake quantization) and fold
        Rᵀ into the weight once; in_features must be a supported Hadamard size (ftcore.hadamard.is_supported).
    rotation_seed: the seed of the random ±1 diagonal s (None: no signs, the plain Hadamard matrix).

    ``weight`` is the fp32 master (in the rotated basis when online_rotation); ``bias`` stays as given.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        w_bits: int = 4,
        a_bits: Optional[int] = 4,
        w_group_size: Optional[int] = None,
        a_group_size: Optional[int] = None,
        w_symmetric: bool = True,
        a_symmetric: bool = True,
        w_clip_ratio: float = 1.0,
        a_clip_ratio: float = 1.0,
        online_rotation: bool = False,
        rotation_seed: Optional[int] = 0,
        device=None,
        dtype=None,
    ):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.w_bits = ops._check_bits(w_bits, "w_bits")  # the weight is always fake-quantized
        self.w_granularity, self.w_group_size = _granularity("w_group_size", w_group_size, "channel")
        if w_group_size is not None and in_features % w_group_size:
            raise ValueError(f"w_group_size ({w_group_size}) must divide in_features ({in_features})")
        self.w_symmetric, self.w_clip_ratio = w_symmetric, w_clip_ratio
        self.quantizer = _Quantizer(
            in_features, None if a_bits is None else ops._check_bits(a_bits, "a_bits"), a_group_size, a_symmetric,
            a_clip_ratio, online_rotation
        )
        if online_rotation:
            hadamard_factors(in_features)  # a clear error now for a size with no Hadamard matrix
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=torch.float32))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None
        self.register_buffer(
            "rotation_signs",
            random_signs(in_features, rotation_seed, device=device) if online_rotation and rotation_seed is not None else None,
        )
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)

    @classmethod
    def from_linear(cls, linear: nn.Linear, **config) -> "RotatedQuantLinear":
        """The QAT layer for a trained ``nn.Linear``: same outputs in full precision (up to the fp32 rotation),
        with its weight copied to the fp32 master and, with online_rotation, rotated once (W·Rᵀ)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear needs an nn.Linear, got {type(linear).__name__}")
        w = linear.weight
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, device=w.device,
                    dtype=w.dtype, **config)
        with torch.no_grad():
            master = w.detach().float()
            if layer.quantizer.online_rotation:
                # (W·Rᵀ)[o, :] = R·W[o, :]: the rotation of each row, once.
                master = ops.hadamard_transform(master, signs=layer.rotation_signs)
            layer.weight.copy_(master)
            if linear.bias is not None:
                layer.bias.copy_(linear.bias)
        return layer

    def quantized_weight(self) -> Tensor:
        """The fake-quantized master weight (fp32) the forward uses; differentiable (straight-through)."""
        return ops.fake_quantize(
            self.weight, self.w_bits, self.w_symmetric, self.w_granularity, self.w_group_size, self.w_clip_ratio
        )

    def unrotated_weight(self) -> Tensor:
        """The master weight in the original input basis, W = (W·Rᵀ)·R (fp32, detached)."""
        w = self.weight.detach()
        if self.quantizer.online_rotation:
            w = ops.hadamard_transform(w, signs=self.rotation_signs, transpose=True)
        return w

    def forward(self, x: Tensor) -> Tensor:
        x = self.quantizer(x, self.rotation_signs)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.quantized_weight().to(x.dtype), bias)

    @torch.no_grad()
    def export(self) -> "Int4Linear":
        """The packed inference layer: int4 weight (two codes a byte), the same activation rotation and
        quantization. Its outputs match this layer's up to float rounding (the weights are bit-identical)."""
        if self.w_bits != 4:
            raise ValueError(f"export() packs 4-bit weights; this layer has w_bits={self.w_bits}")
        if self.in_features % 2:
            raise ValueError(f"export() needs an even in_features to pack two codes a byte, got {self.in_features}")
        packed, scale, zero = ops.quantize_int4(self.weight, self.w_group_size, self.w_symmetric, self.w_clip_ratio)
        return Int4Linear(self, packed, scale, zero)

    def extra_repr(self) -> str:
        q = self.quantizer
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"w_bits={self.w_bits}, a_bits={q.a_bits}, w_group_size={self.w_group_size}, "
            f"online_rotation={q.online_rotation}"
        )


class Int4Linear(nn.Module):
    """An exported RotatedQuantLinear: int4 weight (layout in csrc/include/ftcore/quant.h) with float32 scales
    and uint8 zero points, multiplied by ``ops.int4_linear`` (dequantized a block at a time); activations are
    rotated and fake-quantized exactly as in training. Inference only."""

    def __init__(self, source: RotatedQuantLinear, packed: Tensor, scale: Tensor, zero_point: Tensor):
        super().__init__()
        self.in_features, self.out_features = source.in_features, source.out_features
        self.group_size = source.w_group_size
        self.quantizer = source.quantizer
        self.register_buffer("packed", packed)
        self.register_buffer("scale", scale)
        self.register_buffer("zero_point", zero_point)
        self.register_buffer("bias", None if source.bias is None else source.bias.detach().clone())
        self.register_buffer(
            "rotation_signs", None if source.rotation_signs is None else source.rotation_signs.clone()
        )

    def forward(self, x: Tensor) -> Tensor:
        x = self.quantizer(x, self.rotation_signs)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return ops.int4_linear(x, self.packed, self.scale, self.zero_point, self.group_size, bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}, "
            f"online_rotation={self.quantizer.online_rotation}"
        )
