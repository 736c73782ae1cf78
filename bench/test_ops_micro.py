"""Per-op microbenchmarks with pytest-benchmark, for tracking regressions between commits:

    make bench-micro                       # = pytest bench/test_ops_micro.py --benchmark-only
    pytest bench/test_ops_micro.py --benchmark-autosave / --benchmark-compare

Each op runs at one layer-sized shape (1024 x 4096 weight, 2048 tokens, 1% density, fp32) beside its
pure-PyTorch reference. The ratios that the design targets are printed by bench_sparse_delta.py.
"""

import pytest
import torch

from ftcore import ops, reference
from ftcore.tuners.sparse_delta import layer_generator, random_positions

OUT, IN, TOKENS, DENSITY = 1024, 4096, 2048, 0.01


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)
    k = round(DENSITY * OUT * IN)
    return {
        "x": torch.randn(TOKENS, IN, generator=g),
        "grad": torch.randn(TOKENS, OUT, generator=g),
        "idx": random_positions(OUT * IN, k, layer_generator(0, "micro")).int(),
        "values": torch.randn(k, generator=g),
        "weight": torch.randn(OUT, IN, generator=g),
    }


IMPLS = {"ftcore": ops, "reference": reference}


@pytest.mark.parametrize("impl", IMPLS)
def test_grad(benchmark, data, impl):
    benchmark(IMPLS[impl].sparse_delta_grad, data["grad"], data["x"], data["idx"])


@pytest.mark.parametrize("impl", IMPLS)
def test_linear(benchmark, data, impl):
    benchmark(IMPLS[impl].sparse_delta_linear, data["x"], data["idx"], data["values"], OUT)


@pytest.mark.parametrize("impl", IMPLS)
def test_linear_transpose(benchmark, data, impl):
    benchmark(IMPLS[impl].sparse_delta_linear_transpose, data["grad"], data["idx"], data["values"], IN)


@pytest.mark.parametrize("impl", IMPLS)
def test_scatter(benchmark, data, impl):
    weight = data["weight"].clone()
    benchmark(IMPLS[impl].sparse_delta_scatter_, weight, data["idx"], data["values"], 1.0)


@pytest.mark.parametrize("impl", IMPLS)
def test_gather(benchmark, data, impl):
    benchmark(IMPLS[impl].sparse_delta_gather, data["weight"], data["idx"])


@pytest.mark.parametrize("impl", IMPLS)
def test_topk(benchmark, data, impl):
    k = data["idx"].numel()
    benchmark(IMPLS[impl].sparse_delta_topk, data["grad"], data["x"], k)
