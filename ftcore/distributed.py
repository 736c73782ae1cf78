"""What ftcore needs from torch.distributed: every rank makes the same choices from the whole batch.

Data-driven choices (gradient and activation selection, the backprop planner, SpIEL's regrowth) reduce their
statistics over the ranks before choosing; the model's first forward inside DDP and every regrowth check that
every rank holds the same positions and the same W0 values there. These run only when a default process group
is initialised with more than one rank, and every rank must make the same calls in the same order (as in any
SPMD script: every rank runs the data-driven `ftcore.apply`, the scheduler, the calibration).

ftcore's collectives run in a process group of their own (over all ranks, or the data-parallel ranks given to
`set_data_parallel_group`), so that the few issued during a backward pass (a gradient probe's first batch, a
calibration batch's gradient statistics) never interleave with DDP's bucketed all-reduces. With the NCCL
backend they run on the current CUDA device, wherever the model is.
"""

from typing import Dict, List

import torch
import torch.distributed as dist
from torch import Tensor

_group = None
_ranks = None  # None: every rank


def set_data_parallel_group(ranks) -> None:
    """The ranks whose ftcore choices must agree: the data-parallel replicas of one model (default: all). Call it
    on every rank, with this rank's replica group, before ftcore.apply (tensor or pipeline parallel layouts)."""
    global _group, _ranks
    _ranks, _group = (None if ranks is None else sorted(int(r) for r in ranks)), None


def active() -> bool:
    """Whether ftcore's choices must agree across ranks (a process group with more than one rank)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1 and (_ranks is None or len(_ranks) > 1)


def _size() -> int:
    return dist.get_world_size() if _ranks is None else len(_ranks)


def _comm(t: Tensor) -> Tensor:
    """t on a device the backend can reduce: the current CUDA device under NCCL, else the CPU."""
    nccl = dist.get_backend() == "nccl"
    return t.to(torch.device("cuda", torch.cuda.current_device()) if nccl else "cpu")


def inside_ddp_forward() -> bool:
    """Whether a DistributedDataParallel forward is running (every rank is inside it)."""
    from torch.nn.parallel import DistributedDataParallel

    getter = getattr(DistributedDataParallel, "_get_active_ddp_module", None)
    return active() and getter is not None and getter() is not None


def _ftcore_group():
    global _group
    if _group is None:
        _group = dist.new_group(ranks=_ranks)  # collective: every rank reaches here in the same order
    return _group


def all_reduce_sum_(t: Tensor) -> Tensor:
    """Sums `t` over the ranks, in place (a no-op without a process group). Returns it."""
    if active():
        buffer = _comm(t)
        dist.all_reduce(buffer, group=_ftcore_group())
        if buffer is not t:
            t.copy_(buffer)
    return t


def all_agree(flag: bool) -> bool:
    """Whether `flag` holds on every rank (this rank's flag without a process group)."""
    if not active():
        return flag
    t = _comm(torch.tensor([0 if flag else 1], dtype=torch.int64))
    dist.all_reduce(t, group=_ftcore_group())
    return int(t.item()) == 0


def union_over_ranks(positions: Tensor) -> Tensor:
    """The sorted union of every rank's 1-D integer `positions` (this rank's own without a process group)."""
    if not active():
        return torch.unique(positions)
    group, world = _ftcore_group(), _size()
    width = max(_gather_counts(positions.numel()))
    padded = _comm(torch.full((width,), -1, dtype=torch.int64))
    padded[: positions.numel()] = _comm(positions.long())
    gathered = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded, group=group)
    everything = torch.cat(gathered)
    return torch.unique(everything[everything >= 0]).to(device=positions.device, dtype=positions.dtype)


def _gather_counts(n: int) -> List[int]:
    """Every rank's `n`, in rank order (under an active process group)."""
    count = _comm(torch.tensor([n], dtype=torch.int64))
    counts = [torch.zeros_like(count) for _ in range(_size())]
    dist.all_gather(counts, count, group=_ftcore_group())
    return [int(c.item()) for c in counts]


def check_same_count(what: str, n: int) -> None:
    """Raises RuntimeError on every rank unless `n` is the same on every rank (nothing without a process group)."""
    if not active():
        return
    values = _gather_counts(n)
    if len(set(values)) > 1:
        raise RuntimeError(f"{what} differs between the ranks: {values}")


def _fingerprint(t: Tensor) -> Tensor:
    """Two float64 numbers that differ, in practice, for any two different tensors of one shape."""
    flat = t.detach().reshape(-1).double()
    weights = torch.arange(1, flat.numel() + 1, dtype=torch.float64, device=flat.device).remainder_(9973).add_(1)
    return torch.stack([flat.sum(), (flat * weights).sum()])


def check_same_on_every_rank(what: str, tensors: Dict[str, Tensor]) -> None:
    """Raises RuntimeError naming the first tensor that differs between ranks (nothing without a process
    group). One all-gather of two numbers a tensor."""
    if not active():
        return
    names = list(tensors)
    check_same_count(f"{what}: the number of ftcore layers", len(names))  # first: unequal shapes would hang a gather
    if not names:
        return
    group, world = _ftcore_group(), _size()
    mine = _comm(torch.stack([_fingerprint(tensors[n]).cpu() for n in names]))
    gathered: List[Tensor] = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(gathered, mine, group=group)
    for rank, theirs in enumerate(gathered):
        differs = (theirs != mine).any(1)
        if bool(differs.any()):
            name = names[int(differs.nonzero()[0])]
            raise RuntimeError(
                f"{what}: rank {dist.get_rank()} and rank {rank} differ at {name!r}. Every rank must build the same "
                "base model (same weights: seed its initialisation or load the same checkpoint) and apply the same "
                "config with the same seed before the engine (DDP, FSDP, DeepSpeed) wraps it"
            )
