"""Loads the compiled extension, refusing loudly when it is missing or was built for another torch."""

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

OPS = (
    "sparse_delta_grad",
    "sparse_delta_linear",
    "sparse_delta_linear_transpose",
    "sparse_delta_scatter_",
    "sparse_delta_gather",
    "sparse_delta_topk",
    "gather_columns",
    "scatter_columns",
    "structured_block_grad",
    "structured_block_scatter_",
    "structured_block_gather",
    "multi_adapter_linear",
    "hadamard_transform",
    "fake_quantize",
    "fake_quantize_backward",
    "rotate_fake_quantize",
    "rotate_fake_quantize_backward",
    "quantize_int4",
    "pack_int4",
    "unpack_int4",
    "dequantize_int4",
    "int4_linear",
)


def cuda_kernels_available() -> bool:
    """Whether the CUDA kernels were compiled into this build (a GPU may still be absent)."""
    return bool(_C.cuda_kernels)


def check_registrations(device: str = "CPU") -> list:
    """Raises RuntimeError unless every ftcore op has a kernel for `device` ("CPU" or "CUDA"); returns the ops."""
    missing = [op for op in OPS if not torch._C._dispatch_has_kernel_for_dispatch_key(f"ftcore::{op}", device)]
    if missing:
        raise RuntimeError(f"ftcore ops without a {device} kernel: {', '.join(missing)}")
    return list(OPS)
