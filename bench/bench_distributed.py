"""What training past one process costs and saves with ftcore: a Llama of 8 layers x 1024 (intermediate 2816,
16 heads over 8 key/value heads, vocabulary 32000, random weights from a config) with sparse deltas at 1%
density on every linear layer of the blocks, AdamW.

    python bench/bench_distributed.py            # 2 ranks (gloo) on the CPU, one thread each
    python bench/bench_distributed.py --quick    # 2 layers x 256: a smoke run

Variants, each measured in the same run:
- 1 process, the concatenated batch (2 sequences), merged (the default);
- DDP on 2 ranks, one sequence each, merged and unmerged;
- FSDP2 on 2 ranks (fully_shard per decoder layer + root), where ftcore runs the exact unmerged path.
Per rank: the bytes of parameters (this rank's shards under FSDP2), gradients and optimizer state, beside the
ideal (1 process's / 2) for FSDP2; the median step time (the slower rank's, after a warm-up step) beside the
1-process step; the resident set of each process after the steps (everything it holds: libraries, activations,
the weights it still references); the bytes each rank hands the collectives per step: DDP's gradient buckets, counted by a
communication hook; FSDP2's all-gathers and reduce-scatters, computed from the units' sizes. On the CPU the step times are the CPU's (2 cores here): they show
overheads, not a GPU's speed-up. Results: bench/results/distributed-<machine>.{json,md}.
"""

import argparse
import datetime
import json
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from transformers import LlamaConfig, LlamaForCausalLM

import ftcore
from ftcore._measure import _status_bytes

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_sparse_delta import RESULTS, machine_name  # noqa: E402

WORLD = 2


def build(quick: bool, merged: bool) -> LlamaForCausalLM:
    torch.manual_seed(0)
    hidden, layers = (256, 2) if quick else (1024, 8)
    config = LlamaConfig(vocab_size=32000, hidden_size=hidden, intermediate_size=hidden * 11 // 4,
                         num_hidden_layers=layers, num_attention_heads=16, num_key_value_heads=8,
                         max_position_embeddings=256, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    return ftcore.apply(model, ftcore.SparseDeltaConfig(density=0.01, merged=merged))


def local_bytes(tensors) -> int:
    total = 0
    for t in tensors:
        if t is None:
            continue
        t = t.to_local() if ftcore.engines.is_dtensor(t) else t
        total += t.numel() * t.element_size()
    return total


class GradientBytes:
    """What DDP all-reduces: a communication hook (count_and_all_reduce) adds its buckets' bytes here."""

    def __init__(self):
        self.bytes, self.counting = 0, False


def count_and_all_reduce(counter: GradientBytes, bucket):
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    if counter.counting:
        counter.bytes += bucket.buffer().numel() * bucket.buffer().element_size()
    return allreduce_hook(None, bucket)


def fsdp2_bytes_per_step(model) -> int:
    """What FSDP2 moves per step, from the units' sizes: each decoder layer's parameters all-gathered in
    forward and again in backward (resharded after forward), the root's once, the trainable gradients
    reduce-scattered."""
    full = lambda params: sum(p.numel() * p.element_size() for p in params)  # noqa: E731  (global sizes)
    layers = full(p for layer in model.model.layers for p in layer.parameters())
    return 2 * layers + (full(model.parameters()) - layers) + full(ftcore.trainable_parameters(model))


def measure(model, forward, steps: int, ids, counter=None) -> dict:
    optimizer = torch.optim.AdamW(ftcore.trainable_parameters(model), lr=1e-4)
    times = []
    grads = 0
    for step in range(steps + 1):
        if step == 1 and counter is not None:
            counter.counting = True  # not the warm-up step (lazy initialisation, ftcore's rank check)
        start = time.perf_counter()
        forward(ids).loss.backward()
        grads = local_bytes(p.grad for p in model.parameters())
        optimizer.step()
        optimizer.zero_grad()
        if step:
            times.append(time.perf_counter() - start)
    state = [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0]
    return {
        "parameter_bytes": local_bytes(model.parameters()) + local_bytes(model.buffers()),
        "gradient_bytes": grads,
        "optimizer_bytes": local_bytes(state),
        "step_s": statistics.median(times),
        "collective_bytes_per_step": counter.bytes / steps if counter is not None else 0,
        "resident_bytes": _status_bytes("VmRSS"),  # the whole process: libraries, activations, freed-not-returned
    }


def worker(rank, folder, variant, quick, steps, length):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{os.path.join(folder, 'rendezvous')}", rank=rank,
                            world_size=WORLD, timeout=datetime.timedelta(seconds=600))
    model = build(quick, merged=variant != "ddp-unmerged")
    if variant == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        forward, counter = (lambda ids: model(input_ids=ids, labels=ids)), None  # noqa: E731
    else:
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        counter = GradientBytes()
        ddp.register_comm_hook(counter, count_and_all_reduce)
        forward = lambda ids: ddp(input_ids=ids, labels=ids)  # noqa: E731
    g = torch.Generator().manual_seed(1 + rank)
    ids = torch.randint(0, 32000, (1, length), generator=g)
    result = measure(model, forward, steps, ids, counter)
    if variant == "fsdp2":
        result["collective_bytes_per_step"] = fsdp2_bytes_per_step(model)
    slowest = torch.tensor([result["step_s"]], dtype=torch.float64)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    result["step_s"] = slowest.item()
    result["unmerged"] = all(not m.merged for m in ftcore.api.adapter_layers(model).values())
    if rank == 0:
        torch.save(result, os.path.join(folder, "result.pt"))
    dist.destroy_process_group()


def run_ranks(variant, quick, steps, length) -> dict:
    folder = tempfile.mkdtemp(prefix="ftcore-bench-dist-")
    mp.start_processes(worker, args=(folder, variant, quick, steps, length), nprocs=WORLD, start_method="spawn")
    return torch.load(os.path.join(folder, "result.pt"))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--length", type=int, default=128, help="tokens per sequence")
    args = parser.parse_args()

    torch.set_num_threads(WORLD)  # the one process gets the cores the two ranks share
    model = build(args.quick, merged=True)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 32000, (WORLD, args.length), generator=g)
    one = measure(model, lambda x: model(input_ids=x, labels=x), args.steps, ids)
    model = None  # freed before the ranks start
    results = {"1 process (merged)": one}
    for variant, label in (("ddp", "DDP (merged)"), ("ddp-unmerged", "DDP (unmerged)"), ("fsdp2", "FSDP2 (unmerged)")):
        results[label] = run_ranks(variant, args.quick, args.steps, args.length)

    machine = machine_name(torch.device("cpu"))
    shape = "2 x 256" if args.quick else "8 x 1024"
    lines = [
        f"# ftcore on 2 ranks vs 1 process, CPU ({machine}, {os.cpu_count()} cores, gloo), {datetime.date.today()}",
        "",
        f"Llama {shape} (vocabulary 32000), sparse deltas at 1% density on every block linear, AdamW. "
        f"{WORLD} ranks with one thread and one sequence of {args.length} tokens each, against one process with "
        f"{WORLD} threads on both sequences. Median of {args.steps} steps after a warm-up; CPU figures, not a GPU's.",
        "",
        "| variant | parameters + buffers / rank | vs 1 process (ideal FSDP2: 0.50) | gradients / rank | optimizer state / rank "
        "| resident set / rank | step | vs 1 process | collective bytes / rank / step (FSDP2: computed) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    mib = 1 << 20
    for label, r in results.items():
        lines.append(
            f"| {label} | {r['parameter_bytes'] / mib:.1f} MiB | {r['parameter_bytes'] / one['parameter_bytes']:.2f} "
            f"| {r['gradient_bytes'] / mib:.2f} MiB | {r['optimizer_bytes'] / mib:.2f} MiB "
            f"| {r['resident_bytes'] / mib:.0f} MiB | {r['step_s'] * 1e3:.0f} ms "
            f"| {r['step_s'] / one['step_s']:.2f} | {r['collective_bytes_per_step'] / mib:.2f} MiB |"
        )
    trainable = sum(p.numel() for p in ftcore.trainable_parameters(build(args.quick, True)))
    lines += [
        "",
        f"Trainable entries: {trainable:,} (fp32: {trainable * 4 / mib:.2f} MiB of gradients to all-reduce under DDP). "
        "Under FSDP2 the collectives carry the frozen weights too (all-gathered in forward and again in backward): "
        "sharding trades those bytes for the halved resident weights.",
    ]
    report = "\n".join(lines) + "\n"
    print(report)
    os.makedirs(RESULTS, exist_ok=True)
    stem = os.path.join(RESULTS, f"distributed-cpu-{machine}" + ("-quick" if args.quick else ""))
    with open(stem + ".md", "w") as f:
        f.write(report)
    with open(stem + ".json", "w") as f:
        json.dump({"machine": machine, "length": args.length, "steps": args.steps, "shape": shape,
                   "trainable": trainable, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
