"""The KL anchor to the base: ftcore's one-model path against the two-model setup users write, side by side.

A Llama built from a config (fixed seed), adapted with ftcore sparse deltas (1% of every linear layer but the
head), one training step's forward + backward of  CE + β · KL(p_base ‖ p_θ):

  ftcore     ftcore.causal_lm_loss(model, batch, kl_strength=β): the base from the same model under
             ftcore.disable (no second copy), the logits never whole (the fused op and a chunked KL)
  two-model  a frozen copy of the base model beside the adapted one, both models' full logits, log_softmax, KL

Each variant runs in a fresh process; the figure is the peak resident-set growth from before the base model is
built to the end of the step (so the second model's weights count), and the step's wall time.

    python bench/bench_kl_anchor.py [--quick]
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def run_one(variant, quick):
    import copy

    import torch
    import torch.nn.functional as F
    from transformers import LlamaConfig, LlamaForCausalLM

    import ftcore

    torch.set_num_threads(int(os.environ.get("FTCORE_BENCH_THREADS", "2")))
    layers, hidden, vocab, tokens = (2, 256, 8000, 256) if quick else (4, 512, 32000, 1024)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 3, num_hidden_layers=layers,
                         num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=tokens,
                         tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    base = copy.deepcopy(model).eval().requires_grad_(False) if variant == "two-model" else None
    ftcore.apply(model, ftcore.SparseDeltaConfig(density=0.01, target_modules="all-linear", exclude_modules=["lm_head"]))
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (2, tokens // 2), generator=g)
    batch = {"input_ids": ids, "labels": ids}
    beta = 0.1
    start = time.perf_counter()
    if variant == "ftcore":
        loss = ftcore.causal_lm_loss(model, batch, kl_strength=beta)
    else:
        out = model(**batch)
        with torch.no_grad():
            base_logits = base(input_ids=ids).logits
        log_p = torch.log_softmax(out.logits[:, :-1], -1)
        log_q = torch.log_softmax(base_logits[:, :-1], -1)
        kl = (log_q.exp() * (log_q - log_p)).sum(-1).mean()
        loss = out.loss + beta * kl
    loss.backward()
    seconds = time.perf_counter() - start
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024
    params = sum(p.numel() for p in model.parameters())
    print(json.dumps({"variant": variant, "seconds": seconds, "peak_rss_growth": grown, "loss": loss.item(),
                      "shape": f"Llama {layers} × {hidden}, vocab {vocab}, {tokens} tokens, {params / 1e6:.1f}M parameters"}))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        return run_one(args.one, args.quick)
    rows = []
    for variant in ("two-model", "ftcore"):
        cmd = [sys.executable, __file__, "--one", variant] + (["--quick"] if args.quick else [])
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    two = rows[0]
    lines = [
        "# KL anchor to the base: one model under ftcore.disable vs a second copy of the base",
        "",
        f"{rows[0]['shape']}, fp32, CE + 0.1 · KL(p_base ‖ p_θ), one step's forward + backward, each variant in its "
        f"own process, {time.strftime('%Y-%m-%d')}. `python bench/bench_kl_anchor.py" + (" --quick" if args.quick else "") + "`",
        "",
        "| variant | peak RSS growth (weights built included) | vs two-model | step | vs two-model | loss |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['variant']} | {r['peak_rss_growth'] / 2**20:.0f} MiB | {r['peak_rss_growth'] / two['peak_rss_growth']:.2f}× | "
            f"{r['seconds']:.2f} s | {r['seconds'] / two['seconds']:.2f}× | {r['loss']:.5f} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    os.makedirs(RESULTS, exist_ok=True)
    name = "kl_anchor-cpu" + ("-quick" if args.quick else "")
    with open(os.path.join(RESULTS, name + ".md"), "w") as f:
        f.write(text)
    with open(os.path.join(RESULTS, name + ".json"), "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
