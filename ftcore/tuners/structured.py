"""Structured sparse fine-tuning (S²FT, Salient Channel Tuning) for Hugging Face models: which attention heads and
FFN channels train, and the model surgery that wraps their layers in StructuredSparseLinear.

A selected attention head trains its head_dim slice of o_proj's input columns (and, when "v_proj" is targeted,
the rows of the key/value head it reads: with grouped-query attention several query heads share one). A
selected FFN channel trains its down_proj input column (and its up_proj / gate_proj rows when targeted). The
weights keep their layout: blocks are addressed by index, never permuted into place.
"""

import zlib
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from .. import distributed, engines, ops
from ..nn.base import DeltaLinear, logical_weight
from ..nn.structured import StructuredSparseLinear
from .sparse_delta import run_calibration
from .targets import install

SELECTIONS = ("random", "weight-norm", "activation", "gradient")
TARGETS = ("o_proj", "v_proj", "down_proj", "up_proj", "gate_proj")


@dataclass
class StructuredSparseConfig:
    """Which heads and channels train.

    Args:
        head_ratio: fraction of attention heads trained (0 for none).
        channel_ratio: fraction of FFN channels trained (0 for none).
        targets: the layers the chosen heads/channels train: "o_proj" and "down_proj" (input columns, S²FT's
            default), and "v_proj", "up_proj", "gate_proj" (output rows of the same heads/channels).
        selection: "random" (S²FT's default), "weight-norm" (largest o_proj / down_proj column norms),
            "activation" (largest mean input magnitude over calibration batches, as SCT does) or "gradient"
            (largest weight-gradient norm over calibration batches). The last two need ``calibration=``.
        scope: "model" chooses among all layers' heads/channels at once (S²FT), "layer" the same share in each.
        layers_to_transform: only these transformer blocks (an int or a list).
        seed: makes "random" reproducible.
        merged: merged (one GEMM a forward, default) or unmerged.
    """

    head_ratio: float = 0.0
    channel_ratio: float = 0.0
    targets: Tuple[str, ...] = ("o_proj", "down_proj")
    selection: str = "random"
    scope: str = "model"
    layers_to_transform: Union[int, List[int], None] = None
    seed: int = 0
    merged: bool = True
    method: str = field(default="structured_sparse", init=False)

    def __post_init__(self):
        self.targets = tuple(self.targets)
        for name, ratio in (("head_ratio", self.head_ratio), ("channel_ratio", self.channel_ratio)):
            if not 0 <= ratio <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {ratio}")
        if self.head_ratio == 0 and self.channel_ratio == 0:
            raise ValueError("give head_ratio > 0 (attention heads) and/or channel_ratio > 0 (FFN channels)")
        unknown = [t for t in self.targets if t not in TARGETS]
        if unknown or not self.targets:
            raise ValueError(f"targets must be a non-empty subset of {TARGETS}, got {self.targets}")
        if self.selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {SELECTIONS}, got {self.selection!r}")
        if self.scope not in ("model", "layer"):
            raise ValueError(f"scope must be 'model' or 'layer', got {self.scope!r}")
        if isinstance(self.layers_to_transform, int):
            self.layers_to_transform = [self.layers_to_transform]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "StructuredSparseConfig":
        return cls(**{k: v for k, v in d.items() if k != "method"})


# ---- architectures -------------------------------------------------------------------------------------------


@dataclass
class Block:
    """One transformer block's layers, by role, and its attention geometry."""

    number: int
    module: nn.Module  # the whole transformer block
    layers: Dict[str, nn.Module]  # role -> linear layer (only roles the architecture has)
    names: Dict[str, str]  # role -> full module name
    v_row_offset: int  # where v's rows start in its (possibly fused q/k/v) weight


@dataclass
class Geometry:
    heads: int
    kv_heads: int
    head_dim: int
    channels: int


_ARCHITECTURES = {
    # model_type: (block list paths, role -> path inside a block, geometry from the config)
    **{
        t: (("model.layers", "layers"), {"o_proj": "self_attn.o_proj", "v_proj": "self_attn.v_proj", "down_proj": "mlp.down_proj",
                                         "up_proj": "mlp.up_proj", "gate_proj": "mlp.gate_proj"}, "llama")
        for t in ("llama", "mistral", "qwen2", "qwen3")
    },
    "gpt2": (("transformer.h", "h"), {"o_proj": "attn.c_proj", "v_proj": "attn.c_attn", "down_proj": "mlp.c_proj", "up_proj": "mlp.c_fc"}, "gpt2"),
    "bert": (("bert.encoder.layer", "encoder.layer"), {"o_proj": "attention.output.dense", "v_proj": "attention.self.value",
                                                         "down_proj": "output.dense", "up_proj": "intermediate.dense"}, "bert"),
}


def geometry(config) -> Geometry:
    model_type = getattr(config, "model_type", None)
    if model_type == "gpt2":
        heads = config.n_head
        return Geometry(heads, heads, config.n_embd // heads, config.n_inner or 4 * config.n_embd)
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    return Geometry(heads, kv_heads, head_dim, config.intermediate_size)


def transformer_blocks(model: nn.Module) -> Tuple[List[Block], Geometry]:
    """The model's transformer blocks with their layers by role. Raises ValueError for an architecture this
    does not know, naming the ones it does."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in _ARCHITECTURES:
        raise ValueError(
            f"structured sparse fine-tuning supports model types {sorted(_ARCHITECTURES)}; this model is "
            f"{model_type!r} ({type(model).__name__}). Its attention/FFN layout is not known to ftcore."
        )
    paths, roles, _ = _ARCHITECTURES[model_type]
    for path in paths:
        try:
            block_list = model.get_submodule(path)
            break
        except AttributeError:
            continue
    else:
        raise ValueError(f"{type(model).__name__}: none of {paths} holds the transformer blocks")
    geo = geometry(config)
    blocks = []
    for number, block in enumerate(block_list):
        layers, names = {}, {}
        for role, sub in roles.items():
            layer = block.get_submodule(sub)
            layers[role] = layer.base_layer if isinstance(layer, DeltaLinear) else layer
            names[role] = f"{path}.{number}.{sub}"
        v_offset = 2 * geo.heads * geo.head_dim if model_type == "gpt2" else 0  # GPT-2 fuses q, k, v
        blocks.append(Block(number, block, layers, names, v_offset))
    return blocks, geo


# ---- selection -------------------------------------------------------------------------------------------------


def _column_norms(weight: Tensor, groups: int) -> Tensor:
    """Norm of each group of consecutive input columns of a logical (out, in) weight."""
    w = weight.detach().float()
    return w.pow(2).sum(0).view(groups, -1).sum(1).sqrt()


class _CalibrationStats:
    """Per-unit scores from calibration batches, via hooks on the o_proj / down_proj layers: mean input
    magnitude ("activation") or weight-gradient norm ("gradient", from chunked block gradients: the dense
    gradient is never held)."""

    def __init__(self, model, blocks, geo, kind):
        self.model, self.blocks, self.kind, self.geo = model, blocks, kind, geo
        self.scores: Dict[Tuple[int, str], Tensor] = {}
        self.handles = []
        self._inputs = {}  # "gradient": each layer's input until its backward (about what full FT keeps)
        self._requires_grad = []

    def run(self, calibration) -> None:
        """Hooks in, passes over the calibration batches, hooks out; the model is as before whatever happens."""
        if self.kind == "gradient" and distributed.active():  # a reduction per batch: every rank, the same count
            calibration = list(calibration)
            distributed.check_same_count("the number of calibration batches", len(calibration))
        try:
            self._attach()
            run_calibration(self.model, calibration, backward=self.kind == "gradient")
        finally:
            self._detach()
        if self.kind == "activation":  # gradient scores were reduced batch by batch, in the hooks
            for score in self.scores.values():
                distributed.all_reduce_sum_(score)

    def _attach(self) -> None:
        model, blocks, geo, kind = self.model, self.blocks, self.geo, self.kind
        # Nothing may form a dense weight gradient: freeze everything while the hooks look on.
        self._requires_grad = [(p, p.requires_grad) for p in model.parameters()]
        for p, _ in self._requires_grad:
            p.requires_grad_(False)
        for block in blocks:
            for role, groups in (("o_proj", geo.heads), ("down_proj", geo.channels)):
                layer = block.layers[role]
                key = (block.number, role)
                self.handles.append(layer.register_forward_hook(self._forward_hook(key, groups)))
                if kind == "gradient":
                    self.handles.append(layer.register_full_backward_hook(self._backward_hook(key, groups)))
        if kind == "gradient":  # make the frozen model's backward reach every layer (and nothing else)
            embeddings = model.get_input_embeddings()
            self.handles.append(embeddings.register_forward_hook(lambda m, i, o: o.requires_grad_()))

    def _add(self, key, value):
        self.scores[key] = self.scores.get(key, 0) + value

    def _forward_hook(self, key, groups):
        def hook(module, inputs, output):
            x = inputs[0].detach()
            if self.kind == "activation":
                self._add(key, x.float().abs().reshape(-1, groups, x.shape[-1] // groups).mean((0, 2)))
            else:
                self._inputs[key] = x

        return hook

    def _backward_hook(self, key, groups):
        def hook(module, grad_input, grad_output):
            x = self._inputs.pop(key)
            g = grad_output[0].detach()
            width = x.shape[-1] // groups
            step = max(1, (1 << 22) // max(g.shape[-1] * width, 1))  # groups per chunk: bounded memory
            norms = []
            for g0 in range(0, groups, step):
                cols = torch.arange(g0 * width, min(groups, g0 + step) * width, device=x.device)
                block = ops.structured_block_grad(g.to(x.dtype), x, None, cols, checked=True)  # an arange: in range
                distributed.all_reduce_sum_(block)  # the whole batch's gradient, before its norm
                norms.append(block.pow(2).sum(0).view(-1, width).sum(1))
            self._add(key, torch.cat(norms))

        return hook

    def _detach(self) -> None:
        for h in self.handles:
            h.remove()
        for p, flag in self._requires_grad:
            p.requires_grad_(flag)
        self.handles, self._requires_grad, self._inputs = [], [], {}


def _unit_scores(model, blocks, geo, config, calibration) -> Dict[Tuple[int, str], Tensor]:
    """A score per head ("heads") and per channel ("channels") in every block; larger is chosen first."""
    units = {"heads": geo.heads, "channels": geo.channels}
    scores = {}
    if config.selection == "random":
        for block in blocks:
            for kind, n in units.items():
                g = torch.Generator().manual_seed(zlib.crc32(f"{config.seed}:{block.number}:{kind}".encode()))
                scores[(block.number, kind)] = torch.rand(n, generator=g)
        return scores
    if config.selection == "weight-norm":
        for block in blocks:
            o_proj, down_proj = block.layers["o_proj"], block.layers["down_proj"]
            with engines.gathered([o_proj.weight, down_proj.weight]):  # whole under ZeRO-3
                scores[(block.number, "heads")] = _column_norms(logical_weight(o_proj), geo.heads)
                scores[(block.number, "channels")] = _column_norms(logical_weight(down_proj), geo.channels)
        return scores
    if calibration is None:
        raise ValueError(f'selection="{config.selection}" needs calibration= (a few batches of model inputs)')
    stats = _CalibrationStats(model, blocks, geo, config.selection)
    stats.run(calibration)
    for block in blocks:
        scores[(block.number, "heads")] = stats.scores[(block.number, "o_proj")].cpu()
        scores[(block.number, "channels")] = stats.scores[(block.number, "down_proj")].cpu()
    return scores


def _choose(scores: Dict[Tuple[int, str], Tensor], numbers: List[int], kind: str, ratio: float, scope: str) -> Dict[int, Tensor]:
    """Sorted unit indices chosen per block: the top `ratio` of units by score, across blocks or per block."""
    if ratio == 0:
        return {}
    if scope == "layer":
        chosen = {}
        for n in numbers:
            s = scores[(n, kind)]
            take = max(1, round(ratio * s.numel()))
            chosen[n] = torch.sort(torch.topk(s, take).indices).values
        return chosen
    pooled = torch.cat([scores[(n, kind)] for n in numbers])
    per_block = scores[(numbers[0], kind)].numel()
    take = max(1, round(ratio * pooled.numel()))
    flat = torch.topk(pooled, take).indices
    chosen = {}
    for n_pos, n in enumerate(numbers):
        mine = flat[(flat >= n_pos * per_block) & (flat < (n_pos + 1) * per_block)] - n_pos * per_block
        if mine.numel():
            chosen[n] = torch.sort(mine).values
    return chosen


def _head_columns(heads: Tensor, head_dim: int) -> Tensor:
    return (heads[:, None] * head_dim + torch.arange(head_dim)).flatten()


def plan_layers(model, config: StructuredSparseConfig, calibration=None) -> Dict[str, Tuple[Tensor, bool]]:
    """The layers to wrap: full module name -> (sorted index, rows mode)."""
    blocks, geo = transformer_blocks(model)
    if config.layers_to_transform is not None:
        wanted = set(config.layers_to_transform)
        if not wanted:
            raise ValueError("layers_to_transform is empty: name at least one block, or pass None for all")
        missing = wanted - {b.number for b in blocks}
        if missing:
            raise ValueError(f"layers_to_transform names blocks {sorted(missing)}; the model has {len(blocks)}")
        blocks = [b for b in blocks if b.number in wanted]
    roles = set(config.targets)
    for block in blocks[:1]:
        missing = [r for r in roles if r not in block.layers]
        if missing:
            raise ValueError(f"{model.config.model_type} has no {missing} layer (its FFN has no gate); drop it from targets")
    scores = _unit_scores(model, blocks, geo, config, calibration)
    numbers = [b.number for b in blocks]
    heads = _choose(scores, numbers, "heads", config.head_ratio, config.scope)
    channels = _choose(scores, numbers, "channels", config.channel_ratio, config.scope)
    group = geo.heads // geo.kv_heads  # query heads that share one key/value head
    plan = {}
    for block in blocks:
        if block.number in heads:
            h = heads[block.number]
            if "o_proj" in roles:
                plan[block.names["o_proj"]] = (_head_columns(h, geo.head_dim), False)
            if "v_proj" in roles:
                kv = torch.unique(h // group)
                plan[block.names["v_proj"]] = (_head_columns(kv, geo.head_dim) + block.v_row_offset, True)
        if block.number in channels:
            c = channels[block.number]
            if "down_proj" in roles:
                plan[block.names["down_proj"]] = (c, False)
            for role in ("up_proj", "gate_proj"):
                if role in roles:
                    plan[block.names[role]] = (c, True)
    if not plan:
        raise ValueError("the config selects nothing to train: raise head_ratio/channel_ratio or widen targets")
    return plan


def apply_structured(
    model: nn.Module,
    config: StructuredSparseConfig,
    calibration: Optional[Sequence] = None,
    layers: Optional[Dict[str, Tuple[Tensor, bool]]] = None,
) -> nn.Module:
    """Wraps the chosen heads' and channels' layers in StructuredSparseLinear, in place, and freezes everything
    else (`layers`, name -> (index, rows), when a BackpropPlan already chose them). Returns the model. On any
    error the model is left as it was."""
    plan = layers if layers is not None else plan_layers(model, config, calibration)

    def builder(index: Tensor, rows: bool):
        return lambda layer: StructuredSparseLinear(layer, index, rows=rows, merged=config.merged)

    return install(model, config, {name: builder(index, rows) for name, (index, rows) in plan.items()})
