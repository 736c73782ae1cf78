"""What ftcore needs from torch.distributed: every rank makes the same choices from the whole batch.

Data-driven choices (gradient and activation selection, the backprop planner, SpIEL's regrowth) reduce their
statistics over the ranks before choosing, and `apply` checks that every rank ended with the same positions
and the same W0 values there. These run only when a default process group is initialised with more than one
rank, and every rank must make the same calls in the same order (as in any SPMD script: every rank runs
`ftcore.apply`, the scheduler, the calibration).

ftcore's collectives run in a process group of their own, so that the few issued during a backward pass (a
gradient probe's first batch) never interleave with DDP's bucketed all-reduces in the default group.
"""

from typing import Dict, List

import torch
import torch.distributed as dist
from torch import Tensor

_group = None


def active() -> bool:
    """Whether ftcore's choices must agree across ranks (a process group with more than one rank)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _ftcore_group():
    global _group
    if _group is None:
        _group = dist.new_group()  # collective: every rank reaches here in the same order
    return _group


def all_reduce_sum_(t: Tensor) -> Tensor:
    """Sums `t` over the ranks, in place (a no-op without a process group). Returns it."""
    if active():
        dist.all_reduce(t, group=_ftcore_group())
    return t


def union_over_ranks(positions: Tensor) -> Tensor:
    """The sorted union of every rank's 1-D integer `positions` (this rank's own without a process group)."""
    if not active():
        return torch.unique(positions)
    group = _ftcore_group()
    world = dist.get_world_size()
    count = torch.tensor([positions.numel()], dtype=torch.int64, device=positions.device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count, group=group)
    width = int(max(c.item() for c in counts))
    padded = torch.full((width,), -1, dtype=torch.int64, device=positions.device)
    padded[: positions.numel()] = positions.long()
    gathered = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded, group=group)
    everything = torch.cat(gathered)
    return torch.unique(everything[everything >= 0]).to(positions.dtype)


def _fingerprint(t: Tensor) -> Tensor:
    """Two float64 numbers that differ, in practice, for any two different tensors of one shape."""
    flat = t.detach().reshape(-1).double()
    weights = torch.arange(1, flat.numel() + 1, dtype=torch.float64, device=flat.device).remainder_(9973).add_(1)
    return torch.stack([flat.sum(), (flat * weights).sum()])


def check_same_on_every_rank(what: str, tensors: Dict[str, Tensor]) -> None:
    """Raises RuntimeError naming the first tensor that differs between ranks (nothing without a process
    group). One all-gather of two numbers a tensor."""
    if not active() or not tensors:
        return
    names = list(tensors)
    mine = torch.stack([_fingerprint(tensors[n]).cpu() for n in names])
    device = next(iter(tensors.values())).device
    mine = mine.to(device)
    gathered: List[Tensor] = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, mine, group=_ftcore_group())
    for rank, theirs in enumerate(gathered):
        differs = (theirs != mine).any(1)
        if bool(differs.any()):
            name = names[int(differs.nonzero()[0])]
            raise RuntimeError(
                f"{what}: rank {dist.get_rank()} and rank {rank} differ at {name!r}. Every rank must build the same "
                "base model (same weights: seed its initialisation or load the same checkpoint) and apply the same "
                "config with the same seed before DDP wraps it"
            )
