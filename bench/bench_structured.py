"""Structured sparse fine-tuning (S²FT) vs full fine-tuning vs PEFT LoRA with the same number of trainable
parameters, on a Llama built from a config: one training step's time (forward, backward, AdamW) and peak
memory, measured side by side in one run; and switching adapters vs LoRA's unmerge + merge.

    python bench/bench_structured.py            # CPU: fp32, batch 1 x 512 tokens; GPU: bf16, batch 4 x 512
    python bench/bench_structured.py --quick

Model: hidden 1024, 8 layers, intermediate 2816, 16 attention heads over 4 key/value heads, vocab 8192.
S²FT: 1/16 of the heads (o_proj columns) and 2% of the FFN channels (down_proj columns), chosen at random over
the whole model (S²FT's default). LoRA: rank r on the same o_proj and down_proj layers, r matching the count.
Targets (issue 3): S²FT step <= 0.7x full fine-tuning's time and <= 0.6x its peak memory, and no worse than LoRA
on either. Results go to bench/results/structured-<machine>.{json,md}.
"""

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import warnings

import torch

from peft import LoraConfig, get_peft_model  # imported here: never inside a memory window
from transformers import LlamaConfig, LlamaForCausalLM

import ftcore
from ftcore._measure import PeakMemory, prepare_cpu_memory_measurement, time_interleaved

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_sparse_delta import RESULTS, machine_name  # noqa: E402

# PEFT calls a transformers API that transformers 5 deprecates; nothing of ours.
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")

TARGETS = {"time_vs_full": 0.7, "memory_vs_full": 0.6}
S2FT = dict(head_ratio=1 / 16, channel_ratio=0.02, targets=("o_proj", "down_proj"))
LORA_TARGETS = ["o_proj", "down_proj"]


def base_model(device, dtype):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=8192, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
        num_key_value_heads=4, max_position_embeddings=1024, tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).to(device=device, dtype=dtype)


def s2ft_trainable() -> int:
    model = ftcore.apply(base_model("cpu", torch.float32), ftcore.StructuredSparseConfig(**S2FT))
    return sum(p.numel() for p in ftcore.trainable_parameters(model))


def lora_rank(trainable: int) -> int:
    # A rank-r LoRA on an (out, in) layer trains r·(in + out): o_proj 1024x1024, down_proj 1024x2816, 8 layers.
    per_rank = 8 * ((1024 + 1024) + (2816 + 1024))
    return max(1, round(trainable / per_rank))


def make(variant, device, dtype, rank=None, seed=0):
    model = base_model(device, dtype)
    if variant == "s2ft":
        ftcore.apply(model, ftcore.StructuredSparseConfig(**S2FT, seed=seed))
    elif variant == "lora":
        model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=LORA_TARGETS))
    params = [p for p in model.parameters() if p.requires_grad]
    return model, params


def step_fn(variant, device, dtype, rank, tokens):
    model, params = make(variant, device, dtype, rank)
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 8192, tokens, generator=g).to(device)

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, (model, optimizer), sum(p.numel() for p in params)


def memory_child(variant, device, dtype_name, rank, batch, seq) -> None:
    device, dtype = torch.device(device), getattr(torch, dtype_name)
    if device.type == "cpu":
        prepare_cpu_memory_measurement()
        torch.randn(64, 64) @ torch.randn(64, 64)
    with PeakMemory(device) as peak:
        step, _, _ = step_fn(variant, device, dtype, int(rank), (int(batch), int(seq)))
        for _ in range(2):
            step()
    print(peak.peak)


def switch_times(device, dtype, rank, repeats) -> dict:
    """S²FT: switch between two adapters held in memory (only block bytes move). LoRA: two adapters loaded,
    unmerge the active one and merge the other, as PEFT serves one merged adapter at a time."""
    with tempfile.TemporaryDirectory() as tmp:
        adapters = []
        for seed in (1, 2):
            model, _ = make("s2ft", device, dtype, seed=seed)
            with torch.no_grad():
                for p in ftcore.trainable_parameters(model):
                    p.normal_(std=1e-3)
            ftcore.save_adapter(model, os.path.join(tmp, str(seed)))
            adapters.append(ftcore.read_adapter(os.path.join(tmp, str(seed))))
        serving = ftcore.load_adapter(base_model(device, dtype), adapters[0].path, trainable=False)
        lora = get_peft_model(base_model(device, dtype), LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=LORA_TARGETS), adapter_name="a")
        lora.add_adapter("b", LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=LORA_TARGETS))
        lora.merge_adapter()
        state = {"s2ft": 0, "lora": "a"}

        def s2ft_switch():
            state["s2ft"] ^= 1
            ftcore.switch_adapter(serving, adapters[state["s2ft"]])

        def lora_switch():
            state["lora"] = "b" if state["lora"] == "a" else "a"
            lora.unmerge_adapter()
            lora.set_adapter(state["lora"])
            lora.merge_adapter()

        t = time_interleaved({"s2ft": s2ft_switch, "lora": lora_switch}, repeats=repeats, device=device)
    return {"s2ft_ms": t["s2ft"].median * 1e3, "lora_ms": t["lora"].median * 1e3, "ratio": t["s2ft"].median / t["lora"].median}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--memory-child", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        return memory_child(*args.memory_child)

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    batch, seq = (4, 512) if device.type == "cuda" else (1, 512)
    repeats = 3 if args.quick else 7
    trainable = s2ft_trainable()
    rank = lora_rank(trainable)
    meta = {
        "machine": machine_name(device), "date": datetime.date.today().isoformat(), "torch": torch.__version__,
        "ftcore": ftcore.__version__, "dtype": str(dtype).split(".")[1], "batch": batch, "seq": seq, "lora_rank": rank,
        "command": "python bench/bench_structured.py" + (" --quick" if args.quick else ""),
    }
    print(f"# S²FT vs full FT vs LoRA on {meta['machine']}: Llama 8x1024 (GQA 16/4), {meta['dtype']}, {batch}x{seq} tokens")

    fns, alive, counts = {}, [], {}
    for variant in ("full", "s2ft", "lora"):
        fns[variant], keep, counts[variant] = step_fn(variant, device, dtype, rank, (batch, seq))
        alive.append(keep)
    print(f"trainable parameters: full {counts['full']:,}, S²FT {counts['s2ft']:,}, LoRA r={rank} {counts['lora']:,}", flush=True)
    t = time_interleaved(fns, repeats=repeats, device=device)
    del fns, alive
    for v in t:
        print(f"step {v}: {t[v]}", flush=True)

    memory = {}
    for variant in ("full", "s2ft", "lora"):
        cmd = [sys.executable, __file__, "--memory-child", variant, str(device), meta["dtype"], str(rank), str(batch), str(seq)]
        memory[variant] = int(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1])
        print(f"peak memory {variant}: {memory[variant] / 2**20:.0f} MB", flush=True)

    switch = switch_times(device, dtype, rank, repeats=9 if args.quick else 21)
    print(f"adapter switch: S²FT {switch['s2ft_ms']:.2f} ms, LoRA unmerge+merge {switch['lora_ms']:.2f} ms -> {switch['ratio']:.2f}x")

    ratios = {
        "s2ft_time_vs_full": t["s2ft"].median / t["full"].median,
        "s2ft_memory_vs_full": memory["s2ft"] / memory["full"],
        "s2ft_time_vs_lora": t["s2ft"].median / t["lora"].median,
        "s2ft_memory_vs_lora": memory["s2ft"] / memory["lora"],
        "lora_time_vs_full": t["lora"].median / t["full"].median,
        "lora_memory_vs_full": memory["lora"] / memory["full"],
    }
    checks = [
        (f"S²FT step <= {TARGETS['time_vs_full']}x full FT time", ratios["s2ft_time_vs_full"] <= TARGETS["time_vs_full"], ratios["s2ft_time_vs_full"]),
        (f"S²FT peak memory <= {TARGETS['memory_vs_full']}x full FT", ratios["s2ft_memory_vs_full"] <= TARGETS["memory_vs_full"], ratios["s2ft_memory_vs_full"]),
        ("S²FT step no slower than LoRA", ratios["s2ft_time_vs_lora"] <= 1.0, ratios["s2ft_time_vs_lora"]),
        ("S²FT peak memory no more than LoRA", ratios["s2ft_memory_vs_lora"] <= 1.0, ratios["s2ft_memory_vs_lora"]),
    ]
    print("\ntargets:")
    for name, ok, value in checks:
        print(f"  {'ok  ' if ok else 'MISS'} {name}: {value:.3f}x")

    os.makedirs(RESULTS, exist_ok=True)
    stem = os.path.join(RESULTS, f"structured-{meta['machine']}")
    record = {"meta": meta, "trainable": counts, "step_ms": {v: x.median * 1e3 for v, x in t.items()},
              "step_iqr_ms": {v: [x.q1 * 1e3, x.q3 * 1e3] for v, x in t.items()}, "peak_mb": {v: m / 2**20 for v, m in memory.items()},
              "ratios": ratios, "switch": switch, "targets": [{"target": n, "met": ok, "measured": v} for n, ok, v in checks]}
    with open(stem + ".json", "w") as f:
        json.dump(record, f, indent=2)
    lines = [
        f"# S²FT vs full fine-tuning vs LoRA on {meta['machine']}", "",
        f"{meta['date']} · torch {meta['torch']} · ftcore {meta['ftcore']} · {meta['dtype']} · batch {batch} x {seq} tokens · "
        f"Llama 8 x 1024, intermediate 2816, GQA 16/4 heads, vocab 8192 · command: `{meta['command']}`", "",
        "| method | trainable params | step ms (median) | peak MB | time vs full | memory vs full |", "|---|---|---|---|---|---|",
    ]
    for v, name in (("full", "full fine-tuning"), ("s2ft", "S²FT (1/16 heads, 2% channels)"), ("lora", f"LoRA r={rank} (o_proj, down_proj)")):
        lines.append(f"| {name} | {counts[v]:,} | {t[v].median * 1e3:.0f} | {memory[v] / 2**20:.0f} | "
                     f"{t[v].median / t['full'].median:.3f} | {memory[v] / memory['full']:.3f} |")
    lines += ["", f"Adapter switch (in memory): S²FT {switch['s2ft_ms']:.2f} ms vs LoRA unmerge + merge {switch['lora_ms']:.2f} ms "
              f"({switch['ratio']:.2f}x).", "", "| target | met | measured |", "|---|---|---|"]
    lines += [f"| {n} | {'yes' if ok else 'NO'} | {v:.3f}x |" for n, ok, v in checks]
    with open(stem + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"\nwrote {stem}.json and .md")


if __name__ == "__main__":
    main()
