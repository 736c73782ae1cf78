"""Pulls toward the base model W0, for fine-tuning that keeps what the model knows.

With ftcore's layers the weight is W0 + Δ and only Δ trains, so the distance to the base is the delta itself:
‖W − W0‖²_F = Σ Δ² (positions are distinct in a layer, so nothing overlaps). Two ways to pull toward W0 follow:

- **AdamW's weight decay on the delta parameters** (``torch.optim.AdamW(ftcore.trainable_parameters(model),
  weight_decay=λ)``): decoupled decay multiplies Δ by (1 − lr·λ) each step, which moves W straight back toward
  W0, not toward zero as decay on a full fine-tune's weight does. Nothing else is needed with AdamW.
- **l2_to_base**: the same pull as a loss term, for optimizers without decoupled decay (SGD, Adam, Adafactor).
"""

from torch import Tensor, nn

from . import engines
from .api import _layers_or_raise


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
    for name, layer in _layers_or_raise(model).items():
        delta = layer.delta
        engine = engines.sharding_of(delta)
        if engine is not None:
            raise ValueError(
                f"l2_to_base: {name}'s delta is sharded by {engine}; use AdamW's weight_decay on the delta "
                "parameters instead (the same pull toward the base, applied in the update)"
            )
        term = delta.float().pow(2).sum()
        total = term if total is None else total + term
    return total * float(strength)
