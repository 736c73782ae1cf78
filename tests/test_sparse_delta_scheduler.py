"""SpIEL drop-and-regrow: the delta count stays fixed, optimizer state follows its entry, growth follows the
accumulated gradient, and it runs from a plain loop and from transformers' Trainer."""

import pytest
import torch
from models import batch, tiny_llama
from torch import nn

import ftcore
from ftcore import SparseDeltaConfig, SparseDeltaLinear, SparseDeltaScheduler


def one_layer_model(seed=0, k=40):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(32, 24))
    ftcore.apply(model, SparseDeltaConfig(num_deltas=k, target_modules=["0"]))
    return model


def test_regrow_keeps_count_and_remaps_adam_state():
    model = one_layer_model()
    layer = model[0]
    w0 = layer.base_layer.weight.detach().clone()
    opt = torch.optim.AdamW(ftcore.trainable_parameters(model), lr=0.05)
    sched = SparseDeltaScheduler(model, opt, regrow_every=4, accumulate_steps=2, drop_fraction=0.25)
    x, target = torch.randn(64, 32), torch.randn(64, 24)
    snapshot = None
    for step in range(1, 5):
        loss = ((model(x) - target) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step == 4:
            old_indices = layer.indices.clone()
            old_values = layer.values.detach().clone()
            old_state = {k: v.clone() for k, v in opt.state[layer.values].items()}
            snapshot = True
        sched.step()
        if step == 2:
            assert layer.probe is not None  # armed for the two steps before the regrowth
    assert snapshot and sched.regrowths == 1 and layer.probe is None

    new_indices = layer.indices
    assert new_indices.numel() == 40 and torch.all(new_indices[1:] > new_indices[:-1])
    kept = torch.isin(new_indices, old_indices)
    assert int((~kept).sum()) == 10  # 25% of 40 replaced
    # Dropped: the 10 smallest |Δ|; their weights are back to W0.
    dropped = old_indices[~torch.isin(old_indices, new_indices)]
    smallest = old_indices[torch.topk(old_values.abs(), 10, largest=False).indices]
    assert torch.equal(torch.sort(dropped).values, torch.sort(smallest).values)
    model(x)  # re-merge
    flat_w = layer.base_layer.weight.detach().flatten()
    assert torch.equal(flat_w[dropped.long()], w0.flatten()[dropped.long()])
    # Kept entries keep value and Adam moments; new ones start at zero.
    pos_old = torch.searchsorted(old_indices, new_indices[kept])
    assert torch.equal(layer.values.detach()[kept], old_values[pos_old])
    state = opt.state[layer.values]
    for key in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(state[key][kept], old_state[key][pos_old])
        assert torch.all(state[key][~kept] == 0)
    assert torch.all(layer.values.detach()[~kept] == 0)
    # Training goes on with the same optimizer.
    ((model(x) - target) ** 2).mean().backward()
    opt.step()


def test_growth_follows_largest_dense_gradient():
    model = one_layer_model(k=30)
    layer = model[0]
    dense = nn.Linear(32, 24)
    with torch.no_grad():
        dense.weight.copy_(layer.base_layer.weight)
        dense.bias.copy_(layer.base_layer.bias)
    opt = torch.optim.SGD(ftcore.trainable_parameters(model), lr=0.0)  # weights stay put: gradients comparable
    sched = SparseDeltaScheduler(model, opt, regrow_every=3, accumulate_steps=3, drop_fraction=0.2, candidate_factor=200)
    data = [(torch.randn(16, 32), torch.randn(16, 24)) for _ in range(3)]
    active = layer.indices.clone()  # unchanged until the regrowth after the third step
    for x, target in data:
        ((model(x) - target) ** 2).mean().backward()
        ((dense(x) - target) ** 2).mean().backward()
        opt.step()
        opt.zero_grad()
        sched.step()
    scores = dense.weight.grad.flatten().abs()
    scores[active.long()] = -1
    expected = torch.sort(torch.topk(scores, 6).indices).values
    grown = layer.indices[~torch.isin(layer.indices, active)].long()
    assert torch.equal(grown, expected)


def test_cosine_schedule_and_errors():
    model = one_layer_model()
    opt = torch.optim.AdamW(ftcore.trainable_parameters(model))
    sched = SparseDeltaScheduler(model, opt, drop_fraction=0.4, total_steps=100)
    assert sched.current_drop_fraction() == pytest.approx(0.4)
    sched.steps = 50
    assert sched.current_drop_fraction() == pytest.approx(0.2)
    sched.steps = 100
    assert sched.current_drop_fraction() == 0.0
    with pytest.raises(ValueError, match="accumulate_steps"):
        SparseDeltaScheduler(model, opt, regrow_every=4, accumulate_steps=5)
    with pytest.raises(ValueError, match="does not hold the delta values"):
        SparseDeltaScheduler(model, torch.optim.AdamW([nn.Parameter(torch.zeros(1))]))
    with pytest.raises(ValueError, match="no SparseDeltaLinear"):
        SparseDeltaScheduler(nn.Linear(2, 2), opt)


class TinyDataset(torch.utils.data.Dataset):
    def __init__(self, n=16):
        self.items = [{k: v[0] for k, v in batch(i, size=1).items()} for i in range(n)]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def test_trainer_callback_runs_regrowth(tmp_path):
    from transformers import Trainer, TrainingArguments

    model = ftcore.apply(tiny_llama(), SparseDeltaConfig(density=0.02))
    counts = {n: m.num_deltas for n, m in model.named_modules() if isinstance(m, SparseDeltaLinear)}
    before = {n: m.indices.clone() for n, m in model.named_modules() if isinstance(m, SparseDeltaLinear)}
    callback = ftcore.SparseDeltaCallback(regrow_every=3, accumulate_steps=2, drop_fraction=0.3)
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=2, learning_rate=1e-2,
        report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True, dataloader_num_workers=0,
    )
    Trainer(model=model, args=args, train_dataset=TinyDataset(), callbacks=[callback]).train()
    assert callback.scheduler.regrowths == 2
    for name, m in model.named_modules():
        if isinstance(m, SparseDeltaLinear):
            assert m.num_deltas == counts[name]
            assert not torch.equal(m.indices, before[name])


def _regrow_once(model, opt, steps=4):
    sched = SparseDeltaScheduler(model, opt, regrow_every=2, accumulate_steps=1, drop_fraction=0.25)
    for _ in range(steps):
        x = torch.randn(8, 32)
        model(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        sched.step()
    return sched


def test_state_of_an_unknown_layout_is_reset_not_scrambled():
    """A state dict of bitsandbytes' 8-bit Adam layout: uint8 codes of the values' shape with per-block
    absmax scales. Moving codes would rescale them by another block's absmax, and code 0 means about -absmax:
    the state is reset instead, with a warning."""
    from ftcore.tuners.scheduler import remap_optimizer_state

    values = torch.zeros(64)
    state = {"step": 3, "state1": torch.randint(0, 256, (64,), dtype=torch.uint8), "absmax1": torch.rand(1),
             "qmap1": torch.linspace(-1, 1, 256), "state2": torch.randint(0, 256, (64,), dtype=torch.uint8)}
    assert not remap_optimizer_state(state, values, lambda t: t.flip(0))
    assert state == {}
    adam = {"step": torch.tensor(3.0), "exp_avg": torch.arange(64.0), "exp_avg_sq": torch.arange(64.0) ** 2}
    assert remap_optimizer_state(adam, values, lambda t: t.flip(0))
    assert torch.equal(adam["exp_avg"], torch.arange(64.0).flip(0)) and float(adam["step"]) == 3.0


def test_bitsandbytes_8bit_adam_is_reset_with_a_warning_and_trains_on():
    bnb = pytest.importorskip("bitsandbytes")
    model = one_layer_model(k=64)
    layer = model[0]
    opt = bnb.optim.Adam8bit(ftcore.trainable_parameters(model), lr=1e-2, min_8bit_size=16)
    with pytest.warns(UserWarning, match="cannot follow moved entries"):
        _regrow_once(model, opt)
    model(torch.randn(8, 32)).pow(2).mean().backward()
    opt.step()  # after the reset
    x = torch.randn(4, 32)
    w0 = one_layer_model(k=64)[0].base_layer.weight.detach()
    delta = torch.zeros(24 * 32)
    delta[layer.indices.long()] = layer.values.detach()
    torch.testing.assert_close(model(x), x @ (w0 + delta.view(24, 32)).t() + layer.base_layer.bias, rtol=1e-5, atol=1e-5)
    assert opt.state[layer.values]["state1"].dtype == torch.uint8  # bitsandbytes took it up again afresh
