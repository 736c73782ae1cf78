"""Language-model objectives on the final hidden state, so that the (tokens × vocab) logits never exist whole.

``causal_lm_loss(model, batch)`` runs the model's body once (through the model's own forward, so DDP, FSDP and
DeepSpeed wrappers see it, with ``logits_to_keep`` set to keep no position: the LM head computes nothing) and
hands the final hidden state and the head's weight to :func:`ftcore.ops.linear_cross_entropy`. With
``kl_strength > 0`` it adds a KL anchor to the base model: the base's next-token distribution comes from the same
model under :func:`ftcore.disable` (no second copy of the weights), chunked over tokens like the loss.
``FusedLossTrainer`` is a ``transformers.Trainer`` whose ``compute_loss`` is this.
"""

import functools
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import engines, ops
from .api import adapter_layers, disable
from .nn.base import DeltaLinear

KL_DIRECTIONS = ("forward", "reverse")


def _unwrapped(model: nn.Module) -> nn.Module:
    """The transformers model inside a DDP / DeepSpeed wrapper or a PEFT model (the wrapper itself is what runs)."""
    inner = engines.unwrap(model)
    while not hasattr(inner, "get_output_embeddings") and isinstance(getattr(inner, "module", None), nn.Module):
        inner = inner.module  # FSDP1's wrapper
    get_base_model = getattr(inner, "get_base_model", None)  # PEFT: the transformers model its layers live in
    return get_base_model() if callable(get_base_model) else inner


def _lm_head(model: nn.Module) -> nn.Module:
    inner = _unwrapped(model)
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    if head is None:
        raise ValueError(f"causal_lm_loss: {type(inner).__name__} has no output embeddings (an LM head) to fuse")
    if isinstance(head, DeltaLinear) or hasattr(head, "lora_A") or hasattr(head, "base_layer"):
        # The fused op reads the head's weight directly: an adapter on the head would get no gradient.
        raise ValueError(
            "causal_lm_loss: the LM head carries an adapter (ftcore or PEFT); the fused loss would not train it. "
            "Exclude lm_head from the adapter's targets, or compute the loss from the model's logits"
        )
    if not isinstance(head, nn.Linear) or head.bias is not None:
        raise ValueError(f"causal_lm_loss: the LM head must be an nn.Linear without bias, got {head!r}")
    config = getattr(inner, "config", None)
    configs = [config]
    if config is not None and hasattr(config, "get_text_config"):
        configs.append(config.get_text_config())  # multimodal models keep the LM's knobs there
    # Models that transform the head's output (soft-capping, scaling): the fused loss would score other logits.
    knobs = ("final_logit_softcapping", "logit_scale", "output_multiplier_scale", "logits_scaling",
             "lm_head_multiplier", "logit_softcapping")
    for c in configs:
        for knob in knobs:
            if getattr(c, knob, None) not in (None, 1.0):
                raise ValueError(f"causal_lm_loss: the model transforms its logits ({knob}); that is not fused yet")
    return head


def _final_hidden(model: nn.Module, inputs: dict) -> Tensor:
    """The body's last hidden state (after the final norm), from one run of the model's forward in which the LM
    head keeps no position."""
    inner = _unwrapped(model)
    body = getattr(inner, "base_model", None)
    if body is None or body is inner:
        raise ValueError(f"causal_lm_loss: cannot find the body of {type(inner).__name__} (base_model)")
    seen = []

    def capture(module, args, output):
        seen.append(output[0] if isinstance(output, tuple) else output.last_hidden_state)

    handle = body.register_forward_hook(capture)
    try:
        ids = inputs.get("input_ids", inputs.get("inputs_embeds"))
        if ids is None:
            raise ValueError("causal_lm_loss: batch has neither input_ids nor inputs_embeds")
        model(**inputs, logits_to_keep=torch.empty(0, dtype=torch.long, device=ids.device), use_cache=False)
    finally:
        handle.remove()
    if len(seen) != 1:
        raise RuntimeError(f"causal_lm_loss: the body ran {len(seen)} times in one forward")
    return seen[0]


def _shift(t: Tensor, fill) -> Tensor:
    """Token t + 1's entry at position t (the target of position t), `fill` at the end: HF's shift, without
    slicing the hidden states."""
    return F.pad(t[..., 1:], (0, 1), value=fill)


def causal_lm_loss(
    model: nn.Module,
    batch: dict,
    *,
    weighting: str = "none",
    token_weights: Optional[Tensor] = None,
    tau: float = 1.0,
    ignore_index: int = -100,
    num_items_in_batch=None,
    kl_strength: float = 0.0,
    kl_direction: str = "forward",
    chunk_tokens: int = 0,
) -> Tensor:
    """The causal LM loss of ``model(**batch).loss`` (labels in ``batch["labels"]``, shifted as HF shifts them),
    with the token weighting of :func:`ftcore.ops.linear_cross_entropy` (``token_weights`` aligned with the
    labels), computed from the final hidden state without the logits. Tied embeddings are handled: the head's
    weight is the Parameter itself, whatever it is tied to.

    ``kl_strength > 0`` adds ``kl_strength · KL`` averaged over the counted tokens (the same divisor as the loss),
    KL to the base model's next-token distribution: ``"forward"`` KL(p_base ‖ p_θ), ``"reverse"`` KL(p_θ ‖ p_base).
    The base's hidden state comes from a second run of the body under ``ftcore.disable(model)`` without gradients.
    """
    if "labels" not in batch:
        raise ValueError("causal_lm_loss: batch has no labels")
    if kl_direction not in KL_DIRECTIONS:
        raise ValueError(f"kl_direction must be one of {KL_DIRECTIONS}, got {kl_direction!r}")
    if isinstance(kl_strength, bool) or not isinstance(kl_strength, (int, float)) or kl_strength < 0:
        raise ValueError(f"kl_strength must be a number >= 0, got {kl_strength!r}")
    head = _lm_head(model)
    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    hidden = _final_hidden(model, inputs)
    shifted = _shift(labels, ignore_index)
    weights = _shift(token_weights, 0.0) if token_weights is not None else None
    weight = head.weight
    engine = engines.sharding_of(weight)
    if engine is not None and weight.requires_grad:
        # Its gradient would have to meet the engine's reduction (FSDP2's full_tensor() backward only slices):
        # not built, so refused rather than trained on one rank's batch.
        raise ValueError(
            f"causal_lm_loss: the LM head's weight trains and is sharded by {engine}; the fused loss trains a "
            "sharded head not yet (freeze the head, as every ftcore method does, or do not shard it)"
        )
    if engine == "FSDP1":
        raise ValueError("causal_lm_loss: the LM head's weight is flattened by FSDP1; use FSDP2 or DeepSpeed")
    if engines.is_dtensor(weight):
        weight = weight.full_tensor()  # a collective: every rank computes its loss
    if weight.dtype != hidden.dtype:
        weight = weight.to(hidden.dtype)  # e.g. FSDP2 mixed precision: an fp32 head over a bf16 body
    with engines.gathered([weight]):  # ZeRO-3: whole for the call; its gradient is computed inside, nothing later
        loss = ops.linear_cross_entropy(
            hidden, weight, shifted, ignore_index=ignore_index, weighting=weighting, token_weights=weights,
            tau=tau, num_items_in_batch=num_items_in_batch, chunk_tokens=chunk_tokens,
        )
    if kl_strength > 0:
        if not adapter_layers(_unwrapped(model)):
            raise ValueError("causal_lm_loss: kl_strength needs an ftcore-adapted model (its base is ftcore.disable)")
        with torch.no_grad(), disable(_unwrapped(model)):
            base_hidden = _final_hidden(model, inputs)
        valid = shifted != ignore_index
        divisor = num_items_in_batch if num_items_in_batch is not None else valid.sum()
        with engines.gathered([weight]):
            kl = _ChunkedKL.apply(hidden, base_hidden, weight, valid, kl_direction == "reverse", chunk_tokens)
        loss = loss + kl_strength * kl / divisor
    return loss


class _ChunkedKL(torch.autograd.Function):
    """Σ over the counted tokens of KL(p_base ‖ p_θ) (or KL(p_θ ‖ p_base) when reverse), p = softmax(h · Wᵀ),
    a chunk of tokens at a time; the gradient with respect to h is computed in the forward, like the fused loss,
    and the base side is a constant. The head's weight gets no gradient (it is frozen under every ftcore method)."""

    @staticmethod
    def forward(ctx, hidden, base_hidden, weight, valid, reverse, chunk_tokens):
        if weight.requires_grad:
            raise ValueError("causal_lm_loss: the KL anchor does not train the LM head's weight; freeze it")
        h = hidden.reshape(-1, hidden.shape[-1])
        hb = base_hidden.reshape(-1, hidden.shape[-1])
        mask = valid.reshape(-1)
        acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        chunk = chunk_tokens or max(1, (1 << 25) // weight.shape[0])
        total = torch.zeros((), dtype=acc, device=hidden.device)
        grad = torch.zeros_like(h) if hidden.requires_grad else None
        for s in range(0, h.shape[0], chunk):
            m = mask[s : s + chunk]
            log_p = torch.log_softmax((h[s : s + chunk] @ weight.T).to(acc), -1)
            log_q = torch.log_softmax((hb[s : s + chunk] @ weight.T).to(acc), -1)  # the base
            if reverse:
                p = log_p.exp()
                per_token = (p * (log_p - log_q)).sum(-1)
                g = p * (log_p - log_q - per_token.unsqueeze(-1))
            else:
                q = log_q.exp()
                per_token = (q * (log_q - log_p)).sum(-1)
                g = log_p.exp() - q
            total += torch.where(m, per_token, 0.0).sum()
            if grad is not None:
                g = torch.where(m.unsqueeze(-1), g, 0.0)
                grad[s : s + chunk] = (g.to(weight.dtype) @ weight).to(h.dtype)
        ctx.save_for_backward(grad)
        ctx.shape = hidden.shape
        return total

    @staticmethod
    def backward(ctx, d_total):
        (grad,) = ctx.saved_tensors
        d_hidden = None if grad is None else (grad * d_total).to(grad.dtype).reshape(ctx.shape)
        return d_hidden, None, None, None, None, None


@functools.lru_cache(maxsize=None)  # one class, so isinstance works
def _trainer_class():
    from transformers import Trainer

    class FusedLossTrainer(Trainer):
        """A ``transformers.Trainer`` whose loss is :func:`causal_lm_loss` (the logits never exist whole).
        ``loss_kwargs`` go to it: ``weighting``, ``tau``, ``kl_strength``, ``kl_direction``, ``chunk_tokens``.
        The Trainer's ``num_items_in_batch`` (gradient accumulation) is passed through. Evaluation gives the loss
        only (no logits exist). The Trainer's ``label_smoothing_factor`` and ``compute_loss_func`` are not used."""

        def __init__(self, *args, loss_kwargs: Optional[dict] = None, **kwargs):
            super().__init__(*args, **kwargs)
            self.fused_loss_kwargs = dict(loss_kwargs or {})

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = causal_lm_loss(model, inputs, num_items_in_batch=num_items_in_batch, **self.fused_loss_kwargs)
            if num_items_in_batch is not None and self.args.average_tokens_across_devices:
                # num_items_in_batch counts every data-parallel rank's tokens and DDP averages the gradients over
                # the ranks: scaled back as Trainer scales a model's own loss.
                scale = self.accelerator.num_processes // self.get_tp_size()
                loss = loss * (scale if self.args.n_gpu <= 1 else self.args.n_gpu)
            # Evaluation asks for outputs: there are no logits, so only the loss is evaluated.
            return (loss, {"loss": loss}) if return_outputs else loss

    return FusedLossTrainer


def __getattr__(name):
    if name == "FusedLossTrainer":  # imports transformers' Trainer on first use
        return _trainer_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

