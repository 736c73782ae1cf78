"""Pulls toward the base model W0, for fine-tuning that keeps what the model knows.

With ftcore's layers the weight is W0 + Δ and only Δ trains, so the distance to the base is the delta itself:
‖W − W0‖²_F = Σ Δ² (positions are distinct in a layer, so nothing overlaps). Two ways to pull toward W0 follow:

- **AdamW's weight decay on the delta parameters** (``torch.optim.AdamW(ftcore.trainable_parameters(model),
  weight_decay=λ)``): decoupled decay multiplies Δ by (1 − lr·λ) each step, which moves W straight back toward
  W0, not toward zero as decay on a full fine-tune's weight does. Nothing else is needed with AdamW.
- **l2_to_base**: the same pull as a loss term, for optimizers without decoupled decay (SGD, Adam, Adafactor).

EWC weights the pull by each entry's importance to earlier data: ``DiagonalFisher.estimate`` then
``ewc_penalty``.
"""

from typing import Callable, Dict, Iterable, Tuple

import torch
from torch import Tensor, nn

from . import engines
from .api import _layers_or_raise
from .nn.base import DeltaLinear


def l2_to_base(model: nn.Module, strength: float = 1.0) -> Tensor:
    """``strength · Σ‖W − W0‖²_F`` over the model's ftcore layers, i.e. strength times the sum of their deltas'
    squares, as a differentiable fp32 scalar to add to the loss. Its gradient is 2·strength·Δ.

    Under gradient accumulation add it to every micro-batch's loss scaled as that loss is (divided by the number
    of micro-batches when the losses are), so that one optimizer step sees it once. DDP: each rank adds the same
    term and the averaged gradient is unchanged. A delta sharded by FSDP1/FSDP2 or DeepSpeed ZeRO-3 is refused
    (how its gradient would meet the engine's reduction is not tested yet): use AdamW's weight decay there,
    which is the same pull.
    """
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or strength < 0:
        raise ValueError(f"strength must be a number >= 0, got {strength!r}")
    total = None
    for layer in _unsharded_layers(model, "l2_to_base").values():
        term = layer.delta.float().pow(2).sum()
        total = term if total is None else total + term
    return total * float(strength)


class DiagonalFisher:
    """EWC's importance of each delta entry: the diagonal empirical Fisher at the delta positions only, i.e. the
    mean over examples of the squared per-example gradient (not the square of a batch gradient), with the labels
    taken from the data. O(k) memory a layer: one value per delta entry.

    ``fisher[name]`` is (positions, values): the layer's index when estimated, and the Fisher values in the delta's
    shape. A sparse layer whose positions have moved since (SpIEL regrowth) keeps the values of the positions it
    kept and gives new ones zero (no estimate yet; re-estimate to count them); a structured layer whose block moved
    is refused."""

    def __init__(self, values: Dict[str, Tuple[Tensor, Tensor]], examples: int):
        self.values, self.examples = values, examples

    @classmethod
    def estimate(cls, model: nn.Module, batches: Iterable, per_example_loss: Callable[[nn.Module, object], Tensor]):
        """Runs `per_example_loss(model, batch)` (a (B,) tensor: each example's loss, e.g. its mean token NLL) on
        every batch with gradients on, and accumulates each example's squared gradient at every ftcore layer's
        delta. Every ftcore layer must see the batch on dim 0 (B rows, example i in row i; checked), each layer
        runs at most once a forward, and gradient checkpointing must be off (both refused). Parameters' ``.grad``
        are not touched: only the layers' outputs are differentiated.

        EWC anchors at the weights the Fisher was estimated at; ewc_penalty anchors at W0, so estimate it right
        after ``apply``, while Δ = 0."""
        layers = _unsharded_layers(model, "DiagonalFisher.estimate")
        # transformers 5 names it is_activation_checkpointing (the old name warns); 4.x has only the old one
        checkpointing = getattr(model, "is_activation_checkpointing", None)
        if checkpointing is None:
            checkpointing = getattr(model, "is_gradient_checkpointing", False)
        if checkpointing:
            raise ValueError("DiagonalFisher.estimate: turn gradient checkpointing off while estimating (its "
                             "recomputed forwards would be counted again)")
        sums = {name: torch.zeros_like(layer.delta, dtype=torch.float32) for name, layer in layers.items()}
        examples = 0
        seen: Dict[str, Tuple[Tensor, Tensor]] = {}  # this batch: layer -> (its input, its output)

        def watch(name, layer):
            def on_forward(module, args, kwargs, output):
                if name in seen:
                    raise ValueError(f"DiagonalFisher.estimate: {name} ran twice in one forward (a shared layer)")
                if layer.delta.requires_grad and not output.requires_grad:
                    raise ValueError(f"DiagonalFisher.estimate: {name} ran without autograd (a no_grad pass?); "
                                     "its gradient is what the Fisher is made of")
                x = args[0] if args else next(iter(kwargs.values()))
                seen[name] = (x.detach(), output)

            return layer.register_forward_hook(on_forward, with_kwargs=True)

        handles = [watch(name, layer) for name, layer in layers.items()]
        try:
            for batch in batches:
                seen.clear()
                with torch.enable_grad():
                    losses = per_example_loss(model, batch)
                if losses.dim() != 1:
                    raise ValueError(f"per_example_loss must return one loss per example (B,), got {tuple(losses.shape)}")
                b = losses.shape[0]
                names = [n for n, (_, out) in seen.items() if out.requires_grad]
                for name in names:
                    if seen[name][0].shape[0] != b or seen[name][1].shape[0] != b:
                        raise ValueError(
                            f"DiagonalFisher.estimate: {name} sees {seen[name][0].shape[0]} rows on dim 0 for {b} "
                            "examples; every ftcore layer must see the batch on dim 0 (example i in row i)"
                        )
                # The examples are independent, so the gradient of the sum at a layer's output holds, in row i,
                # example i's own gradient. A layer the loss does not reach gets none (it contributes zero).
                grads = torch.autograd.grad(losses.sum(), [seen[n][1] for n in names], allow_unused=True)
                with torch.no_grad():
                    for name, g in zip(names, grads):
                        if g is None:
                            continue
                        x, layer = seen[name][0], layers[name]
                        for i in range(b):  # per example: O(k) each, never a dense gradient
                            sums[name] += layer.delta_grad(g[i], x[i]).pow(2)
                examples += b
                seen.clear()
        finally:
            for h in handles:
                h.remove()
            seen.clear()
        if examples == 0:
            raise ValueError("DiagonalFisher.estimate saw no examples")
        values = {name: (_index_of(layers[name]).clone(), s / examples) for name, s in sums.items()}
        return cls(values, examples)

    def aligned(self, name: str, layer: DeltaLinear) -> Tensor:
        """The Fisher values for the layer's current delta entries."""
        positions, values = self.values[name]
        current = _index_of(layer)
        if torch.equal(current.to(positions.device), positions):
            return values
        if hasattr(layer, "values"):  # sparse: kept positions keep their estimate, new ones get zero
            if positions.numel() == 0:
                return torch.zeros(current.numel(), dtype=values.dtype, device=values.device)
            where = torch.searchsorted(positions.long(), current.long().to(positions.device)).clamp_max(positions.numel() - 1)
            kept = positions.long()[where] == current.long().to(positions.device)
            return torch.where(kept, values[where], torch.zeros_like(values[where]))
        raise ValueError(f"{name}: the block moved since the Fisher was estimated; estimate it again")


def ewc_penalty(model: nn.Module, fisher: DiagonalFisher, strength: float = 1.0) -> Tensor:
    """``strength · Σ F · Δ²`` over the model's ftcore layers: EWC's pull toward the base, weighted by how much
    each entry mattered to the data the Fisher was estimated on. Add it to the loss; gradient accumulation as for
    l2_to_base."""
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or strength < 0:
        raise ValueError(f"strength must be a number >= 0, got {strength!r}")
    total = None
    for name, layer in _unsharded_layers(model, "ewc_penalty").items():
        if name not in fisher.values:
            raise ValueError(f"ewc_penalty: the Fisher has no estimate for layer {name}")
        f = fisher.aligned(name, layer).to(layer.delta.device)
        term = (f * layer.delta.float().pow(2)).sum()
        total = term if total is None else total + term
    return total * float(strength)


def _index_of(layer: DeltaLinear) -> Tensor:
    return getattr(layer, layer.index_name)


def _unsharded_layers(model: nn.Module, what: str) -> Dict[str, DeltaLinear]:
    layers = _layers_or_raise(model)
    for name, layer in layers.items():
        engine = engines.sharding_of(layer.delta)
        if engine is not None:
            raise ValueError(
                f"{what}: {name}'s delta is sharded by {engine}; use AdamW's weight_decay on the delta "
                "parameters instead (the same pull toward the base, applied in the update)"
            )
    return layers
