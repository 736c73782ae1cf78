import os

import pytest
import torch

import ftcore
from ftcore.nn.base import is_conv1d

# The tests build models from configs and never reach a hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() and ftcore.cuda_kernels_available() else [])
# FTCORE_TEST_DEVICES=cpu,cuda collects the CUDA cases on a machine without a GPU: the gpu-check dry run lists
# them with --collect-only, so a renamed test or a broken import shows before a GPU is at hand.
if os.environ.get("FTCORE_TEST_DEVICES"):
    DEVICES = [d.strip() for d in os.environ["FTCORE_TEST_DEVICES"].split(",") if d.strip()]
FLOAT_DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


@pytest.fixture(autouse=True)
def _cuda_errors_surface_in_their_test(request):
    """After a CUDA case: synchronise, so an asynchronous kernel error fails the test that launched it. Such an
    error poisons the process's CUDA context, so under xdist (make gpu-check) the worker then exits and xdist
    starts a fresh one, instead of failing every later test on that worker."""
    yield
    if request.node.get_closest_marker("cuda") is None or not torch.cuda.is_available():
        return
    try:
        torch.cuda.synchronize()
    except RuntimeError as exc:
        if os.environ.get("PYTEST_XDIST_WORKER"):
            print(f"\nCUDA error after {request.node.nodeid}: {exc}; ending this worker", flush=True)
            os._exit(3)
        raise


def pytest_collection_modifyitems(config, items):
    """Marks every case that runs on a CUDA device `cuda`: `pytest -m cuda` is the GPU check's selection."""
    for item in items:
        callspec = getattr(item, "callspec", None)
        if callspec is not None and callspec.params.get("device") == "cuda":
            item.add_marker(pytest.mark.cuda)


@pytest.fixture(params=ftcore._C.available_cpu_isas())
def cpu_isa(request):
    """Runs a test once per instruction-set build of the CPU kernels this machine supports."""
    previous = ftcore._C.cpu_isa()
    assert ftcore._C.set_cpu_isa(request.param)
    yield request.param
    ftcore._C.set_cpu_isa(previous)


def tolerances(dtype: torch.dtype):
    """(rtol, atol) for a result rounded to `dtype` against an fp32/fp64 oracle: about twice what plain
    PyTorch makes at that precision."""
    return {
        torch.float64: (1e-10, 1e-10),
        torch.float32: (2e-5, 2e-5),
        torch.bfloat16: (1.6e-2, 2e-2),
        torch.float16: (2e-3, 2e-3),
    }[dtype]


def assert_close(actual, expected, dtype, scale=1.0):
    rtol, atol = tolerances(dtype)
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol * scale)


def compare_with_dense(module, dense, x):
    """Runs an ftcore module and the dense layer holding the same weights on x; asserts equal outputs and input
    gradients; returns the dense layer's weight gradient in the logical (out, in) layout."""
    x = x.detach().clone().requires_grad_()
    x_dense = x.detach().clone().requires_grad_()
    y, y_dense = module(x), dense(x_dense)
    torch.testing.assert_close(y, y_dense, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y)
    y.backward(g)
    y_dense.backward(g)
    torch.testing.assert_close(x.grad, x_dense.grad, rtol=1e-5, atol=1e-5)
    return dense.weight.grad.t() if is_conv1d(dense) else dense.weight.grad


def random_indices(numel, k, *, dtype=torch.int64, device="cpu", duplicates=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    if duplicates:
        idx = torch.randint(0, numel, (k,), generator=g)
    else:
        idx = torch.randperm(numel, generator=g)[:k]
    return torch.sort(idx).values.to(device=device, dtype=dtype)
