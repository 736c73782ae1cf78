"""The fused linear + cross-entropy op against what users run instead, side by side in one run.

Forward + backward of the mean token loss of hidden (tokens × hidden) through an LM head (vocab × hidden) that is
frozen, as under every ftcore method (the head's weight gradient is not asked; pass --train-head to ask it). Each
variant runs in a fresh process of its own, so its peak resident set growth (ru_maxrss after − before the call) is
its own; time is the wall time of the call after one small warm-up. Variants:

  plain   HF's path: logits = hidden @ Wᵀ, then CrossEntropyLoss (the (tokens × vocab) logits and their gradient)
  trl     TRL's ChunkedLogProbFunction (what SFTTrainer uses by default), loss = −Σ log p / count
  torch   torch's F.linear_cross_entropy with LinearCrossEntropyOptions() (no per-token weights)
  ftcore  ftcore.ops.linear_cross_entropy

The physical floor beside them: the GEMMs alone (2 of tokens × hidden × vocab multiply-adds: logits and
d_hidden), timed as two torch.mm calls on one vocab-sized chunk at a time and scaled (--quick: smaller shapes).

    python bench/bench_linear_cross_entropy.py            # 4096 tokens × 256, vocab 32000 / 128256 / 151936
    python bench/bench_linear_cross_entropy.py --quick
"""

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
VARIANTS = ("plain", "trl", "torch", "ftcore", "gemm")


def run_one(variant, tokens, hidden, vocab, train_head, threads):
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(threads)
    import ftcore

    def make(t, v):
        g = torch.Generator().manual_seed(0)
        h = torch.randn(t, hidden, generator=g).requires_grad_()
        w = torch.randn(v, hidden, generator=g).div_(hidden**0.5).requires_grad_(train_head)  # no freed temporary: it would hide later peaks
        y = torch.randint(0, v, (t,), generator=g)
        y[:: 7] = -100  # a share of ignored (prompt) tokens
        return h, w, y

    def call(h, w, y):
        if variant == "plain":
            loss = F.cross_entropy(h @ w.T, y, ignore_index=-100)
        elif variant == "trl":
            from trl.kernels import ChunkedLogProbFunction

            mask = y != -100
            logp = ChunkedLogProbFunction.apply(h, w, None, y.clamp(min=0), 1.0, 4096, None, 1.0, ())[0]
            loss = -(logp.masked_fill(~mask, 0)).sum() / mask.sum()
        elif variant == "torch":
            loss = F.linear_cross_entropy(h, w, y, ignore_index=-100, options=torch.nn.LinearCrossEntropyOptions())
        elif variant == "ftcore":
            loss = ftcore.ops.linear_cross_entropy(h, w, y)
        else:  # gemm: the two products of the frozen-head case, one vocab chunk of 2^25 logits at a time
            chunk = max(1, (1 << 25) // w.shape[0])
            with torch.no_grad():
                for s in range(0, h.shape[0], chunk):
                    logits = h[s : s + chunk] @ w.T
                    logits @ w
            return None
        loss.backward()
        return loss.item()

    call(*make(64, 1000))  # warm-up: first-call costs (threads, dispatch) out of the measurement
    h, w, y = make(tokens, vocab)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    loss = call(h, w, y)
    seconds = time.perf_counter() - start
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024
    print(json.dumps({"variant": variant, "seconds": seconds, "peak_rss_growth": grown, "loss": loss}))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--train-head", action="store_true")
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS))
    parser.add_argument("--torch-max-vocab", type=int, default=32000,
                        help="torch's own op takes minutes at large vocabularies on a CPU: run it up to this one")
    parser.add_argument("--one", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    threads = int(os.environ.get("FTCORE_BENCH_THREADS", "2"))
    if args.one:
        variant, tokens, hidden, vocab = args.one
        return run_one(variant, int(tokens), int(hidden), int(vocab), args.train_head, threads)

    tokens, hidden = (512, 128) if args.quick else (4096, 256)
    vocabs = (8000, 32000) if args.quick else (32000, 128256, 151936)
    rows = []
    for vocab in vocabs:
        for variant in args.variants:
            if variant == "torch" and vocab > args.torch_max_vocab:
                rows.append({"variant": variant, "vocab": vocab, "skipped": f"vocab > --torch-max-vocab {args.torch_max_vocab}"})
                continue
            cmd = [sys.executable, __file__, "--one", variant, str(tokens), str(hidden), str(vocab)]
            if args.train_head:
                cmd.append("--train-head")
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode != 0:
                rows.append({"variant": variant, "vocab": vocab, "error": out.stderr.strip().splitlines()[-1]})
            else:
                rows.append({**json.loads(out.stdout.strip().splitlines()[-1]), "vocab": vocab})
            print(rows[-1], flush=True)

    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    lines = [
        f"# linear + cross-entropy, forward + backward ({'head trained' if args.train_head else 'head frozen'})",
        "",
        f"{tokens} tokens × hidden {hidden}, fp32, {threads} threads, {cpu}, torch {torch.__version__}, "
        f"{time.strftime('%Y-%m-%d')}. Each variant in its own process; peak RSS growth of the call; one timed "
        "call after a small warm-up. `python bench/bench_linear_cross_entropy.py" + (" --quick" if args.quick else "") + "`",
        "",
        "| vocab | variant | time | peak RSS growth | loss | time vs plain | time vs TRL | memory vs plain |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for vocab in vocabs:
        by = {r["variant"]: r for r in rows if r["vocab"] == vocab}
        plain, trl = by.get("plain", {}), by.get("trl", {})
        for variant in args.variants:
            r = by.get(variant, {})
            if "seconds" not in r:
                lines.append(f"| {vocab} | {variant} | {r.get('skipped') or r.get('error', 'not run')} | | | | | |")
                continue

            def ratio(a, b, key):
                return f"{a[key] / b[key]:.3f}×" if key in b and b[key] else ""

            loss = "" if r["loss"] is None else f"{r['loss']:.5f}"
            lines.append(
                f"| {vocab} | {variant} | {r['seconds']:.2f} s | {r['peak_rss_growth'] / 2**20:.0f} MiB | {loss} | "
                f"{ratio(r, plain, 'seconds')} | {ratio(r, trl, 'seconds')} | {ratio(r, plain, 'peak_rss_growth')} |"
            )
    lines += ["", "`gemm` is the floor: the two GEMMs a frozen head needs (logits and d_hidden) and nothing else."]
    text = "\n".join(lines) + "\n"
    print(text)
    os.makedirs(RESULTS, exist_ok=True)
    name = "linear_cross_entropy-cpu" + ("-quick" if args.quick else "") + ("-train-head" if args.train_head else "")
    with open(os.path.join(RESULTS, name + ".md"), "w") as f:
        f.write(text)
    with open(os.path.join(RESULTS, name + ".json"), "w") as f:
        json.dump({"tokens": tokens, "hidden": hidden, "threads": threads, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
