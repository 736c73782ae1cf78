"""Every ftcore op once, on small shapes: the one process that `make gpu-check` runs under compute-sanitizer
(memcheck on everything; racecheck and synccheck on ftcore's kernels, which use shared memory), and a quick
smoke test on the CPU (the gpu-check dry run and the test suite).

    python bench/gpu_smoke.py --device cuda

Each op's result on the device is compared with the same call on the CPU (on a CPU run: the active instruction-set
build against the generic one), float results within a float32 tolerance; quantized results may differ by one level where a value sits on a rounding tie, in at most 1% of
the elements; integer results exactly. Fails, naming the op, if an op of ftcore's op list has no call here:
adding an op without adding it here breaks the dry run in CI.
"""

import argparse
import sys
from typing import Callable, Dict, Tuple

import torch

import ftcore
from ftcore import hadamard, ops

# Shapes chosen to exercise the interesting paths while staying small under the sanitizers: odd token counts
# (partial tiles), a Hadamard size with K = 1 (1024) and one with K > 1 (768 = 12·64), groups, int32 indices.
TOKENS, OUT, IN, K = 37, 24, 40, 50


def _rand(*shape, seed, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _positions(numel, k, seed, dtype=torch.int32):
    perm = torch.randperm(numel, generator=torch.Generator().manual_seed(seed))[:k]
    return torch.sort(perm).values.to(dtype)


def _on(device, *tensors):
    return [t.to(device) for t in tensors]


# Each entry: op name -> (function of the device returning a tuple of tensors, compare mode).
# Compare modes: "float" (close to the CPU), "quantized" (close except for rare one-level ties), "exact".
CALLS: Dict[str, Tuple[Callable[[torch.device], tuple], str]] = {}


def smoke(*names, mode="float"):
    def register(fn):
        for name in names:
            CALLS[name] = (fn, mode)
        return fn

    return register


@smoke("sparse_delta_grad")
def _grad(device):
    g, x, idx = _on(device, _rand(TOKENS, OUT, seed=1), _rand(TOKENS, IN, seed=2), _positions(OUT * IN, K, 3))
    bf16 = ops.sparse_delta_grad(g.bfloat16(), x.bfloat16(), idx.long())
    return ops.sparse_delta_grad(g, x, idx), bf16


@smoke("sparse_delta_linear", "sparse_delta_linear_transpose")
def _linear(device):
    x, g, idx, v = _on(device, _rand(TOKENS, IN, seed=4), _rand(TOKENS, OUT, seed=5), _positions(OUT * IN, K, 6),
                       _rand(K, seed=7))
    return ops.sparse_delta_linear(x, idx, v, OUT), ops.sparse_delta_linear_transpose(g, idx, v, IN)


@smoke("sparse_delta_scatter_", "sparse_delta_gather")
def _scatter_gather(device):
    w, idx, v = _on(device, _rand(OUT, IN, seed=8), _positions(OUT * IN, K, 9), _rand(K, seed=10))
    base = ops.sparse_delta_gather(w, idx)
    merged = w.clone()
    ops.sparse_delta_scatter_(merged, idx, v, 0.5)
    restored = merged.clone()
    ops.sparse_delta_scatter_(restored, idx, v, 0.0, base)  # the bit-exact unmerge
    transposed = w.t().contiguous().t()  # strided: the logical view of a GPT-2 Conv1D weight
    ops.sparse_delta_scatter_(transposed, idx, v, 1.0)
    return base, merged, restored, transposed


@smoke("sparse_delta_topk")
def _topk(device):
    g, x = _on(device, _rand(TOKENS, OUT, seed=11), _rand(TOKENS, IN, seed=12))
    top, mags = ops.sparse_delta_topk(g, x, K, chunk_rows=7)
    skip = top[::2].contiguous()
    again, _ = ops.sparse_delta_topk(g, x, K, exclude=skip)
    return top, mags, again


@smoke("gather_columns", "scatter_columns")
def _columns(device):
    x, cols = _on(device, _rand(3, TOKENS, IN, seed=13), _positions(IN, 9, 14))
    kept = ops.gather_columns(x, cols)
    return kept, ops.scatter_columns(kept, cols, IN)


@smoke("structured_block_grad")
def _block_grad(device):
    g, x, rows, cols = _on(device, _rand(TOKENS, OUT, seed=15), _rand(TOKENS, IN, seed=16), _positions(OUT, 5, 17),
                           _positions(IN, 9, 18))
    return (ops.structured_block_grad(g, ops.gather_columns(x, cols)), ops.structured_block_grad(g, x, rows=rows),
            ops.structured_block_grad(g.bfloat16(), x.bfloat16(), columns=cols))


@smoke("structured_block_scatter_", "structured_block_gather")
def _blocks(device):
    w, cols, rows = _on(device, _rand(OUT, IN, seed=19), _positions(IN, 9, 20), _positions(OUT, 5, 21))
    out = []
    for index, by_rows in ((cols, False), (rows, True)):
        base = ops.structured_block_gather(w, index, rows=by_rows)
        block = _rand(*base.shape, seed=int(by_rows)).to(device)
        merged = w.clone()
        ops.structured_block_scatter_(merged, index, block, 0.5, rows=by_rows)
        restored = merged.clone()
        ops.structured_block_scatter_(restored, index, block, 0.0, base, rows=by_rows)
        out += [base, merged, restored]
    return tuple(out)


@smoke("multi_adapter_linear")
def _multi_adapter(device):
    x, w, bias = _on(device, _rand(4, 6, IN, seed=22), _rand(OUT, IN, seed=23), _rand(OUT, seed=24))
    index = torch.cat([_positions(IN, 5, 25), _positions(IN, 7, 26)]).long().to(device)
    offsets = torch.tensor([0, 5, 12], device=device)
    blocks = _rand(OUT, 12, seed=27).to(device)
    ids = torch.tensor([0, -1, 1, 0], device=device)
    return (ops.multi_adapter_linear(x, w, bias, ids, index, offsets, blocks),)


@smoke("hadamard_transform")
def _hadamard(device):
    out = []
    for n in (1024, 768):  # K = 1 and K = 12
        x = _rand(7, n, seed=n).to(device)
        signs = hadamard.random_signs(n, 3, device=device)
        y = ops.hadamard_transform(x, signs=signs)
        out += [y, ops.hadamard_transform(y, signs=signs, transpose=True), ops.hadamard_transform(x.bfloat16())]
    return tuple(out)


@smoke("fake_quantize", "fake_quantize_backward", mode="quantized")
def _fake_quantize(device):
    x = (_rand(6, 64, seed=28) * 3).to(device).requires_grad_()
    out = []
    for kwargs in (dict(granularity="token"), dict(granularity="group", group_size=16, symmetric=False),
                   dict(granularity="tensor")):
        y = ops.fake_quantize(x, 4, **kwargs)
        (dx,) = torch.autograd.grad(y, x, torch.ones_like(y))  # fake_quantize_backward (straight-through)
        out += [y.detach(), dx]
    scale = torch.full((6, 4), 0.3, device=device, requires_grad=True)  # learnable (LSQ) scale
    y = ops.fake_quantize(x, 4, granularity="group", group_size=16, scale=scale)
    dx, dscale = torch.autograd.grad(y, (x, scale), torch.ones_like(y))
    return tuple(out) + (y.detach(), dx, dscale)


@smoke("rotate_fake_quantize", "rotate_fake_quantize_backward", mode="quantized")
def _rotate_fake_quantize(device):
    out = []
    for n, kwargs in ((1024, dict(granularity="token")), (768, dict(granularity="group", group_size=64, symmetric=False))):
        x = _rand(5, n, seed=29).to(device).requires_grad_()
        y = ops.rotate_fake_quantize(x, 4, signs=hadamard.random_signs(n, 4, device=device), **kwargs)
        (dx,) = torch.autograd.grad(y, x, torch.ones_like(y))  # rotate_fake_quantize_backward
        out += [y.detach(), dx]
    return tuple(out)


@smoke("quantize_int4", "pack_int4", "unpack_int4", "dequantize_int4", "int4_linear", mode="quantized")
def _int4(device):
    w, x, bias = _on(device, _rand(48, 64, seed=30), _rand(3, 5, 64, seed=31), _rand(48, seed=32))
    packed, scale, zero = ops.quantize_int4(w, 16, symmetric=False)
    codes = ops.unpack_int4(packed)
    return (packed, scale, zero, codes, ops.pack_int4(codes), ops.dequantize_int4(packed, scale, zero, 16),
            ops.int4_linear(x, packed, scale, zero, 16, bias))


@smoke("linear_cross_entropy")
def _linear_cross_entropy(device):
    # A vocabulary that is not a multiple of the block's threads, ignored labels, several chunks; fp32 and bf16.
    h, w = _on(device, _rand(TOKENS, IN, seed=40), _rand(1000, IN, seed=41) / 8)
    y = torch.randint(0, 1000, (TOKENS,), generator=torch.Generator().manual_seed(42)).to(device)
    y[::5] = -100
    out = []
    for weighting in ("none", "dft", "talr"):
        for hh, ww in ((h, w), (h.bfloat16(), w.bfloat16())):
            raw = torch.ops.ftcore.linear_cross_entropy.default(hh, ww, y, None, -100, weighting, 0.5, 0.0, True, True, 8)
            out += [t.float() for t in raw]
    return tuple(out)


def compare(name: str, mode: str, got, want) -> float:
    """Raises AssertionError naming the op unless `got` (device) matches `want` (CPU); returns the largest
    absolute difference."""
    worst = 0.0
    for i, (a, b) in enumerate(zip(got, want)):
        a = a.cpu()
        where = f"{name} output {i}"
        assert a.shape == b.shape and a.dtype == b.dtype, f"{where}: {a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}"
        if not a.is_floating_point():
            assert torch.equal(a, b) or mode == "quantized", f"{where}: integer results differ"
            mismatched = (a != b).float().mean().item()
            assert mismatched <= 0.01, f"{where}: {mismatched:.1%} of the codes differ"
            continue
        tol = 2e-2 if a.dtype in (torch.bfloat16, torch.float16) else 1e-4
        a, b = a.double(), b.double()
        assert torch.isfinite(a).all(), f"{where}: non-finite values"
        bad = ~torch.isclose(a, b, rtol=tol, atol=tol * max(1.0, b.abs().max().item()))
        allowed = 0.01 if mode == "quantized" else 0.0
        assert bad.float().mean().item() <= allowed, (
            f"{where}: {int(bad.sum())} of {bad.numel()} elements differ from the CPU (max |diff| "
            f"{(a - b).abs().max().item():.3g})")
        worst = max(worst, (a - b).abs().max().item() if a.numel() else 0.0)
    return worst


def _reference(fn):
    """The same call on the CPU; for a CPU run, through the generic (no AVX) build of the CPU kernels."""
    previous = ftcore._C.cpu_isa()
    ftcore._C.set_cpu_isa("generic")
    try:
        return fn(torch.device("cpu"))
    finally:
        ftcore._C.set_cpu_isa(previous)


def run(device: torch.device) -> Dict[str, float]:
    missing = sorted(set(ftcore.check_registrations("CPU")) - set(CALLS))
    if missing:
        raise SystemExit(f"gpu_smoke: no call for these ops: {', '.join(missing)} (add one to bench/gpu_smoke.py)")
    results, done = {}, set()
    for name, (fn, mode) in CALLS.items():
        if fn in done:
            continue
        done.add(fn)
        print(f"  calling {name} ...", flush=True)
        got = fn(device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        group = "+".join(n for n, (f, _) in CALLS.items() if f is fn)
        results[group] = compare(group, mode, got, _reference(fn))
        # printed as it goes: a run cut off under a sanitizer shows the group it was in
        print(f"  {group}: ok (max |difference| {results[group]:.2e})", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        assert ftcore.cuda_kernels_available(), "this ftcore build has no CUDA kernels"
    results = run(device)
    print(f"gpu_smoke: {len(CALLS)} ops called on {device}, {len(results)} groups, all ok")


if __name__ == "__main__":
    sys.exit(main())
