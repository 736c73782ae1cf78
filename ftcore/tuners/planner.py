"""Which structured blocks to train under a backward-FLOPs budget (GreenTrainer's adaptive backpropagation,
applied to S²FT's heads and channels).

Backpropagation costs two things: the input gradients of every layer from the loss down to the lowest trainable
one (the chain; backward ends there), and each trained block's weight gradient. Full fine-tuning pays the chain
through the whole model plus every weight's gradient. Given a budget as a fraction of that, the planner scores
each unit (a block's attention heads, a block's FFN channels) by the squared norm of its weight gradient over a
few calibration batches, then, for every choice of lowest trained unit, fills what the budget leaves after the
chain with the most important units (a 0/1 knapsack, solved exactly on a discretised cost), and keeps the best.

    plan = ftcore.plan_backprop(model, budget=0.3, calibration=batches, head_ratio=0.1, channel_ratio=0.05)
    print(plan)            # the table: units, their FLOPs and importance, what trains
    ftcore.apply(model, plan)
"""

from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor, nn

from .. import engines
from ..nn.base import DeltaLinear, is_linear_like
from .structured import StructuredSparseConfig, _CalibrationStats, _head_columns, transformer_blocks

_BINS = 2000  # cost resolution of the knapsack
COLUMN_TARGETS = ("o_proj", "down_proj")


@dataclass
class PlanUnit:
    block: int
    kind: str  # "heads" or "channels"
    dw_flops: float  # per token: the weight gradient of this unit's trained slice
    chain_flops: float  # per token: input gradients needed if this is the lowest trained unit
    importance: float
    index: Tensor  # the heads / channels it trains
    train: bool = False


@dataclass
class BackpropPlan:
    """What ``ftcore.apply`` needs (``config`` and the exact layers to wrap), and the reasoning as a table."""

    config: StructuredSparseConfig
    layers: Dict[str, Tuple[Tensor, bool]]
    units: List[PlanUnit]
    budget: float
    cost: float  # fraction of full fine-tuning's backward FLOPs this plan spends
    full_flops: float  # per token, full fine-tuning's backward

    def __str__(self) -> str:
        lines = [
            f"backprop plan: budget {self.budget:.0%} of full fine-tuning's backward FLOPs, plan uses {self.cost:.1%}",
            f"{'block':>5} {'unit':<9} {'train':<6} {'dW MFLOP/token':>15} {'chain MFLOP/token':>18} {'importance':>11}",
        ]
        for u in self.units:
            lines.append(
                f"{u.block:>5} {u.kind:<9} {'yes' if u.train else '':<6} {u.dw_flops / 1e6:>15.3f} {u.chain_flops / 1e6:>18.3f} {u.importance:>11.3g}"
            )
        return "\n".join(lines)


def _linear_flops(layer: nn.Module) -> float:
    out_f, in_f = engines.logical_shape(layer)
    return 2.0 * out_f * in_f  # one matrix product, per token


def plan_backprop(
    model: nn.Module,
    budget: float,
    calibration: Sequence,
    *,
    head_ratio: float = 0.1,
    channel_ratio: float = 0.05,
    targets: Tuple[str, ...] = COLUMN_TARGETS,
) -> BackpropPlan:
    """Chooses which blocks' heads and channels to train so that backward costs at most `budget` (a fraction in
    (0, 1]) of full fine-tuning's, from per-layer backward FLOPs and gradient importance on `calibration`
    (batches with labels). Inside a trained block, the heads / channels with the largest gradients train
    (head_ratio / channel_ratio of them) as column blocks of o_proj / down_proj. Returns a BackpropPlan for
    ``ftcore.apply``."""
    if not 0 < budget <= 1:
        raise ValueError(f"budget must be a fraction in (0, 1], got {budget}")
    rows = [t for t in targets if t not in COLUMN_TARGETS]
    if rows:
        raise ValueError(f"plan_backprop plans column blocks {COLUMN_TARGETS}; {rows} (row blocks) are not in its cost model")
    if any(isinstance(m, DeltaLinear) for m in model.modules()):
        raise ValueError("plan on the plain model: this one already carries an ftcore adapter")
    probe = StructuredSparseConfig(head_ratio=head_ratio, channel_ratio=channel_ratio, targets=targets)
    blocks, geo = transformer_blocks(model)
    stats = _CalibrationStats(model, blocks, geo, "gradient")
    stats.run(calibration)

    # Full fine-tuning: every linear layer's input and weight gradient (the output head included).
    linears = [m for m in model.modules() if is_linear_like(m)]
    full = sum(2 * _linear_flops(m) for m in linears)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head_dx = _linear_flops(head) if head is not None else 0.0
    block_dx = [sum(_linear_flops(m) for m in b.module.modules() if is_linear_like(m)) for b in blocks]
    ffn_dx = [sum(_linear_flops(b.layers[r]) for r in ("up_proj", "gate_proj", "down_proj") if r in b.layers) for b in blocks]

    units: List[PlanUnit] = []
    for i, b in enumerate(blocks):
        above = head_dx + sum(block_dx[i + 1 :])
        for kind, ratio, role, groups in (("heads", head_ratio, "o_proj", geo.heads), ("channels", channel_ratio, "down_proj", geo.channels)):
            if ratio == 0:
                continue
            scores = stats.scores[(b.number, role)].cpu()
            take = max(1, round(ratio * groups))
            top = torch.topk(scores, take)
            out_f = engines.logical_shape(b.layers[role])[0]
            width = geo.head_dim if kind == "heads" else 1
            dw = 2.0 * out_f * take * width
            # Lowest at the heads: this block's FFN input gradients are needed too; lowest at the channels: none.
            chain = above + (ffn_dx[i] if kind == "heads" else 0.0)
            units.append(PlanUnit(b.number, kind, dw, chain, float(top.values.sum()), torch.sort(top.indices).values))

    chosen = _solve(units, budget * full)
    if not chosen:
        cheapest = min(u.chain_flops + u.dw_flops for u in units) / full
        raise ValueError(f"budget {budget:.1%} buys no trainable unit: the cheapest costs {cheapest:.1%} of full fine-tuning's backward")
    for i in chosen:
        units[i].train = True
    cost = plan_cost(units[i] for i in chosen) / full

    layers = {}
    by_number = {b.number: b for b in blocks}
    for u in units:
        if not u.train:
            continue
        b = by_number[u.block]
        if u.kind == "heads" and "o_proj" in targets:
            layers[b.names["o_proj"]] = (_head_columns(u.index, geo.head_dim), False)
        elif u.kind == "channels" and "down_proj" in targets:
            layers[b.names["down_proj"]] = (u.index, False)
    config = StructuredSparseConfig(
        head_ratio=probe.head_ratio, channel_ratio=probe.channel_ratio, targets=targets, selection="gradient",
        scope="layer", layers_to_transform=sorted({u.block for u in units if u.train}),
    )
    return BackpropPlan(config, layers, units, budget, cost, full)


def plan_cost(units) -> float:
    """Backward FLOPs per token of training these units: the chain down to the lowest of them (the longest
    chain), plus each one's weight gradient."""
    units = list(units)
    return max(u.chain_flops for u in units) + sum(u.dw_flops for u in units)


def _solve(units: List[PlanUnit], budget_flops: float) -> List[int]:
    """Indices of the units to train: the best total importance over all choices of lowest unit."""
    best: Tuple[float, List[int]] = (-1.0, [])
    order = sorted(range(len(units)), key=lambda i: units[i].chain_flops)  # higher in the model: cheaper chain
    for lowest in order:
        room = budget_flops - units[lowest].chain_flops - units[lowest].dw_flops
        if room < 0:
            continue
        # Units at or above the lowest one: those whose own chain is no longer than its chain.
        candidates = [i for i in order if i != lowest and units[i].chain_flops <= units[lowest].chain_flops]
        picked = _knapsack([units[i].dw_flops for i in candidates], [units[i].importance for i in candidates], room)
        total = units[lowest].importance + sum(units[candidates[j]].importance for j in picked)
        if total > best[0]:
            best = (total, [lowest] + [candidates[j] for j in picked])
    return best[1]


def _knapsack(costs: List[float], values: List[float], capacity: float) -> List[int]:
    """0/1 knapsack on costs discretised to _BINS of the capacity (rounded up: never over budget)."""
    if not costs or capacity <= 0:
        return []
    scale = _BINS / capacity
    weights = [int(np.ceil(c * scale)) for c in costs]
    best = np.zeros(_BINS + 1)
    keep = np.zeros((len(costs), _BINS + 1), dtype=bool)
    for i, (w, v) in enumerate(zip(weights, values)):
        if w > _BINS:
            continue
        with_item = np.full(_BINS + 1, -np.inf)
        with_item[w:] = best[: _BINS + 1 - w] + v
        keep[i] = with_item > best
        best = np.maximum(best, with_item)
    picked, room = [], _BINS
    for i in range(len(costs) - 1, -1, -1):
        if keep[i, room]:
            picked.append(i)
            room -= weights[i]
    return picked
