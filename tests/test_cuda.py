"""What only a GPU can show: whole models trained on CUDA match the same training on the CPU, kernels run on
the caller's stream, large shapes (many tiles, offsets past 2^31 elements) stay exact. Marked `cuda`, so
`make gpu-check` runs them; skipped where no CUDA device (and CUDA build of ftcore) is present."""

import pytest
import torch
from models import tiny_llama

import ftcore
from ftcore import ops

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not (torch.cuda.is_available() and ftcore.cuda_kernels_available()), reason="needs a CUDA device"),
]

CONFIGS = {
    "sparse_delta": lambda: ftcore.SparseDeltaConfig(density=0.05, seed=3),
    "sparse_delta_unmerged": lambda: ftcore.SparseDeltaConfig(density=0.05, seed=3, merged=False),
    "s2ft": lambda: ftcore.StructuredSparseConfig(head_ratio=0.25, channel_ratio=0.1, seed=3),
    "s2ft_rows": lambda: ftcore.StructuredSparseConfig(head_ratio=0.25, channel_ratio=0.1, targets=("v_proj", "up_proj"), seed=3),
}


def _train(model, data, steps=3):
    opt = torch.optim.AdamW(ftcore.trainable_parameters(model), lr=1e-2)
    losses = []
    for _ in range(steps):
        loss = model(**data).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    with torch.no_grad():
        logits = model(input_ids=data["input_ids"]).logits
    return losses, logits


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_a_model_trains_on_cuda_as_on_the_cpu(method):
    torch.backends.cuda.matmul.allow_tf32 = False
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 128, (3, 24), generator=g)
    cpu = ftcore.apply(tiny_llama(), CONFIGS[method]())
    gpu = ftcore.apply(tiny_llama().cuda(), CONFIGS[method]())
    cpu_losses, cpu_logits = _train(cpu, {"input_ids": ids, "labels": ids})
    gpu_losses, gpu_logits = _train(gpu, {"input_ids": ids.cuda(), "labels": ids.cuda()})
    assert gpu_losses == pytest.approx(cpu_losses, rel=1e-4)
    torch.testing.assert_close(gpu_logits.cpu(), cpu_logits, rtol=1e-4, atol=1e-4)
    for (name, a), (_, b) in zip(cpu.named_parameters(), gpu.named_parameters()):
        assert b.device.type == "cuda", name
        torch.testing.assert_close(b.detach().cpu(), a.detach(), rtol=1e-4, atol=1e-5, msg=name)
    for (name, a), (_, b) in zip(cpu.named_buffers(), gpu.named_buffers()):
        assert b.device.type == "cuda", name
        torch.testing.assert_close(b.cpu(), a, rtol=1e-4, atol=1e-5, msg=name)
    original = tiny_llama().state_dict()
    ftcore.unmerge(gpu)
    for name, layer in ftcore.api.adapter_layers(gpu).items():  # W0 back bit for bit on the GPU too
        assert torch.equal(layer.base_layer.weight.cpu(), original[f"{name}.weight"]), name


def test_kernels_run_on_the_callers_stream():
    """Each op on a side stream right after that stream queued a long sleep and then wrote the inputs: a kernel
    launched on another stream would read them before they are written. The kernels are called directly: the
    wrappers' index checks synchronise with the host, which would hide a kernel on the wrong stream."""
    n = 4096
    x0, g0 = torch.randn(2048, n, device="cuda"), torch.randn(2048, n, device="cuda")
    idx = torch.arange(0, n * n, 997, device="cuda")
    cols = torch.arange(0, n, 3, device="cuda")
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        torch.cuda._sleep(200_000_000)  # about 0.1 s of spinning ahead of the writes below
        x, g = x0 * 1.5, g0 * -2.0
        got = {
            "grad": torch.ops.ftcore.sparse_delta_grad(g, x, idx),
            "hadamard": torch.ops.ftcore.hadamard_transform(x, None, None, n**-0.5, False),
            "gather": torch.ops.ftcore.gather_columns(x, cols),
            "fake_quantize": torch.ops.ftcore.fake_quantize(x, None, 4, True, 0, 1.0)[0],
        }
    side.synchronize()
    x, g = x0 * 1.5, g0 * -2.0
    want = {
        "grad": (g.t().double() @ x.double()).flatten()[idx].float(),
        "hadamard": ops.hadamard_transform(x),
        "gather": x[:, ::3],
        "fake_quantize": ops.fake_quantize(x, 4),
    }
    for name in got:
        torch.testing.assert_close(got[name], want[name], rtol=2e-4, atol=2e-3, msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sparse_gradient_at_full_scale(dtype):
    """A Llama-3-8B down_proj-sized gradient (many panels and groups) against the dense product in float64."""
    torch.manual_seed(0)
    out_f, in_f, tokens = 4096, 14336, 2048
    x = torch.randn(tokens, in_f, device="cuda").to(dtype)
    g = torch.randn(tokens, out_f, device="cuda").to(dtype)
    idx = torch.sort(torch.randperm(out_f * in_f, device="cuda")[: out_f * in_f // 100]).values
    got = ops.sparse_delta_grad(g, x, idx)
    rows, cols = idx // in_f, idx % in_f
    want = torch.empty(idx.numel(), dtype=torch.float64, device="cuda")
    for s in range(0, idx.numel(), 1 << 16):  # exact reference, a slice of the entries at a time
        r, c = rows[s : s + (1 << 16)], cols[s : s + (1 << 16)]
        want[s : s + r.numel()] = (g[:, r].double() * x[:, c].double()).sum(0)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-3 * tokens**0.5)


def _free_gib() -> float:
    free, _ = torch.cuda.mem_get_info()
    return free / 2**30


def test_offsets_past_two_to_the_31_elements():
    """Weights and activations with more than 2^31 elements: every kernel indexes them with 64-bit offsets."""
    if _free_gib() < 24:
        pytest.skip("needs 24 GiB of free GPU memory")
    out_f, in_f = 32768, 65600  # 2.15e9 elements > 2^31, 4.3 GB in bf16
    w = torch.zeros(out_f, in_f, device="cuda", dtype=torch.bfloat16)
    numel = out_f * in_f
    idx = torch.tensor([0, 2**31 - 1, 2**31, 2**31 + 12345, numel - 1], device="cuda")
    values = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0], device="cuda")
    ops.sparse_delta_scatter_(w, idx, values, 1.0)
    assert ops.sparse_delta_gather(w, idx).tolist() == values.tolist()
    assert float(w.view(-1)[2**31 + 12345]) == 4.0 and float(w[-1, -1]) == 5.0 and float(w.sum()) == 15.0
    cols = torch.tensor([1, in_f - 1], device="cuda")
    block = ops.structured_block_gather(w, cols)
    torch.testing.assert_close(block, w[:, cols])
    ops.structured_block_scatter_(w, cols, torch.ones(out_f, 2, device="cuda"), 1.0)
    assert float(w[-1, -1]) == 6.0 and float(w[-1, 1]) == 1.0
    del w, block
    rows = 2**31 // 4096 + 8  # an activation of more than 2^31 elements
    x = torch.randn(rows, 4096, device="cuda", dtype=torch.bfloat16)
    y = ops.hadamard_transform(x)
    torch.testing.assert_close(y[-3:].float(), ops.hadamard_transform(x[-3:].float()), rtol=2e-2, atol=2e-2)
    q = ops.fake_quantize(x, 4)
    torch.testing.assert_close(q[-3:], ops.fake_quantize(x[-3:], 4))


# Rows too long for shared memory run on a global workspace: float64 at 28,672 (K = 28) needs 458,752 bytes a row,
# over every GPU's per-block limit; in float32 the same size takes the shared path on an H100/H200 and the global
# one on an A100. More rows than the global path's grid exercise its grid-stride loop. The fused quantizer is
# compared in float64 only: float32 rotations summed in another order can flip a rounding at a level boundary.
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_rotation_rows_past_shared_memory(dtype):
    n = 28672
    rows = 2 * torch.cuda.get_device_properties(0).multi_processor_count + 3
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(rows, n, dtype=dtype, generator=gen)
    dy = torch.randn(rows, n, dtype=dtype, generator=gen)
    signs = ftcore.hadamard.random_signs(n, 5)
    ops_under_test = {"hadamard_transform": lambda t, s: ops.hadamard_transform(t, signs=s)}
    if dtype == torch.float64:
        ops_under_test["rotate_fake_quantize"] = lambda t, s: ops.rotate_fake_quantize(t, 4, signs=s)
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-4)
    for name, run in ops_under_test.items():
        results = []
        for device in ("cpu", "cuda"):
            t = x.to(device).requires_grad_()
            y = run(t, signs.to(device))
            y.backward(dy.to(device))
            results.append((y.detach().cpu(), t.grad.cpu()))
        (y_cpu, g_cpu), (y_gpu, g_gpu) = results
        torch.testing.assert_close(y_gpu, y_cpu, **tol, msg=lambda m: f"{name} forward: {m}")
        torch.testing.assert_close(g_gpu, g_cpu, **tol, msg=lambda m: f"{name} backward: {m}")
