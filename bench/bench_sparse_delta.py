"""Sparse-delta microbenchmarks: ratios measured side by side in one run, with the physical ceilings beside them.

    python bench/bench_sparse_delta.py            # CPU: fp32; GPU (if present): bf16
    python bench/bench_sparse_delta.py --quick    # fewer repeats, one shape

1. gradient at the k delta positions: ftcore's sparse_delta_grad vs forming the dense gradient then gathering
   (SpIEL's way), and vs the floor for this work (reading X and G once at copy bandwidth, or k·N multiply-adds
   at dense-GEMM speed, whichever is larger).
2. a training step of one layer (forward, backward, parameter update): SparseDeltaLinear (merged) vs a frozen
   linear (forward + input gradient: the floor) and a fully trained linear.
3. peak memory of those steps, each measured in a fresh process (CPU: peak resident set; GPU: allocator peak).

Targets (DESIGN.md, density 1%): gradient >= 8x faster than dense-then-gather; step <= 1.15x frozen and
<= 0.75x full; peak memory <= 1.1x frozen. Results go to bench/results/sparse_delta-<machine>.{json,md}.
"""

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys

import torch
from torch import nn

import ftcore
from ftcore._measure import PeakMemory, prepare_cpu_memory_measurement, time_interleaved
from ftcore.tuners.sparse_delta import layer_generator, random_positions

TARGETS = {"grad_speedup": 8.0, "step_vs_frozen": 1.15, "step_vs_full": 0.75, "memory_vs_frozen": 1.1}
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def machine_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device).replace(" ", "-")
    model = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"cpu-{model.replace(' ', '-')}-{os.cpu_count()}cores"


# ---- workloads -------------------------------------------------------------------------------------------------


def make_step(variant: str, out_f: int, in_f: int, density: float, tokens: int, dtype, device, lr=1e-3):
    """A closure running one training step of one layer, and the tensors it keeps alive."""
    torch.manual_seed(0)
    layer = nn.Linear(in_f, out_f, bias=False).to(device=device, dtype=dtype)
    x = torch.randn(tokens, in_f, device=device, dtype=dtype, requires_grad=True)
    g = torch.randn(tokens, out_f, device=device, dtype=dtype)
    if variant == "frozen":
        layer.weight.requires_grad_(False)
        params = []
    elif variant == "full":
        params = [layer.weight]
    else:
        k = max(1, round(density * out_f * in_f))
        layer = ftcore.SparseDeltaLinear(layer, random_positions(out_f * in_f, k, layer_generator(0, "bench")))
        params = [layer.values]

    def step():
        x.grad = None
        layer(x).backward(g)
        with torch.no_grad():
            for p in params:
                p.add_(p.grad, alpha=-lr)  # an optimizer's in-place update (a merged delta re-syncs after it)
                p.grad = None

    return step, (layer, x, g)


def ceilings(device, dtype, copy_bytes=64 << 20, gemm=(2048, 4096, 4096)) -> dict:
    """Copy bandwidth (bytes/s, read + write) and dense GEMM throughput (flop/s, an (m, k) x (k, n) product of
    random operands) on this machine, now."""
    n = copy_bytes // torch.tensor([], dtype=dtype).element_size()
    a = torch.randn(n, device=device).to(dtype)
    b = torch.empty_like(a)  # preallocated: a clone would also time page faults
    t_copy = time_interleaved({"copy": lambda: b.copy_(a)}, repeats=5, device=device)["copy"].median
    rows, inner, cols = gemm
    m = torch.randn(rows, inner, device=device).to(dtype)
    w = torch.randn(cols, inner, device=device).to(dtype)
    t_mm = time_interleaved({"mm": lambda: m @ w.t()}, repeats=5, device=device)["mm"].median
    return {"copy_bytes_per_s": 2 * a.numel() * a.element_size() / t_copy, "gemm_flops": 2 * rows * inner * cols / t_mm}


def bench_grad(shapes, densities, tokens, dtype, device, repeats, ceil) -> list:
    rows = []
    for out_f, in_f in shapes:
        torch.manual_seed(0)
        x = torch.randn(tokens, in_f, device=device).to(dtype)
        g = torch.randn(tokens, out_f, device=device).to(dtype)
        for density in densities:
            k = max(1, round(density * out_f * in_f))
            idx = random_positions(out_f * in_f, k, layer_generator(0, "bench")).to(device=device, dtype=torch.int32)
            idx_long = idx.long()
            t = time_interleaved(
                {
                    "ftcore": lambda: torch.ops.ftcore.sparse_delta_grad(g, x, idx),
                    "dense_then_gather": lambda: (g.t() @ x).flatten()[idx_long],
                },
                repeats=repeats,
                device=device,
            )
            # reading X and G once (copy_bytes_per_s counts a copy's reads and writes), or k·N multiply-adds
            floor = max((x.numel() + g.numel()) * x.element_size() / ceil["copy_bytes_per_s"], 2 * k * tokens / ceil["gemm_flops"])
            rows.append(
                {
                    "shape": f"{out_f}x{in_f}", "density": density, "k": k,
                    "ftcore_ms": t["ftcore"].median * 1e3, "ftcore_iqr_ms": [t["ftcore"].q1 * 1e3, t["ftcore"].q3 * 1e3],
                    "dense_then_gather_ms": t["dense_then_gather"].median * 1e3,
                    "speedup": t["dense_then_gather"].median / t["ftcore"].median,
                    "floor_ms": floor * 1e3,
                }
            )
            print(
                f"grad {out_f}x{in_f} density {density:.1%}: ftcore {t['ftcore']}, dense-then-gather "
                f"{t['dense_then_gather']} -> {rows[-1]['speedup']:.1f}x faster (floor {floor * 1e3:.2f} ms)",
                flush=True,
            )
    return rows


def bench_step(shapes, densities, tokens, dtype, device, repeats) -> list:
    rows = []
    for out_f, in_f in shapes:
        fns, keep = {}, []
        for variant in ["frozen", "full"] + [f"sparse@{d}" for d in densities]:
            density = float(variant.split("@")[1]) if "@" in variant else 0.0
            fns[variant], alive = make_step(variant.split("@")[0], out_f, in_f, density, tokens, dtype, device)
            keep.append(alive)
        t = time_interleaved(fns, repeats=repeats, device=device)
        for density in densities:
            s = t[f"sparse@{density}"].median
            rows.append(
                {
                    "shape": f"{out_f}x{in_f}", "density": density, "sparse_ms": s * 1e3,
                    "frozen_ms": t["frozen"].median * 1e3, "full_ms": t["full"].median * 1e3,
                    "vs_frozen": s / t["frozen"].median, "vs_full": s / t["full"].median,
                }
            )
            print(
                f"step {out_f}x{in_f} density {density:.1%}: sparse {t[f'sparse@{density}']}, frozen {t['frozen']}, "
                f"full {t['full']} -> {rows[-1]['vs_frozen']:.3f}x frozen, {rows[-1]['vs_full']:.3f}x full",
                flush=True,
            )
    return rows


def peak_in_child(variant, out_f, in_f, density, tokens, dtype_name, device) -> int:
    cmd = [sys.executable, __file__, "--memory-child", variant, str(out_f), str(in_f), str(density), str(tokens), dtype_name, str(device)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return int(done.stdout.strip().splitlines()[-1])


def memory_child(variant, out_f, in_f, density, tokens, dtype_name, device) -> None:
    device = torch.device(device)
    dtype = getattr(torch, dtype_name)
    if device.type == "cpu":
        prepare_cpu_memory_measurement()
        torch.randn(64, 64) @ torch.randn(64, 64)  # start the thread pool and GEMM library outside the window
    with PeakMemory(device) as peak:
        step, _ = make_step(variant, int(out_f), int(in_f), float(density), int(tokens), dtype, device)
        for _ in range(3):
            step()
    print(peak.peak)


def bench_memory(shapes, densities, tokens, dtype, device) -> list:
    rows = []
    dtype_name = str(dtype).split(".")[1]
    for out_f, in_f in shapes:
        frozen = peak_in_child("frozen", out_f, in_f, 0, tokens, dtype_name, device)
        full = peak_in_child("full", out_f, in_f, 0, tokens, dtype_name, device)
        for density in densities:
            sparse = peak_in_child("sparse", out_f, in_f, density, tokens, dtype_name, device)
            rows.append(
                {
                    "shape": f"{out_f}x{in_f}", "density": density, "sparse_mb": sparse / 2**20,
                    "frozen_mb": frozen / 2**20, "full_mb": full / 2**20,
                    "vs_frozen": sparse / frozen, "vs_full": sparse / full,
                }
            )
            print(
                f"peak memory {out_f}x{in_f} density {density:.1%}: sparse {sparse / 2**20:.1f} MB, frozen "
                f"{frozen / 2**20:.1f} MB, full {full / 2**20:.1f} MB -> {rows[-1]['vs_frozen']:.3f}x frozen",
                flush=True,
            )
    return rows


def verdicts(grad_rows, step_rows, mem_rows) -> list:
    out = []
    for r in grad_rows:
        if r["density"] == 0.01:
            out.append((f"grad {r['shape']} >= {TARGETS['grad_speedup']}x dense", r["speedup"] >= TARGETS["grad_speedup"], f"{r['speedup']:.1f}x"))
    for r in step_rows:
        if r["density"] == 0.01:
            out.append((f"step {r['shape']} <= {TARGETS['step_vs_frozen']}x frozen", r["vs_frozen"] <= TARGETS["step_vs_frozen"], f"{r['vs_frozen']:.3f}x"))
            out.append((f"step {r['shape']} <= {TARGETS['step_vs_full']}x full", r["vs_full"] <= TARGETS["step_vs_full"], f"{r['vs_full']:.3f}x"))
    for r in mem_rows:
        if r["density"] == 0.01:
            out.append((f"memory {r['shape']} <= {TARGETS['memory_vs_frozen']}x frozen", r["vs_frozen"] <= TARGETS["memory_vs_frozen"], f"{r['vs_frozen']:.3f}x"))
    return out


def write_markdown(path, meta, ceil, grad_rows, step_rows, mem_rows, checks) -> None:
    lines = [
        f"# Sparse-delta benchmark on {meta['machine']}",
        "",
        f"{meta['date']} · torch {meta['torch']} · ftcore {meta['ftcore']} · {meta['dtype']} · {meta['tokens']} tokens"
        f" · CPU kernels: {meta['cpu_isa']} · command: `{meta['command']}`",
        "",
        f"Ceilings measured in this run: copy {ceil['copy_bytes_per_s'] / 1e9:.1f} GB/s (read + write), dense GEMM "
        f"{ceil['gemm_flops'] / 1e9:.0f} GFLOP/s.",
        "",
        "## Weight gradient at the delta positions",
        "",
        "| shape (out x in) | density | ftcore ms | dense-then-gather ms | speedup | floor ms |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['shape']} | {r['density']:.1%} | {r['ftcore_ms']:.2f} | {r['dense_then_gather_ms']:.2f} | {r['speedup']:.1f}x | {r['floor_ms']:.2f} |"
        for r in grad_rows
    ]
    lines += ["", "## One training step of one layer (forward, backward, update)", "",
              "| shape | density | sparse ms | frozen ms | full ms | sparse / frozen | sparse / full |", "|---|---|---|---|---|---|---|"]
    lines += [
        f"| {r['shape']} | {r['density']:.1%} | {r['sparse_ms']:.1f} | {r['frozen_ms']:.1f} | {r['full_ms']:.1f} | {r['vs_frozen']:.3f} | {r['vs_full']:.3f} |"
        for r in step_rows
    ]
    lines += ["", "## Peak memory of the step (fresh process each)", "",
              "| shape | density | sparse MB | frozen MB | full MB | sparse / frozen | sparse / full |", "|---|---|---|---|---|---|---|"]
    lines += [
        f"| {r['shape']} | {r['density']:.1%} | {r['sparse_mb']:.1f} | {r['frozen_mb']:.1f} | {r['full_mb']:.1f} | {r['vs_frozen']:.3f} | {r['vs_full']:.3f} |"
        for r in mem_rows
    ]
    lines += ["", "## Targets at 1% density", "", "| target | met | measured |", "|---|---|---|"]
    lines += [f"| {name} | {'yes' if ok else 'NO'} | {value} |" for name, ok, value in checks]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="float32 / bfloat16 (default: fp32 on CPU, bf16 on GPU)")
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--quick", action="store_true", help="one shape, fewer repeats")
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--memory-child", nargs=7, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        return memory_child(*args.memory_child)

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    shapes = [(1024, 4096), (4096, 4096)] + ([(4096, 14336)] if device.type == "cuda" else [])
    densities = [0.001, 0.01, 0.05]
    repeats = 5 if args.quick else 15
    if args.quick:
        shapes = shapes[:1]
    meta = {
        "machine": machine_name(device), "device": str(device), "date": datetime.date.today().isoformat(),
        "torch": torch.__version__, "ftcore": ftcore.__version__, "dtype": str(dtype).split(".")[1],
        "tokens": args.tokens, "cpu_isa": ftcore._C.cpu_isa(), "threads": torch.get_num_threads(),
        "command": "python bench/bench_sparse_delta.py" + (" --quick" if args.quick else ""),
    }
    print(f"# sparse-delta benchmark: {meta['machine']}, {meta['dtype']}, {args.tokens} tokens, CPU kernels {meta['cpu_isa']}")
    ceil = ceilings(device, dtype)
    print(f"ceilings: copy {ceil['copy_bytes_per_s'] / 1e9:.1f} GB/s, dense GEMM {ceil['gemm_flops'] / 1e9:.0f} GFLOP/s", flush=True)
    grad_rows = bench_grad(shapes, densities, args.tokens, dtype, device, repeats, ceil)
    step_rows = bench_step(shapes, densities, args.tokens, dtype, device, repeats)
    mem_rows = [] if args.no_memory else bench_memory(shapes, densities, args.tokens, dtype, device)
    checks = verdicts(grad_rows, step_rows, mem_rows)
    print("\ntargets at 1% density:")
    for name, ok, value in checks:
        print(f"  {'ok  ' if ok else 'MISS'} {name}: {value}")

    os.makedirs(RESULTS, exist_ok=True)
    stem = os.path.join(RESULTS, f"sparse_delta-{meta['machine']}")
    with open(stem + ".json", "w") as f:
        json.dump({"meta": meta, "ceilings": ceil, "grad": grad_rows, "step": step_rows, "memory": mem_rows,
                   "targets": [{"target": n, "met": ok, "measured": v} for n, ok, v in checks]}, f, indent=2)
    write_markdown(stem + ".md", meta, ceil, grad_rows, step_rows, mem_rows, checks)
    print(f"\nwrote {stem}.json and .md")


if __name__ == "__main__":
    main()
