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

import contextlib
import math
from typing import Dict, Iterator, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops
from ..hadamard import hadamard_factors, random_signs

__all__ = ["RotatedQuantLinear", "Int4Linear", "QuantErrorLog", "optional_bits"]


def optional_bits(bits, name: str) -> Optional[int]:
    """A quantizer's bit width: 2–8, or None / 16 for no quantization (full precision)."""
    if bits is None or (bits == 16 and not isinstance(bits, bool)):
        return None
    return ops._check_bits(bits, name)


class QuantErrorLog:
    """Mean squared quantization errors by name, summed over the forwards run inside ``recording()``: what
    ftcore's adaptive rotation compares (RoSTE's lower level). Layers and attention report into the active log
    only when they carry an ``error_name``."""

    active: Optional["QuantErrorLog"] = None

    def __init__(self):
        self.sums: Dict[Tuple, list] = {}

    def add(self, name: Tuple, exact: Tensor, quantized: Tensor) -> None:
        entry = self.sums.setdefault(name, [0.0, 0])
        entry[0] += float((quantized.detach().double() - exact.detach().double()).square().sum())
        entry[1] += exact.numel()

    def mean(self, name: Tuple) -> float:
        total, count = self.sums[name]
        return total / count

    @contextlib.contextmanager
    def recording(self) -> Iterator["QuantErrorLog"]:
        previous, QuantErrorLog.active = QuantErrorLog.active, self
        try:
            yield self
        finally:
            QuantErrorLog.active = previous


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

    def __init__(self, in_features: int, a_bits, a_group_size, a_symmetric, a_clip_ratio, online_rotation,
                 rotation_block_size=None):
        self.a_bits, self.a_symmetric, self.a_clip_ratio = a_bits, a_symmetric, a_clip_ratio
        self.a_granularity, self.a_group_size = _granularity("a_group_size", a_group_size, "token")
        if a_group_size is not None and in_features % a_group_size:
            raise ValueError(f"a_group_size ({a_group_size}) must divide in_features ({in_features})")
        self.online_rotation = online_rotation
        if rotation_block_size is not None:
            if isinstance(rotation_block_size, bool) or not isinstance(rotation_block_size, int) or rotation_block_size < 1 \
                    or in_features % rotation_block_size:
                raise ValueError(f"rotation_block_size must be a positive divisor of in_features ({in_features}), "
                                 f"got {rotation_block_size!r}")
            hadamard_factors(rotation_block_size)  # a clear error now for a block with no Hadamard matrix
        elif online_rotation:
            hadamard_factors(in_features)  # a clear error now for a size with no Hadamard matrix
        self.rotation_block_size = rotation_block_size

    def settings(self) -> dict:
        return dict(a_bits=self.a_bits, a_group_size=self.a_group_size, a_symmetric=self.a_symmetric,
                    a_clip_ratio=self.a_clip_ratio, online_rotation=self.online_rotation,
                    rotation_block_size=self.rotation_block_size)

    def rotate(self, x: Tensor, signs: Optional[Tensor], transpose: bool = False) -> Tensor:
        """The online rotation (full, or block-diagonal with rotation_block_size) or its transpose."""
        return ops.hadamard_transform(x, signs=signs, transpose=transpose, block_size=self.rotation_block_size)

    def exact(self, x: Tensor, signs: Optional[Tensor]) -> Tensor:
        """The activation before its quantization (rotated when the rotation is online)."""
        return self.rotate(x, signs) if self.online_rotation else x

    def __call__(self, x: Tensor, signs: Optional[Tensor]) -> Tensor:
        if self.online_rotation and self.a_bits is not None and self.rotation_block_size is None:
            return ops.rotate_fake_quantize(
                x, self.a_bits, self.a_symmetric, self.a_granularity, self.a_group_size, self.a_clip_ratio, signs=signs
            )
        if self.online_rotation:  # (block-diagonal: the rotation, then the quantizer, unfused)
            x = self.rotate(x, signs)
        if self.a_bits is not None:
            x = ops.fake_quantize(x, self.a_bits, self.a_symmetric, self.a_granularity, self.a_group_size, self.a_clip_ratio)
        return x


class RotatedQuantLinear(nn.Module):
    """Drop-in for ``nn.Linear`` in quantization-aware fine-tuning.

    w_bits / a_bits: weight / input-activation bits (2–8; None or 16 leaves that side in full precision).
    w_group_size: None for one scale per output channel, else per group of that many input columns.
    a_group_size: None for one scale per token, else per group. *_symmetric, *_clip_ratio: as ops.fake_quantize.
    online_rotation: rotate the input by R = H·diag(s)/√in at run time (fused with its fake quantization) and fold
        Rᵀ into the weight once; in_features must be a supported Hadamard size (ftcore.hadamard.is_supported).
    rotation_block_size: make that rotation block-diagonal, H_b on each run of b inputs (b a supported size
        dividing in_features): for sizes with no full Hadamard matrix. Rotation and quantizer then run unfused.
    rotation_seed: the seed of the random ±1 diagonal s (None: no signs, the plain Hadamard matrix).
    w_learnable_scale: learn the weight's quantization scale (LSQ, Esser et al.) as ``weight_scale`` (rows ×
        groups, float32), initialised to the min/max scale the layer would use otherwise; needs w_symmetric. Its
        gradient is scaled by LSQ's 1/√(elements per scale · q_max), and the export packs with the learned scale.

    ``weight`` is the fp32 master (fp64 for a float64 layer; in the rotated basis when online_rotation);
    ``bias`` stays as given. ``error_name``, when set, names the layer's weight and input quantization errors in
    the active QuantErrorLog.
    """

    error_name: Optional[Tuple] = None

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        w_bits: Optional[int] = 4,
        a_bits: Optional[int] = 4,
        w_group_size: Optional[int] = None,
        a_group_size: Optional[int] = None,
        w_symmetric: bool = True,
        a_symmetric: bool = True,
        w_clip_ratio: float = 1.0,
        a_clip_ratio: float = 1.0,
        online_rotation: bool = False,
        rotation_seed: Optional[int] = 0,
        rotation_block_size: Optional[int] = None,
        w_learnable_scale: bool = False,
        device=None,
        dtype=None,
    ):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.w_bits = optional_bits(w_bits, "w_bits")
        self.w_granularity, self.w_group_size = _granularity("w_group_size", w_group_size, "channel")
        if w_group_size is not None and in_features % w_group_size:
            raise ValueError(f"w_group_size ({w_group_size}) must divide in_features ({in_features})")
        self.w_symmetric, self.w_clip_ratio = w_symmetric, w_clip_ratio
        self.quantizer = _Quantizer(
            in_features, optional_bits(a_bits, "a_bits"), a_group_size, a_symmetric, a_clip_ratio, online_rotation,
            rotation_block_size,
        )
        master = torch.float64 if dtype == torch.float64 else torch.float32
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=master))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None
        self.register_buffer(
            "rotation_signs",
            random_signs(in_features, rotation_seed, device=device) if online_rotation and rotation_seed is not None else None,
        )
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)
        if not isinstance(w_learnable_scale, bool):
            raise ValueError(f"w_learnable_scale must be a bool, got {w_learnable_scale!r}")
        if w_learnable_scale and (self.w_bits is None or not w_symmetric):
            raise ValueError("w_learnable_scale needs quantized (w_bits 2–8), symmetric (w_symmetric=True) weights: "
                             "LSQ learns a scale, not a zero point")
        groups = 1 if w_group_size is None else in_features // w_group_size
        self.weight_scale = (
            nn.Parameter(torch.ones(out_features, groups, device=device, dtype=torch.float32)) if w_learnable_scale else None
        )
        self.reset_weight_scale()

    @torch.no_grad()
    def reset_weight_scale(self) -> None:
        """The learnable scale set to the min/max scale of the current master weight (a no-op without one)."""
        if self.weight_scale is not None:
            _, scale, _ = ops.fake_quantize(self.weight, self.w_bits, True, self.w_granularity, self.w_group_size,
                                            self.w_clip_ratio, return_params=True)
            self.weight_scale.copy_(scale)

    def _weight_scale(self) -> Optional[Tensor]:
        """The learnable scale as the quantizer takes it: the parameter's value, its gradient scaled by LSQ's
        1/√(elements per scale · q_max) (so its step is of the weights' order). A value an optimizer step took to
        zero or below is floored at a tiny positive one straight-through: the gradient still reaches the
        parameter, so the scale can come back (a plain clamp would zero it and freeze the channel for good)."""
        if self.weight_scale is None:
            return None
        per_scale = self.in_features // self.weight_scale.shape[1]
        g = 1.0 / math.sqrt(per_scale * (2 ** (self.w_bits - 1) - 1))
        s = self.weight_scale * g + self.weight_scale.detach() * (1 - g)
        return s + (s.detach().clamp_min(1e-12) - s.detach())

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
            master = w.detach()
            if layer.quantizer.online_rotation:
                # (W·Rᵀ)[o, :] = R·W[o, :]: the rotation of each row, once, computed in float64.
                master = layer.quantizer.rotate(master.double(), layer.rotation_signs)
            layer.weight.copy_(master)
            if linear.bias is not None:
                layer.bias.copy_(linear.bias)
        layer.reset_weight_scale()
        return layer

    def settings(self) -> dict:
        """The constructor's arguments (what ftcore.save_quantized records to rebuild the layer; the signs
        themselves are a buffer of the saved state)."""
        return dict(in_features=self.in_features, out_features=self.out_features, bias=self.bias is not None,
                    w_bits=self.w_bits, w_group_size=self.w_group_size, w_symmetric=self.w_symmetric,
                    w_clip_ratio=self.w_clip_ratio, rotation_seed=0 if self.rotation_signs is not None else None,
                    w_learnable_scale=self.weight_scale is not None, **self.quantizer.settings())

    def quantized_weight(self) -> Tensor:
        """The fake-quantized master weight the forward uses; differentiable (straight-through). The master
        itself when w_bits is None."""
        if self.w_bits is None:
            return self.weight
        return ops.fake_quantize(
            self.weight, self.w_bits, self.w_symmetric, self.w_granularity, self.w_group_size, self.w_clip_ratio,
            scale=self._weight_scale(),
        )

    def unrotated_weight(self) -> Tensor:
        """The master weight in the original input basis, W = (W·Rᵀ)·R (fp32, detached)."""
        w = self.weight.detach()
        if self.quantizer.online_rotation:
            w = self.quantizer.rotate(w, self.rotation_signs, transpose=True)
        return w

    def forward(self, x: Tensor) -> Tensor:
        xq, w = self.quantizer(x, self.rotation_signs), self.quantized_weight()
        log = QuantErrorLog.active
        if log is not None and self.error_name is not None:
            log.add((*self.error_name, "weight"), self.weight, w)
            log.add((*self.error_name, "input"), self.quantizer.exact(x, self.rotation_signs), xq)
        bias = None if self.bias is None else self.bias.to(xq.dtype)
        return F.linear(xq, w.to(xq.dtype), bias)

    @torch.no_grad()
    def export(self) -> "Int4Linear":
        """The packed inference layer: int4 weight (two codes a byte), the same activation rotation and
        quantization. Its outputs match this layer's up to float rounding (the weights are bit-identical)."""
        if self.w_bits != 4:
            raise ValueError(f"export() packs 4-bit weights; this layer has w_bits={self.w_bits}")
        if self.in_features % 2:
            raise ValueError(f"export() needs an even in_features to pack two codes a byte, got {self.in_features}")
        if self.weight_scale is None:
            packed, scale, zero = ops.quantize_int4(self.weight, self.w_group_size, self.w_symmetric, self.w_clip_ratio)
        else:  # the learned scale: codes = level + 8 (symmetric int4), the same levels the forward rounds to
            scale = self._weight_scale().detach()
            levels = ops.fake_quantize(self.weight, 4, True, self.w_granularity, self.w_group_size, scale=scale)
            levels = (levels.unflatten(1, (scale.shape[1], -1)) / scale.unsqueeze(-1)).round().flatten(1)
            packed = ops.pack_int4((levels + 8).to(torch.uint8))
            zero = torch.full_like(scale, 8, dtype=torch.uint8)
        layer = Int4Linear(self.in_features, self.out_features, self.bias is not None, group_size=self.w_group_size,
                           rotation_signs=self.rotation_signs is not None, device=self.weight.device,
                           dtype=self.weight.dtype if self.bias is None else self.bias.dtype, **self.quantizer.settings())
        layer.packed.copy_(packed)
        layer.scale.copy_(scale)
        layer.zero_point.copy_(zero)
        if self.bias is not None:
            layer.bias.copy_(self.bias)
        if self.rotation_signs is not None:
            layer.rotation_signs.copy_(self.rotation_signs)
        return layer

    def extra_repr(self) -> str:
        q = self.quantizer
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"w_bits={self.w_bits}, a_bits={q.a_bits}, w_group_size={self.w_group_size}, "
            f"online_rotation={q.online_rotation}"
        )


class Int4Linear(nn.Module):
    """An exported RotatedQuantLinear: int4 weight (layout in csrc/include/ftcore/quant.h) with float32 scales
    and uint8 zero points, multiplied by ``ops.int4_linear`` (on the CPU a matrix-vector kernel for up to 32 rows,
    otherwise dequantized a block at a time for a GEMM); activations are rotated and fake-quantized exactly as in
    training. Inference only."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        group_size: Optional[int] = None,
        a_bits: Optional[int] = 4,
        a_group_size: Optional[int] = None,
        a_symmetric: bool = True,
        a_clip_ratio: float = 1.0,
        online_rotation: bool = False,
        rotation_signs: bool = False,
        rotation_block_size: Optional[int] = None,
        device=None,
        dtype=torch.float32,
    ):
        """An empty (zero) layer of this shape and configuration; ``RotatedQuantLinear.export()`` and
        ``ftcore.load_quantized`` fill it."""
        super().__init__()
        if in_features % 2:
            raise ValueError(f"Int4Linear packs two codes a byte: in_features must be even, got {in_features}")
        self.in_features, self.out_features = in_features, out_features
        self.group_size = _granularity("group_size", group_size, "channel")[1]
        groups = 1 if group_size is None else in_features // group_size
        self.quantizer = _Quantizer(in_features, optional_bits(a_bits, "a_bits"), a_group_size, a_symmetric,
                                    a_clip_ratio, online_rotation, rotation_block_size)
        self.register_buffer("packed", torch.zeros(out_features, in_features // 2, dtype=torch.uint8, device=device))
        self.register_buffer("scale", torch.ones(out_features, groups, dtype=torch.float32, device=device))
        self.register_buffer("zero_point", torch.zeros(out_features, groups, dtype=torch.uint8, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)
        self.register_buffer("rotation_signs", torch.ones(in_features, device=device) if rotation_signs else None)

    def settings(self) -> dict:
        """The constructor's arguments (what ftcore.save_quantized records to rebuild the layer)."""
        return dict(in_features=self.in_features, out_features=self.out_features, bias=self.bias is not None,
                    group_size=self.group_size, rotation_signs=self.rotation_signs is not None,
                    **self.quantizer.settings())

    def forward(self, x: Tensor) -> Tensor:
        x = self.quantizer(x, self.rotation_signs)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return ops.int4_linear(x, self.packed, self.scale, self.zero_point, self.group_size, bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}, "
            f"online_rotation={self.quantizer.online_rotation}"
        )
