"""The quantization-quality benchmark (bench/bench_quant_quality.py, `make quant-quality`) end to end on random-init
tiny models, and its hand-built BERT rotations (R2 folded, R4 online) as an exact identity at 16 bits."""

import copy
import importlib.util
import math
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_bench():
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    spec = importlib.util.spec_from_file_location("bench_quant_quality", os.path.join(ROOT, "bench", "bench_quant_quality.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quant_quality_smoke(tmp_path):
    bench = load_bench()
    result = bench.run(bench.SMOKE, out_dir=str(tmp_path), log=lambda *a: None)
    assert set(result["lm"]["perplexity"]) == {
        "full precision", "W4A4KV4, no rotation", "W4A4KV4, R1-R4", "W4A4KV4, adaptive",
        "W4A4KV4, adaptive + RoSTE fine-tune", "full precision + the same fine-tune",
    }
    for stat in result["lm"]["perplexity"].values():
        assert all(math.isfinite(v) and v > 1 for v in stat["values"])
    for stat in result["minilm"]["mean_cosine"].values():
        assert all(-1 <= v <= 1 for v in stat["values"])
    assert (tmp_path / "quant-quality-smoke.md").read_text().count("|") > 10


def test_bert_rotations_are_an_identity_at_16_bits():
    from transformers import BertConfig, BertModel

    bench = load_bench()
    torch.manual_seed(0)
    bert = BertModel(BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=128), add_pooling_layer=False).eval().double()
    ids = torch.randint(0, 100, (2, 9))
    with torch.no_grad():
        want = bert(input_ids=ids).last_hidden_state
        flags = [{"r2": True, "r4": True}, {"r2": True, "r4": False}]
        got = bench.quantize_bert(copy.deepcopy(bert), flags, seed=3, bits=16)(input_ids=ids).last_hidden_state
    assert (got - want).abs().max().item() < 1e-9
