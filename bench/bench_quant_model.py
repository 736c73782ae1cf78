"""Whole-model quantization-aware fine-tuning (ftcore.QuantConfig) on a Llama built from a config, measured
side by side in one run:

- a W4A4KV4 QAT training step (R1–R4) vs the same model's plain full fine-tuning step (AdamW, fp32);
- the exported model's quantized linears' bytes vs their fp16 bytes, and the whole model's bytes (embeddings and
  lm_head stay full precision);
- the exported model's KV-cache bytes vs an fp16 cache at 2,048 tokens;
- CPU decode tokens/s at batch 1, the exported int4 model vs the fp32 model;
- the int4 matrix-vector (decode) kernel at LLM layer shapes: int4_linear at batch 1 vs the dequantize-then-GEMM
  path (what int4_linear does past 32 rows) vs torch's fp32 linear, with the machine's copy bandwidth beside the
  kernel's effective weight bandwidth (packed bytes / time), and int4_linear over a sweep of rows.

    .venv/bin/python bench/bench_quant_model.py [--quick]      # writes bench/results/quant-model-cpu.json
"""

import argparse
import copy
import json
import os
import platform
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import ftcore
from ftcore.nn.quant import Int4Linear
from ftcore.tuners.quantize import kv_cache_bytes_per_token

RESULTS = os.path.join(os.path.dirname(__file__), "results")


def model_of(quick: bool) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=2048, hidden_size=256 if quick else 512, intermediate_size=1024 if quick else 1536,
                         num_hidden_layers=2 if quick else 4, num_attention_heads=8, num_key_value_heads=4,
                         max_position_embeddings=4096)
    return LlamaForCausalLM(config).eval()


def step_seconds(model, batch, repeats: int) -> float:
    """Median seconds of one AdamW step (forward, backward, update) after one warm-up step."""
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    times = []
    for i in range(repeats + 1):
        start = time.perf_counter()
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if i:
            times.append(time.perf_counter() - start)
    model.eval()
    return sorted(times)[len(times) // 2]


def decode_tokens_per_second(model, prompt, new_tokens: int) -> float:
    model.generate(prompt, max_new_tokens=2, do_sample=False, pad_token_id=0)  # warm-up
    start = time.perf_counter()
    model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    return new_tokens / (time.perf_counter() - start)


def best_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * min(times)


def copy_gb_per_s() -> float:
    """Read + write bandwidth of a 256 MB copy: the ceiling a weight-streaming kernel works under."""
    src = torch.ones(64 << 20)
    dst = torch.empty_like(src)
    return 2 * src.numel() * 4 / best_ms(lambda: dst.copy_(src), 5) / 1e6


def matvec(quick: bool) -> dict:
    from ftcore import ops

    shapes = [(4096, 4096)] if quick else [(4096, 4096), (11008, 4096), (4096, 11008)]
    repeats = 5 if quick else 20
    out = {"copy_gb_per_s": copy_gb_per_s(), "shapes": []}
    torch.manual_seed(2)
    for rows, cols in shapes:
        w = torch.randn(rows, cols)
        packed, scale, zero = ops.quantize_int4(w, 128, symmetric=False)
        x = torch.randn(1, cols)
        gemv = best_ms(lambda: ops.int4_linear(x, packed, scale, zero, 128), repeats)
        dequant_gemm = best_ms(lambda: x @ ops.dequantize_int4(packed, scale, zero, 128, torch.float32).t(), repeats)
        fp32 = best_ms(lambda: torch.nn.functional.linear(x, w), repeats)
        weight_bytes = packed.numel() + scale.numel() * 4 + zero.numel()
        sweep = {}
        for m in (1, 8, 32, 33, 64):
            xm = torch.randn(m, cols)
            sweep[m] = best_ms(lambda: ops.int4_linear(xm, packed, scale, zero, 128), max(3, repeats // 4))
        out["shapes"].append({
            "out_features": rows, "in_features": cols, "group_size": 128,
            "int4_gemv_ms": gemv, "dequantize_then_gemm_ms": dequant_gemm, "fp32_linear_ms": fp32,
            "gemv_vs_dequantize_then_gemm": dequant_gemm / gemv, "gemv_vs_fp32_linear": fp32 / gemv,
            "gemv_weight_gb_per_s": weight_bytes / gemv / 1e6, "fp32_weight_gb_per_s": w.numel() * 4 / fp32 / 1e6,
            "int4_linear_ms_by_rows (<=32: gemv, more: dequantize+GEMM)": sweep,
        })
    return out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    repeats = 3 if args.quick else 5
    torch.manual_seed(1)
    base = model_of(args.quick)
    ids = torch.randint(0, base.config.vocab_size, (4, 128))
    batch = {"input_ids": ids, "labels": ids}

    plain = copy.deepcopy(base)
    qat = ftcore.apply(copy.deepcopy(base), ftcore.QuantConfig(rotation="full"))
    # Interleaved twice, so drift on a shared machine hits both sides alike.
    plain_s, qat_s = [], []
    for _ in range(2):
        plain_s.append(step_seconds(plain, batch, repeats))
        qat_s.append(step_seconds(qat, batch, repeats))
    plain_step, qat_step = min(plain_s), min(qat_s)

    exported = ftcore.export_int4(qat)
    int4_bytes = fp16_bytes = 0
    for m in exported.modules():
        if isinstance(m, Int4Linear):
            int4_bytes += sum(t.numel() * t.element_size() for t in (m.packed, m.scale, m.zero_point))
            int4_bytes += 0 if m.bias is None else m.bias.numel() * 2
            fp16_bytes += m.in_features * m.out_features * 2 + (0 if m.bias is None else m.out_features * 2)
    whole = sum(t.numel() * t.element_size() for t in exported.state_dict().values())
    whole_fp16 = sum(p.numel() * 2 for p in base.parameters())
    kv_coded = kv_cache_bytes_per_token(exported) * 2048
    layers, heads, d = base.config.num_hidden_layers, base.config.num_key_value_heads, base.config.head_dim
    kv_fp16 = 2 * layers * heads * d * 2 * 2048

    prompt = torch.randint(0, base.config.vocab_size, (1, 32))
    new_tokens = 16 if args.quick else 64
    fp32_tps = decode_tokens_per_second(base, prompt, new_tokens)
    int4_tps = decode_tokens_per_second(exported, prompt, new_tokens)

    result = {
        "machine": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "model": {k: getattr(base.config, k) for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                       "num_attention_heads", "num_key_value_heads", "vocab_size")},
        "qat_step_s": qat_step,
        "full_ft_step_s": plain_step,
        "qat_vs_full_ft": qat_step / plain_step,
        "quantized_linear_bytes": int4_bytes,
        "quantized_linear_fp16_bytes": fp16_bytes,
        "quantized_linears_vs_fp16": int4_bytes / fp16_bytes,
        "whole_model_bytes_exported": whole,
        "whole_model_bytes_fp16": whole_fp16,
        "kv_cache_bytes_2048_coded": kv_coded,
        "kv_cache_bytes_2048_fp16": kv_fp16,
        "kv_coded_vs_fp16": kv_coded / kv_fp16,
        "decode_tokens_per_s_fp32": fp32_tps,
        "decode_tokens_per_s_int4": int4_tps,
        "decode_int4_vs_fp32": int4_tps / fp32_tps,
        "int4_matvec": matvec(args.quick),
    }
    for key, value in result.items():
        if key == "int4_matvec":
            print(f"copy bandwidth                   {value['copy_gb_per_s']:.1f} GB/s")
            for shape in value["shapes"]:
                print(f"int4 matvec {shape['out_features']}x{shape['in_features']}: gemv {shape['int4_gemv_ms']:.2f} ms "
                      f"({shape['gemv_weight_gb_per_s']:.1f} GB/s of packed weight), dequantize+GEMM "
                      f"{shape['dequantize_then_gemm_ms']:.2f} ms ({shape['gemv_vs_dequantize_then_gemm']:.1f}x slower), "
                      f"fp32 linear {shape['fp32_linear_ms']:.2f} ms ({shape['gemv_vs_fp32_linear']:.2f}x the gemv's time)")
        else:
            print(f"{key:32s} {value:.4g}" if isinstance(value, float) else f"{key:32s} {value}")
    os.makedirs(RESULTS, exist_ok=True)
    name = "quant-model-cpu-quick.json" if args.quick else "quant-model-cpu.json"
    with open(os.path.join(RESULTS, name), "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
