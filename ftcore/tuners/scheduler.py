"""SpIEL's drop-and-regrow dynamics for sparse deltas, for a plain PyTorch loop and for the transformers Trainer.

Every `regrow_every` optimizer steps, each SparseDeltaLinear
  1. drops the fraction `drop_fraction` of its deltas with the smallest |Δ| (their weights return to W0);
  2. grows as many new positions where the accumulated gradient is largest. The candidates come from the
     dense gradient's top entries on the first of the last `accumulate_steps` steps (the chunked top-k: never
     a dense gradient in memory) and their exact gradients are summed over those steps;
so the number of deltas stays constant. The optimizer's per-entry state follows its entry: kept entries keep
their moments, new entries start from zero. Only state of a known layout moves (floating tensors shaped like
the values: Adam's moments, SGD's momentum, RMSprop's and Adagrad's sums); state of any other layout, such as
bitsandbytes' 8-bit codes with their per-block scales, is reset for that layer, with a warning. The drop
fraction can decay to zero with a cosine schedule (RigL's), set by `total_steps`.
"""

import math
import warnings
from typing import Callable, Dict, Optional

import torch
from torch import nn

from .. import distributed
from ..nn.sparse_delta import GradientProbe, SparseDeltaLinear


def remap_optimizer_state(state: Dict[str, object], param: torch.Tensor, remap: Callable[[torch.Tensor], torch.Tensor]) -> bool:
    """Moves a parameter's optimizer state with its entries, in place. Floating tensors of the parameter's
    shape hold one number an entry and follow it; scalars (step counts) stay. Any other tensor (quantized codes
    whose meaning depends on per-block scales, a block-shaped statistic) cannot be moved entry by entry: the
    parameter's whole state is then dropped, so that the optimizer starts it afresh. Returns False then."""
    per_entry = [v for v in state.values() if torch.is_tensor(v) and v.is_floating_point() and v.shape == param.shape]
    unknown = [k for k, v in state.items() if torch.is_tensor(v) and v.dim() > 0 and not any(v is t for t in per_entry)]
    if unknown:
        state.clear()
        return False
    for v in per_entry:
        v.copy_(remap(v))
    return True


def _unwrap_optimizer(optimizer):
    # accelerate wraps the optimizer (AcceleratedOptimizer, itself an Optimizer); its state lives inside.
    inner = getattr(optimizer, "optimizer", None)
    return inner if isinstance(inner, torch.optim.Optimizer) else optimizer


class SparseDeltaScheduler:
    """Call ``step()`` right after each ``optimizer.step()``.

    Args:
        model: a model with SparseDeltaLinear layers (after ``ftcore.apply``).
        optimizer: the optimizer holding their ``values``; its per-entry state is remapped at each regrowth.
        regrow_every: optimizer steps between regrowths (SpIEL: 20).
        accumulate_steps: steps over which candidate gradients are summed before a regrowth (SpIEL: 5).
        drop_fraction: fraction of each layer's deltas replaced at a regrowth (at step 0 of the schedule).
        total_steps: if given, the fraction decays as ``drop_fraction·(1 + cos(π·t/total_steps))/2`` and
            regrowth stops at total_steps.
        candidate_factor: candidates scored exactly per grown delta.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        regrow_every: int = 20,
        accumulate_steps: int = 5,
        drop_fraction: float = 0.2,
        total_steps: Optional[int] = None,
        candidate_factor: int = 4,
    ):
        if regrow_every < 1:
            raise ValueError(f"regrow_every must be >= 1, got {regrow_every}")
        if not 1 <= accumulate_steps <= regrow_every:
            raise ValueError(f"accumulate_steps must be in [1, regrow_every={regrow_every}], got {accumulate_steps}")
        if not 0 <= drop_fraction <= 1:
            raise ValueError(f"drop_fraction must be in [0, 1], got {drop_fraction}")
        if candidate_factor < 1:
            raise ValueError(f"candidate_factor must be >= 1, got {candidate_factor}")
        self.layers = {n: m for n, m in model.named_modules() if isinstance(m, SparseDeltaLinear)}
        for layer in self.layers.values():
            layer.refuse_moving_when_sharded()
        if not self.layers:
            raise ValueError("the model has no SparseDeltaLinear layers: call ftcore.apply with a SparseDeltaConfig first")
        self.optimizer = _unwrap_optimizer(optimizer)
        held = {id(p) for group in self.optimizer.param_groups for p in group["params"]}
        missing = [n for n, m in self.layers.items() if id(m.values) not in held]
        if missing:
            raise ValueError(f"the optimizer does not hold the delta values of {missing[0]} (and {len(missing) - 1} more)")
        self.regrow_every = regrow_every
        self.accumulate_steps = accumulate_steps
        self.drop_fraction = drop_fraction
        self.total_steps = total_steps
        self.candidate_factor = candidate_factor
        self.steps = 0
        self.regrowths = 0
        self._arm_if_due()

    def current_drop_fraction(self) -> float:
        if self.total_steps is None:
            return self.drop_fraction
        if self.steps >= self.total_steps:
            return 0.0
        return self.drop_fraction * (1 + math.cos(math.pi * self.steps / self.total_steps)) / 2

    def _grow_count(self, module: SparseDeltaLinear) -> int:
        return int(round(self.current_drop_fraction() * module.num_deltas))

    def _arm_if_due(self) -> None:
        # Probes watch the backward passes of the `accumulate_steps` steps that end at the next regrowth.
        if (self.steps + self.accumulate_steps) % self.regrow_every != 0:
            return
        for module in self.layers.values():
            n = self._grow_count(module)
            module.probe = GradientProbe(self.candidate_factor * n, exclude=module.indices) if n > 0 else None

    def step(self) -> None:
        self.steps += 1
        if self.steps % self.regrow_every == 0:
            self.regrow()
        self._arm_if_due()

    @torch.no_grad()
    def regrow(self) -> None:
        """Drop and regrow every layer now, using what its probe has gathered."""
        reset, stateless = [], []
        for name, module in self.layers.items():
            probe, module.probe = module.probe, None
            # the layer regrows on every rank or on none: its choice takes collectives
            observed = probe is not None and probe.candidates is not None
            if not distributed.all_agree(observed):
                if not distributed.all_agree(not observed):
                    raise RuntimeError(f"SparseDeltaScheduler: layer {name!r} ran backward on some ranks only; under "
                                       "torch.distributed every rank must run every adapted layer's backward")
                continue
            if not self.optimizer.state.get(module.values) and self.optimizer.state:
                stateless.append(name)
            if not self._regrow_layer(module, probe, self._grow_count(module)):
                reset.append(name)
        distributed.check_same_on_every_rank(
            "SparseDeltaScheduler.regrow", {f"{name}.indices": m.indices for name, m in self.layers.items()})
        if stateless:
            warnings.warn(
                f"SparseDeltaScheduler: the optimizer keeps no state for the delta values of {len(stateless)} layers "
                f"({', '.join(stateless[:3])}{', ...' if len(stateless) > 3 else ''}) though it holds state for others: "
                "if a wrapper or a sharded optimizer keeps it elsewhere, it was not moved with the entries",
                stacklevel=2,
            )
        if reset:
            warnings.warn(
                f"SparseDeltaScheduler: the optimizer state of {len(reset)} layers ({', '.join(reset[:3])}"
                f"{', ...' if len(reset) > 3 else ''}) has a layout that cannot follow moved entries (e.g. 8-bit "
                "codes with per-block scales); it was reset for those layers",
                stacklevel=2,
            )
        self.regrowths += 1

    def _regrow_layer(self, module: SparseDeltaLinear, probe: GradientProbe, n: int) -> bool:
        """Returns False if the layer's optimizer state had to be reset rather than remapped."""
        grown = probe.best(n)
        n = grown.numel()
        if n == 0:
            return True
        values = module.values
        k = values.numel()
        drop = torch.topk(values.abs(), n, largest=False, sorted=False).indices
        keep = torch.ones(k, dtype=torch.bool, device=values.device)
        keep[drop] = False
        new_indices = torch.cat([module.indices[keep].long(), grown.to(values.device).long()])
        new_indices, order = torch.sort(new_indices)

        def remap(t: torch.Tensor) -> torch.Tensor:
            return torch.cat([t[keep], torch.zeros(n, dtype=t.dtype, device=t.device)])[order]

        module.set_delta(new_indices, remap(values))
        return remap_optimizer_state(self.optimizer.state.get(values, {}), values, remap)
