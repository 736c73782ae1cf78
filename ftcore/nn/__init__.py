"""Drop-in nn.Module replacements built on ftcore's kernels."""

from .base import DeltaLinear, is_linear_like, logical_weight
from .sparse_delta import GradientProbe, SparseDeltaLinear
from .quant import Int4Linear, RotatedQuantLinear
from .structured import StructuredSparseLinear

__all__ = [
    "DeltaLinear",
    "SparseDeltaLinear",
    "StructuredSparseLinear",
    "RotatedQuantLinear",
    "Int4Linear",
    "GradientProbe",
    "is_linear_like",
    "logical_weight",
]
