"""Drop-in nn.Module replacements built on ftcore's kernels."""

from .sparse_delta import GradientProbe, SparseDeltaLinear, is_linear_like, logical_weight

__all__ = ["SparseDeltaLinear", "GradientProbe", "is_linear_like", "logical_weight"]
