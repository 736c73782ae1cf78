"""Structured sparse fine-tuning (S²FT): the module against the layer it replaces and against dense fine-tuning
restricted to the block, what it keeps for backward, the model surgery on six architectures (grouped-query
attention, explicit head_dim, fused q/k/v), selection, partial backpropagation, the planner, and adapters."""

import itertools

import pytest
import torch
from conftest import compare_with_dense
from models import batch, tiny_gpt2, tiny_llama
from torch import nn
from transformers.pytorch_utils import Conv1D

import ftcore
from ftcore import StructuredSparseConfig, StructuredSparseLinear
from ftcore.nn.structured import _StructuredSparseLinearFunction
from ftcore.tuners.structured import transformer_blocks


def bits(t):
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def make_layer(kind, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    if kind == "linear":
        return nn.Linear(24, 16).to(dtype)
    layer = Conv1D(16, 24)
    nn.init.normal_(layer.weight, std=0.2)
    return layer.to(dtype)


def logical(layer):
    return layer.weight.t() if isinstance(layer, Conv1D) else layer.weight


# ---- the module ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("rows", [False, True])
@pytest.mark.parametrize("merged", [True, False])
def test_module_matches_dense_finetuning_of_the_block(device, kind, rows, merged):
    layer = make_layer(kind).to(device)
    dense = make_layer(kind).to(device)
    index = torch.tensor([1, 4, 5, 11], device=device)
    module = StructuredSparseLinear(layer, index, rows=rows, merged=merged)
    x = torch.randn(2, 5, 24, device=device, requires_grad=True)
    assert torch.equal(module(x), dense(x))  # exact at initialisation
    with torch.no_grad():
        module.block.normal_()
        w = logical(dense)
        if rows:
            w[index] += module.block
        else:
            w[:, index] += module.block
    w_grad = compare_with_dense(module, dense, x)
    expected = w_grad[index] if rows else w_grad[:, index]
    torch.testing.assert_close(module.block.grad, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_unmerge_is_bit_exact_and_fp32_master(dtype):
    layer = make_layer("linear", dtype)
    original = layer.weight.detach().clone()
    module = StructuredSparseLinear(layer, torch.tensor([0, 7, 9]))
    assert module.block.dtype == torch.float32
    opt = torch.optim.SGD([module.block], lr=0.5)
    x = torch.randn(6, 24, dtype=dtype)
    for _ in range(3):
        module(x).float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    module(x)
    assert not torch.equal(bits(layer.weight), bits(original))
    module.set_merged(False)
    assert torch.equal(bits(layer.weight), bits(original))


def test_column_block_keeps_only_the_input_slice():
    layer = nn.Linear(512, 64)
    x = torch.randn(8, 32, 512, requires_grad=True)

    def saved_activation_bytes(module):
        own = {t.data_ptr() for t in (*module.parameters(), *module.buffers())}  # saved by reference: no memory
        sizes = []

        def pack(t):
            if t.data_ptr() not in own:
                sizes.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            module(x)
        return sum(sizes)

    columns = StructuredSparseLinear(layer, torch.arange(0, 512, 16))  # 32 of 512 input columns
    assert saved_activation_bytes(columns) == 8 * 32 * 32 * 4  # x[..., S] only: 1/16 of x
    rows = StructuredSparseLinear(nn.Linear(512, 64), torch.arange(4), rows=True)
    assert saved_activation_bytes(rows) == x.numel() * 4  # a row block needs the whole input
    rows.block.requires_grad_(False)
    assert saved_activation_bytes(rows) == 0  # frozen: only the input gradient, nothing of x kept


def test_function_gradcheck_float64_unmerged():
    layer = nn.Linear(7, 5).double()
    x = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    for rows, index, shape in ((False, torch.tensor([1, 4, 6]), (5, 3)), (True, torch.tensor([0, 3]), (2, 7))):
        block = torch.randn(shape, dtype=torch.float64, requires_grad=True)

        def f(x, block):
            return _StructuredSparseLinearFunction.apply(x, block, layer.weight, layer.bias, index, rows, False, True)

        assert torch.autograd.gradcheck(f, (x, block))


def test_autocast_bfloat16_cpu():
    module = StructuredSparseLinear(make_layer("linear"), torch.tensor([2, 3]))
    x = torch.randn(4, 24, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = module(x)
    y.float().sum().backward()
    assert y.dtype == torch.bfloat16 and module.block.grad.dtype == torch.float32 and x.grad.dtype == torch.float32


# ---- model surgery on real architectures -----------------------------------------------------------------------


def tiny(model_type, seed=0):
    from transformers import (BertConfig, BertModel, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM,
                              Qwen3Config, Qwen3ForCausalLM)

    torch.manual_seed(seed)
    common = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=64)
    if model_type == "llama":
        return tiny_llama(seed)
    if model_type == "gpt2":
        return tiny_gpt2(seed)
    if model_type == "mistral":
        return MistralForCausalLM(MistralConfig(**common, num_key_value_heads=2)).eval()
    if model_type == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**common, num_key_value_heads=1)).eval()
    if model_type == "qwen3":  # head_dim 24 is not hidden / heads = 16
        return Qwen3ForCausalLM(Qwen3Config(**common, num_key_value_heads=2, head_dim=24)).eval()
    if model_type == "bert":
        return BertModel(BertConfig(**{k: v for k, v in common.items() if k != "max_position_embeddings"})).eval()


ARCHS = ["llama", "mistral", "qwen2", "qwen3", "gpt2", "bert"]


def output(model, seed=0):
    with torch.no_grad():
        out = model(input_ids=batch(seed)["input_ids"])
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def loss_of(model, seed=0):
    out = model(**batch(seed)) if hasattr(model, "lm_head") else None
    if out is not None:
        return out.loss
    hidden = model(input_ids=batch(seed)["input_ids"]).last_hidden_state  # an encoder: regress a few features
    return (hidden[..., :8] - 1.0).pow(2).mean()


@pytest.mark.parametrize("arch", ARCHS)
def test_apply_on_each_architecture(arch, tmp_path):
    config = StructuredSparseConfig(head_ratio=0.25, channel_ratio=0.1, targets=("o_proj", "v_proj", "down_proj", "up_proj"))
    base_out = output(tiny(arch))
    model = ftcore.apply(tiny(arch), config)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, StructuredSparseLinear)}
    assert layers and torch.equal(output(model), base_out)
    assert {id(p) for p in ftcore.trainable_parameters(model)} == {id(m.block) for m in layers.values()}
    opt = torch.optim.AdamW(ftcore.trainable_parameters(model), lr=1e-2)
    losses = []
    for step in range(4):
        loss = loss_of(model, step % 2)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss_of(model, 0).item())
    assert losses[-1] < losses[0]
    adapted = output(model)
    ftcore.save_adapter(model, str(tmp_path))
    assert torch.equal(output(ftcore.load_adapter(tiny(arch), str(tmp_path))), adapted)
    with ftcore.disable(model):  # computed without writing the merged weights: equal up to float rounding
        torch.testing.assert_close(output(model), base_out, rtol=1e-5, atol=1e-5)
    merged = ftcore.merge(model)
    assert not any(isinstance(m, StructuredSparseLinear) for m in merged.modules())
    torch.testing.assert_close(output(merged), adapted)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "gpt2"])
def test_heads_map_to_their_columns_and_kv_rows(arch):
    model = tiny(arch)
    blocks, geo = transformer_blocks(model)
    ftcore.apply(model, StructuredSparseConfig(head_ratio=0.5, targets=("o_proj", "v_proj"), scope="layer"))
    group = geo.heads // geo.kv_heads
    for b in blocks:
        o = model.get_submodule(b.names["o_proj"])
        v = model.get_submodule(b.names["v_proj"])
        heads = torch.unique(o.index // geo.head_dim)
        assert o.index.numel() == heads.numel() * geo.head_dim == 2 * geo.head_dim  # whole heads
        kv = torch.unique(heads // group)
        expected_rows = (kv[:, None] * geo.head_dim + torch.arange(geo.head_dim)).flatten() + b.v_row_offset
        assert torch.equal(v.index.long(), expected_rows) and v.rows


def test_unsupported_architecture_is_named():
    from transformers import OPTConfig, OPTForCausalLM

    model = OPTForCausalLM(OPTConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, ffn_dim=64, num_attention_heads=2))
    with pytest.raises(ValueError, match=r"supports model types \['bert', 'gpt2', 'llama', 'mistral', 'qwen2', 'qwen3'\]; this model is 'opt'"):
        ftcore.apply(model, StructuredSparseConfig(head_ratio=0.5))
    with pytest.raises(ValueError, match="no \\['gate_proj'\\] layer"):
        ftcore.apply(tiny_gpt2(), StructuredSparseConfig(channel_ratio=0.5, targets=("gate_proj",)))
    with pytest.raises(ValueError, match="give head_ratio > 0"):
        StructuredSparseConfig()
    with pytest.raises(ValueError, match="targets must be"):
        StructuredSparseConfig(head_ratio=0.1, targets=("q_proj",))


# ---- selection -------------------------------------------------------------------------------------------------


def chosen_heads(model, geo):
    return {n: torch.unique(m.index // geo.head_dim).tolist() for n, m in model.named_modules() if isinstance(m, StructuredSparseLinear) and n.endswith("o_proj")}


def test_random_selection_seeded_and_scoped():
    geo = transformer_blocks(tiny_llama())[1]
    a = chosen_heads(ftcore.apply(tiny_llama(), StructuredSparseConfig(head_ratio=0.5, seed=3)), geo)
    b = chosen_heads(ftcore.apply(tiny_llama(), StructuredSparseConfig(head_ratio=0.5, seed=3)), geo)
    c = chosen_heads(ftcore.apply(tiny_llama(), StructuredSparseConfig(head_ratio=0.5, seed=4)), geo)
    assert a == b and a != c
    assert sum(len(h) for h in a.values()) == 4  # pooled over the model: half of 2 x 4 heads
    per_layer = chosen_heads(ftcore.apply(tiny_llama(), StructuredSparseConfig(head_ratio=0.5, scope="layer")), geo)
    assert [len(h) for h in per_layer.values()] == [2, 2]


def test_weight_norm_activation_and_gradient_selection():
    blocks, geo = transformer_blocks(tiny_llama())
    cfg = dict(head_ratio=0.25, channel_ratio=0.25, scope="layer")
    # weight-norm: the o_proj heads with the largest column-block norms
    model = ftcore.apply(tiny_llama(), StructuredSparseConfig(selection="weight-norm", **cfg))
    w = tiny_llama().model.layers[1].self_attn.o_proj.weight
    head_norms = w.pow(2).sum(0).view(geo.heads, -1).sum(1)
    assert chosen_heads(model, geo)["model.layers.1.self_attn.o_proj"] == [int(head_norms.argmax())]
    # activation: the down_proj input channels with the largest mean |x|
    data = [batch(0), batch(1)]
    reference = tiny_llama()
    seen = []
    hook = reference.model.layers[0].mlp.down_proj.register_forward_hook(lambda m, i, o: seen.append(i[0].abs().reshape(-1, i[0].shape[-1]).mean(0)))
    with torch.no_grad():
        for b in data:
            reference(**b)
    hook.remove()
    expected = torch.sort(torch.topk(sum(seen), 24).indices).values
    model = ftcore.apply(tiny_llama(), StructuredSparseConfig(selection="activation", **cfg), calibration=data)
    assert torch.equal(model.model.layers[0].mlp.down_proj.index.long(), expected)
    # gradient: the heads whose o_proj weight gradient is largest
    dense = tiny_llama()
    for b in data:
        dense(**b).loss.backward()
    g = dense.model.layers[0].self_attn.o_proj.weight.grad
    expected_head = int(g.pow(2).sum(0).view(geo.heads, -1).sum(1).argmax())
    model = ftcore.apply(tiny_llama(), StructuredSparseConfig(selection="gradient", **cfg), calibration=data)
    assert chosen_heads(model, geo)["model.layers.0.self_attn.o_proj"] == [expected_head]
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(ValueError, match="needs calibration"):
        ftcore.apply(tiny_llama(), StructuredSparseConfig(selection="gradient", **cfg))


# ---- partial backpropagation -----------------------------------------------------------------------------------


def test_backward_stops_at_the_lowest_trainable_layer():
    model = ftcore.apply(tiny_llama(layers=3), StructuredSparseConfig(head_ratio=0.5, channel_ratio=0.5, layers_to_transform=[1]))
    reached = set()
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            module.register_full_backward_pre_hook(lambda m, g, name=name: reached.add(name))
    model(**batch()).loss.backward()
    assert any(n.startswith("model.layers.2.") for n in reached) and "lm_head" in reached
    assert not any(n.startswith("model.layers.0.") for n in reached)  # below the lowest trainable block: untouched
    assert model.model.embed_tokens.weight.grad is None


def train_losses(model, steps=4, checkpointing=False, compiled=False):
    if checkpointing:
        model.train()
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    runner = torch.compile(model, backend="aot_eager") if compiled else model
    opt = torch.optim.AdamW(ftcore.trainable_parameters(model), lr=1e-2)
    losses = []
    for _ in range(steps):
        loss = runner(**batch()).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_checkpointing_and_compile_train_like_eager():
    config = StructuredSparseConfig(head_ratio=0.5, channel_ratio=0.2)
    eager = train_losses(ftcore.apply(tiny_llama(), config))
    assert train_losses(ftcore.apply(tiny_llama(), config), checkpointing=True) == pytest.approx(eager, rel=1e-4)
    assert train_losses(ftcore.apply(tiny_llama(), config), compiled=True) == pytest.approx(eager, rel=1e-4)
    assert eager[-1] < eager[0]


# ---- the planner ----------------------------------------------------------------------------------------------


def test_plan_backprop_is_optimal_under_the_budget():
    from ftcore.tuners.planner import plan_cost

    data = [batch(0), batch(1)]
    plan = ftcore.plan_backprop(tiny_llama(layers=3), 0.5, data, head_ratio=0.25, channel_ratio=0.25)
    chosen = [u for u in plan.units if u.train]
    assert plan.cost == pytest.approx(plan_cost(chosen) / plan.full_flops) and 0.2 < plan.cost <= 0.5
    assert "backprop plan" in str(plan) and len(plan.units) == 6
    # The chain down to a block's heads runs through every linear layer above, q and k projections included.
    llama = tiny_llama(layers=3)
    per_block = sum(2 * m.weight.numel() for m in llama.model.layers[2].modules() if isinstance(m, nn.Linear))
    top_ffn = sum(2 * m.weight.numel() for m in llama.model.layers[2].mlp.modules() if isinstance(m, nn.Linear))
    heads_1 = next(u for u in plan.units if u.block == 1 and u.kind == "heads")
    head_dx = 2 * llama.lm_head.weight.numel()
    assert heads_1.chain_flops == head_dx + per_block + sum(2 * m.weight.numel() for m in llama.model.layers[1].mlp.modules() if isinstance(m, nn.Linear))
    assert next(u for u in plan.units if u.block == 2 and u.kind == "channels").chain_flops == head_dx
    assert next(u for u in plan.units if u.block == 2 and u.kind == "heads").chain_flops == head_dx + top_ffn
    # Brute force over every subset of units: none within budget is more important.
    full = plan.full_flops
    best = 0.0
    for r in range(1, len(plan.units) + 1):
        for subset in itertools.combinations(plan.units, r):
            cost = max(u.chain_flops for u in subset) + sum(u.dw_flops for u in subset)
            if cost <= 0.5 * full * (1 - 1e-3):  # the planner rounds costs up, so leave it that margin
                best = max(best, sum(u.importance for u in subset))
    assert sum(u.importance for u in plan.units if u.train) >= best * (1 - 1e-9)
    model = ftcore.apply(tiny_llama(layers=3), plan)
    trained = {n for n, m in model.named_modules() if isinstance(m, StructuredSparseLinear)}
    assert trained == set(plan.layers)
    losses = train_losses(model)
    assert losses[-1] < losses[0]
    with pytest.raises(ValueError, match="buys no trainable unit"):
        ftcore.plan_backprop(tiny_llama(layers=3), 0.01, data)
    with pytest.raises(ValueError, match="row blocks"):
        ftcore.plan_backprop(tiny_llama(layers=3), 0.5, data, targets=("o_proj", "v_proj"))
    with pytest.raises(ValueError, match="already carries an ftcore adapter"):
        ftcore.plan_backprop(model, 0.5, data)


# ---- adapters ---------------------------------------------------------------------------------------------------


def test_switch_adapter_moves_only_block_bytes(tmp_path):
    adapters = []
    for seed in (1, 2):
        model = ftcore.apply(tiny_llama(), StructuredSparseConfig(head_ratio=0.5, channel_ratio=0.2, seed=seed))
        train_losses(model, steps=2)
        ftcore.save_adapter(model, str(tmp_path / str(seed)))
        adapters.append(output(model))
    serving = ftcore.load_adapter(tiny_llama(), str(tmp_path / "1"), trainable=False)
    assert torch.equal(output(serving), adapters[0])
    before = {k: v.clone() for k, v in tiny_llama().state_dict().items()}
    ftcore.switch_adapter(serving, str(tmp_path / "2"))
    assert torch.equal(output(serving), adapters[1])
    ftcore.unmerge(serving)  # base weights back: identical to the untouched model's, bit for bit
    state = {k.replace(".base_layer", ""): v for k, v in serving.state_dict().items() if not k.endswith(("block", "index"))}
    assert all(torch.equal(state[k], v) for k, v in before.items())
    with pytest.raises(ValueError, match="holds a 'sparse_delta' adapter"):
        sparse = ftcore.apply(tiny_llama(), ftcore.SparseDeltaConfig(density=0.01))
        ftcore.save_adapter(sparse, str(tmp_path / "sparse"))
        ftcore.switch_adapter(serving, str(tmp_path / "sparse"))


def test_bad_structured_adapter_is_refused(tmp_path):
    import json

    from safetensors.torch import load_file, save_file

    from ftcore.tuners.adapter import CONFIG_NAME, WEIGHTS_NAME, _sha256

    model = ftcore.apply(tiny_llama(), StructuredSparseConfig(head_ratio=0.5, channel_ratio=0.2))
    ftcore.save_adapter(model, str(tmp_path))
    tensors = load_file(str(tmp_path / WEIGHTS_NAME))
    name = next(k for k in tensors if k.endswith("down_proj.block"))
    tensors[name] = tensors[name][:, :-1].contiguous()
    save_file(tensors, str(tmp_path / WEIGHTS_NAME))
    record = json.loads((tmp_path / CONFIG_NAME).read_text())
    record["weights_sha256"] = _sha256(str(tmp_path / WEIGHTS_NAME))
    (tmp_path / CONFIG_NAME).write_text(json.dumps(record))
    target = tiny_llama()
    with pytest.raises(ValueError, match="block must be float32 of shape"):
        ftcore.load_adapter(target, str(tmp_path))
    assert not any(isinstance(m, StructuredSparseLinear) for m in target.modules())
