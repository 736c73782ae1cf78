"""`make demo`: fine-tune a small Llama (built from a config, fixed seed) on the text task shipped with ftcore
(ftcore/data/demo_corpus.txt, byte-level tokens) with sparse deltas, with structured sparse blocks (S²FT) and
with full fine-tuning, side by side.

For each method it prints the trainable parameters, the median step time, the peak memory (each method runs
in a fresh process) and the loss before and after. Then it reloads the saved sparse adapter into a fresh base
model and checks that the outputs match the trained model's exactly.

    python -m ftcore.demo [--steps 60] [--density 0.05] [--out demo-output]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM  # imported here: never inside a memory window

import ftcore
from ftcore._measure import PeakMemory, prepare_cpu_memory_measurement

CORPUS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "demo_corpus.txt")
SEQ_LEN, BATCH = 96, 8


def base_model(seed: int = 0):
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=256, hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=SEQ_LEN, tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


def token_windows():
    """Byte-level tokens of the corpus, cut into training windows and a fixed evaluation batch."""
    data = torch.tensor(list(open(CORPUS, "rb").read()), dtype=torch.long)
    g = torch.Generator().manual_seed(0)
    starts = torch.randint(0, data.numel() - SEQ_LEN, (4096,), generator=g)
    windows = torch.stack([data[s : s + SEQ_LEN] for s in starts.tolist()])
    return windows[BATCH:], windows[:BATCH]


@torch.no_grad()
def eval_loss(model, batch) -> float:
    return model(input_ids=batch, labels=batch).loss.item()


# S²FT: a quarter of the heads (o_proj columns) and a tenth of the FFN channels (down_proj columns), about as
# many trainable parameters as the 5% sparse deltas.
S2FT = dict(head_ratio=0.25, channel_ratio=0.1)
# Sparse deltas take larger steps: each trains a few scattered entries of a weight, not whole blocks of it.
LEARNING_RATES = {"sparse": 1e-2, "s2ft": 3e-3, "full": 1e-3}


def setup(method: str, steps: int, density: float):
    model = base_model()
    if method == "sparse":
        ftcore.apply(model, ftcore.SparseDeltaConfig(density=density))
    elif method == "s2ft":
        ftcore.apply(model, ftcore.StructuredSparseConfig(**S2FT))
    params = ftcore.trainable_parameters(model)
    optimizer = torch.optim.AdamW(params, lr=LEARNING_RATES[method], weight_decay=0.0)
    scheduler = ftcore.SparseDeltaScheduler(model, optimizer, regrow_every=20, total_steps=steps) if method == "sparse" else None
    return model.eval(), params, optimizer, scheduler  # eval: no dropout in Llama anyway; evaluation matches training


def train_step(model, optimizer, scheduler, batch) -> None:
    loss = model(input_ids=batch, labels=batch).loss
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    if scheduler is not None:
        scheduler.step()


def peak_memory(method: str, steps: int, density: float) -> dict:
    """Peak memory over the first steps (optimizer state and all), in a process whose allocator returns freed
    memory at once so the resident set follows live memory (that costs speed, so timing runs elsewhere)."""
    prepare_cpu_memory_measurement()
    torch.randn(64, 64) @ torch.randn(64, 64)  # thread pool and GEMM library start outside the window
    train_windows, _ = token_windows()
    with PeakMemory("cpu") as peak:
        model, _, optimizer, scheduler = setup(method, steps, density)
        for step in range(3):
            train_step(model, optimizer, scheduler, train_windows[step * BATCH : (step + 1) * BATCH])
    return {"peak_mb": peak.peak / 2**20}


def train(method: str, steps: int, density: float, out: str) -> dict:
    train_windows, eval_batch = token_windows()
    model, params, optimizer, scheduler = setup(method, steps, density)
    before = eval_loss(model, eval_batch)
    times = []
    for step in range(steps):
        start = time.perf_counter()
        train_step(model, optimizer, scheduler, train_windows[step * BATCH : (step + 1) * BATCH])
        times.append(time.perf_counter() - start)
    result = {
        "method": method,
        "trainable": sum(p.numel() for p in params),
        "total": sum(p.numel() for p in model.parameters()),
        "step_ms": statistics.median(times) * 1e3,
        "loss_before": before,
        "loss_after": eval_loss(model, eval_batch),
    }
    if method != "full":
        ftcore.save_adapter(model, os.path.join(out, f"{method}-adapter"), overwrite=True)
        with torch.no_grad():
            torch.save(model(input_ids=eval_batch).logits, os.path.join(out, f"{method}-logits.pt"))
    if scheduler is not None:
        result["regrowths"] = scheduler.regrowths
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description="ftcore demo: sparse-delta vs full fine-tuning of a small Llama")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--density", type=float, default=0.05)
    parser.add_argument("--out", default="demo-output")
    parser.add_argument("--child", choices=["sparse", "s2ft", "full"], help=argparse.SUPPRESS)
    parser.add_argument("--child-memory", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    if args.child:
        work = peak_memory if args.child_memory else lambda *a: train(*a, args.out)
        print(json.dumps(work(args.child, args.steps, args.density)))
        return

    print(f"ftcore {ftcore.__version__} demo: Llama (4 layers, hidden 256, GQA 4/2 heads) built from a config, "
          f"{args.steps} steps of {BATCH}x{SEQ_LEN} byte tokens on {os.path.basename(CORPUS)}; CPU kernels: {ftcore._C.cpu_isa()}")
    results = []
    for method in ("sparse", "s2ft", "full"):
        result = {}
        for extra in ([], ["--child-memory"]):
            cmd = [sys.executable, "-m", "ftcore.demo", "--child", method, "--steps", str(args.steps),
                   "--density", str(args.density), "--out", args.out, *extra]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                sys.stderr.write(done.stderr)
                raise SystemExit(f"the {method} run failed")
            result.update(json.loads(done.stdout.strip().splitlines()[-1]))
        results.append(result)

    names = {"sparse": f"sparse deltas ({args.density:.0%})", "s2ft": "S²FT (heads, channels)", "full": "full fine-tuning"}
    print(f"\n{'method':<24}{'trainable':>22}{'step ms':>10}{'peak MB':>10}{'loss before':>13}{'loss after':>12}")
    for r in results:
        share = f"{r['trainable']:,} ({r['trainable'] / r['total']:.1%})"
        print(f"{names[r['method']]:<24}{share:>22}{r['step_ms']:>10.1f}{r['peak_mb']:>10.1f}{r['loss_before']:>13.3f}{r['loss_after']:>12.3f}")
    full = results[-1]
    for r in results[:-1]:
        print(f"{names[r['method']]} / full: step time {r['step_ms'] / full['step_ms']:.2f}x, peak memory {r['peak_mb'] / full['peak_mb']:.2f}x")
    print(f"{results[0]['regrowths']} SpIEL regrowths during the sparse-delta run")

    _, eval_batch = token_windows()
    for method in ("sparse", "s2ft"):
        adapter = os.path.join(args.out, f"{method}-adapter")
        size = sum(os.path.getsize(os.path.join(adapter, f)) for f in os.listdir(adapter))
        fresh = ftcore.load_adapter(base_model(), adapter)
        with torch.no_grad():
            reloaded = fresh(input_ids=eval_batch).logits
        same = torch.equal(reloaded, torch.load(os.path.join(args.out, f"{method}-logits.pt")))
        print(f"{names[method]} adapter: {adapter} ({size / 1024:.0f} KiB); reloaded into a fresh base model, its outputs "
              f"match the trained model's exactly: {same}")
        if not same:
            raise SystemExit(f"the reloaded {method} adapter does not reproduce the trained model")


if __name__ == "__main__":
    main()
