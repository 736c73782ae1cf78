"""The merged-weight contract: while merged, the base weight holds W0 + Δ, and nothing may ever make a forward,
a gradient or a checkpoint silently wrong.

* every write into a weight bumps its version counter, so autograd raises rather than use rewritten values;
* a reference forward under ``ftcore.disable`` never writes, and gives the base layer's output;
* a change of Δ is seen whatever wrote it (any optimizer, an engine stepping a copy), once per optimizer step:
  not between two forwards before one backward, not between micro-batches;
* state dicts, partial loads, deep copies and pickles keep W0.
"""

import copy
import io
import pickle

import pytest
import torch
from torch import nn

import ftcore
from ftcore import SparseDeltaLinear, StructuredSparseLinear


def sparse(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return SparseDeltaLinear(nn.Linear(8, 4, bias=True).to(dtype), torch.arange(0, 32, 3))


def structured(dtype=torch.float32, rows=False, seed=0):
    torch.manual_seed(seed)
    return StructuredSparseLinear(nn.Linear(8, 4, bias=True).to(dtype), torch.tensor([1, 2] if rows else [1, 6]), rows=rows)


LAYERS = {"sparse": sparse, "columns": structured, "rows": lambda dtype=torch.float32, seed=0: structured(dtype, True, seed)}


def with_delta(layer, value=0.5):
    with torch.no_grad():
        layer.delta.fill_(value)
    return layer


def base_weight(make):
    """W0 of a freshly made layer (the layers are made with fixed seeds)."""
    return make().base_layer.weight.detach().clone()


def dense_delta(layer):
    """Δ as a dense (out, in) tensor."""
    d = torch.zeros(layer.out_features, layer.in_features, dtype=torch.float64)
    if isinstance(layer, SparseDeltaLinear):
        d.view(-1)[layer.indices.long()] = layer.values.detach().double()
    elif layer.rows:
        d[layer.index] = layer.block.detach().double()
    else:
        d[:, layer.index] = layer.block.detach().double()
    return d


def expected_output(layer, w0, x):
    return (x.double() @ (w0.double() + dense_delta(layer)).t() + layer.bias.double()).to(x.dtype)


# ---- 1. writes bump the version: autograd raises instead of using a rewritten weight -------------------------


def test_the_in_place_ops_bump_the_written_tensors_version():
    w = torch.zeros(4, 8)
    v = w._version
    ftcore.ops.sparse_delta_scatter_(w, torch.tensor([1, 5]), torch.ones(2), 1.0)
    assert w._version > v
    v = w._version
    ftcore.ops.structured_block_scatter_(w.t(), torch.tensor([0, 2]), torch.ones(8, 2), 1.0)  # through a view
    assert w._version > v
    v = w._version
    torch.ops.ftcore.sparse_delta_scatter_.default(w, torch.tensor([3]), torch.ones(1), 1.0, None)  # raw op too
    assert w._version > v


@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_a_reference_forward_between_forward_and_backward_keeps_the_gradient_right(kind):
    """The KL / DPO / GRPO pattern: policy forward, reference forward under ftcore.disable, then backward."""
    make = LAYERS[kind]
    layer, w0 = with_delta(make()), base_weight(make)
    x = torch.randn(5, 8, requires_grad=True)
    y = layer(x)
    with ftcore.disable(nn.Sequential(layer)), torch.no_grad():
        reference = layer(x)
    torch.testing.assert_close(reference, x.detach() @ w0.t() + layer.bias.detach(), rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y)
    y.backward(g)
    torch.testing.assert_close(x.grad, g @ (w0 + dense_delta(layer).float()), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_a_bf16_reference_forward_never_carries_the_delta(kind):
    make = LAYERS[kind]
    layer, w0 = with_delta(make(torch.bfloat16), 0.25), base_weight(lambda: make(torch.bfloat16))
    x = torch.randn(64, 8, dtype=torch.bfloat16)
    layer(x)  # merged
    with ftcore.disable(nn.Sequential(layer)), torch.no_grad():
        reference = layer(x).float()
    base = nn.functional.linear(x, w0, layer.bias).float()  # what the base layer gives, one bf16 GEMM
    scale = base.abs().max()
    # one GEMM's rounding: a bf16 ulp of the output's scale, where the delta would move outputs by about 0.25·|x|
    assert (reference - base).abs().max() <= scale * 2**-7
    assert (layer(x).float() - base).abs().max() > 0.1  # and the adapted output does differ


@pytest.mark.parametrize("kind", sorted(LAYERS))
@pytest.mark.parametrize("write", ["unmerge", "set_merged", "set_delta"])
def test_any_rewrite_of_a_saved_weight_before_backward_raises(kind, write):
    layer = with_delta(LAYERS[kind]())
    x = torch.randn(5, 8, requires_grad=True)
    y = layer(x)
    if write == "unmerge":
        ftcore.unmerge(nn.Sequential(layer))
    elif write == "set_merged":
        layer.set_merged(False)
    elif isinstance(layer, SparseDeltaLinear):
        layer.set_delta(torch.arange(1, 32, 3))
    else:
        layer.set_block(torch.tensor([0, 3]))
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


# ---- 2. a change of Δ is seen whatever stepped it, once per optimizer step ------------------------------------


class Writes:
    """Counts the merged-weight refreshes of a layer."""

    def __init__(self, layer):
        self.count = 0
        original = layer._write_merged

        def counted():
            self.count += 1
            original()

        layer._write_merged = counted


def step_once(layer, optimizer, x):
    layer(x).sum().backward()
    optimizer.step()
    optimizer.zero_grad()


def step_a_flat_copy(layer, x):
    """One step the way DeepSpeed ZeRO-1/2 takes it: the delta becomes a view of the engine's flat buffer, the
    engine moves the gradient there and steps the buffer, never the delta itself (no in-place op on it, no
    optimizer holding it)."""
    flat = layer.delta.detach().flatten().clone()
    layer.delta.data = flat.view_as(layer.delta)
    inner = torch.optim.SGD([flat], lr=1.0)
    layer(x).sum().backward()
    flat.grad = layer.delta.grad.flatten().clone()
    inner.step()


@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_a_step_on_a_copy_of_the_delta_is_seen(kind):
    """An engine that steps a flat copy of the delta and writes back through .data: the gradient hook and the
    step count see it."""
    make = LAYERS[kind]
    layer, w0 = make(), base_weight(make)
    x = torch.randn(3, 8)
    step_a_flat_copy(layer, x)
    assert layer.delta.detach().abs().sum() > 0
    torch.testing.assert_close(layer(x), expected_output(layer, w0, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_a_no_grad_forward_between_backward_and_step_does_not_hide_the_step(kind):
    make = LAYERS[kind]
    layer, w0 = make(), base_weight(make)
    opt = torch.optim.SGD([layer.delta], lr=0.5)
    x = torch.randn(3, 8)
    layer(x).sum().backward()
    with torch.no_grad():
        layer(x)  # logging / evaluation before the step
    opt.step()
    torch.testing.assert_close(layer(x), expected_output(layer, w0, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_two_forwards_before_one_backward_write_nothing_between_them(kind):
    """DPO's chosen and rejected forwards (and checkpointing's recomputation): a refresh between them would
    bump the saved weight's version and make backward raise."""
    make = LAYERS[kind]
    layer = make()
    opt = torch.optim.AdamW([layer.delta], lr=0.1)
    x1, x2 = torch.randn(3, 8), torch.randn(3, 8)
    step_once(layer, opt, x1)
    writes = Writes(layer)
    loss = layer(x1).sum() - layer(x2).sum()
    loss.backward()  # would raise if the weight had been rewritten between the forwards
    assert writes.count == 1  # the step's one refresh, at the first forward


@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_gradient_accumulation_refreshes_once_per_step(kind):
    make = LAYERS[kind]
    layer, w0 = make(), base_weight(make)
    opt = torch.optim.AdamW([layer.delta], lr=0.1)
    step_once(layer, opt, torch.randn(3, 8))
    writes = Writes(layer)
    for _ in range(2):
        for _ in range(4):  # micro-batches
            layer(torch.randn(3, 8)).sum().backward()
        opt.step()
        opt.zero_grad()
    x = torch.randn(3, 8)
    torch.testing.assert_close(layer(x), expected_output(layer, w0, x), rtol=1e-5, atol=1e-5)
    assert writes.count == 3  # once after each step: the first one and the two accumulated ones


def test_an_optimizer_that_writes_raw_memory_is_seen():
    """bitsandbytes' optimizers write the parameter from a kernel: no version bump. The step count sees it."""

    class RawSGD(torch.optim.Optimizer):
        def __init__(self, params):
            super().__init__(params, {})

        @torch.no_grad()
        def step(self):
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        p.data.sub_(p.grad)  # through .data: the parameter's version does not move

    layer, w0 = sparse(), base_weight(sparse)
    opt = RawSGD([layer.values])
    x = torch.randn(3, 8)
    version = layer.values._version
    step_once(layer, opt, x)
    assert layer.values._version == version
    torch.testing.assert_close(layer(x), expected_output(layer, w0, x), rtol=1e-5, atol=1e-5)


# ---- 3. state dicts, partial loads, copies and pickles keep W0 -------------------------------------------------


def trained(make, steps=2):
    layer = make()
    opt = torch.optim.SGD([layer.delta], lr=0.5)
    for _ in range(steps):
        step_once(layer, opt, torch.randn(3, 8))
    layer(torch.randn(3, 8))  # merged
    return layer


def test_a_trainable_only_load_with_moved_indices_keeps_w0():
    """{indices, values} with strict=False, the PEFT habit, into a layer whose indices differ."""
    w0 = base_weight(sparse)
    source = trained(sparse)
    source.set_delta(torch.tensor([10, 20, 30, 31]), torch.full((4,), 0.5))
    state = {k: v for k, v in source.state_dict().items() if k in ("indices", "values")}
    target = sparse()
    target.set_delta(torch.tensor([0, 1, 2, 3]))
    target(torch.randn(3, 8))
    target.load_state_dict(state, strict=False)
    x = torch.randn(3, 8)
    torch.testing.assert_close(target(x), expected_output(target, w0, x), rtol=1e-5, atol=1e-5)
    target.restore_base()
    assert torch.equal(target.base_layer.weight, w0)


@pytest.mark.parametrize("kind", sorted(LAYERS))
@pytest.mark.parametrize("keys", ["all", "trainable", "weight_and_delta", "delta_only"])
def test_every_partial_load_keeps_w0(kind, keys):
    make = LAYERS[kind]
    w0 = base_weight(make)
    source = trained(make)
    names = {
        "all": None,
        "trainable": (source.index_name, "values" if kind == "sparse" else "block"),
        "weight_and_delta": ("base_layer.weight", "base_layer.bias", source.index_name, "values" if kind == "sparse" else "block"),
        "delta_only": ("values" if kind == "sparse" else "block",),
    }[keys]
    state = {k: v.clone() for k, v in source.state_dict().items() if names is None or k in names}
    if keys == "weight_and_delta":  # a weight without base values is taken as W0: give it W0
        state["base_layer.weight"] = w0.clone()
    target = trained(make, steps=1)
    target.load_state_dict(state, strict=names is None)
    target.restore_base()
    assert torch.equal(target.base_layer.weight, w0)
    torch.testing.assert_close(target.delta, source.delta)


def test_a_weight_with_base_values_but_no_positions_is_refused():
    source = trained(sparse)
    state = {k: v for k, v in source.state_dict().items() if k != "indices"}
    with pytest.raises(ValueError, match="cannot be told"):
        sparse().load_state_dict(state, strict=False)


@pytest.mark.parametrize("kind", sorted(LAYERS))
@pytest.mark.parametrize("how", ["deepcopy", "pickle", "torch.save"])
def test_copies_train_and_keep_w0(kind, how):
    make = LAYERS[kind]
    w0 = base_weight(make)
    model = nn.Sequential(trained(make))
    if how == "deepcopy":
        copied = copy.deepcopy(model)
    elif how == "pickle":
        copied = pickle.loads(pickle.dumps(model))
    else:
        buffer = io.BytesIO()
        torch.save(model, buffer)
        buffer.seek(0)
        copied = torch.load(buffer, weights_only=False)
    layer = copied[0]
    x = torch.randn(3, 8)
    torch.testing.assert_close(layer(x), model[0](x))
    step_a_flat_copy(layer, x)  # the copy trains on its own, with a step its gradient hook must see
    torch.testing.assert_close(layer(x), expected_output(layer, w0, x), rtol=1e-5, atol=1e-5)
    layer.restore_base()
    assert torch.equal(layer.base_layer.weight, w0)


@pytest.mark.parametrize("kind", sorted(LAYERS))
@pytest.mark.parametrize("then", ["disable", "set_merged", "unwrap", "move_delta"])
def test_a_copy_knows_its_weight_holds_a_merge_before_any_forward(kind, then):
    """deepcopy / pickle / torch.load copy a merged weight: the copy must not take it for W0 (a reference
    model made by deepcopy, an EMA copy, a reloaded checkpoint)."""
    make = LAYERS[kind]
    w0 = base_weight(make)
    layer = copy.deepcopy(trained(make))  # no forward on the copy yet
    x = torch.randn(3, 8)
    if then == "disable":
        with ftcore.disable(nn.Sequential(layer)):
            torch.testing.assert_close(layer(x), x @ w0.t() + layer.bias, rtol=1e-5, atol=1e-5)
        return
    if then == "set_merged":
        layer.set_merged(False)
        torch.testing.assert_close(layer(x), expected_output(layer, w0, x), rtol=1e-5, atol=1e-5)
    elif then == "unwrap":
        assert torch.equal(layer.unwrap(with_delta=False).weight, w0)
        return
    elif isinstance(layer, SparseDeltaLinear):
        layer.set_delta(torch.arange(2, 32, 5))
    else:
        layer.set_block(torch.tensor([0, 3]))
    layer.restore_base()
    assert torch.equal(layer.base_layer.weight, w0)


def test_a_load_with_another_delta_count_fails_before_writing():
    w0 = base_weight(sparse)
    source = trained(sparse)
    source.set_delta(torch.arange(0, 32, 2))  # 16 deltas, the target has 11
    target = trained(sparse)
    with pytest.raises(ValueError, match="different number of deltas"):
        target.load_state_dict(source.state_dict())
    target.restore_base()
    assert torch.equal(target.base_layer.weight, w0)


def test_merged_mode_refuses_tied_weights():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, tie_word_embeddings=True)
    with pytest.raises(ValueError, match="tied weights"):
        ftcore.apply(LlamaForCausalLM(config), ftcore.SparseDeltaConfig(density=0.05, target_modules=["lm_head"]))
    model = ftcore.apply(LlamaForCausalLM(config), ftcore.SparseDeltaConfig(density=0.05, target_modules=["lm_head"], merged=False))
    assert torch.equal(model.lm_head.base_layer.weight, model.model.embed_tokens.weight)


def test_a_layer_called_outside_its_models_forward_still_sees_the_step():
    from models import tiny_llama

    model = ftcore.apply(tiny_llama(), ftcore.SparseDeltaConfig(density=0.05))
    layer = model.model.layers[0].mlp.down_proj
    opt = torch.optim.SGD(ftcore.trainable_parameters(model), lr=0.5)
    ids = torch.randint(0, 128, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    x = torch.randn(3, layer.in_features)
    w0 = tiny_llama().model.layers[0].mlp.down_proj.weight.detach()
    torch.testing.assert_close(layer(x), (x.double() @ (w0.double() + dense_delta(layer)).t()).float(), rtol=1e-5, atol=1e-5)
