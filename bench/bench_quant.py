"""Rotations and quantizers, measured side by side in one run (ratios; absolute times only for context).

    python bench/bench_quant.py            # CPU: float32; GPU: bfloat16
    python bench/bench_quant.py --quick

1. hadamard_transform for n = 128 … 32768 and the LLM sizes 896 … 28672 against the pure-PyTorch butterfly
   (ftcore.reference.hadamard_transform), a dense x @ Hᵀ (n ≤ 1024 on CPU, ≤ 8192 on GPU: the matrix is n²) and a
   copy of the same tensor (x.clone(): the memory ceiling). On a GPU also against the fast-hadamard-transform
   package when it is installed (powers of two only: it zero-pads other sizes, which is not orthogonal).
   Each row also reports the float32 round-trip error max|Hᵀ(H x) − x| / max|x|.
2. The fused rotate + fake-quantize (per token, 4 bits) against the two ops unfused, forward and forward+backward.
3. One training step (forward, backward, AdamW) of a down_proj-like RotatedQuantLinear (W4A4, online rotation)
   against nn.Linear of the same shape: 14336 → 4096 with 8192 tokens on a GPU; Qwen2.5-0.5B's 4864 → 896 with
   2048 tokens on a CPU.
4. int4_linear (the exported layer, groups of 128) against dequantizing the whole weight then one matmul, and
   against the dense matmul in the activation dtype, from decode (1 token) to prefill (2048 tokens).

Targets (issue 4): CPU Hadamard >= 5x the butterfly; GPU >= 85% of copy bandwidth for n <= 8192 and at least as
fast as fast-hadamard-transform; fused <= 0.6x the unfused pair; QAT step <= 1.3x the plain step.
Results go to bench/results/quant-<machine>.{json,md}.
"""

import argparse
import datetime
import json
import os
import sys

import torch
from torch import nn

import ftcore
from ftcore import hadamard, ops, reference
from ftcore._measure import time_interleaved

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_sparse_delta import RESULTS, machine_name  # noqa: E402

POW2 = [128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768]
LLM = [896, 1536, 3072, 3584, 4864, 8960, 11008, 13824, 14336, 18944, 28672]
TARGETS = {"cpu_vs_butterfly": 5.0, "gpu_copy_fraction": 0.85, "fused_vs_unfused": 0.6, "qat_vs_linear": 1.3}


def fast_hadamard_transform():
    try:
        from fast_hadamard_transform import hadamard_transform as fht

        return fht
    except ImportError:
        return None


def bench_hadamard(device, dtype, tensor_bytes, repeats, sizes):
    fht = fast_hadamard_transform() if device.type == "cuda" else None
    dense_limit = 8192 if device.type == "cuda" else 1024
    rows = []
    for n in sizes:
        k, p = hadamard.hadamard_factors(n)
        hk = hadamard.hadamard_matrix(k) if k > 1 else None
        m = max(1, tensor_bytes // (n * torch.finfo(dtype).bits // 8))
        x = torch.randn(m, n, device=device).to(dtype)
        scale = n**-0.5
        fns = {
            "ftcore": lambda: ops.hadamard_transform(x),
            "butterfly": lambda: reference.hadamard_transform(x, None if hk is None else hk.to(device), None, scale, False),
            "copy": lambda: x.clone(),
        }
        if n <= dense_limit:
            h = reference.hadamard_dense(hk, n, torch.float32).to(device, dtype) * scale
            fns["dense"] = lambda: x @ h.T
        if fht is not None and k == 1:
            fns["fast_hadamard_transform"] = lambda: fht(x, scale)
        t = time_interleaved(fns, repeats=repeats, device=device)
        x32 = x[:64].float()
        roundtrip = ops.hadamard_transform(ops.hadamard_transform(x32), transpose=True)
        row = {
            "n": n, "K": k, "P": p, "rows": m,
            "ms": {name: t[name].median * 1e3 for name in t},
            "speedup_vs_butterfly": t["butterfly"].median / t["ftcore"].median,
            "copy_fraction": t["copy"].median / t["ftcore"].median,
            "GB_per_s": 2 * x.numel() * x.element_size() / t["ftcore"].median / 1e9,
            "roundtrip_error": float((roundtrip - x32).abs().max() / x32.abs().max()),
        }
        if "dense" in t:
            row["speedup_vs_dense"] = t["dense"].median / t["ftcore"].median
        if "fast_hadamard_transform" in t:
            row["vs_fast_hadamard_transform"] = t["fast_hadamard_transform"].median / t["ftcore"].median
        rows.append(row)
        extra = f", dense {row['speedup_vs_dense']:.1f}x" if "speedup_vs_dense" in row else ""
        extra += f", fht {row['vs_fast_hadamard_transform']:.2f}x" if "vs_fast_hadamard_transform" in row else ""
        print(f"  n={n:6d} (K={k:3d}) {row['ms']['ftcore']:8.2f} ms  butterfly {row['speedup_vs_butterfly']:5.1f}x"
              f"  copy fraction {row['copy_fraction']:.2f} ({row['GB_per_s']:.1f} GB/s){extra}"
              f"  round-trip {row['roundtrip_error']:.1e}", flush=True)
    return rows


def bench_fused(device, dtype, tokens, sizes, repeats):
    rows = []
    for n in sizes:
        x = torch.randn(tokens, n, device=device).to(dtype)
        g = torch.randn_like(x)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()

        def fused():
            return ops.rotate_fake_quantize(x, 4)

        def unfused():
            return ops.fake_quantize(ops.hadamard_transform(x), 4)

        def fused_fb():
            ops.rotate_fake_quantize(xa, 4).backward(g)
            xa.grad = None

        def unfused_fb():
            ops.fake_quantize(ops.hadamard_transform(xb), 4).backward(g)
            xb.grad = None

        t = time_interleaved({"fused": fused, "unfused": unfused, "fused_fb": fused_fb, "unfused_fb": unfused_fb},
                             repeats=repeats, device=device)
        row = {
            "n": n, "tokens": tokens, "ms": {name: t[name].median * 1e3 for name in t},
            "forward_ratio": t["fused"].median / t["unfused"].median,
            "forward_backward_ratio": t["fused_fb"].median / t["unfused_fb"].median,
        }
        rows.append(row)
        print(f"  n={n:6d} fused/unfused forward {row['forward_ratio']:.2f}x, forward+backward "
              f"{row['forward_backward_ratio']:.2f}x", flush=True)
    return rows


def bench_qat_step(device, dtype, tokens, in_features, out_features, repeats):
    torch.manual_seed(0)
    plain = nn.Linear(in_features, out_features, bias=False, device=device, dtype=dtype)
    qat = ftcore.RotatedQuantLinear.from_linear(plain, online_rotation=True).to(device)
    x = torch.randn(tokens, in_features, device=device, dtype=dtype, requires_grad=True)
    g = torch.randn(tokens, out_features, device=device, dtype=dtype)

    def stepper(layer):
        opt = torch.optim.AdamW(layer.parameters(), lr=1e-5)

        def step():
            layer(x).backward(g)
            opt.step()
            opt.zero_grad(set_to_none=True)
            x.grad = None

        return step

    t = time_interleaved({"linear": stepper(plain), "rotated_quant": stepper(qat)}, repeats=repeats, device=device)
    flops = 6 * tokens * in_features * out_features
    row = {
        "tokens": tokens, "in": in_features, "out": out_features,
        "ms": {name: t[name].median * 1e3 for name in t},
        "ratio": t["rotated_quant"].median / t["linear"].median,
        "linear_gemm_GFLOP_per_s": flops / t["linear"].median / 1e9,
    }
    print(f"  {in_features}->{out_features}, {tokens} tokens: QAT step {row['ms']['rotated_quant']:.1f} ms vs linear "
          f"{row['ms']['linear']:.1f} ms = {row['ratio']:.2f}x (linear at {row['linear_gemm_GFLOP_per_s']:.0f} GFLOP/s)")
    return row


def bench_int4_linear(device, dtype, shapes, token_counts, repeats, group_size=128):
    """Time ratios (below 1: int4_linear is faster). On a GPU each variant cycles through enough copies of its
    weight to overflow the L2 cache twice, as a model's layers do at decode: a 29 MB int4 weight would
    otherwise stay cached between calls and flatter the int4 side."""
    rows = []
    l2 = torch.cuda.get_device_properties(device).L2_cache_size if device.type == "cuda" else 0
    for out_f, in_f in shapes:
        w = torch.randn(out_f, in_f, device=device) / in_f**0.5
        packed, scale, zero = ops.quantize_int4(w, group_size)
        copies = max(1, -(-2 * l2 // packed.numel()))
        int4 = [(packed.clone(), scale.clone(), zero.clone()) for _ in range(copies)]
        dense = [ops.dequantize_int4(packed, scale, zero, group_size, dtype) for _ in range(copies)]
        turn = {"int4_linear": 0, "dequantize_then_matmul": 0, "dense": 0}

        def next_copy(name):
            turn[name] = (turn[name] + 1) % copies
            return turn[name]

        for tokens in token_counts:
            x = torch.randn(tokens, in_f, device=device).to(dtype)
            t = time_interleaved({
                "int4_linear": lambda: ops.int4_linear(x, *int4[next_copy("int4_linear")], group_size),
                "dequantize_then_matmul": lambda: x @ ops.dequantize_int4(*int4[next_copy("dequantize_then_matmul")], group_size, dtype).t(),
                "dense": lambda: x @ dense[next_copy("dense")].t(),
            }, repeats=repeats, device=device)
            row = {"out": out_f, "in": in_f, "tokens": tokens, "ms": {name: t[name].median * 1e3 for name in t},
                   "vs_dense": t["int4_linear"].median / t["dense"].median,
                   "vs_dequantize_then_matmul": t["int4_linear"].median / t["dequantize_then_matmul"].median,
                   "weight_bytes_int4": packed.numel() + scale.numel() * 4 + zero.numel(),
                   "weight_bytes_dense": dense[0].numel() * dense[0].element_size(), "weight_copies": copies}
            rows.append(row)
            print(f"  {in_f}->{out_f}, {tokens:5d} tokens: int4_linear {row['ms']['int4_linear']:.3f} ms = "
                  f"{row['vs_dense']:.2f}x dense, {row['vs_dequantize_then_matmul']:.2f}x dequantize-then-matmul", flush=True)
    return rows


def verdicts(device, had_rows, fused_rows, qat_row):
    checks = []
    if device.type == "cpu":
        worst = min(had_rows, key=lambda r: r["speedup_vs_butterfly"])
        checks.append(("CPU Hadamard >= 5x the PyTorch butterfly (every size)",
                       worst["speedup_vs_butterfly"] >= TARGETS["cpu_vs_butterfly"],
                       f"min {worst['speedup_vs_butterfly']:.1f}x at n={worst['n']}"))
    else:
        small = [r for r in had_rows if r["n"] <= 8192]
        worst = min(small, key=lambda r: r["copy_fraction"])
        checks.append(("GPU Hadamard >= 85% of copy bandwidth for n <= 8192",
                       worst["copy_fraction"] >= TARGETS["gpu_copy_fraction"],
                       f"min {worst['copy_fraction']:.2f} at n={worst['n']}"))
        vs = [r for r in had_rows if "vs_fast_hadamard_transform" in r]
        if vs:
            w = min(vs, key=lambda r: r["vs_fast_hadamard_transform"])
            checks.append(("at least as fast as fast-hadamard-transform", w["vs_fast_hadamard_transform"] >= 1.0,
                           f"min {w['vs_fast_hadamard_transform']:.2f}x at n={w['n']}"))
    worst = max(fused_rows, key=lambda r: max(r["forward_ratio"], r["forward_backward_ratio"]))
    ratio = max(worst["forward_ratio"], worst["forward_backward_ratio"])
    checks.append(("fused rotate+fake-quant <= 0.6x the unfused pair (forward, forward+backward)",
                   ratio <= TARGETS["fused_vs_unfused"], f"max {ratio:.2f}x at n={worst['n']}"))
    checks.append(("QAT layer step <= 1.3x a plain linear step", qat_row["ratio"] <= TARGETS["qat_vs_linear"],
                   f"{qat_row['ratio']:.2f}x"))
    return checks


def int4_markdown(rows):
    lines = ["| shape | tokens | int4_linear ms | dequantize + matmul ms | dense matmul ms | time / dense | time / dequantize + matmul |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        ms = r["ms"]
        lines.append(f"| {r['in']} → {r['out']} | {r['tokens']} | {ms['int4_linear']:.3f} | {ms['dequantize_then_matmul']:.3f} | "
                     f"{ms['dense']:.3f} | {r['vs_dense']:.2f}x | {r['vs_dequantize_then_matmul']:.2f}x |")
    return lines


def write_markdown(path, meta, had_rows, fused_rows, qat_row, int4_rows, checks):
    lines = [f"# Rotations and quantizers: {meta['machine']}", "",
             f"`{meta['command']}`, {meta['date']}, torch {meta['torch']}, ftcore {meta['ftcore']}, {meta['dtype']}, "
             f"CPU kernels {meta['cpu_isa']}, {meta['threads']} threads.", "",
             "## hadamard_transform (median ms; ratios = other / ftcore; copy fraction = clone time / ftcore time)", "",
             "| n | K | rows | ftcore ms | GB/s | vs butterfly | vs dense | copy fraction | vs fast-hadamard-transform | round-trip error |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in had_rows:
        dense = f"{r['speedup_vs_dense']:.1f}x" if "speedup_vs_dense" in r else "n/a"
        fht = f"{r['vs_fast_hadamard_transform']:.2f}x" if "vs_fast_hadamard_transform" in r else "n/a"
        lines.append(f"| {r['n']} | {r['K']} | {r['rows']} | {r['ms']['ftcore']:.2f} | {r['GB_per_s']:.1f} | "
                     f"{r['speedup_vs_butterfly']:.1f}x | {dense} | {r['copy_fraction']:.2f} | {fht} | "
                     f"{r['roundtrip_error']:.1e} |")
    lines += ["", "## Fused rotate + fake-quantize (4 bits, per token) vs the two ops unfused", "",
              "| n | tokens | fused fwd ms | unfused fwd ms | ratio | fused fwd+bwd ms | unfused fwd+bwd ms | ratio |",
              "|---|---|---|---|---|---|---|---|"]
    for r in fused_rows:
        ms = r["ms"]
        lines.append(f"| {r['n']} | {r['tokens']} | {ms['fused']:.2f} | {ms['unfused']:.2f} | {r['forward_ratio']:.2f}x | "
                     f"{ms['fused_fb']:.2f} | {ms['unfused_fb']:.2f} | {r['forward_backward_ratio']:.2f}x |")
    q = qat_row
    lines += ["", "## QAT layer step (forward, backward, AdamW): RotatedQuantLinear W4A4 + online rotation vs nn.Linear", "",
              "| shape | tokens | RotatedQuantLinear ms | nn.Linear ms | ratio | nn.Linear GEMM GFLOP/s |", "|---|---|---|---|---|---|",
              f"| {q['in']} → {q['out']} | {q['tokens']} | {q['ms']['rotated_quant']:.1f} | {q['ms']['linear']:.1f} | "
              f"{q['ratio']:.2f}x | {q['linear_gemm_GFLOP_per_s']:.0f} |",
              "", "## int4_linear (groups of 128) vs dequantizing the whole weight then a matmul, and the dense matmul", ""]
    lines += int4_markdown(int4_rows)
    lines += ["", "## Targets", "", "| target | met | measured |", "|---|---|---|"]
    lines += [f"| {name} | {'yes' if ok else 'NO'} | {value} |" for name, ok, value in checks]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="fewer sizes and repeats")
    args = parser.parse_args()
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    dtype = torch.bfloat16 if gpu else torch.float32
    repeats = 3 if args.quick else (20 if gpu else 7)
    sizes = [1024, 4096, 4864] if args.quick else POW2 + LLM
    meta = {
        "machine": machine_name(device), "device": str(device), "date": datetime.date.today().isoformat(),
        "torch": torch.__version__, "ftcore": ftcore.__version__, "dtype": str(dtype).split(".")[1],
        "cpu_isa": ftcore._C.cpu_isa(), "threads": torch.get_num_threads(),
        "command": "python bench/bench_quant.py" + (" --quick" if args.quick else ""),
    }
    print(f"# rotation/quantization benchmark: {meta['machine']}, {meta['dtype']}, CPU kernels {meta['cpu_isa']}")
    print("hadamard_transform:")
    had_rows = bench_hadamard(device, dtype, (256 if gpu else 64) << 20, repeats, sizes)
    print("fused rotate + fake-quantize:")
    fused_rows = bench_fused(device, dtype, 8192 if gpu else 2048, [4096, 14336] if gpu else [4096, 4864], repeats)
    print("QAT layer step:")
    qat_row = (bench_qat_step(device, dtype, 8192, 14336, 4096, repeats) if gpu
               else bench_qat_step(device, dtype, 2048, 4864, 896, repeats))
    print("int4_linear:")
    int4_rows = bench_int4_linear(device, dtype, [(4096, 14336)] if gpu else [(896, 4864)], [1, 16, 2048], repeats)
    checks = verdicts(device, had_rows, fused_rows, qat_row)
    print("\ntargets:")
    for name, ok, value in checks:
        print(f"  {'ok  ' if ok else 'MISS'} {name}: {value}")
    if args.quick:
        return
    os.makedirs(RESULTS, exist_ok=True)
    stem = os.path.join(RESULTS, f"quant-{meta['machine']}")
    with open(stem + ".json", "w") as f:
        json.dump({"meta": meta, "hadamard": had_rows, "fused": fused_rows, "qat_step": qat_row, "int4_linear": int4_rows,
                   "targets": [{"target": n, "met": ok, "measured": v} for n, ok, v in checks]}, f, indent=2)
    write_markdown(stem + ".md", meta, had_rows, fused_rows, qat_row, int4_rows, checks)
    print(f"\nwrote {stem}.json and .md")


if __name__ == "__main__":
    main()
