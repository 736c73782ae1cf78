"""The one validation entry point for index values, shared by the public wrappers (ftcore.ops) and the modules.

The policy, the same on CPU and CUDA:
- shapes, dtypes, devices and memory overlap are checked by the kernels' argument checks (csrc/*_args.cpp, one
  code path for both devices) on every call;
- index values (range, order) are checked here: by every public wrapper call, and by the modules once, when they
  set their indices (construction, ``set_delta``/``set_block``, ``load_state_dict``). The modules' hot paths (the
  merged refresh, the unmerged products, the gradient in backward) pass ``checked=True`` to the wrappers and skip
  it: their indices were proven when set. (Writing into an index buffer by hand bypasses that proof; the kernels'
  guard below still stops it from touching memory out of bounds);
- the kernels themselves only guard memory (a raw ``torch.ops.ftcore`` call with a bad index raises on the CPU, or
  trips a device-side assert on CUDA, and never reads or writes out of bounds); they do not re-validate.
"""

import torch
from torch import Tensor


def check_delta_indices(indices: Tensor, numel: int, *, name: str = "indices", strict: bool = False) -> None:
    """Raises a clear error unless `indices` is a 1-D int32/int64 tensor, sorted (strictly increasing when
    `strict`, i.e. no duplicates), with every entry in [0, numel). One host sync for a CUDA tensor (two when it
    fails, to name the entry). Under torch.compile the values are not read (that would break the graph); the
    kernels' memory guard still holds there."""
    if not isinstance(indices, Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(indices).__name__}")
    if indices.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name} must be int32 or int64, got {indices.dtype}")
    if indices.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(indices.shape)}")
    if indices.numel() == 0 or torch.compiler.is_compiling():
        return
    steps = indices[1:] - indices[:-1]
    out_of_order = (steps <= 0) if strict else (steps < 0)
    lo, hi = torch.aminmax(indices)
    # Compared in Python: numel may not fit the index dtype (int32 positions of a weight with 2^31+ entries).
    lo, hi, disordered = torch.stack((lo.long(), hi.long(), out_of_order.any().long())).tolist()  # the one sync
    if lo >= 0 and hi < numel and not disordered:
        return
    if lo < 0 or hi >= numel:
        outside = ((indices.long() < 0) | (indices.long() >= numel)).nonzero()
        t = int(outside[0])
        raise IndexError(f"{name}[{t}] = {int(indices[t])} is out of range [0, {numel})")
    t = int(out_of_order.nonzero()[0])
    what = "strictly increasing (sorted, no repeats)" if strict else "sorted (non-decreasing)"
    raise ValueError(
        f"{name} must be {what}, but {name}[{t}] = {int(indices[t])} and {name}[{t + 1}] = {int(indices[t + 1])}"
    )
