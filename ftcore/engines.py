"""What a distributed engine has made of a tensor, and how ftcore reads it whole.

ftcore's layers keep the frozen weight W0 and the trainable delta as ordinary Parameters. The engines that
shard parameters change them in ways the layers must see:

* FSDP2 (``fully_shard``) replaces every Parameter by a DTensor holding this rank's shard, and inside the
  unit's forward by a plain unsharded Parameter that it frees again afterwards.
* FSDP1 (``FullyShardedDataParallel``) flattens a unit's Parameters into one FlatParameter; with
  ``use_orig_params=True`` the originals become views of it (marked ``_fsdp_flattened``), of this rank's shard
  outside forward.
* DeepSpeed ZeRO-3 keeps the Parameter objects but partitions their data (``ds_id``; ``numel() == 0`` outside
  forward; the real shape in ``ds_shape``). ZeRO-1/2 leave the model's Parameters whole and step flat fp32
  copies of them (``_hp_mapping`` points there).

A write into a sharded weight is lost or lands on the wrong rank's shard, so merged mode (W0 + Δ written into
the weight) cannot run on them: ftcore's layers detect these and use the exact unmerged path instead (see
ftcore.nn.base). Nothing here imports deepspeed unless a tensor is DeepSpeed's.
"""

import contextlib
import functools
from typing import Iterable, Iterator, Optional, Tuple

import torch
from torch import Tensor, nn

FSDP1_WRAPPERS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")


@functools.lru_cache(maxsize=None)
def _has_base_named(cls: type, name: str) -> bool:
    return any(c.__name__ == name for c in cls.__mro__)


def is_dtensor(t) -> bool:
    cls = type(t)
    return cls is not nn.Parameter and cls is not torch.Tensor and _has_base_named(cls, "DTensor")


def is_fsdp2_module(module: nn.Module) -> bool:
    """Whether fully_shard has made `module` an FSDP2 unit (its class then derives from FSDPModule)."""
    return _has_base_named(type(module), "FSDPModule")


def is_zero3(t) -> bool:
    return getattr(t, "ds_id", None) is not None


def sharding_of(t: Optional[Tensor]) -> Optional[str]:
    """The engine that shards Parameter `t` ("FSDP2", "FSDP1", "DeepSpeed ZeRO-3"), or None for a whole tensor
    (single process, DDP, ZeRO-1/2). Runs before every merged forward: dictionary lookups only."""
    if t is None:
        return None
    if is_dtensor(t):
        return "FSDP2"
    marks = t.__dict__  # DeepSpeed and FSDP1 mark the Parameters they manage with instance attributes
    if marks.get("ds_id") is not None:
        return "DeepSpeed ZeRO-3"
    if marks.get("_fsdp_flattened"):
        return "FSDP1"
    return None


def needs_gather(t: Tensor) -> bool:
    """Whether reading `t` whole (or its fp32 master) takes a collective: sharded, or a DeepSpeed ZeRO-1/2
    Parameter whose fp32 master the optimizer keeps partitioned."""
    return sharding_of(t) is not None or hasattr(t, "_hp_mapping")


def logical_shape(layer: nn.Module) -> Tuple[int, int]:
    """A linear-like layer's logical (out, in) weight shape, also where ZeRO-3 has partitioned the weight
    (its data is then empty and the real shape is ``ds_shape``)."""
    from .nn.base import is_conv1d

    weight = layer.weight
    shape = tuple(weight.ds_shape) if is_zero3(weight) else tuple(weight.shape)
    if len(shape) != 2:
        raise ValueError(f"{type(layer).__name__}: expected a 2-D weight, got shape {shape}")
    return (shape[1], shape[0]) if is_conv1d(layer) else shape


@contextlib.contextmanager
def gathered(params: Iterable[Tensor]) -> Iterator[None]:
    """Inside the block, ZeRO-3-partitioned Parameters among `params` hold their whole data on every rank (read
    only: writes are dropped when they are partitioned again). Every rank must enter it together (an
    all-gather). Nothing happens for any other tensor."""
    partitioned = [p for p in params if is_zero3(p)]
    if not partitioned:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None):
        yield


def full_fp32(t: Tensor) -> Tensor:
    """The whole of `t` as a detached CPU tensor, floats in fp32 from the engine's fp32 master where it keeps
    one (DeepSpeed runs bf16/fp16 models on fp32 copies). A collective for a sharded tensor: every rank calls
    it, for the same tensors in the same order. Integer buffers are returned as they are."""
    if not t.is_floating_point():
        return t.detach().to("cpu", copy=True)
    if is_dtensor(t):
        return t.full_tensor().detach().float().cpu()
    # DeepSpeed's fp32 master, where an optimizer keeps one (not for a frozen delta, nor without an optimizer)
    if (is_zero3(t) and hasattr(t, "_z3_optimizer")) or hasattr(t, "_hp_mapping"):
        from deepspeed.utils import safe_get_full_fp32_param

        master = safe_get_full_fp32_param(t)
        if master is not None:
            return master.detach().float().cpu()
    if is_zero3(t):
        with gathered([t]):
            return t.detach().to("cpu", torch.float32, copy=True)
    # a copy: inside FSDP1's summon_full_params `t` views a buffer that is freed when the block ends
    return t.detach().to("cpu", torch.float32, copy=True)


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DistributedDataParallel or DeepSpeed engine wrapper (FSDP2 keeps the model itself;
    FSDP1's wrapper is kept, and its names are cleaned by clean_name)."""
    while (_has_base_named(type(model), "DistributedDataParallel") or _has_base_named(type(model), "DeepSpeedEngine")) \
            and isinstance(getattr(model, "module", None), nn.Module):
        model = model.module
    return model


def clean_name(name: str) -> str:
    """A module name without the segments FSDP1 and activation-checkpoint wrappers insert."""
    for segment in FSDP1_WRAPPERS:
        name = name.replace(segment, "")
    return name


def base_class(model: nn.Module) -> type:
    """The model's own class: FSDP2 makes a subclass FSDP<Name> of FSDPModule and the original class."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch without FSDP2
        return type(model)
    return next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule))


@contextlib.contextmanager
def fsdp1_full_params(model: nn.Module) -> Iterator[None]:
    """Inside the block, the Parameters of FSDP1 units under `model` (use_orig_params=True) are whole on every
    rank (a collective; no write-back). Nothing happens without FSDP1."""
    if not any(getattr(p, "_fsdp_flattened", False) for p in model.parameters()):
        yield
        return
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    with FSDP.summon_full_params(model, writeback=False):
        yield
