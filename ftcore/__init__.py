"""ftcore: compiled kernels and drop-in modules for fine-tuning Hugging Face models cheaply without wrecking
what they already know.

    import ftcore
    ftcore.apply(model, ftcore.SparseDeltaConfig(density=0.01))            # sparse deltas (SpIEL, LT-SFT)
    # or ftcore.apply(model, ftcore.StructuredSparseConfig(head_ratio=0.05, channel_ratio=0.02))   # S²FT
    optimizer = torch.optim.AdamW(ftcore.trainable_parameters(model), lr=1e-4)
    ...
    ftcore.save_adapter(model, "out/")
"""

from ._version import __version__
from ._loader import check_registrations, cuda_kernels_available  # loads ftcore._C and defines the ops; fails loudly
from . import hadamard, ops, reference
from .ops import fake_quantize, hadamard_transform, rotate_fake_quantize
from .api import (
    apply,
    compose,
    disable,
    load_adapter,
    merge,
    read_adapter,
    save_adapter,
    switch_adapter,
    trainable_parameters,
    unmerge,
)
from .regularizers import DiagonalFisher, ewc_penalty, l2_to_base
from .losses import causal_lm_loss
from .nn import Int4Linear, RotatedQuantLinear, SparseDeltaLinear, StructuredSparseLinear
from .tuners.quantize import QuantConfig, RotationPlan, export_int4
from .tuners.quant_files import load_quantized, save_quantized
from .tuners import (
    BackpropPlan,
    SparseDeltaConfig,
    SparseDeltaScheduler,
    StructuredSparseConfig,
    plan_backprop,
)

__all__ = [
    "__version__",
    "apply",
    "trainable_parameters",
    "save_adapter",
    "load_adapter",
    "switch_adapter",
    "read_adapter",
    "merge",
    "unmerge",
    "compose",
    "disable",
    "l2_to_base",
    "DiagonalFisher",
    "ewc_penalty",
    "causal_lm_loss",
    "FusedLossTrainer",
    "SparseDeltaConfig",
    "SparseDeltaLinear",
    "StructuredSparseConfig",
    "StructuredSparseLinear",
    "RotatedQuantLinear",
    "Int4Linear",
    "QuantConfig",
    "RotationPlan",
    "export_int4",
    "save_quantized",
    "load_quantized",
    "plan_backprop",
    "BackpropPlan",
    "SparseDeltaScheduler",
    "SparseDeltaCallback",
    "SaveAdapterCallback",
    "hadamard_transform",
    "fake_quantize",
    "rotate_fake_quantize",
    "hadamard",
    "cuda_kernels_available",
    "check_registrations",
    "ops",
    "reference",
]


def __getattr__(name):
    if name in ("SparseDeltaCallback", "SaveAdapterCallback"):  # loaded on first use (see ftcore.tuners)
        from . import tuners

        return getattr(tuners, name)
    if name == "FusedLossTrainer":  # imports transformers' Trainer on first use
        from . import losses

        return losses.FusedLossTrainer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
