"""torch.compile: the unmerged path compiles with fullgraph=True; the merged path has one graph break per model
forward (the model's pre-hook that refreshes every merged layer), never one per layer; a compiled optimizer
step is still seen; compiled training equals eager (aot_eager, and once with inductor)."""

import pytest
import torch
from models import tiny_llama
from torch._dynamo.utils import counters

import ftcore

CONFIGS = {
    "sparse": lambda merged: ftcore.SparseDeltaConfig(density=0.05, merged=merged),
    "s2ft": lambda merged: ftcore.StructuredSparseConfig(head_ratio=0.25, channel_ratio=0.1, merged=merged),
}


def data(steps=3):
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 128, (2, 16), generator=g) for _ in range(steps)]


def losses(model, runner, steps=3, step_fn=None):
    opt = torch.optim.AdamW(ftcore.trainable_parameters(model), lr=1e-2)
    step = step_fn(opt) if step_fn else opt.step
    out = []
    for ids in data(steps):
        loss = runner(input_ids=ids, labels=ids).loss
        loss.backward()
        step()
        opt.zero_grad()
        out.append(loss.item())
    return out


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def graph_breaks() -> int:
    return sum(counters["graph_break"].values())


@pytest.mark.parametrize("kind", sorted(CONFIGS))
@pytest.mark.parametrize("merged", [False, True], ids=["unmerged", "merged"])
def test_compiled_training_equals_eager(kind, merged):
    model = ftcore.apply(tiny_llama(), CONFIGS[kind](merged))
    expected = losses(model, model)
    model = ftcore.apply(tiny_llama(), CONFIGS[kind](merged))
    compiled = torch.compile(model, backend="aot_eager", fullgraph=not merged)  # unmerged: no break at all
    assert losses(model, compiled) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_merged_layers_cost_one_graph_break_per_model_forward(kind):
    for layers in (2, 4):  # not one per layer
        torch._dynamo.reset()
        counters.clear()
        model = ftcore.apply(tiny_llama(layers=layers), CONFIGS[kind](True))
        compiled = torch.compile(model, backend="aot_eager")
        ids = data(1)[0]
        compiled(input_ids=ids, labels=ids).loss.backward()
        assert graph_breaks() == 1, dict(counters["graph_break"])


@pytest.mark.parametrize("how", ["model.forward", "blocks"])
def test_compiling_the_forward_or_the_blocks_trains_like_eager(how):
    """Compiled regions that the model's pre-hook runs outside of (HF's `model.forward = torch.compile(...)`,
    per-block compilation): the hook prepares the layers before them."""
    model = ftcore.apply(tiny_llama(), CONFIGS["sparse"](True))
    expected = losses(model, model)
    model = ftcore.apply(tiny_llama(), CONFIGS["sparse"](True))
    if how == "model.forward":
        model.forward = torch.compile(model.forward, backend="aot_eager")
    else:
        for block in model.model.layers:
            block.compile(backend="aot_eager")
    assert losses(model, model) == pytest.approx(expected, rel=1e-5)


def test_a_reference_forward_under_compile_does_not_recompile_every_step():
    model = ftcore.apply(tiny_llama(), CONFIGS["sparse"](True))
    compiled = torch.compile(model, backend="aot_eager")
    opt = torch.optim.AdamW(ftcore.trainable_parameters(model), lr=1e-2)

    def step(ids):
        loss = compiled(input_ids=ids, labels=ids).loss
        with ftcore.disable(model), torch.no_grad():
            compiled(input_ids=ids, labels=ids)  # the KL / DPO reference pass
        loss.backward()
        opt.step()
        opt.zero_grad()

    batches = data(5)
    for ids in batches[:2]:  # warm-up: the graphs of both passes
        step(ids)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for ids in batches[2:]:
            step(ids)


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_a_compiled_optimizer_step_is_seen(kind):
    model = ftcore.apply(tiny_llama(), CONFIGS[kind](True))
    expected = losses(model, model)
    model = ftcore.apply(tiny_llama(), CONFIGS[kind](True))
    assert losses(model, model, step_fn=lambda opt: torch.compile(opt.step, backend="aot_eager")) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("merged", [False, True], ids=["unmerged-fullgraph", "merged"])
def test_inductor_training_equals_eager(merged):
    model = ftcore.apply(tiny_llama(), CONFIGS["sparse"](merged))
    expected = losses(model, model)
    model = ftcore.apply(tiny_llama(), CONFIGS["sparse"](merged))
    assert losses(model, torch.compile(model, fullgraph=not merged)) == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("learnable_scale", [False, True], ids=["minmax-scale", "lsq-scale"])
def test_compiled_quantization_aware_training_equals_eager(learnable_scale):
    """Whole-model QAT (R1–R4, W4A4KV4 through the ftcore attention function; with or without LSQ scales)."""
    config = lambda: ftcore.QuantConfig(rotation="full", w_symmetric=True, w_learnable_scale=learnable_scale)  # noqa: E731
    model = ftcore.apply(tiny_llama(), config())
    expected = losses(model, model)
    model = ftcore.apply(tiny_llama(), config())
    compiled = torch.compile(model, backend="aot_eager")
    assert losses(model, compiled) == pytest.approx(expected, rel=1e-5)
