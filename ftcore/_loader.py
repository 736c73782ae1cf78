"""Loads the compiled extension, refusing loudly when it is missing or was built for another torch, then defines
the ops of the op table (_op_table.py) around its kernels."""

import torch

try:
    from . import _C
except ImportError as exc:  # the .so is absent, or references symbols this torch does not have
    raise ImportError(
        f"ftcore's compiled extension (ftcore._C) could not be loaded: {exc}. Build it against the torch you run "
        f"(torch {torch.__version__}) with `pip install --no-build-isolation .` or `make build`."
    ) from exc

if _C.torch_version != torch.__version__:
    raise ImportError(
        f"ftcore._C was built against torch {_C.torch_version}, but torch {torch.__version__} is installed. "
        "Rebuild ftcore with `pip install --no-build-isolation --force-reinstall .` against this torch."
    )

if not hasattr(_C, "bump_version_after_write"):  # built from sources older than the op table
    raise ImportError(
        "ftcore._C was built from older ftcore sources (it defines its own op schemas). Rebuild it with "
        "`pip install --no-build-isolation --force-reinstall .` or `make build`."
    )

from . import _op_table  # noqa: E402  (after the checks above: a stale build must not reach the dispatcher)

_op_table.register(_C)

OPS = tuple(op.name for op in _op_table.TABLE)


def cuda_kernels_available() -> bool:
    """Whether the CUDA kernels were compiled into this build (a GPU may still be absent)."""
    return bool(_C.cuda_kernels)


def check_registrations(device: str = "CPU") -> list:
    """Raises RuntimeError unless every ftcore op has a kernel for `device` ("CPU" or "CUDA"); returns the ops."""
    missing = [op for op in OPS if not torch._C._dispatch_has_kernel_for_dispatch_key(f"ftcore::{op}", device)]
    if missing:
        raise RuntimeError(f"ftcore ops without a {device} kernel: {', '.join(missing)}")
    return list(OPS)
