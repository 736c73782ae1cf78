"""Model surgery per method: configs, target matching, selection, adapter files, training dynamics, planning."""

from .planner import BackpropPlan, plan_backprop
from .scheduler import SparseDeltaCallback, SparseDeltaScheduler
from .sparse_delta import SparseDeltaConfig
from .structured import StructuredSparseConfig
from .targets import find_targets

__all__ = [
    "SparseDeltaConfig",
    "StructuredSparseConfig",
    "SparseDeltaScheduler",
    "SparseDeltaCallback",
    "BackpropPlan",
    "plan_backprop",
    "find_targets",
]
