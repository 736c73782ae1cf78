"""The offline half of whole-model rotation (QuaRot / SpinQuant / RoSTE): where each rotation goes in a
transformers causal LM, and the exact weight rewrites that put it there.

Convention: nn.Linear computes y = x·Wᵀ + b with W (out, in) and x a row. M = H·diag(s)/√n is the orthonormal
matrix ``ops.hadamard_transform`` applies to a column, so it maps a row r to r·Mᵀ; the rotation of the
residual stream is R1 = Mᵀ (x' = x·R1).

- R1 (residual stream): embeddings E ← E·R1; readers of a norm (q/k/v, gate/up, lm_head) W ← W·R1;
  writers into the residual (o_proj, down_proj) W ← R1ᵀ·W and b ← b·R1. RMSNorm(x·R1) = RMSNorm(x)·R1 once
  every norm's γ is fused into its readers (γ := 1). A LayerNorm model is first mean-centred (SliceGPT):
  every residual writer and embedding has its mean over the hidden dim removed, so the stream has mean 0 and
  LayerNorm equals RMSNorm, which then replaces it. RMSNorm models are not centred (that would change them).
- R2 (per head, V → O): each KV head's value rows and bias take M_d on the output side, each o_proj head
  block takes it on the input side. One M_d for every head commutes with the grouped-query repetition.

Every rewrite is computed in float64 and stored once into the model's float32 (or float64) weights.
"""

from dataclasses import dataclass, field
from typing import List, Optional

import torch
from torch import Tensor, nn

from .. import ops
from ..hadamard import hadamard_factors, random_signs

SUPPORTED = ("llama", "mistral", "qwen2", "qwen3", "gpt2")


@dataclass
class Block:
    """One decoder layer's pieces, by role."""

    index: int
    attention: nn.Module
    input_norm: nn.Module
    post_attention_norm: nn.Module
    attention_readers: List[str]  # attribute paths (relative to the layer) of the linears reading input_norm
    mlp_readers: List[str]
    o_proj: str
    down_proj: str
    v_linear: str  # the linear whose output rows [v_offset, v_offset + kv_heads·head_dim) are the values
    v_offset: int
    layer: nn.Module = field(repr=False, default=None)

    def get(self, path: str) -> nn.Module:
        return self.layer.get_submodule(path)


@dataclass
class Architecture:
    """Where a supported model keeps its embeddings, layers, final norm and head."""

    model_type: str
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    layer_norm: bool  # LayerNorm (GPT-2) rather than RMSNorm
    embeddings: List[nn.Embedding]  # every embedding added into the residual stream
    final_norm_path: str
    blocks: List[Block]


def model_type_of(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED or not hasattr(model, "lm_head"):
        raise ValueError(
            f"whole-model quantization supports the causal LMs {', '.join(SUPPORTED)}; got "
            f"{type(model).__name__} (model_type={model_type!r})"
        )
    return model_type


def describe(model: nn.Module) -> Architecture:
    """The Architecture of a supported causal LM; a ValueError naming the supported ones otherwise."""
    model_type = model_type_of(model)
    config = model.config
    if model_type == "gpt2" and getattr(config, "add_cross_attention", False):
        # Its cache nests the self-attention cache inside an EncoderDecoderCache, which the coded KV cache does
        # not reach: refused rather than generating from uncoded K/V.
        raise ValueError("whole-model quantization does not support GPT-2 with add_cross_attention=True")
    if model_type == "gpt2":
        body = model.transformer
        blocks = [
            Block(i, layer.attn, layer.ln_1, layer.ln_2, ["attn.c_attn"], ["mlp.c_fc"], "attn.c_proj", "mlp.c_proj",
                  "attn.c_attn", 2 * config.n_embd, layer)
            for i, layer in enumerate(body.h)
        ]
        heads = config.n_head
        return Architecture(
            model_type, config.n_embd, config.n_inner or 4 * config.n_embd, heads, heads, config.n_embd // heads,
            True, [body.wte, body.wpe], "transformer.ln_f", blocks,
        )
    body = model.model
    blocks = [
        Block(i, layer.self_attn, layer.input_layernorm, layer.post_attention_layernorm,
              ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["mlp.gate_proj", "mlp.up_proj"],
              "self_attn.o_proj", "mlp.down_proj", "self_attn.v_proj", 0, layer)
        for i, layer in enumerate(body.layers)
    ]
    head_dim = blocks[0].attention.head_dim if blocks else config.hidden_size // config.num_attention_heads
    return Architecture(
        model_type, config.hidden_size, config.intermediate_size, config.num_attention_heads,
        config.num_key_value_heads, head_dim, False, [body.embed_tokens], "model.norm", blocks,
    )


def block_for(n: int, block_size: Optional[int]) -> Optional[int]:
    """The block size a rotation over n uses: None (the full transform) when n has a Hadamard matrix, else
    block_size (QuantConfig.rotation_block_size, None when not given)."""
    try:
        hadamard_factors(n)
        return None
    except ValueError:
        return block_size


def check_rotation_size(n: int, what: str, block_size: Optional[int] = None) -> None:
    """A clear error, before anything changes, for a size with no Hadamard matrix and no usable block size."""
    block = block_for(n, block_size)
    try:
        hadamard_factors(n if block is None else block)
    except ValueError as exc:
        raise ValueError(f"{what} ({n}) has no Hadamard rotation: {str(exc).rstrip('.')}. Use rotation='none', a "
                         "per-layer plan that leaves it off, or rotation_block_size= for a block-diagonal rotation") from None
    if block is not None and (block < 1 or n % block):
        raise ValueError(f"{what} ({n}) has no full Hadamard rotation and rotation_block_size ({block}) does not divide it")


# ---- the exact rewrites, each in float64 ----------------------------------------------------------------------


def _store(param: Tensor, value: Tensor) -> None:
    with torch.no_grad():
        param.copy_(value.to(param.dtype))


def rotate_rows(w: Tensor, signs: Optional[Tensor], transpose: bool = False, block_size: Optional[int] = None) -> Tensor:
    """Each row r ↦ r·Mᵀ (or r·M with transpose), in float64; M block-diagonal with block_size."""
    return ops.hadamard_transform(w.detach().double(), signs=signs, transpose=transpose, block_size=block_size)


def rotate_columns(w: Tensor, signs: Optional[Tensor], transpose: bool = False, block_size: Optional[int] = None) -> Tensor:
    """W ↦ M·W (or Mᵀ·W): the rotation of every column, in float64."""
    return rotate_rows(w.t(), signs, transpose, block_size).t()


def conv1d_to_linear(module: nn.Module) -> nn.Linear:
    """GPT-2's Conv1D (y = x·W + b, W (in, out)) as the nn.Linear it is."""
    weight = module.weight
    linear = nn.Linear(weight.shape[0], weight.shape[1], bias=module.bias is not None, device=weight.device,
                       dtype=weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(weight.t())
        if module.bias is not None:
            linear.bias.copy_(module.bias)
    return linear


def untie(model: nn.Module) -> None:
    """Gives lm_head its own copy of a tied embedding and records in the config that the two are separate, so
    that a reload (or post_init) does not tie them again."""
    head, embed = model.lm_head, model.get_input_embeddings()
    if head.weight is embed.weight or head.weight.data_ptr() == embed.weight.data_ptr():
        head.weight = nn.Parameter(embed.weight.detach().clone(), requires_grad=embed.weight.requires_grad)
    for config in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
        config.tie_word_embeddings = False
    if getattr(model, "_tied_weights_keys", None):
        model._tied_weights_keys = {}


def _fuse_norm(norm: nn.Module, readers: List[nn.Linear]) -> None:
    """Folds γ (and LayerNorm's β) into the linears reading the norm, then sets γ := 1 (β := 0)."""
    gamma = norm.weight.detach().double()
    beta = getattr(norm, "bias", None)
    for linear in readers:
        w = linear.weight.detach().double()
        if beta is not None:
            shift = w @ beta.detach().double()
            if linear.bias is None:
                linear.bias = nn.Parameter(torch.zeros(linear.out_features, dtype=linear.weight.dtype,
                                                       device=linear.weight.device))
            _store(linear.bias, linear.bias.detach().double() + shift)
        _store(linear.weight, w * gamma)
    with torch.no_grad():
        norm.weight.fill_(1.0)
        if beta is not None:
            beta.zero_()


def _center_writer(linear: nn.Linear) -> None:
    """Removes the mean over the output (hidden) dim from a residual writer's outputs."""
    w = linear.weight.detach().double()
    _store(linear.weight, w - w.mean(0, keepdim=True))
    if linear.bias is not None:
        b = linear.bias.detach().double()
        _store(linear.bias, b - b.mean())


def _rms_norm_for(norm: nn.LayerNorm) -> nn.RMSNorm:
    rms = nn.RMSNorm(norm.normalized_shape, eps=norm.eps, device=norm.weight.device, dtype=norm.weight.dtype)
    with torch.no_grad():
        rms.weight.copy_(norm.weight)
    return rms


def fuse_norms(model: nn.Module, arch: Architecture) -> None:
    """Every norm's γ into its readers (γ := 1). A LayerNorm model is mean-centred first and its LayerNorms
    become RMSNorms (exact once the stream has mean 0)."""
    blocks = arch.blocks
    if arch.layer_norm:
        for embedding in arch.embeddings:
            e = embedding.weight.detach().double()
            _store(embedding.weight, e - e.mean(-1, keepdim=True))
        for block in blocks:
            _center_writer(block.get(block.o_proj))
            _center_writer(block.get(block.down_proj))
    for block in blocks:
        _fuse_norm(block.input_norm, [block.get(p) for p in block.attention_readers])
        _fuse_norm(block.post_attention_norm, [block.get(p) for p in block.mlp_readers])
    _fuse_norm(model.get_submodule(arch.final_norm_path), [model.lm_head])
    if arch.layer_norm:
        for block in blocks:
            block.layer.ln_1 = block.input_norm = _rms_norm_for(block.input_norm)
            block.layer.ln_2 = block.post_attention_norm = _rms_norm_for(block.post_attention_norm)
        parent, name = arch.final_norm_path.rsplit(".", 1)
        setattr(model.get_submodule(parent), name, _rms_norm_for(model.get_submodule(arch.final_norm_path)))


def rotate_residual(model: nn.Module, arch: Architecture, signs: Tensor, block_size: Optional[int] = None) -> None:
    """R1 over the residual stream (norms already fused); block-diagonal with block_size."""
    for embedding in arch.embeddings:
        _store(embedding.weight, rotate_rows(embedding.weight, signs, block_size=block_size))
    readers = [model.lm_head]
    for block in arch.blocks:
        readers += [block.get(p) for p in block.attention_readers + block.mlp_readers]
        for path in (block.o_proj, block.down_proj):
            writer = block.get(path)
            _store(writer.weight, rotate_columns(writer.weight, signs, block_size=block_size))  # M·W = R1ᵀ·W
            if writer.bias is not None:
                _store(writer.bias, rotate_rows(writer.bias, signs, block_size=block_size))
    for reader in readers:
        _store(reader.weight, rotate_rows(reader.weight, signs, block_size=block_size))


def rotate_values(block: Block, arch: Architecture, signs: Tensor, block_size: Optional[int] = None) -> None:
    """R2 in one layer: each KV head's value output (rows and bias) by M_d, each o_proj head block by M_d on
    its input side, so attention·V·M_d·(W_o·M_d)ᵀ = attention·V·W_oᵀ (M_d block-diagonal with block_size)."""
    d, kv = arch.head_dim, arch.num_kv_heads
    v, o = block.get(block.v_linear), block.get(block.o_proj)
    rows = slice(block.v_offset, block.v_offset + kv * d)
    w_v = v.weight.detach()[rows].double().unflatten(0, (kv, d))  # (kv, d, in)
    w_v = rotate_rows(w_v.transpose(1, 2), signs, block_size=block_size).transpose(1, 2).flatten(0, 1)
    with torch.no_grad():
        v.weight[rows] = w_v.to(v.weight.dtype)
        if v.bias is not None:
            bias = rotate_rows(v.bias.detach()[rows].unflatten(0, (kv, d)), signs, block_size=block_size)
            v.bias[rows] = bias.flatten().to(v.bias.dtype)
    w_o = o.weight.detach().double().unflatten(1, (arch.num_heads, d))  # (out, heads, d)
    _store(o.weight, rotate_rows(w_o, signs, block_size=block_size).flatten(1))


def residual_signs(arch: Architecture, seed: int, device) -> Tensor:
    return random_signs(arch.hidden_size, seed, device=device)


def head_signs(arch: Architecture, seed: int, device) -> Tensor:
    return random_signs(arch.head_dim, seed + 1, device=device)
