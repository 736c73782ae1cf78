"""The cases of tests/test_distributed.py, run inside 2 spawned gloo ranks (one thread each). Each case returns
plain numbers and booleans; rank 0 saves every case's result (or its traceback) for the test to check.

The reference for a DDP run is one process on the concatenated batch: every rank computes it too, on the
full batch, so that ftcore's collectives (which the reference also issues) stay paired across the ranks."""

import os

import spawned
import torch
import torch.distributed as dist
from models import tiny_llama
from torch import nn

import ftcore
from ftcore import SparseDeltaConfig, StructuredSparseConfig

WORLD = spawned.WORLD


def batches(n=3, size=4, length=16, seed=7):
    """n global batches of `size` rows; under DDP rank r trains on the r-th equal share of the rows."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 128, (size, length), generator=g) for _ in range(n)]


def shard(ids):
    rank = dist.get_rank()
    half = ids.shape[0] // WORLD
    return ids[rank * half:(rank + 1) * half]


def gathered(t):
    out = [torch.empty_like(t) for _ in range(WORLD)]
    dist.all_gather(out, t.contiguous())
    return out


def equal_on_every_rank(t) -> bool:
    parts = gathered(t)
    return all(torch.equal(parts[0], p) for p in parts[1:])


def positions(model):
    return {name: (m.indices if isinstance(m, ftcore.SparseDeltaLinear) else m.index).clone()
            for name, m in ftcore.api.adapter_layers(model).items()}


def sparse_config(**kw):
    return SparseDeltaConfig(density=0.05, **kw)


def s2ft_config(**kw):
    return StructuredSparseConfig(head_ratio=0.25, channel_ratio=0.1, **kw)


SELECTIONS = {
    "sparse-random": (sparse_config, dict(selection="random")),
    "sparse-magnitude": (sparse_config, dict(selection="magnitude")),
    # candidates that cover every entry: the choice must then equal one process's on the whole batch
    "sparse-gradient": (sparse_config, dict(selection="gradient", candidate_factor=10_000)),
    "sparse-gradient-few-candidates": (sparse_config, dict(selection="gradient", candidate_factor=2)),
    "s2ft-random": (s2ft_config, dict(selection="random")),
    "s2ft-weight-norm": (s2ft_config, dict(selection="weight-norm")),
    "s2ft-activation": (s2ft_config, dict(selection="activation")),
    "s2ft-gradient": (s2ft_config, dict(selection="gradient")),
}


def case_selection(name):
    make, kw = SELECTIONS[name]
    data = batches(2)
    local = [{"input_ids": shard(ids), "labels": shard(ids)} for ids in data]
    whole = [{"input_ids": ids, "labels": ids} for ids in data]
    model = ftcore.apply(tiny_llama(), make(**kw), calibration=local)
    reference = ftcore.apply(tiny_llama(), make(**kw), calibration=whole)
    mine, ref = positions(model), positions(reference)
    result = {"identical": all(equal_on_every_rank(p) for p in mine.values())}
    if name != "sparse-gradient-few-candidates":
        result["as_one_process"] = all(torch.equal(mine[k], ref[k]) for k in mine)
    return result


def case_planner():
    data = batches(2)
    local = [{"input_ids": shard(ids), "labels": shard(ids)} for ids in data]
    whole = [{"input_ids": ids, "labels": ids} for ids in data]
    plan = ftcore.plan_backprop(tiny_llama(), 0.5, local)
    reference = ftcore.plan_backprop(tiny_llama(), 0.5, whole)
    chosen = {name: index for name, (index, _) in plan.layers.items()}
    return {
        "identical": all(equal_on_every_rank(i) for i in chosen.values()),
        "as_one_process": chosen.keys() == reference.layers.keys()
        and all(torch.equal(chosen[n], reference.layers[n][0]) for n in chosen),
    }


def train(model, data, steps, ddp=False, scheduler=None):
    module = nn.parallel.DistributedDataParallel(model) if ddp else model
    opt = torch.optim.AdamW(ftcore.trainable_parameters(model), lr=0.05)
    sched = ftcore.SparseDeltaScheduler(model, opt, **scheduler) if scheduler else None
    for ids in data[:steps]:
        ids = shard(ids) if ddp else ids
        module(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
        if sched is not None:
            sched.step()
    return module


TRAINING = {
    "sparse-merged": lambda: sparse_config(merged=True),
    "sparse-unmerged": lambda: sparse_config(merged=False),
    "s2ft-merged": lambda: s2ft_config(merged=True),
    "s2ft-unmerged": lambda: s2ft_config(merged=False),
}
REGROWTH = dict(regrow_every=2, accumulate_steps=1, drop_fraction=0.5, candidate_factor=10_000)


def compare_training(make_config, scheduler=None, steps=3):
    data = batches(4)
    model = ftcore.apply(tiny_llama(), make_config())
    ddp = train(model, data, steps, ddp=True, scheduler=scheduler)
    reference = train(ftcore.apply(tiny_llama(), make_config()), data, steps, scheduler=scheduler)
    probe = data[-1]
    with torch.no_grad():
        out, ref_out = ddp(input_ids=probe).logits, reference(input_ids=probe).logits
    deltas = [m.delta.detach() for m in ftcore.api.adapter_layers(model).values()]
    ref_deltas = [m.delta.detach() for m in ftcore.api.adapter_layers(reference).values()]
    same_positions = all(torch.equal(a, b) for a, b in zip(positions(model).values(), positions(reference).values()))
    return {
        "model": model,
        "delta_max_diff": max((a - b).abs().max().item() for a, b in zip(deltas, ref_deltas)) if same_positions else float("inf"),
        "output_max_diff": (out - ref_out).abs().max().item(),
        "identical": all(equal_on_every_rank(d) for d in deltas) and all(equal_on_every_rank(p) for p in positions(model).values()),
        "same_positions_as_one_process": same_positions,
    }


def case_training(name):
    result = compare_training(TRAINING[name])
    del result["model"]
    return result


def case_regrowth(merged):
    result = compare_training(lambda: sparse_config(merged=merged), scheduler=REGROWTH, steps=4)
    before, after = positions(ftcore.apply(tiny_llama(), sparse_config())), positions(result.pop("model"))
    result["moved"] = all(not torch.equal(before[k], after[k]) for k in before)
    model = ftcore.apply(tiny_llama(), sparse_config())
    train(model, batches(4), 4, ddp=True, scheduler=dict(REGROWTH, candidate_factor=2))
    result["identical_with_few_candidates"] = all(equal_on_every_rank(p) for p in positions(model).values())
    return result


def case_buffers_stay_out_of_the_broadcast():
    model = ftcore.apply(tiny_llama(), sparse_config())
    ddp = nn.parallel.DistributedDataParallel(model)
    names = {n for n, _ in model.named_buffers() if n.endswith((".indices", ".base_values"))}
    return {"ignored": bool(names) and names <= set(ddp.parameters_to_ignore)}


def case_ranks_that_differ_are_refused():
    """Checked at the first forward inside DDP, where every rank is (a check in apply would hang a script that
    adapts a model on one rank only: see case_one_rank_alone)."""
    model = ftcore.apply(tiny_llama(), sparse_config(seed=dist.get_rank()))
    ddp = nn.parallel.DistributedDataParallel(model)
    ids = shard(batches(1)[0])
    try:
        ddp(input_ids=ids, labels=ids)
    except RuntimeError as exc:
        return {"refused": "differ" in str(exc)}
    return {"refused": False}


def case_one_rank_alone(folder):
    """Adapting, loading and switching adapters on one rank while the others wait elsewhere: no collective."""
    path = os.path.join(folder, "adapter")
    ok = True
    if dist.get_rank() == 0:
        model = ftcore.apply(tiny_llama(), sparse_config())
        ftcore.save_adapter(model, path)
        loaded = ftcore.load_adapter(tiny_llama(), path)
        ftcore.switch_adapter(loaded, path)
        ok = loaded(input_ids=batches(1)[0]).logits.isfinite().all().item()
    return {"ran": bool(ok)}


def case_quantization_aware_training():
    """W4A4KV4 QAT (R1–R4, fp32 masters, every parameter trainable) under DDP against one process: nothing in it is
    rank-dependent state, so AdamW on the averaged gradient must land on the same masters, up to the rare
    quantization level that float rounding (a batch of 2 against one of 4 in the GEMMs) flips: such a flip
    changes a gradient entry by a whole step's worth, which Adam then turns into a full-size update."""
    data = batches(4)
    config = lambda: ftcore.QuantConfig(rotation="full", seed=5)  # noqa: E731
    model = ftcore.apply(tiny_llama(), config())
    ddp = train(model, data, 3, ddp=True)
    reference = train(ftcore.apply(tiny_llama(), config()), data, 3)
    with torch.no_grad():
        out, ref_out = ddp(input_ids=data[-1]).logits, reference(input_ids=data[-1]).logits
    params, ref_params = dict(model.named_parameters()), dict(reference.named_parameters())
    diffs = {n: (params[n] - ref_params[n]).abs() for n in params}
    return {
        "param_max_diff": max(d.max().item() for d in diffs.values()),
        "share_of_entries_off": sum(int((d > 1e-5).sum()) for d in diffs.values()) / sum(d.numel() for d in diffs.values()),
        "output_max_diff": (out - ref_out).abs().max().item(),
        "identical": all(equal_on_every_rank(p.detach()) for p in params.values()),
    }


CASES = {
    **{f"selection[{n}]": (case_selection, (n,)) for n in SELECTIONS},
    **{f"training[{n}]": (case_training, (n,)) for n in TRAINING},
    "planner": (case_planner, ()),
    "regrowth[merged]": (case_regrowth, (True,)),
    "regrowth[unmerged]": (case_regrowth, (False,)),
    "buffers_stay_out_of_the_broadcast": (case_buffers_stay_out_of_the_broadcast, ()),
    "ranks_that_differ_are_refused": (case_ranks_that_differ_are_refused, ()),
    "one_rank_alone": (case_one_rank_alone, ("FOLDER",)),
    "quantization_aware_training": (case_quantization_aware_training, ()),
}


def worker(rank, folder):
    torch.set_num_threads(1)
    spawned.run_cases(rank, folder, CASES, {})
