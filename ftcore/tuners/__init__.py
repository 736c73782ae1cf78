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
    "SaveAdapterCallback",
    "BackpropPlan",
    "plan_backprop",
    "find_targets",
]


def __getattr__(name):
    if name in ("SparseDeltaCallback", "SaveAdapterCallback"):  # import the Trainer's machinery: on first use only
        from . import callback

        return getattr(callback, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
