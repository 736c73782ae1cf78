"""The merged weight stays consistent however the deltas change: state dicts, optimizers that write raw memory,
moving a block, switching adapters inside ``disable``; failed loads leave the model as it was."""

import warnings

import pytest
import torch
from models import batch, tiny_gpt2, tiny_llama
from torch import nn
from transformers.pytorch_utils import Conv1D

import ftcore
from ftcore import SparseDeltaConfig, SparseDeltaLinear, StructuredSparseConfig, StructuredSparseLinear
from ftcore.tuners import adapter as adapter_files

CONFIGS = {
    "sparse": lambda: SparseDeltaConfig(density=0.05),
    "s2ft": lambda: StructuredSparseConfig(head_ratio=0.5, channel_ratio=0.25),
}


def logits(model):
    with torch.no_grad():
        return model(input_ids=batch(0)["input_ids"]).logits


def train(model, steps=2):
    opt = torch.optim.SGD(ftcore.trainable_parameters(model), lr=0.5)
    for step in range(steps):
        model(**batch(step)).loss.backward()
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("method", CONFIGS)
def test_load_state_dict_into_a_fresh_adapted_model(method):
    trained = ftcore.apply(tiny_llama(), CONFIGS[method]())
    train(trained)
    expected = logits(trained)
    state = trained.state_dict()  # merged: the base weights hold W0 + Δ
    fresh = ftcore.apply(tiny_llama(), CONFIGS[method]())
    fresh.load_state_dict(state)
    assert torch.equal(logits(fresh), expected)
    ftcore.unmerge(fresh)  # W0 exactly again, the delta added on the side: Δ is counted once
    torch.testing.assert_close(logits(fresh), expected, rtol=1e-4, atol=1e-4)
    with ftcore.disable(fresh):
        assert torch.equal(logits(fresh), logits(tiny_llama()))


class RawMemoryOptimizer(torch.optim.Optimizer):
    """Writes parameters behind their version counters, as fused or quantized optimizers may."""

    def __init__(self, params, lr):
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.data.sub_(group["lr"] * p.grad)  # .data: the Parameter's version does not move


@pytest.mark.parametrize("method", CONFIGS)
def test_optimizer_writing_raw_memory_still_refreshes_the_merged_weight(method):
    model = ftcore.apply(tiny_llama(), CONFIGS[method]())
    opt = RawMemoryOptimizer(ftcore.trainable_parameters(model), lr=0.5)
    model(**batch()).loss.backward()
    opt.step()
    merged = logits(model)
    ftcore.unmerge(model)
    torch.testing.assert_close(merged, logits(model), rtol=1e-4, atol=1e-4)
    assert not torch.equal(merged, logits(tiny_llama()))  # it did train


def test_moving_a_block_drops_the_stale_gradient():
    module = StructuredSparseLinear(nn.Linear(8, 6), torch.tensor([1, 2, 3]))
    module(torch.randn(4, 8)).sum().backward()
    module.set_block(torch.tensor([0, 5]))
    assert module.block.grad is None
    module(torch.randn(4, 8)).sum().backward()
    assert module.block.grad.shape == (6, 2)
    sparse = SparseDeltaLinear(nn.Linear(8, 6), torch.tensor([1, 9]))
    sparse(torch.randn(4, 8)).sum().backward()
    sparse.set_delta(torch.tensor([2, 7]))
    assert sparse.values.grad is None


def test_switch_inside_disable_stays_disabled(tmp_path):
    for seed in (1, 2):
        model = ftcore.apply(tiny_llama(), StructuredSparseConfig(head_ratio=0.5, seed=seed))
        train(model)
        ftcore.save_adapter(model, str(tmp_path / str(seed)))
    serving = ftcore.load_adapter(tiny_llama(), str(tmp_path / "1"))
    with ftcore.disable(serving):
        ftcore.switch_adapter(serving, str(tmp_path / "2"))
        assert torch.equal(logits(serving), logits(tiny_llama()))
    assert torch.equal(logits(serving), logits(ftcore.load_adapter(tiny_llama(), str(tmp_path / "2"))))


def test_failed_load_leaves_the_model_unchanged(tmp_path, monkeypatch):
    model = ftcore.apply(tiny_llama(), CONFIGS["s2ft"]())
    ftcore.save_adapter(model, str(tmp_path))
    calls = {"n": 0}
    real = StructuredSparseLinear.from_adapter_record.__func__

    def fail_on_third(cls, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("out of memory, say")
        return real(cls, *args, **kwargs)

    monkeypatch.setattr(StructuredSparseLinear, "from_adapter_record", classmethod(fail_on_third))
    target = tiny_llama()
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(RuntimeError, match="out of memory"):
        ftcore.load_adapter(target, str(tmp_path))
    assert not any(isinstance(m, ftcore.nn.DeltaLinear) for m in target.modules())
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())
    assert all(p.requires_grad for p in target.parameters())


def test_save_adapter_warns_about_trainable_parameters_it_leaves_out(tmp_path):
    model = ftcore.apply(tiny_llama(), CONFIGS["sparse"]())
    model.lm_head.weight.requires_grad_(True)
    with pytest.warns(UserWarning, match="lm_head.weight"):
        ftcore.save_adapter(model, str(tmp_path))
    model.lm_head.weight.requires_grad_(False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ftcore.save_adapter(model, str(tmp_path), overwrite=True)


def test_conv1d_subclasses_and_config_errors():
    class MyConv1D(Conv1D):
        pass

    layer = MyConv1D(6, 4)
    assert SparseDeltaLinear(layer, torch.tensor([3])).out_features == 6
    with pytest.raises(ValueError, match="layers_to_transform is empty"):
        ftcore.apply(tiny_gpt2(), StructuredSparseConfig(head_ratio=0.5, layers_to_transform=[]))
    with pytest.raises(ValueError, match="calibration is empty"):
        ftcore.apply(tiny_llama(), StructuredSparseConfig(head_ratio=0.5, selection="activation"), calibration=[])
    with pytest.raises(FileNotFoundError, match="is not an ftcore adapter directory"):
        adapter_files.read("/nonexistent")
