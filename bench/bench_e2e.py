"""One training step of a Llama with Llama-3-8B layer shapes, random weights from a config (nothing to
download): ftcore sparse deltas and ftcore S²FT against PEFT LoRA and full fine-tuning, on the same model and
batch, in one run. Step time (forward, backward, AdamW) and peak GPU memory.

    python bench/bench_e2e.py                    # GPU: bf16, 8 layers, batch 1 x 2048 tokens
    python bench/bench_e2e.py --layers 4 --batch 2
    python bench/bench_e2e.py --tiny             # CPU smoke: a small config, two steps each

Shapes: hidden 4096, intermediate 14336, 32 query heads over 8 key/value heads, vocabulary 128256 (untied).
Methods, each trained with torch.optim.AdamW on its trainable parameters:
- full fine-tuning: every parameter, bf16 (AdamW keeps its state in the parameters' dtype);
- PEFT LoRA, rank 16, alpha 32, on every linear layer of the blocks (PEFT keeps the adapters in fp32);
- ftcore sparse deltas: the same number of trainable entries as LoRA over the same layers, random positions,
  merged (fp32 master values);
- ftcore S²FT: 1 head in 32 (o_proj columns) plus the FFN channels (down_proj columns) that bring the count
  to LoRA's, chosen at random over the whole model.
The methods run one after another in this process; memory is the allocator's peak from an empty GPU over the
model's construction and the timed steps (weights, optimizer state, activations). Beside each time: the floor
for the linear layers' work at the dense bf16 GEMM rate measured in the same run (6·N·T multiply-add flops for
full fine-tuning, 4·N·T for methods whose frozen weights need only the input gradient; attention not counted).
Results go to bench/results/e2e-<machine>.{json,md}.
"""

import argparse
import datetime
import gc
import json
import os
import sys
import traceback
import warnings
from typing import Callable, Dict, Optional

import torch

import ftcore
from ftcore._measure import time_interleaved

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_sparse_delta import RESULTS, ceilings, machine_name  # noqa: E402

warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")  # PEFT on transformers 5

METHODS = ("full", "lora", "sparse_delta", "s2ft")
LORA_RANK = 16
BLOCK_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                 vocab_size=128256, rope_theta=500000.0, max_position_embeddings=8192)
TINY = dict(hidden_size=256, intermediate_size=704, num_attention_heads=8, num_key_value_heads=2, vocab_size=1024,
            max_position_embeddings=512)


def build_model(shapes: dict, layers: int, device, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**shapes, num_hidden_layers=layers, tie_word_embeddings=False)
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # initialise in the training dtype, on the device: no fp32 copy on the host
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model


def lora_count(shapes: dict, layers: int) -> int:
    h, i = shapes["hidden_size"], shapes["intermediate_size"]
    kv = h // shapes["num_attention_heads"] * shapes["num_key_value_heads"]
    per_rank = (h + h) + 2 * (h + kv) + (h + h) + 2 * (h + i) + (i + h)  # r · (in + out) for q, k, v, o, gate, up, down
    return LORA_RANK * per_rank * layers


def s2ft_config(shapes: dict, layers: int) -> "ftcore.StructuredSparseConfig":
    """1/32 of the heads plus enough FFN channels to match LoRA's trainable count (o_proj column = hidden
    entries per head dim, down_proj column = hidden entries)."""
    h, heads, i = shapes["hidden_size"], shapes["num_attention_heads"], shapes["intermediate_size"]
    head_ratio = 1 / 32
    head_entries = round(head_ratio * heads * layers) * (h // heads) * h
    channels = max(1, (lora_count(shapes, layers) - head_entries) // h)
    return ftcore.StructuredSparseConfig(head_ratio=head_ratio, channel_ratio=channels / (i * layers),
                                         targets=("o_proj", "down_proj"), seed=0)


def prepare(method: str, model, shapes: dict, layers: int):
    """Applies `method` to `model`; returns (model, trainable parameters)."""
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=LORA_RANK, lora_alpha=2 * LORA_RANK, lora_dropout=0.0,
                                                 target_modules=BLOCK_LINEARS))
    elif method == "sparse_delta":
        ftcore.apply(model, ftcore.SparseDeltaConfig(num_deltas=lora_count(shapes, layers), target_modules=BLOCK_LINEARS))
    elif method == "s2ft":
        ftcore.apply(model, s2ft_config(shapes, layers))
    elif method != "full":
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    return model, [p for p in model.parameters() if p.requires_grad]


def gemm_rate(device, dtype) -> float:
    """Dense GEMM flop/s on this device now (8192³ on a GPU, 1024³ on a CPU), random operands."""
    n = 8192 if torch.device(device).type == "cuda" else 1024
    return ceilings(device, dtype, copy_bytes=1 << 20, gemm=(n, n, n))["gemm_flops"]


def measure(method: str, shapes: dict, layers: int, batch: int, seq: int, device, dtype, *, warmup: int, steps: int) -> dict:
    """Builds the model, applies the method, runs warmup + timed steps; returns the method's row."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        start_bytes = torch.cuda.memory_allocated(device)
    model, params = prepare(method, build_model(shapes, layers, device, dtype), shapes, layers)
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    ids = torch.randint(0, shapes["vocab_size"], (batch, seq), generator=torch.Generator().manual_seed(1)).to(device)
    losses = []

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())

    t = time_interleaved({"step": step}, repeats=steps, warmup=warmup, device=device)["step"]
    row = {
        "method": method,
        "trainable": sum(p.numel() for p in params),
        "total_params": sum(p.numel() for p in model.parameters()),
        "step_ms": t.median * 1e3,
        "step_ms_iqr": [t.q1 * 1e3, t.q3 * 1e3],
        "tokens_per_s": batch * seq / t.median,
        "losses": [float(x) for x in losses],
    }
    if cuda:
        row["peak_gb"] = (torch.cuda.max_memory_allocated(device) - start_bytes) / 2**30
    return row  # the model goes with this frame; the next measure() collects and empties the cache first


def linear_params(shapes: dict, layers: int) -> int:
    h, i = shapes["hidden_size"], shapes["intermediate_size"]
    kv = h // shapes["num_attention_heads"] * shapes["num_key_value_heads"]
    return layers * (2 * h * h + 2 * h * kv + 3 * h * i) + shapes["vocab_size"] * h  # blocks + lm_head


def add_ratios_and_floors(rows: Dict[str, dict], shapes: dict, layers: int, tokens: int, rate: Optional[float]) -> None:
    n = linear_params(shapes, layers)
    for method, row in rows.items():
        if "step_ms" not in row:
            continue
        if rate:
            row["floor_ms"] = (6 if method == "full" else 4) * n * tokens / rate * 1e3
        for other in ("full", "lora"):
            if other != method and "step_ms" in rows.get(other, {}):
                row[f"time_vs_{other}"] = row["step_ms"] / rows[other]["step_ms"]
                if "peak_gb" in row and "peak_gb" in rows[other]:
                    row[f"memory_vs_{other}"] = row["peak_gb"] / rows[other]["peak_gb"]


def markdown(meta: dict, rows: Dict[str, dict]) -> list:
    names = {"full": f"full fine-tuning ({meta['dtype']})", "lora": f"PEFT LoRA r={LORA_RANK}, all block linears",
             "sparse_delta": "ftcore sparse deltas (LoRA's count, random)", "s2ft": "ftcore S²FT (1/32 heads + channels)"}
    sh = TINY if meta["shapes"] == "tiny" else LLAMA3_8B
    shape = (f"{meta['shapes']} shape (hidden {sh['hidden_size']}, intermediate {sh['intermediate_size']}, GQA "
             f"{sh['num_attention_heads']}/{sh['num_key_value_heads']}, vocab {sh['vocab_size']})")
    lines = [f"{meta['layers']} layers of {shape}, "
             f"batch {meta['batch']} x {meta['seq']} tokens, {meta['dtype']}, AdamW; {meta['steps']} timed steps after "
             f"{meta['warmup']} warm-up. Dense GEMM in this run: "
             f"{meta['gemm_tflops']:.1f} TFLOP/s.", "",
             "| method | trainable | step ms (median) | IQR | floor ms | peak GB | time vs full | memory vs full | time vs LoRA | memory vs LoRA |",
             "|---|---|---|---|---|---|---|---|---|---|"]

    def f(row, key, fmt):
        return format(row[key], fmt) if key in row else "–"

    for method in METHODS:
        row = rows.get(method)
        if row is None:
            continue
        if "error" in row:
            lines.append(f"| {names[method]} | – | {row['error']} | | | | | | | |")
            continue
        lo, hi = row["step_ms_iqr"]
        lines.append(f"| {names[method]} | {row['trainable']:,} | {row['step_ms']:.1f} | {lo:.1f}–{hi:.1f} | "
                     f"{f(row, 'floor_ms', '.1f')} | {f(row, 'peak_gb', '.2f')} | {f(row, 'time_vs_full', '.3f')} | "
                     f"{f(row, 'memory_vs_full', '.3f')} | {f(row, 'time_vs_lora', '.3f')} | {f(row, 'memory_vs_lora', '.3f')} |")
    return lines


def run(args, record: Callable[[dict], None] = lambda record: None) -> dict:
    """Measures every method in args.methods; calls `record` with the results so far after each one."""
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    shapes = TINY if args.tiny else LLAMA3_8B
    meta = {
        "machine": machine_name(device), "date": datetime.date.today().isoformat(), "torch": torch.__version__,
        "ftcore": ftcore.__version__, "dtype": str(dtype).split(".")[1], "layers": args.layers, "batch": args.batch,
        "seq": args.seq, "warmup": args.warmup, "steps": args.steps, "shapes": "tiny" if args.tiny else "llama3-8b",
        "command": "python bench/bench_e2e.py " + " ".join(sys.argv[1:]),
    }
    meta["gemm_tflops"] = gemm_rate(device, dtype) / 1e12
    rows: Dict[str, dict] = {}
    result = {"meta": meta, "rows": rows}
    print(f"# one training step, {args.layers} layers of {meta['shapes']} shape, {args.batch}x{args.seq} tokens, "
          f"{meta['dtype']} on {meta['machine']} (dense GEMM {meta['gemm_tflops']:.1f} TFLOP/s)", flush=True)
    for method in args.methods:
        try:
            rows[method] = measure(method, shapes, args.layers, args.batch, args.seq, device, dtype,
                                   warmup=args.warmup, steps=args.steps)
        except Exception as exc:  # noqa: BLE001  (out of memory, or a library's error: report it, measure the rest)
            traceback.print_exc()
            what = "out of memory" if isinstance(exc, torch.OutOfMemoryError) else type(exc).__name__
            rows[method] = {"method": method, "error": f"{what}: {(str(exc).splitlines() or [''])[0][:300]}"}
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        add_ratios_and_floors(rows, shapes, args.layers, args.batch * args.seq, meta["gemm_tflops"] * 1e12)
        row = rows[method]
        if "error" in row:
            print(f"  {method}: {row['error']}", flush=True)
        else:
            peak = f", peak {row['peak_gb']:.2f} GB" if "peak_gb" in row else ""
            print(f"  {method}: {row['trainable']:,} trainable, step {row['step_ms']:.1f} ms{peak}, "
                  f"loss {row['losses'][0]:.3f} -> {row['losses'][-1]:.3f}", flush=True)
        record(result)
    return result


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="default: bfloat16 on a GPU, float32 on a CPU")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--tiny", action="store_true", help="a small config (CPU smoke test)")
    return p


def main() -> None:
    args = parser().parse_args()
    if args.tiny:
        args.layers, args.seq, args.warmup, args.steps = min(args.layers, 2), min(args.seq, 64), 1, 2
    result = run(args)
    lines = markdown(result["meta"], result["rows"])
    print("\n" + "\n".join(lines))
    if args.tiny:
        return
    os.makedirs(RESULTS, exist_ok=True)
    stem = os.path.join(RESULTS, f"e2e-{result['meta']['machine']}")
    with open(stem + ".json", "w") as f:
        json.dump(result, f, indent=2)
    with open(stem + ".md", "w") as f:
        f.write("\n".join([f"# One training step of a Llama-3-8B-shaped model on {result['meta']['machine']}", "",
                           f"{result['meta']['date']} · torch {result['meta']['torch']} · ftcore {result['meta']['ftcore']} · "
                           f"command: `{result['meta']['command']}`", ""] + lines) + "\n")
    print(f"\nwrote {stem}.json and .md")


if __name__ == "__main__":
    main()
