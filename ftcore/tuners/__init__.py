"""Model surgery per method: configs, target matching, selection, adapter files, training dynamics."""

from .scheduler import SparseDeltaCallback, SparseDeltaScheduler
from .sparse_delta import SparseDeltaConfig
from .targets import find_targets

__all__ = ["SparseDeltaConfig", "SparseDeltaScheduler", "SparseDeltaCallback", "find_targets"]
