"""The cases of tests/test_sharded.py, run inside 2 spawned gloo ranks (one thread each): ftcore under the
engines that shard parameters, FSDP2, FSDP1 (use_orig_params) and DeepSpeed ZeRO-2/3 (DS_ACCELERATOR=cpu, a
torch optimizer handed to deepspeed.initialize), against one process on the concatenated batch.

Each training case trains 3 AdamW steps under the engine, saves the adapter from every rank (rank 0 writes),
and compares with the one-process reference: the saved values, the engine's outputs on a full batch, and the
outputs of the saved adapter loaded into a fresh model in one process."""

import os
import warnings

import spawned
import torch
import torch.distributed as dist
from distributed_cases import WORLD, batches, shard
from models import tiny_llama
from torch import nn

import ftcore
from ftcore import SparseDeltaConfig, StructuredSparseConfig

ENGINES = ("fsdp2", "fsdp1", "zero2", "zero3")
CONFIGS = {
    "sparse": lambda **kw: SparseDeltaConfig(density=0.05, **kw),
    "s2ft": lambda **kw: StructuredSparseConfig(head_ratio=0.25, channel_ratio=0.1, **kw),
}
LR = 0.05


def deepspeed_config(stage):
    return {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        # tiny test tensors: without a threshold of 0 ZeRO-3 keeps them whole (persistent), testing nothing
        "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0},
        "steps_per_print": 10**9,
        # DeepSpeed clips the gradient norm at 1.0 unless told otherwise; the one-process reference does not clip
        # (a full fine-tune of the tiny Llama starts near norm 2, so the default would make the runs differ)
        "gradient_clipping": 0.0,
    }


def wrap(engine, model):
    """(the module to call, a function doing one training step on a batch of input ids)."""
    if engine == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        # after fully_shard: it replaces the Parameters (an optimizer built before would step the old ones)
        module, optimizer = model, torch.optim.AdamW(ftcore.trainable_parameters(model), lr=LR)
    elif engine == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # FSDP1 warns of frozen and trainable Parameters in one unit
            module = FSDP(model, auto_wrap_policy=ModuleWrapPolicy({LlamaDecoderLayer}), use_orig_params=True,
                          device_id=torch.device("cpu"))
        optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=LR)
    else:
        import deepspeed

        optimizer = torch.optim.AdamW(ftcore.trainable_parameters(model), lr=LR)
        module, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                               config=deepspeed_config(int(engine[-1])))

        def step(ids):
            module.backward(module(input_ids=ids, labels=ids).loss)
            module.step()

        return module, step

    def step(ids):
        module(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    return module, step


def reference(config, data, steps=3, make_base=tiny_llama, calibration=None):
    model = ftcore.apply(make_base(), config, calibration=calibration)
    optimizer = torch.optim.AdamW(ftcore.trainable_parameters(model), lr=LR)
    for ids in data[:steps]:
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model


def deltas(model):
    return {name: m.delta.detach().float() for name, m in ftcore.api.adapter_layers(model).items()}


def max_diff(a, b):
    return max((a[k] - b[k]).abs().max().item() for k in b) if a.keys() == b.keys() else float("inf")


def compare(module, step, config, folder, tag, data, make_base=tiny_llama, calibration=None):
    for ids in data[:3]:
        step(shard(ids))
    probe = data[3]
    with torch.no_grad():
        out = module(input_ids=probe).logits
    path = os.path.join(folder, f"adapter-{tag}")
    ftcore.save_adapter(module, path, overwrite=True)  # every rank: a collective under sharding
    dist.barrier()
    ref = reference(config, data, make_base=make_base, calibration=calibration)
    with torch.no_grad():
        ref_out = ref(input_ids=probe).logits
        loaded = ftcore.load_adapter(make_base(), path)  # one process, no engine
        loaded_out = loaded(input_ids=probe).logits
    saved = ftcore.read_adapter(path)
    key = "values" if isinstance(config, SparseDeltaConfig) else "block"
    saved_deltas = {name: record.tensors[key] for name, record in saved.layers.items()}
    layers = ftcore.api.adapter_layers(ftcore.engines.unwrap(module)).values()
    return {
        "delta_max_diff": max_diff(saved_deltas, deltas(ref)),
        "output_max_diff": (out - ref_out).abs().max().item(),
        "reloaded_output_max_diff": (loaded_out - ref_out).abs().max().item(),
        "unmerged": all(not m.merged for m in layers),
    }


def case_training(engine, method, merged):
    config = CONFIGS[method](merged=merged)
    data = batches(4)
    ftcore.nn.base._warned_fallback.clear()  # the warning comes once a process and engine
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module, step = wrap(engine, ftcore.apply(tiny_llama(), config))
        # FSDP2 replaces the Parameters: the originals must be freed (ftcore keeps weak references only)
        originals_freed = all(m._owned[0]() is None for m in ftcore.api.adapter_layers(ftcore.engines.unwrap(module)).values())
        result = compare(module, step, config, FOLDER[0], f"{engine}-{method}-{merged}", data)
    fallback = [w for w in caught if "unmerged path instead" in str(w.message)]
    # merged asked for: one warning names the engine (ZeRO-1/2 keep merged mode: their weights are whole)
    result["warned"] = bool(fallback) and all(engine[:4].upper() in str(w.message).upper() for w in fallback)
    result["originals_freed"] = originals_freed
    return result


ZERO3_SELECTIONS = {
    "sparse-magnitude": ("sparse", dict(selection="magnitude")),
    # candidates that cover every entry: the choice must then equal one process's on the whole batch
    "sparse-gradient": ("sparse", dict(selection="gradient", candidate_factor=10_000)),
    "s2ft-weight-norm": ("s2ft", dict(selection="weight-norm")),
    "s2ft-gradient": ("s2ft", dict(selection="gradient")),
}


def case_zero3_apply_and_load(selection):
    """ZeRO-3 partitions at construction (deepspeed.zero.Init, as from_pretrained does under a ZeRO-3
    config): apply reads W0 inside gathers (magnitude / weight-norm selection, base values; a data-driven
    selection gathers the model for its calibration), load_adapter too. The data-driven choices see every
    rank's share of the calibration batches, as one process sees them whole."""
    import deepspeed

    method, options = ZERO3_SELECTIONS[selection]
    config = CONFIGS[method](merged=False, **options)
    data = batches(4)
    local = whole = None
    if options["selection"] == "gradient":
        local = [{"input_ids": shard(ids), "labels": shard(ids)} for ids in data[:2]]
        whole = [{"input_ids": ids, "labels": ids} for ids in data[:2]]
    with deepspeed.zero.Init(config_dict_or_path=deepspeed_config(3)):
        base = tiny_llama()
    partitioned = all(p.numel() == 0 for p in base.model.layers[0].parameters())
    with deepspeed.zero.GatheredParameters(list(base.parameters())):  # its weights, for the one-process reference
        weights = {name: p.detach().clone() for name, p in base.named_parameters()}

    def make_base():
        plain = tiny_llama()
        plain.load_state_dict(weights, strict=False)
        return plain

    model = ftcore.apply(base, config, calibration=local)
    module, step = wrap("zero3", model)
    result = compare(module, step, config, FOLDER[0], f"zero3-init-{selection}", data, make_base, whole)
    ref_positions = {n: getattr(m, m.index_name) for n, m in
                     ftcore.api.adapter_layers(ftcore.apply(make_base(), config, calibration=whole)).items()}
    result["same_positions"] = all(torch.equal(getattr(m, m.index_name), ref_positions[n])
                                   for n, m in ftcore.api.adapter_layers(model).items())
    result["partitioned"] = partitioned
    # the saved adapter, loaded into another partitioned model before its engine starts
    with deepspeed.zero.Init(config_dict_or_path=deepspeed_config(3)):
        fresh = tiny_llama()
    loaded = ftcore.load_adapter(fresh, os.path.join(FOLDER[0], f"adapter-zero3-init-{selection}"))
    engine, _, _, _ = deepspeed.initialize(model=loaded, config=deepspeed_config(3))
    probe, ref = data[3], reference(config, data, make_base=make_base, calibration=whole)
    with torch.no_grad():
        ref_out = ref(input_ids=probe).logits
        result["loaded_under_zero3_output_max_diff"] = (engine(input_ids=probe).logits - ref_out).abs().max().item()
    return result


def case_bf16_saves_the_fp32_master(stage):
    """DeepSpeed with bf16 casts the model, the deltas too, and steps fp32 masters: the adapter holds those."""
    import deepspeed

    model = ftcore.apply(tiny_llama(), CONFIGS["sparse"]())
    optimizer = torch.optim.AdamW(ftcore.trainable_parameters(model), lr=LR)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                           config=dict(deepspeed_config(stage), bf16={"enabled": True}))
    for ids in batches(3):
        engine.backward(engine(input_ids=shard(ids), labels=shard(ids)).loss)
        engine.step()
    path = os.path.join(FOLDER[0], f"adapter-bf16-zero{stage}")
    ftcore.save_adapter(engine, path, overwrite=True)
    dist.barrier()
    saved = ftcore.read_adapter(path).layers
    layers = ftcore.api.adapter_layers(model)
    masters = {name: deepspeed.utils.safe_get_full_fp32_param(m.values).cpu() for name, m in layers.items()}
    return {
        "engine_dtype_bf16": all(m.values.dtype == torch.bfloat16 for m in layers.values()),
        "saved_fp32": all(r.tensors["values"].dtype == torch.float32 for r in saved.values()),
        "saved_the_master": all(torch.equal(saved[n].tensors["values"], masters[n]) for n in layers),
        "finer_than_bf16": any((r.tensors["values"] - r.tensors["values"].bfloat16().float()).abs().max() > 0
                               for r in saved.values()),
    }


def case_fsdp2_state_dict_round_trip():
    """A checkpoint of a sharded run (torch.distributed.checkpoint's full state dict, as accelerate and the
    Trainer resume from) loads back into the sharded model: training goes on from the same state."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict

    data = batches(4)
    model, step = wrap("fsdp2", ftcore.apply(tiny_llama(), CONFIGS["sparse"](merged=False)))
    step(shard(data[0]))
    probe = data[3]
    with torch.no_grad():
        before = model(input_ids=probe).logits
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=False)
    state = get_model_state_dict(model, options=options)
    with torch.no_grad():
        for layer in ftcore.api.adapter_layers(model).values():
            layer.delta.zero_()  # a different state, which the load must undo
    set_model_state_dict(model, state, options=options)
    with torch.no_grad():
        after = model(input_ids=probe).logits
    return {"output_max_diff": (after - before).abs().max().item()}


def case_merged_state_dict_refused_under_fsdp2():
    """A state dict saved from a merged single-process model holds W0 + Δ: loading it into a sharded (so
    unmerged) model would count the delta twice. Refused."""
    from torch.distributed.fsdp import fully_shard

    trained = reference(CONFIGS["sparse"](), batches(4))
    with torch.no_grad():
        trained(input_ids=batches(1)[0])  # merged: the weights hold W0 + Δ
    state = {k: v.clone() for k, v in trained.state_dict().items()}
    model = ftcore.apply(tiny_llama(), CONFIGS["sparse"](merged=False))
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    model(input_ids=shard(batches(1)[0]))  # FSDP2's lazy initialisation
    try:
        model.load_state_dict(state)
    except ValueError as exc:
        return {"refused": "saved from a merged model" in str(exc)}
    return {"refused": False}


def case_rotated_quant(engine):
    """RotatedQuantLinear trains its own weight, read in its own forward: FSDP2 and ZeRO-2/3 shard, gather and
    step it like any Parameter."""

    def build():
        torch.manual_seed(0)
        return nn.Sequential(*[ftcore.nn.RotatedQuantLinear(64, 64, w_bits=4, a_bits=8, online_rotation=True) for _ in range(2)])

    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(4, 64, generator=g) for _ in range(3)]
    model, ref = build(), build()
    if engine == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for layer in model:
            fully_shard(layer)
        fully_shard(model)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        module = model

        def step(loss):
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    else:
        import deepspeed

        module, _, _, _ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-2),
                                               config=deepspeed_config(int(engine[-1])))

        def step(loss):
            module.backward(loss)
            module.step()

    for x in xs:
        step(module(shard(x)).pow(2).mean())
    reference_optimizer = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    for x in xs:
        ref(x).pow(2).mean().backward()
        reference_optimizer.step()
        reference_optimizer.zero_grad()
    weights = [ftcore.engines.full_fp32(layer.weight) for layer in model]
    return {"weight_max_diff": max((a - b.weight).abs().max().item() for a, b in zip(weights, ref))}


def case_whole_model_qat(engine):
    """A whole W4A4KV4 QAT model (ftcore.QuantConfig, R1–R4, every parameter trainable) under the engine against
    one process: the same masters up to the rare quantization level float rounding flips (see the DDP case)."""
    data = batches(4)
    config = lambda: ftcore.QuantConfig(rotation="full", seed=5)  # noqa: E731
    module, step = wrap(engine, ftcore.apply(tiny_llama(), config()))
    for ids in data[:3]:
        step(shard(ids))
    ref = ftcore.apply(tiny_llama(), config())
    optimizer = torch.optim.AdamW(ftcore.trainable_parameters(ref), lr=LR)
    for ids in data[:3]:
        ref(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    inner = getattr(module, "module", module)
    diffs = [(ftcore.engines.full_fp32(p) - q.detach()).abs()
             for (_, p), (_, q) in zip(inner.named_parameters(), ref.named_parameters())]
    with torch.no_grad():
        out, ref_out = module(input_ids=data[-1]).logits, ref(input_ids=data[-1]).logits
    return {
        "param_max_diff": max(d.max().item() for d in diffs),
        "share_of_entries_off": sum(int((d > 1e-5).sum()) for d in diffs) / sum(d.numel() for d in diffs),
        "output_max_diff": (out.float() - ref_out).abs().max().item(),
    }


def case_sharded_weight_refuses_a_held_merge(only_rank0):
    """A merged forward before wrapping leaves W0 + Δ in the weight: FSDP2 shards that, which ftcore cannot
    undo on the shards. It says so, instead of training on a wrong base, on every rank even when one rank
    alone ran that forward (an evaluation on rank 0): none is left waiting in a collective."""
    from torch.distributed.fsdp import fully_shard

    model = ftcore.apply(tiny_llama(), CONFIGS["sparse"]())
    ids = shard(batches(1)[0])
    if dist.get_rank() == 0 or not only_rank0:
        model(input_ids=ids)  # merges
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model(input_ids=ids)
    except RuntimeError as exc:
        return {"refused": "ftcore.unmerge(model)" in str(exc)}
    return {"refused": False}


def case_apply_after_wrapping_refuses():
    from torch.distributed.fsdp import fully_shard

    model = tiny_llama()
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    try:
        ftcore.apply(model, CONFIGS["sparse"]())
    except ValueError as exc:
        return {"refused": "before the engine wraps it" in str(exc)}
    return {"refused": False}


def case_regrowth_refuses():
    from torch.distributed.fsdp import fully_shard

    model = ftcore.apply(tiny_llama(), CONFIGS["sparse"](merged=False))
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    try:
        ftcore.SparseDeltaScheduler(model, torch.optim.AdamW(ftcore.trainable_parameters(model)))
    except RuntimeError as exc:
        return {"refused": "under FSDP2" in str(exc)}
    return {"refused": False}


def case_regrowth_refuses_under_zero2():
    """ZeRO-1/2 keep the weights whole but step flat fp32 copies of the deltas: a regrowth's write into the
    delta would be overwritten by the next step's copy-back. Refused."""
    import deepspeed

    model = ftcore.apply(tiny_llama(), CONFIGS["sparse"]())
    optimizer = torch.optim.AdamW(ftcore.trainable_parameters(model), lr=LR)
    engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=deepspeed_config(2))
    try:
        ftcore.SparseDeltaScheduler(model, optimizer)
    except RuntimeError as exc:
        return {"refused": "under DeepSpeed ZeRO-1/2" in str(exc)}
    return {"refused": False}


def deepspeed_importable() -> bool:
    try:
        import deepspeed  # noqa: F401
    except Exception:  # noqa: BLE001  (any import failure: the ZeRO cases are skipped, and say why)
        return False
    return True


def case_fused_loss(engine):
    """ftcore.causal_lm_loss (the fused LM loss, head frozen) under the engine: the head's weight is a DTensor
    (FSDP2), partitioned (ZeRO-3) or whole (ZeRO-2); 3 steps equal one process's plain-loss steps."""
    config = CONFIGS["sparse"]()
    data = batches(4)
    model = ftcore.apply(tiny_llama(), config)
    if engine == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        module, optimizer = model, torch.optim.AdamW(ftcore.trainable_parameters(model), lr=LR)

        def step(ids):
            ftcore.causal_lm_loss(module, {"input_ids": ids, "labels": ids}).backward()
            optimizer.step()
            optimizer.zero_grad()
    else:
        import deepspeed

        optimizer = torch.optim.AdamW(ftcore.trainable_parameters(model), lr=LR)
        module, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=deepspeed_config(int(engine[-1])))

        def step(ids):
            module.backward(ftcore.causal_lm_loss(module, {"input_ids": ids, "labels": ids}))
            module.step()

    return compare(module, step, config, FOLDER[0], f"fused-{engine}", data)


CASES = {
    **{f"fused_loss[{e}]": (case_fused_loss, (e,)) for e in ("fsdp2", "zero2", "zero3")},
    **{f"training[{e}-{m}-{'merged' if merged else 'unmerged'}]": (case_training, (e, m, merged))
       for e in ENGINES for m in CONFIGS for merged in (True, False)},
    **{f"zero3_apply_and_load[{s}]": (case_zero3_apply_and_load, (s,)) for s in ZERO3_SELECTIONS},
    **{f"bf16_saves_the_fp32_master[zero{stage}]": (case_bf16_saves_the_fp32_master, (stage,)) for stage in (2, 3)},
    "fsdp2_state_dict_round_trip": (case_fsdp2_state_dict_round_trip, ()),
    "merged_state_dict_refused": (case_merged_state_dict_refused_under_fsdp2, ()),
    **{f"rotated_quant[{e}]": (case_rotated_quant, (e,)) for e in ("fsdp2", "zero2", "zero3")},
    **{f"whole_model_qat[{e}]": (case_whole_model_qat, (e,)) for e in ("fsdp2", "zero2", "zero3")},
    "held_merge_refused": (case_sharded_weight_refuses_a_held_merge, (False,)),
    "held_merge_on_one_rank_refused": (case_sharded_weight_refuses_a_held_merge, (True,)),
    "apply_after_wrapping_refused": (case_apply_after_wrapping_refuses, ()),
    "regrowth_refused": (case_regrowth_refuses, ()),
    "regrowth_refused_under_zero2": (case_regrowth_refuses_under_zero2, ()),
}
FOLDER = [None]


def worker(rank, folder):
    torch.set_num_threads(1)
    os.environ.update(DS_ACCELERATOR="cpu", LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_WORLD_SIZE=str(WORLD))
    FOLDER[0] = folder
    has_deepspeed = deepspeed_importable()
    spawned.run_cases(rank, folder, CASES, {"deepspeed": has_deepspeed}, skip=lambda name: "zero" in name and not has_deepspeed)
