"""Model surgery per method: configs, target matching, selection, adapter files, training dynamics, planning."""

from .planner import BackpropPlan, plan_backprop
from .scheduler import SparseDeltaScheduler
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


def __getattr__(name):
    if name == "SparseDeltaCallback":  # imports transformers' Trainer machinery: only on first use
        from .callback import SparseDeltaCallback

        return SparseDeltaCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
