"""Whole-model rotated quantization-aware fine-tuning (ftcore.QuantConfig): every rotation an exact identity at
16 bits, the K/V quantization, the adaptive plan, export to int4 with a coded KV cache, save / load, and the
refusals. Tiny random Llama / Mistral / Qwen2 (biases, tied) / Qwen3 (head_dim ≠ hidden/heads) / GPT-2."""

import copy
import os
import subprocess
import sys

import pytest
import torch
from torch import nn
from transformers import (
    BertConfig,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

import ftcore
from ftcore import ops
from ftcore.nn.attention import AttentionQuant, KVCodec
from ftcore.nn.quant import Int4Linear, RotatedQuantLinear
from ftcore.tuners.quantize import FLAGS, measure

ARCHS = ["llama", "mistral", "qwen2", "qwen3", "gpt2"]
VOCAB = 128


def tiny(kind: str, dtype=torch.float32, intermediate: int = 96, seed: int = 0) -> nn.Module:
    """Two layers, 4 query heads over 2 KV heads (grouped-query), norms and biases made non-trivial."""
    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=intermediate, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    elif kind == "mistral":
        model = MistralForCausalLM(MistralConfig(**common))
    elif kind == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common, tie_word_embeddings=True))
    elif kind == "qwen3":
        model = Qwen3ForCausalLM(Qwen3Config(**common, head_dim=32, tie_word_embeddings=True))
    else:
        model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                           n_inner=intermediate, bos_token_id=0, eos_token_id=0))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or ".ln" in name or "bias" in name:
                p.add_(torch.randn_like(p) * 0.3)
    return model.to(dtype).eval()


def exact_norms(model: nn.Module) -> nn.Module:
    """transformers' RMSNorms compute in float32 whatever the dtype; torch's computes in the input's, which
    is what an fp64 identity check needs (the rotation is exact, the reference must be too)."""
    for name, module in list(model.named_modules()):
        if type(module).__name__.endswith("RMSNorm"):
            norm = nn.RMSNorm(module.weight.shape, eps=module.variance_epsilon, dtype=module.weight.dtype)
            norm.weight.data.copy_(module.weight.data)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, norm)
    return model


def ids(seed: int = 0, size: int = 2, length: int = 12) -> torch.Tensor:
    return torch.randint(0, VOCAB, (size, length), generator=torch.Generator().manual_seed(seed))


def random_subset(seed: int, layers: int = 2) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {i: {f: bool(torch.randint(0, 2, (1,), generator=g)) for f in FLAGS} for i in range(layers)}


FULL_PRECISION = dict(w_bits=16, a_bits=None, kv_bits=16)


# ---- every rotation is an identity at 16 bits ---------------------------------------------------------------


@pytest.mark.parametrize("kind", ARCHS)
@pytest.mark.parametrize("rotation", ["r1", "full", 0, 1])
def test_rotations_preserve_logits_fp64(kind, rotation):
    model = exact_norms(tiny(kind, torch.float64))
    x = ids()
    expected = model(x).logits
    if isinstance(rotation, int):
        rotation = random_subset(rotation)
    ftcore.apply(model, ftcore.QuantConfig(**FULL_PRECISION, rotation=rotation))
    assert (model(x).logits - expected).abs().max() < 1e-9


@pytest.mark.parametrize("kind", ARCHS)
def test_rotations_preserve_logits_fp32(kind):
    model = tiny(kind)
    x = ids(1)
    expected = model(x).logits
    ftcore.apply(model, ftcore.QuantConfig(**FULL_PRECISION, rotation=random_subset(7)))
    assert (model(x).logits - expected).abs().max() < 1e-4
    full = tiny(kind)
    ftcore.apply(full, ftcore.QuantConfig(**FULL_PRECISION, rotation="full"))
    assert (full(x).logits - expected).abs().max() < 1e-4


def test_full_rotation_with_kv_16_and_r3_equals_plain_attention_under_gqa():
    model = tiny("llama")
    assert model.config.num_key_value_heads < model.config.num_attention_heads
    x = ids(2)
    expected = model(x).logits
    ftcore.apply(model, ftcore.QuantConfig(**FULL_PRECISION, rotation={0: {"r3": True}, 1: {"r3": True}}))
    assert all(m.ftcore_attention.r3 for m in model.modules() if hasattr(m, "ftcore_attention"))
    assert (model(x).logits - expected).abs().max() < 1e-4


def test_untie_survives_save_and_load(tmp_path):
    model = tiny("qwen2")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    x = ids(3)
    expected = model(x).logits
    ftcore.apply(model, ftcore.QuantConfig(**FULL_PRECISION, rotation="full"))
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    ftcore.save_quantized(model, str(tmp_path))
    loaded = ftcore.load_quantized(str(tmp_path))
    assert not loaded.config.tie_word_embeddings
    assert loaded.lm_head.weight.data_ptr() != loaded.model.embed_tokens.weight.data_ptr()
    assert (loaded(x).logits - expected).abs().max() < 1e-4


def test_layernorm_model_is_centred_and_rmsnorm_models_are_not():
    gpt2 = tiny("gpt2")
    ftcore.apply(gpt2, ftcore.QuantConfig(**FULL_PRECISION, rotation="r1"))
    assert all(type(m) is not nn.LayerNorm for m in gpt2.modules())
    llama = tiny("llama")
    embed = llama.model.embed_tokens.weight.detach().clone()
    ftcore.apply(llama, ftcore.QuantConfig(**FULL_PRECISION, rotation="r1"))
    # R1 is orthonormal: row norms of the embedding are kept (a centring would shrink them).
    torch.testing.assert_close(llama.model.embed_tokens.weight.norm(dim=1), embed.norm(dim=1))


# ---- K/V quantization ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits,symmetric", [(4, False), (4, True), (8, False), (3, True)])
def test_kv_codec_decodes_to_the_fake_quantized_values(bits, symmetric):
    spec = AttentionQuant(0, kv_bits=bits, kv_symmetric=symmetric, kv_clip_ratio=0.95)
    x = torch.randn(2, 3, 5, 16)
    x[0, 1, 2] = 0.0  # max == min
    codec = KVCodec(spec, 16, torch.float32)
    rows = codec.encode(x)
    assert rows.dtype == torch.uint8 and rows.shape[-1] == codec.bytes_per_vector()
    assert torch.equal(codec.decode(rows), spec.quantize(x))


def test_kv4_coded_cache_equals_quantizing_the_whole_kv_every_step():
    """The exported model codes each token's K/V once, before the cache; the QAT model keeps the cache in
    full precision and quantizes the whole K/V per step. Per (token, head) they are the same values."""
    model = tiny("llama")
    ftcore.apply(model, ftcore.QuantConfig(rotation="full"))
    x = ids(4, size=1, length=10)
    fake_quant = model(x).logits
    ftcore.export_int4(model)
    from transformers import DynamicCache

    cache, steps = DynamicCache(config=model.config), []
    for t in range(x.shape[1]):
        steps.append(model(x[:, t : t + 1], cache=cache, use_cache=True).logits)
    assert cache.layers[0].keys.dtype == torch.uint8  # stored coded
    assert (torch.cat(steps, 1) - fake_quant).abs().max() < 1e-4


# ---- the adaptive plan --------------------------------------------------------------------------------------


def calibration(n: int = 2):
    return [ids(100 + i, size=2, length=16) for i in range(n)]


def test_adaptive_plan_is_deterministic_and_printable():
    plans = []
    for _ in range(2):
        model = ftcore.apply(tiny("qwen3"), ftcore.QuantConfig(rotation="adaptive"), calibration=calibration())
        plans.append(model.ftcore_rotation_plan)
    assert plans[0] == plans[1]
    text = str(plans[0])
    assert "R4" in text and "err" in text and len(text.splitlines()) == 4


def test_adaptive_turns_r4_on_for_an_outlier_channel():
    model = tiny("llama")
    with torch.no_grad():  # one intermediate channel 100× larger: down_proj's input gets an outlier
        model.model.layers[1].mlp.up_proj.weight[5] *= 100
    ftcore.apply(model, ftcore.QuantConfig(rotation="adaptive"), calibration=calibration())
    plan = model.ftcore_rotation_plan
    assert plan.layers[1]["r4"]
    off, on = plan.errors[1]["r4"]
    assert on < off


def _per_token_error(x: torch.Tensor, bits: int = 4, clip: float = 0.95) -> float:
    """An independent asymmetric per-row min/max quantizer (zero inside the range)."""
    x = x.detach().double().reshape(-1, x.shape[-1])
    lo, hi = clip * x.amin(-1, keepdim=True).clamp(max=0), clip * x.amax(-1, keepdim=True).clamp(min=0)
    scale = ((hi - lo) / (2**bits - 1)).float().double()
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero = torch.round(-lo / scale)
    q = (torch.round(x / scale) + zero).clamp(0, 2**bits - 1)
    return float(((q - zero) * scale - x).square().mean())


def test_adaptive_errors_match_a_recomputation():
    model = tiny("llama")
    batches = calibration(1)
    adaptive = ftcore.apply(copy.deepcopy(model), ftcore.QuantConfig(rotation="adaptive"), calibration=batches)
    # The "all off" trial, rebuilt through the public API, with the inputs captured.
    off = ftcore.apply(model, ftcore.QuantConfig(rotation={}))
    down = off.model.layers[0].mlp.down_proj
    seen = {}
    down.register_forward_pre_hook(lambda m, args: seen.__setitem__("x", args[0].detach()))
    spec = off.model.layers[0].self_attn.ftcore_attention
    original_call = spec.quantize_kv
    spec.quantize_kv = lambda k, v: (seen.__setitem__("k", k.detach()), original_call(k, v))[1]
    measure(off, [{"input_ids": b} for b in batches], "recompute")
    w_err = _per_token_error(down.weight)
    x_err = _per_token_error(seen["x"])
    k_err = _per_token_error(seen["k"])
    errors = adaptive.ftcore_rotation_plan.errors[0]
    assert errors["r4"][0] == pytest.approx(w_err + x_err, rel=1e-4)
    assert errors["r3"][0] == pytest.approx(k_err, rel=1e-4)


# ---- training -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["qwen2", "gpt2"])
def test_qat_gradients_reach_every_master_and_no_hadamard_buffer(kind):
    model = ftcore.apply(tiny(kind, torch.bfloat16), ftcore.QuantConfig(rotation="full"))
    quantized = [m for m in model.modules() if isinstance(m, RotatedQuantLinear)]
    assert quantized and all(m.weight.dtype == torch.float32 for m in quantized)
    assert any(m.rotation_signs is not None for m in quantized)
    assert not any("rotation_signs" in name for name, _ in model.named_parameters())
    model.train()
    x = ids(5)
    optimizer = torch.optim.AdamW(ftcore.trainable_parameters(model), lr=1e-3)
    losses = []
    for _ in range(3):
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        if not losses:
            missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
            assert not [n for n in missing if "wpe" not in n], missing  # unused positions get no gradient
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss))
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("learnable_scale", [False, True])
def test_a_second_forward_before_backward_gives_the_summed_gradients(learnable_scale):
    config = lambda: ftcore.QuantConfig(rotation="full", w_symmetric=True, w_learnable_scale=learnable_scale)  # noqa: E731
    a, b = ids(1), ids(2)
    model = ftcore.apply(tiny("llama"), config())
    (model(input_ids=a, labels=a).loss + model(input_ids=b, labels=b).loss).backward()  # two graphs alive at once
    together = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    for x in (a, b):
        model(input_ids=x, labels=x).loss.backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, together[n], rtol=1e-5, atol=1e-7, msg=n)


def test_trainer_runs_a_qat_step(tmp_path):
    from transformers import Trainer, TrainingArguments

    model = ftcore.apply(tiny("llama"), ftcore.QuantConfig(rotation="full"))
    data = [{"input_ids": row, "labels": row} for row in ids(6, size=4, length=16)]
    args = TrainingArguments(str(tmp_path), max_steps=2, per_device_train_batch_size=2, report_to=[],
                             save_strategy="no", use_cpu=True)
    before = model.model.layers[0].mlp.down_proj.weight.detach().clone()
    Trainer(model=model, args=args, train_dataset=data).train()
    assert not torch.equal(before, model.model.layers[0].mlp.down_proj.weight)


def test_a_second_method_is_refused_both_ways():
    model = ftcore.apply(tiny("llama"), ftcore.QuantConfig(rotation="none"))
    with pytest.raises(ValueError, match="quantized"):
        ftcore.apply(model, ftcore.SparseDeltaConfig(density=0.01))
    with pytest.raises(ValueError, match="quantized"):
        ftcore.apply(model, ftcore.QuantConfig())
    adapted = ftcore.apply(tiny("llama"), ftcore.SparseDeltaConfig(density=0.01))
    with pytest.raises(ValueError, match="adapter"):
        ftcore.apply(adapted, ftcore.QuantConfig())


# ---- export, generate, save / load --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ARCHS)
def test_export_matches_fake_quant_and_generates(kind):
    model = ftcore.apply(tiny(kind), ftcore.QuantConfig(rotation="full"))
    prompts = ids(7, size=4, length=12)
    fake_quant = model(prompts).logits
    ftcore.export_int4(model)
    assert not any(isinstance(m, RotatedQuantLinear) for m in model.modules())
    assert any(isinstance(m, Int4Linear) for m in model.modules())
    exported = model(prompts).logits
    assert (exported - fake_quant).abs().max() < 1e-3
    assert (exported.argmax(-1) == fake_quant.argmax(-1)).float().mean() >= 0.95
    cached = model.generate(prompts, max_new_tokens=5, do_sample=False, pad_token_id=0)
    uncached = model.generate(prompts, max_new_tokens=5, do_sample=False, pad_token_id=0, use_cache=False)
    assert torch.equal(cached, uncached)


def test_learnable_weight_scale_trains_and_exports_with_the_learned_scale():
    model = ftcore.apply(tiny("llama"), ftcore.QuantConfig(rotation="full", w_symmetric=True, w_learnable_scale=True))
    scales = [n for n, p in model.named_parameters() if n.endswith("weight_scale")]
    assert len(scales) == 2 * 7  # every quantized linear of the two layers
    x = ids(3, size=2, length=12)
    optimizer = torch.optim.AdamW(ftcore.trainable_parameters(model), lr=1e-2)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if n in scales}
    for _ in range(2):
        model(input_ids=x, labels=x).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert all(not torch.equal(p.detach(), before[n]) for n, p in model.named_parameters() if n in scales)
    model.eval()
    with torch.no_grad():
        fake_quant = model(x).logits
        ftcore.export_int4(model)
        exported = model(x).logits
    assert (exported - fake_quant).abs().max() < 1e-3


def test_generate_with_left_padding_matches_unpadded():
    model = ftcore.export_int4(ftcore.apply(tiny("qwen2"), ftcore.QuantConfig(rotation="full")))
    x = ids(8, size=2, length=10)
    mask = torch.ones_like(x)
    mask[0, :3] = 0
    batch = model.generate(x, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    alone = model.generate(x[:1, 3:], max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(batch[0, 3:], alone[0])


def test_save_and_load_in_a_fresh_process(tmp_path):
    model = ftcore.export_int4(ftcore.apply(tiny("gpt2"), ftcore.QuantConfig(rotation="full")))
    x = ids(9)
    torch.save({"ids": x, "logits": model(x).logits}, tmp_path / "expected.pt")
    out = str(tmp_path / "model")
    ftcore.save_quantized(model, out)
    with pytest.raises(FileExistsError):
        ftcore.save_quantized(model, out)
    code = (
        "import sys, torch, ftcore\n"
        f"d = torch.load({str(tmp_path / 'expected.pt')!r})\n"
        f"m = ftcore.load_quantized({out!r})\n"
        "assert type(m).__name__ == 'GPT2LMHeadModel'\n"
        "assert (m(d['ids']).logits - d['logits']).abs().max() == 0\n"
        "m.generate(d['ids'], max_new_tokens=3, do_sample=False, pad_token_id=0)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    weights = os.path.join(out, "model.safetensors")
    with open(weights, "r+b") as f:
        f.seek(os.path.getsize(weights) - 3)
        f.write(b"\x00\x01\x02")
    with pytest.raises(ValueError, match="checksum"):
        ftcore.load_quantized(out)


def test_quantized_lm_head_exports_saves_and_loads(tmp_path):
    model = ftcore.apply(tiny("qwen2"), ftcore.QuantConfig(rotation="none", quantize_lm_head=True))  # tied, no R1
    assert model.lm_head.weight.data_ptr() != model.get_input_embeddings().weight.data_ptr()
    assert model.config.tie_word_embeddings is False  # a reload or post_init must not tie the quantized head back
    ftcore.export_int4(model)
    assert isinstance(model.lm_head, Int4Linear)
    x = ids(4)
    want = model(x).logits
    model.generate(x, max_new_tokens=3, do_sample=False, pad_token_id=0)
    ftcore.save_quantized(model, str(tmp_path / "m"))
    assert torch.equal(ftcore.load_quantized(str(tmp_path / "m"))(x).logits, want)


def test_a_tied_model_without_rotation_saves_and_loads(tmp_path):
    model = ftcore.export_int4(ftcore.apply(tiny("qwen2"), ftcore.QuantConfig(rotation="none")))
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()  # still tied
    x = ids(5)
    ftcore.save_quantized(model, str(tmp_path / "m"))
    loaded = ftcore.load_quantized(str(tmp_path / "m"))
    assert torch.equal(loaded(x).logits, model(x).logits)


def test_export_shrinks_linears_and_kv_cache():
    model = ftcore.apply(tiny("llama"), ftcore.QuantConfig(rotation="full"))
    from ftcore.tuners.quantize import kv_cache_bytes_per_token

    full = kv_cache_bytes_per_token(model)
    ftcore.export_int4(model)
    coded = kv_cache_bytes_per_token(model)
    assert coded < 0.25 * full  # fp32 cache → 4-bit codes + 5 bytes of scale and zero a (token, head)
    for m in model.modules():
        if isinstance(m, Int4Linear):
            stored = sum(t.numel() * t.element_size() for t in (m.packed, m.scale, m.zero_point))
            assert stored < 0.3 * m.in_features * m.out_features * 2  # vs fp16


# ---- block-diagonal rotations for sizes with no Hadamard matrix ----------------------------------------------


def tiny_unsupported(dtype=torch.float32) -> nn.Module:
    """hidden 54 = 2·27, head_dim 18 = 2·9, intermediate 110 = 2·55: no full Hadamard matrix for any of them."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=54, intermediate_size=110, num_hidden_layers=2,
                                         num_attention_heads=3, num_key_value_heads=1, max_position_embeddings=64))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.3)
    return model.to(dtype).eval()


def test_block_diagonal_rotations_preserve_logits_fp64():
    model = exact_norms(tiny_unsupported(torch.float64))
    x = ids(1)
    want = model(x).logits
    config = ftcore.QuantConfig(w_bits=16, a_bits=16, kv_bits=16, rotation="full", rotation_block_size=2)
    got = ftcore.apply(model, config)(x).logits
    assert (got - want).abs().max() < 1e-9
    down = model.model.layers[0].mlp.down_proj
    assert down.quantizer.online_rotation and down.quantizer.rotation_block_size == 2
    assert model.model.layers[0].self_attn.ftcore_attention.rotation_block_size == 2


def test_block_diagonal_rotations_export_save_and_load(tmp_path):
    model = ftcore.apply(tiny_unsupported(), ftcore.QuantConfig(rotation="full", rotation_block_size=2))
    x = ids(2)
    fake_quant = model(x).logits
    ftcore.export_int4(model)
    exported = model(x).logits
    assert (exported - fake_quant).abs().max() < 1e-3
    ftcore.save_quantized(model, str(tmp_path / "m"))
    assert torch.equal(ftcore.load_quantized(str(tmp_path / "m"))(x).logits, exported)


def test_a_block_size_leaves_sizes_with_a_hadamard_matrix_full():
    model = ftcore.apply(tiny("llama"), ftcore.QuantConfig(rotation="full", rotation_block_size=8))
    assert model.model.layers[0].mlp.down_proj.quantizer.rotation_block_size is None  # 96 = 12·8 has one
    assert model.model.layers[0].self_attn.ftcore_attention.rotation_block_size is None


# ---- refusals before anything changes -----------------------------------------------------------------------


@pytest.mark.parametrize("kwargs", [dict(w_bits=9), dict(a_bits=1), dict(kv_bits=True), dict(rotation="r2"),
                                    dict(rotation={0: {"r5": True}}), dict(w_clip_ratio=1.5), dict(a_group_size=0),
                                    dict(rotation_block_size=0)])
def test_bad_configs_are_refused(kwargs):
    with pytest.raises(ValueError):
        ftcore.QuantConfig(**kwargs)


def _refused_untouched(model, config, match, **kwargs):
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        ftcore.apply(model, config, **kwargs)
    assert not hasattr(model, "_ftcore_quant")
    after = model.state_dict()
    assert state.keys() == after.keys() and all(torch.equal(state[k], after[k]) for k in state)


def test_unsupported_sizes_layers_and_missing_calibration_are_refused_untouched():
    model = tiny("llama", intermediate=70)  # 70 = 35·2: no Hadamard matrix of that size
    _refused_untouched(model, ftcore.QuantConfig(rotation="full"), "intermediate_size")
    _refused_untouched(model, ftcore.QuantConfig(rotation="full", rotation_block_size=4), "does not divide")
    _refused_untouched(model, ftcore.QuantConfig(rotation="full", rotation_block_size=14), "intermediate_size")
    _refused_untouched(model, ftcore.QuantConfig(rotation={5: {"r2": True}}), "layers")
    _refused_untouched(model, ftcore.QuantConfig(rotation="adaptive"), "intermediate_size")  # it tries R4 on
    _refused_untouched(tiny("llama"), ftcore.QuantConfig(rotation="adaptive"), "calibration")
    _refused_untouched(model, ftcore.QuantConfig(w_group_size=32, rotation="none"), "w_group_size")
    ftcore.apply(model, ftcore.QuantConfig(rotation={0: {"r2": True, "r3": True}}))  # R4 off: fine


def test_gpt2_with_cross_attention_is_refused_untouched():
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=2, add_cross_attention=True))
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="add_cross_attention"):
        ftcore.apply(model, ftcore.QuantConfig())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_unsupported_architecture_is_refused_naming_the_supported_ones():
    bert = BertModel(BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                                intermediate_size=96))
    with pytest.raises(ValueError, match="llama, mistral, qwen2, qwen3, gpt2"):
        ftcore.apply(bert, ftcore.QuantConfig())
