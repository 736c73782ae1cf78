"""Sparse-delta fine-tuning (SpIEL, LT-SFT, Diff Pruning style) for Hugging Face models: the config, how many
deltas each layer gets, where they go, and the model surgery."""

import math
import zlib
from dataclasses import asdict, dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from .. import engines
from ..nn.base import logical_weight
from ..nn.sparse_delta import GradientProbe, SparseDeltaLinear
from .targets import find_targets, install

SELECTIONS = ("random", "magnitude", "gradient")


@dataclass
class SparseDeltaConfig:
    """Where sparse deltas go and how many.

    Args:
        density: fraction of each target weight's entries that are trainable (e.g. 0.01).
        num_deltas: total trainable entries over all targets, split in proportion to their sizes.
            Give exactly one of density / num_deltas.
        target_modules, exclude_modules, layers_to_transform: PEFT-style matching (see ftcore.tuners.targets).
        selection: "random" (uniform, seeded), "magnitude" (largest |W0|) or "gradient" (largest accumulated
            |gradient| over calibration batches, found with the chunked top-k: needs ``calibration=`` in apply).
        seed: makes "random" reproducible; each layer draws from its own stream (seed, layer name).
        merged: train merged (one GEMM a forward, default) or unmerged (exact W0 + sparse product).
        candidate_factor: for "gradient", positions scored exactly per delta after the first batch's top-k.
    """

    density: Optional[float] = None
    num_deltas: Optional[int] = None
    target_modules: Union[str, List[str], None] = "all-linear"
    exclude_modules: Union[str, List[str], None] = None
    layers_to_transform: Union[int, List[int], None] = None
    selection: str = "random"
    seed: int = 0
    merged: bool = True
    candidate_factor: int = 4
    method: str = field(default="sparse_delta", init=False)

    def __post_init__(self):
        if (self.density is None) == (self.num_deltas is None):
            raise ValueError("give exactly one of density= (a fraction per layer) or num_deltas= (a total)")
        if self.density is not None and not (0 < self.density <= 1):
            raise ValueError(f"density must be in (0, 1], got {self.density}")
        if self.num_deltas is not None and (not isinstance(self.num_deltas, int) or self.num_deltas < 1):
            raise ValueError(f"num_deltas must be a positive int, got {self.num_deltas!r}")
        if self.selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {SELECTIONS}, got {self.selection!r}")
        if self.candidate_factor < 1:
            raise ValueError(f"candidate_factor must be >= 1, got {self.candidate_factor}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "SparseDeltaConfig":
        d = {k: v for k, v in d.items() if k != "method"}
        return cls(**d)


def allocate(config: SparseDeltaConfig, sizes: Dict[str, int]) -> Dict[str, int]:
    """Deltas per layer: density·size each, or num_deltas split by size (largest remainders get the rest)."""
    if config.density is not None:
        return {name: min(n, max(1, round(config.density * n))) for name, n in sizes.items()}
    total = sum(sizes.values())
    if config.num_deltas > total:
        raise ValueError(f"num_deltas={config.num_deltas} exceeds the {total} entries of the target layers")
    shares = {name: config.num_deltas * n / total for name, n in sizes.items()}
    counts = {name: math.floor(s) for name, s in shares.items()}
    rest = config.num_deltas - sum(counts.values())
    for name in sorted(shares, key=lambda n: shares[n] - counts[n], reverse=True)[:rest]:
        counts[name] += 1
    return counts


def layer_generator(seed: int, name: str) -> torch.Generator:
    """A random stream of its own for each layer, so a layer's draw does not depend on the others."""
    return torch.Generator().manual_seed(zlib.crc32(f"{seed}:{name}".encode()))


def random_positions(numel: int, k: int, generator: torch.Generator) -> Tensor:
    """k distinct positions in [0, numel), uniform over k-subsets, sorted. O(k) memory unless k is large."""
    if k > numel // 4:
        return torch.sort(torch.randperm(numel, generator=generator)[:k]).values
    chosen = torch.empty(0, dtype=torch.int64)
    while chosen.numel() < k:
        draw = torch.randint(0, numel, (int((k - chosen.numel()) * 1.1) + 16,), generator=generator)
        chosen = torch.unique(torch.cat([chosen, draw]))
    # Drawing with replacement and dropping repeats is exchangeable, so a random k of the distinct draws is
    # a uniform k-subset.
    keep = torch.randperm(chosen.numel(), generator=generator)[:k]
    return torch.sort(chosen[keep]).values


@torch.no_grad()
def magnitude_positions(weight: Tensor, k: int, rows_per_chunk: int = 0) -> Tensor:
    """The k positions with the largest |W0|, by row chunks (memory O(chunk + k)), sorted."""
    out_features, in_features = weight.shape
    rows = rows_per_chunk or max(1, (1 << 20) // max(in_features, 1))
    best_scores = torch.empty(0, device=weight.device)
    best_index = torch.empty(0, dtype=torch.int64, device=weight.device)
    for r0 in range(0, out_features, rows):
        block = weight[r0 : r0 + rows].abs().float().flatten()
        scores = torch.cat([best_scores, block])
        index = torch.cat([best_index, torch.arange(block.numel(), device=weight.device) + r0 * in_features])
        top = torch.topk(scores, min(k, scores.numel()), sorted=False)
        best_scores, best_index = top.values, index[top.indices]
    return torch.sort(best_index).values


def run_calibration(model: nn.Module, batches: Iterable, *, backward: bool = True) -> int:
    """Forward (and, by default, backward) over calibration batches: dicts for ``model(**batch)``, with labels
    when backward is wanted, so the output has ``.loss``. Returns how many batches ran."""
    seen = 0
    # The whole model runs: under ZeRO-3 (before the engine starts) every partitioned Parameter is gathered
    # for the calibration, so it needs the model's full size on each rank meanwhile.
    with engines.gathered(model.parameters()), torch.enable_grad() if backward else torch.no_grad():
        for batch in batches:
            if not isinstance(batch, dict):
                raise TypeError(f"calibration batches must be dicts of model inputs, got {type(batch).__name__}")
            output = model(**batch)
            if backward:
                loss = getattr(output, "loss", None)
                if loss is None:
                    raise ValueError("calibration batches must produce a loss: include labels in each batch")
                loss.backward()
            seen += 1
    if seen == 0:
        raise ValueError("calibration is empty: pass at least one batch")
    return seen


def apply_sparse_delta(model: nn.Module, config: SparseDeltaConfig, calibration: Optional[Sequence] = None) -> nn.Module:
    """Swaps the target layers for SparseDeltaLinear in place and freezes everything else. Returns the model.

    On any error the model is left as it was.
    """
    if config.selection == "gradient" and calibration is None:
        raise ValueError('selection="gradient" needs calibration= (a few batches with labels)')
    names = find_targets(model, config.target_modules, config.exclude_modules, config.layers_to_transform)
    layers = {name: model.get_submodule(name) for name in names}
    counts = allocate(config, {name: math.prod(engines.logical_shape(layer)) for name, layer in layers.items()})

    def builder(name: str):
        def build(layer: nn.Module) -> SparseDeltaLinear:
            weight = logical_weight(layer)
            if config.selection == "random":
                positions = random_positions(weight.numel(), counts[name], layer_generator(config.seed, name))
            elif config.selection == "magnitude":
                positions = magnitude_positions(weight, counts[name])
            else:  # gradient: placed after calibration
                positions = torch.empty(0, dtype=torch.int64)
            return SparseDeltaLinear(layer, positions, merged=config.merged)

        return build

    finish = None
    if config.selection == "gradient":
        finish = lambda wrapped: _place_by_gradient(model, wrapped, counts, config.candidate_factor, calibration)  # noqa: E731
    return install(model, config, {name: builder(name) for name in layers}, finish)


def _place_by_gradient(model, wrapped, counts, candidate_factor, calibration) -> None:
    for name, module in wrapped.items():
        module.probe = GradientProbe(candidate_factor * counts[name])
    try:
        run_calibration(model, calibration)
        with engines.gathered(m.base_layer.weight for m in wrapped.values()):  # W0's values at the new positions
            for name, module in wrapped.items():
                module.set_delta(module.probe.best(counts[name]))
                module.values.grad = None
    finally:
        for module in wrapped.values():
            module.probe = None


__all__ = [
    "SparseDeltaConfig",
    "apply_sparse_delta",
    "allocate",
    "random_positions",
    "magnitude_positions",
]
