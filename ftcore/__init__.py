"""ftcore: compiled kernels and drop-in modules for fine-tuning Hugging Face models cheaply without wrecking
what they already know.

    import ftcore
    ftcore.apply(model, ftcore.SparseDeltaConfig(density=0.01))
    optimizer = torch.optim.AdamW(ftcore.trainable_parameters(model), lr=1e-4)
    ...
    ftcore.save_adapter(model, "out/")
"""

from ._version import __version__
from ._loader import check_registrations, cuda_kernels_available  # loads ftcore._C; fails loudly

from . import _autograd, _fake  # noqa: F401  (registrations)
from . import ops, reference
from .api import apply, compose, disable, load_adapter, merge, save_adapter, trainable_parameters, unmerge
from .nn import SparseDeltaLinear
from .tuners import SparseDeltaCallback, SparseDeltaConfig, SparseDeltaScheduler

__all__ = [
    "__version__",
    "apply",
    "trainable_parameters",
    "save_adapter",
    "load_adapter",
    "merge",
    "unmerge",
    "compose",
    "disable",
    "SparseDeltaConfig",
    "SparseDeltaLinear",
    "SparseDeltaScheduler",
    "SparseDeltaCallback",
    "cuda_kernels_available",
    "check_registrations",
    "ops",
    "reference",
]
