"""The model-level API on real transformers models: apply, merge, unmerge, disable, save/load, compose."""

import json
import os

import pytest
import torch
from models import batch, tiny_gpt2, tiny_llama
from torch import nn
from transformers.pytorch_utils import Conv1D

import ftcore
from ftcore import SparseDeltaConfig, SparseDeltaLinear
from ftcore.tuners import find_targets
from ftcore.tuners.adapter import CONFIG_NAME, WEIGHTS_NAME


def bits(t):
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def logits(model, seed=0):
    with torch.no_grad():
        return model(input_ids=batch(seed)["input_ids"]).logits


def train_steps(model, steps=3, lr=1e-2):
    opt = torch.optim.AdamW(ftcore.trainable_parameters(model), lr=lr)
    for step in range(steps):
        loss = model(**batch(step)).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return opt


def sparse_layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, SparseDeltaLinear)}


# ---- target matching -----------------------------------------------------------------------------------------


def test_find_targets_follows_peft_conventions():
    model = tiny_llama()
    all_linear = find_targets(model, "all-linear")
    assert "lm_head" not in all_linear and len(all_linear) == 2 * 7
    assert find_targets(model, ["q_proj", "v_proj"]) == [
        "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj",
        "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj",
    ]
    assert find_targets(model, r".*\.mlp\.(up|down)_proj") == [
        "model.layers.0.mlp.up_proj", "model.layers.0.mlp.down_proj",
        "model.layers.1.mlp.up_proj", "model.layers.1.mlp.down_proj",
    ]
    assert find_targets(model, "all-linear", exclude_modules=["o_proj", "mlp.gate_proj"], layers_to_transform=1) == [
        "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.k_proj", "model.layers.1.self_attn.v_proj",
        "model.layers.1.mlp.up_proj", "model.layers.1.mlp.down_proj",
    ]
    assert find_targets(tiny_gpt2(), ["c_attn"]) == ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]
    with pytest.raises(ValueError, match="no linear layer matches.*include: model.layers.0.self_attn.q_proj"):
        find_targets(model, ["nonexistent"])
    with pytest.raises(ValueError, match="not a valid regular expression"):
        find_targets(model, "q_proj(")


# ---- apply ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
@pytest.mark.parametrize("merged", [True, False])
def test_apply_keeps_outputs_and_trains_only_the_deltas(make, merged):
    base_logits = logits(make())
    model = ftcore.apply(make(), SparseDeltaConfig(density=0.05, merged=merged))
    assert torch.equal(logits(model), base_logits)
    trainable = ftcore.trainable_parameters(model)
    layers = sparse_layers(model)
    assert {id(p) for p in trainable} == {id(m.values) for m in layers.values()}
    for m in layers.values():
        assert m.num_deltas == round(0.05 * m.out_features * m.in_features)
        assert isinstance(m.base_layer, Conv1D if make is tiny_gpt2 else nn.Linear)
    train_steps(model)
    assert not torch.equal(logits(model), base_logits)


def test_num_deltas_budget_is_split_by_size_and_exact():
    model = ftcore.apply(tiny_llama(), SparseDeltaConfig(num_deltas=5000, target_modules=["q_proj", "k_proj", "up_proj"]))
    layers = sparse_layers(model)
    assert sum(m.num_deltas for m in layers.values()) == 5000
    q, k = layers["model.layers.0.self_attn.q_proj"], layers["model.layers.0.self_attn.k_proj"]
    assert abs(q.num_deltas / k.num_deltas - 2.0) < 0.01  # q is 64x64, k (2 kv heads) 32x64


def test_random_selection_is_seeded_per_layer():
    a = sparse_layers(ftcore.apply(tiny_llama(), SparseDeltaConfig(density=0.1, seed=7)))
    b = sparse_layers(ftcore.apply(tiny_llama(), SparseDeltaConfig(density=0.1, seed=7)))
    c = sparse_layers(ftcore.apply(tiny_llama(), SparseDeltaConfig(density=0.1, seed=8)))
    only_q = sparse_layers(ftcore.apply(tiny_llama(), SparseDeltaConfig(density=0.1, seed=7, target_modules=["q_proj"])))
    name = "model.layers.1.self_attn.q_proj"
    assert torch.equal(a[name].indices, b[name].indices)
    assert not torch.equal(a[name].indices, c[name].indices)
    assert torch.equal(a[name].indices, only_q[name].indices)  # independent of which other layers are targeted


def test_magnitude_selection_picks_largest_weights():
    model = tiny_llama()
    weight = model.model.layers[0].mlp.down_proj.weight.detach().clone()
    ftcore.apply(model, SparseDeltaConfig(density=0.02, selection="magnitude", target_modules=["down_proj"]))
    chosen = model.model.layers[0].mlp.down_proj.indices.long()
    expected = torch.sort(torch.topk(weight.abs().flatten(), chosen.numel()).indices).values
    assert torch.equal(chosen, expected)


def test_gradient_selection_picks_largest_gradient_entries():
    dense = tiny_llama()
    data = [batch(0), batch(1)]
    for b in data:
        dense(**b).loss.backward()
    expected_grad = dense.model.layers[1].self_attn.o_proj.weight.grad.flatten().abs()
    model = tiny_llama()
    config = SparseDeltaConfig(density=0.02, selection="gradient", target_modules=["o_proj"], candidate_factor=50)
    ftcore.apply(model, config, calibration=data)
    chosen = model.model.layers[1].self_attn.o_proj.indices.long()
    expected = torch.sort(torch.topk(expected_grad, chosen.numel()).indices).values
    assert torch.equal(chosen, expected)
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(ValueError, match="calibration"):
        ftcore.apply(tiny_llama(), SparseDeltaConfig(density=0.02, selection="gradient"))


def test_failed_apply_leaves_model_unchanged():
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="produce a loss"):
        ftcore.apply(model, SparseDeltaConfig(density=0.02, selection="gradient"), calibration=[{"input_ids": batch()["input_ids"]}])
    assert not sparse_layers(model) and all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="exactly one of density"):
        SparseDeltaConfig()
    with pytest.raises(ValueError, match="density must be in"):
        SparseDeltaConfig(density=1.5)
    with pytest.raises(ValueError, match="selection must be one of"):
        SparseDeltaConfig(density=0.1, selection="best")
    ftcore.apply(model, SparseDeltaConfig(density=0.01))
    with pytest.raises(ValueError, match="already carries"):
        ftcore.apply(model, SparseDeltaConfig(density=0.01))


# ---- merge / unmerge / disable -------------------------------------------------------------------------------


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_merge_returns_plain_model_equal_to_adapted(make):
    model = ftcore.apply(make(), SparseDeltaConfig(density=0.05))
    train_steps(model)
    adapted = logits(model)
    merged = ftcore.merge(model)
    assert not sparse_layers(merged)
    assert isinstance(merged.lm_head, nn.Linear) and all(p.requires_grad for p in merged.parameters())
    assert torch.equal(logits(merged), adapted)
    assert type(merged.get_submodule(find_targets(make(), "all-linear")[0])) in (nn.Linear, Conv1D)


def test_unmerge_restores_base_weights_bit_for_bit_and_keeps_the_adapter():
    base = tiny_llama(dtype=torch.bfloat16)
    original = {k: v.clone() for k, v in base.state_dict().items()}
    model = ftcore.apply(base, SparseDeltaConfig(density=0.05))
    train_steps(model, lr=0.05)
    merged_logits = logits(model)
    ftcore.unmerge(model)
    for name, m in sparse_layers(model).items():
        assert torch.equal(bits(m.base_layer.weight), bits(original[f"{name}.weight"]))
    torch.testing.assert_close(logits(model), merged_logits, rtol=0.05, atol=0.05)
    with ftcore.disable(model):
        assert torch.equal(logits(model), logits(tiny_llama(dtype=torch.bfloat16)))


def test_disable_context_gives_base_outputs_then_restores():
    model = ftcore.apply(tiny_llama(), SparseDeltaConfig(density=0.05))
    train_steps(model)
    adapted = logits(model)
    with ftcore.disable(model):  # computed without writing the merged weights: equal up to float rounding
        torch.testing.assert_close(logits(model), logits(tiny_llama()), rtol=1e-5, atol=1e-5)
    assert torch.equal(logits(model), adapted)


# ---- save / load ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_save_load_round_trip_is_exact(tmp_path, make):
    model = ftcore.apply(make(), SparseDeltaConfig(density=0.03))
    train_steps(model)
    ftcore.save_adapter(model, str(tmp_path))
    loaded = ftcore.load_adapter(make(), str(tmp_path))
    assert torch.equal(logits(loaded), logits(model))
    for name, m in sparse_layers(model).items():
        other = loaded.get_submodule(name)
        assert torch.equal(other.indices, m.indices) and torch.equal(other.values, m.values)
        assert not other.values.requires_grad  # frozen for inference unless trainable=True, as in PEFT
    resumed = ftcore.load_adapter(make(), str(tmp_path), trainable=True)
    assert all(p.requires_grad for p in ftcore.trainable_parameters(resumed)) and ftcore.trainable_parameters(resumed)
    k = sum(m.num_deltas for m in sparse_layers(model).values())
    header_slack = 4096 + 200 * len(sparse_layers(model))
    assert os.path.getsize(tmp_path / WEIGHTS_NAME) <= 8 * k + header_slack
    record = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert record["method"] == "sparse_delta" and record["config"]["density"] == 0.03


def test_save_refuses_to_overwrite(tmp_path):
    model = ftcore.apply(tiny_llama(), SparseDeltaConfig(density=0.03))
    ftcore.save_adapter(model, str(tmp_path))
    before = (tmp_path / WEIGHTS_NAME).read_bytes()
    train_steps(model)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        ftcore.save_adapter(model, str(tmp_path))
    assert (tmp_path / WEIGHTS_NAME).read_bytes() == before
    ftcore.save_adapter(model, str(tmp_path), overwrite=True)
    assert (tmp_path / WEIGHTS_NAME).read_bytes() != before
    assert sorted(os.listdir(tmp_path)) == [CONFIG_NAME, WEIGHTS_NAME]  # no temporary files left


def _rewrite_weights(path, edit):
    """Edits the saved tensors and fixes up the checksum, to get a well-formed file with bad content."""
    from safetensors.torch import load_file, save_file

    from ftcore.tuners.adapter import _sha256

    tensors = load_file(str(path / WEIGHTS_NAME))
    edit(tensors)
    save_file(tensors, str(path / WEIGHTS_NAME))
    record = json.loads((path / CONFIG_NAME).read_text())
    record["weights_sha256"] = _sha256(str(path / WEIGHTS_NAME))
    (path / CONFIG_NAME).write_text(json.dumps(record))


BAD_ADAPTERS = {
    "truncated": (lambda p: (p / WEIGHTS_NAME).write_bytes((p / WEIGHTS_NAME).read_bytes()[:-100]), "checksum"),
    "bit flip": (lambda p: (p / WEIGHTS_NAME).write_bytes((lambda b: b[:-10] + bytes([b[-10] ^ 1]) + b[-9:])((p / WEIGHTS_NAME).read_bytes())), "checksum"),
    "bad json": (lambda p: (p / CONFIG_NAME).write_text("{not json"), "not valid JSON"),
    "no weights": (lambda p: (p / WEIGHTS_NAME).unlink(), "not found"),
    "index out of range": (lambda p: _rewrite_weights(p, lambda t: t["model.layers.0.mlp.up_proj.indices"].__setitem__(-1, 10**6)), "out of range"),
    "duplicate index": (lambda p: _rewrite_weights(p, lambda t: t["model.layers.0.mlp.up_proj.indices"].__setitem__(1, t["model.layers.0.mlp.up_proj.indices"][0])), "strictly increasing"),
    "float64 values": (lambda p: _rewrite_weights(p, lambda t: t.__setitem__("model.layers.0.mlp.up_proj.values", t["model.layers.0.mlp.up_proj.values"].double())), "must be 1-D float32"),
    "extra tensor": (lambda p: _rewrite_weights(p, lambda t: t.__setitem__("stray", torch.zeros(1))), "not listed"),
    "missing tensor": (lambda p: _rewrite_weights(p, lambda t: t.pop("model.layers.1.mlp.up_proj.values")), "lacks"),
}


@pytest.mark.parametrize("case", sorted(BAD_ADAPTERS))
def test_bad_adapter_files_are_refused_and_model_unchanged(tmp_path, case):
    model = ftcore.apply(tiny_llama(), SparseDeltaConfig(density=0.03, target_modules=["up_proj", "q_proj"]))
    train_steps(model)
    ftcore.save_adapter(model, str(tmp_path))
    damage, message = BAD_ADAPTERS[case]
    damage(tmp_path)
    target = tiny_llama()
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        ftcore.load_adapter(target, str(tmp_path))
    assert not sparse_layers(target)
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())
    assert all(p.requires_grad for p in target.parameters())


def test_adapter_for_another_architecture_is_refused(tmp_path):
    model = ftcore.apply(tiny_llama(), SparseDeltaConfig(density=0.03))
    ftcore.save_adapter(model, str(tmp_path))
    with pytest.raises(ValueError, match="this model does not have"):
        ftcore.load_adapter(tiny_gpt2(), str(tmp_path))
    bigger = tiny_llama()
    bigger.model.layers[0].mlp.up_proj = nn.Linear(64, 100, bias=False)
    with pytest.raises(ValueError, match="is 96x64, the model's is 100x64"):
        ftcore.load_adapter(bigger, str(tmp_path))


# ---- compose ---------------------------------------------------------------------------------------------------


def test_compose_adds_adapters_lt_sft_style(tmp_path):
    a = ftcore.apply(tiny_llama(), SparseDeltaConfig(density=0.05, seed=1))
    train_steps(a)
    b = ftcore.apply(tiny_llama(), SparseDeltaConfig(density=0.05, seed=2, target_modules=["q_proj", "down_proj"]))
    train_steps(b)
    ftcore.save_adapter(a, str(tmp_path / "a"))
    ftcore.save_adapter(b, str(tmp_path / "b"))

    composed = ftcore.compose(tiny_llama(), str(tmp_path / "a"), str(tmp_path / "b"))
    expected = tiny_llama()
    with torch.no_grad():
        for model in (a, b):
            for name, m in sparse_layers(model).items():
                w = expected.get_submodule(name).weight
                w.view(-1).index_add_(0, m.indices.long(), m.values.detach())
    for name, p in expected.named_parameters():
        torch.testing.assert_close(composed.get_parameter(name), p, rtol=0, atol=1e-6)

    # Under a live adapter: its deltas sit on the composed base, and unmerging restores that base.
    live = ftcore.apply(tiny_llama(), SparseDeltaConfig(density=0.02, seed=3))
    train_steps(live)
    ftcore.compose(live, str(tmp_path / "a"))
    ftcore.unmerge(live)
    plain_a = ftcore.compose(tiny_llama(), str(tmp_path / "a"))
    for name, m in sparse_layers(live).items():
        assert torch.equal(m.base_layer.weight, plain_a.get_submodule(name).weight)
    # Subtracting undoes it (up to fp32 rounding).
    ftcore.compose(plain_a, str(tmp_path / "a"), scale=-1.0)
    for name, p in tiny_llama().named_parameters():
        torch.testing.assert_close(plain_a.get_parameter(name), p, rtol=0, atol=1e-6)
