"""Drop-in nn.Module replacements built on ftcore's kernels."""

from .base import DeltaLinear, is_linear_like, logical_weight
from .sparse_delta import GradientProbe, SparseDeltaLinear
from .structured import StructuredSparseLinear

__all__ = ["DeltaLinear", "SparseDeltaLinear", "StructuredSparseLinear", "GradientProbe", "is_linear_like", "logical_weight"]
