"""The fused linear + cross-entropy op (ftcore.ops.linear_cross_entropy) and ftcore.causal_lm_loss, against their
references: the op's own (ftcore.reference), torch's cross_entropy on whole logits, and model(**batch).loss."""

import copy
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

import ftcore
from ftcore import ops, reference
from models import batch, tiny_gpt2, tiny_llama

WEIGHTINGS = ("none", "given", "dft", "talr")


def _case(seed=0, tokens=(3, 7), hidden=16, vocab=53, dtype=torch.float64, ignored=3):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(*tokens, hidden, generator=g, dtype=torch.float64).to(dtype)
    w = (torch.randn(vocab, hidden, generator=g, dtype=torch.float64) / hidden**0.5).to(dtype)
    y = torch.randint(0, vocab, tokens, generator=g)
    y.view(-1)[torch.randperm(y.numel(), generator=g)[:ignored]] = -100
    tw = torch.randn(*tokens, generator=g, dtype=torch.float64).to(dtype)
    return h, w, y, tw


def _op_grads(h, w, y, **kw):
    h, w = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    loss = ops.linear_cross_entropy(h, w, y, **kw)
    loss.backward()
    return loss.detach(), h.grad, w.grad


def _reference_grads(h, w, y, weighting="none", token_weights=None, tau=1.0, num_items_in_batch=None, reduction="mean", **_):
    """Whole logits in float64, the weights detached, autograd for the gradients."""
    h64, w64 = h.detach().double().clone().requires_grad_(), w.detach().double().clone().requires_grad_()
    logits = h64.reshape(-1, h.shape[-1]) @ w64.T
    flat = y.reshape(-1)
    valid = flat != -100
    nll = torch.where(valid, F.cross_entropy(logits, torch.where(valid, flat, 0), reduction="none"), 0.0)
    weights = reference.token_loss_weights(nll, valid, weighting, token_weights, tau)
    div = num_items_in_batch if num_items_in_batch is not None else (1.0 if reduction == "sum" else valid.sum())
    loss = (weights * nll).sum() / div
    loss.backward()
    return loss.detach(), h64.grad, w64.grad


@pytest.mark.parametrize("weighting", WEIGHTINGS)
@pytest.mark.parametrize("chunk_tokens", [0, 1, 4])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_values_and_gradients_match_the_whole_logits_reference(weighting, chunk_tokens, dtype):
    h, w, y, tw = _case(dtype=dtype)
    kw = dict(weighting=weighting, token_weights=tw if weighting == "given" else None, tau=0.7, chunk_tokens=chunk_tokens)
    got = _op_grads(h, w, y, **kw)
    want = _reference_grads(h, w, y, **kw)
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    for g, r in zip(got, want):
        torch.testing.assert_close(g.double(), r, rtol=tol, atol=tol)


@pytest.mark.parametrize("weighting", WEIGHTINGS)
def test_reductions_and_num_items_in_batch(weighting):
    h, w, y, tw = _case(seed=1)
    base = dict(weighting=weighting, token_weights=tw if weighting == "given" else None)
    for extra in (dict(reduction="sum"), dict(num_items_in_batch=37), dict(num_items_in_batch=torch.tensor(37))):
        got = _op_grads(h, w, y, **base, **extra)
        want = _reference_grads(h, w, y, **base, **{k: (int(v) if torch.is_tensor(v) else v) for k, v in extra.items()})
        for g, r in zip(got, want):
            torch.testing.assert_close(g, r, rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        per_token = ops.linear_cross_entropy(h, w, y, reduction="none", **base)
        total = ops.linear_cross_entropy(h, w, y, reduction="sum", **base)
    assert per_token.shape == y.shape and bool((per_token[y == -100] == 0).all())
    torch.testing.assert_close(per_token.sum(), total, rtol=1e-12, atol=1e-12)


def test_plain_weighting_is_torch_cross_entropy():
    h, w, y, _ = _case(seed=2, dtype=torch.float32)
    logits = h @ w.T
    want = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), ignore_index=-100)
    got = ops.linear_cross_entropy(h, w, y)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    y_all_ignored = torch.full_like(y, -100)
    assert torch.isnan(ops.linear_cross_entropy(h, w, y_all_ignored))  # as CrossEntropyLoss: 0 / 0
    assert ops.linear_cross_entropy(h, w, y_all_ignored, reduction="sum") == 0


def test_talr_weights_follow_the_paper_and_accumulate_per_micro_batch():
    """TALR's weights are w_t = N · softmax(log p_t / tau) over one call's N counted tokens. Under gradient
    accumulation each micro-batch is one call: with num_items_in_batch = the accumulated count D, micro-batch k
    contributes (N_k / D) · Σ_t softmax_k(log p / tau)_t · nll_t, so the accumulated loss (and its gradient) is
    the token-count-weighted mean of the paper's per-batch objective."""
    h, w, y, _ = _case(seed=3, tokens=(4, 6), ignored=5)
    tau = 0.5
    halves = [(h[:2], y[:2]), (h[2:], y[2:])]
    total = int((y != -100).sum())
    acc_h = torch.zeros_like(h)
    acc_loss = 0.0
    for k, (hk, yk) in enumerate(halves):
        loss, gh, _ = _op_grads(hk, w, yk, weighting="talr", tau=tau, num_items_in_batch=total)
        acc_loss += loss
        acc_h[2 * k : 2 * k + 2] = gh
    want_loss, want_h = 0.0, torch.zeros_like(h)
    for k, (hk, yk) in enumerate(halves):
        hk = hk.clone().requires_grad_()
        logits = hk.reshape(-1, hk.shape[-1]) @ w.T
        flat = yk.reshape(-1)
        valid = flat != -100
        nll = F.cross_entropy(logits[valid], flat[valid], reduction="none")
        paper = (torch.softmax(-nll.detach() / tau, 0) * nll).sum()  # the paper's weighted loss of one batch
        term = valid.sum().double() / total * paper
        term.backward()
        want_loss += term.detach()
        want_h[2 * k : 2 * k + 2] = hk.grad
    torch.testing.assert_close(acc_loss, want_loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(acc_h, want_h, rtol=1e-12, atol=1e-12)


def test_talr_does_not_underflow_at_a_small_temperature():
    h, w, y, _ = _case(seed=4, dtype=torch.float32)
    h = h * 30  # confident, spread-out logits: p_t^(1/tau) underflows float32 for most tokens
    got = _op_grads(h, w, y, weighting="talr", tau=0.02, chunk_tokens=2)
    want = _reference_grads(h, w, y, weighting="talr", tau=0.02)
    assert all(torch.isfinite(g).all() for g in got)
    for g, r in zip(got, want):
        torch.testing.assert_close(g.double(), r, rtol=1e-4, atol=1e-5)


def test_float16_training_is_refused_and_inference_runs():
    h, w, y, _ = _case(seed=12, dtype=torch.float16, vocab=300)
    with pytest.raises(ValueError, match="float16"):
        ops.linear_cross_entropy(h.requires_grad_(), w, y)
    with torch.no_grad():
        got = ops.linear_cross_entropy(h, w, y)
    torch.testing.assert_close(got.double(), _reference_grads(h.float(), w.float(), y)[0], rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("dtype", [torch.bfloat16])
def test_half_precision_inputs_accumulate_in_fp32(dtype):
    h, w, y, _ = _case(seed=5, dtype=dtype, vocab=300)
    loss, gh, gw = _op_grads(h, w, y, weighting="dft")
    assert loss.dtype == torch.float32 and gh.dtype == dtype and gw.dtype == dtype
    want = _reference_grads(h.float(), w.float(), y, weighting="dft")
    torch.testing.assert_close(loss.double(), want[0], rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(gh.double(), want[1], rtol=5e-2, atol=2e-3)
    torch.testing.assert_close(gw.double(), want[2], rtol=5e-2, atol=2e-3)


def test_a_frozen_weight_gets_no_gradient_pass():
    h, w, y, _ = _case(seed=6)
    hh = h.clone().requires_grad_()
    out = torch.ops.ftcore.linear_cross_entropy.default(hh, w, y, None, -100, "none", 1.0, 0.0, True, False, 0)
    assert out[3].numel() == 0 and out[2].shape == h.shape
    ops.linear_cross_entropy(hh, w, y).backward()
    assert hh.grad is not None and w.grad is None


def test_second_outputs_are_not_differentiable():
    h, w, y, _ = _case(seed=7)
    hh = h.clone().requires_grad_()
    _, nll, _, _ = torch.ops.ftcore.linear_cross_entropy.default(hh, w, y, None, -100, "none", 1.0, 0.0, True, False, 0)
    assert not nll.requires_grad  # backward through it raises instead of giving a silent zero


def test_bad_arguments_are_named():
    h, w, y, tw = _case(seed=8, dtype=torch.float32)
    with pytest.raises(IndexError, match="labels"):
        ops.linear_cross_entropy(h, w, torch.where(y == -100, 999, y))
    with pytest.raises((IndexError, RuntimeError), match="out of bounds"):  # the kernel's gather still refuses it when validation is skipped
        ops.linear_cross_entropy(h, w, torch.where(y == -100, 999, y), checked=True)
    with pytest.raises(ValueError, match="token_weights"):
        ops.linear_cross_entropy(h, w, y, weighting="given")
    with pytest.raises(ValueError, match="token_weights"):
        ops.linear_cross_entropy(h, w, y, token_weights=tw)
    with pytest.raises(ValueError, match="weighting"):
        ops.linear_cross_entropy(h, w, y, weighting="focal")
    with pytest.raises(ValueError, match="reduction"):
        ops.linear_cross_entropy(h, w, y, reduction="avg")
    with pytest.raises(ValueError, match="tau"):
        ops.linear_cross_entropy(h, w, y, weighting="talr", tau=0.0)
    with pytest.raises(ValueError, match="num_items_in_batch"):
        ops.linear_cross_entropy(h, w, y, num_items_in_batch=0)
    with pytest.raises(ValueError, match="lm_head_weight"):
        ops.linear_cross_entropy(h, w[:, :-1], y)
    with pytest.raises(TypeError, match="lm_head_weight"):
        ops.linear_cross_entropy(h, w.double(), y)
    with pytest.raises(ValueError, match="labels"):
        ops.linear_cross_entropy(h, w, y[:, :-1])
    with pytest.raises(TypeError, match="labels"):
        ops.linear_cross_entropy(h, w, y.float())
    with pytest.raises(ValueError, match="none"):
        ops.linear_cross_entropy(h.requires_grad_(), w, y, reduction="none")


def test_compiles_fullgraph_with_its_gradient():
    h, w, y, _ = _case(seed=9, dtype=torch.float32)

    def step(h, w, y):
        return ops.linear_cross_entropy(h, w, y, weighting="dft")

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    a, b = h.clone().requires_grad_(), h.clone().requires_grad_()
    step(a, w, y).backward()
    compiled(b, w, y).backward()
    torch.testing.assert_close(a.grad, b.grad)


_MEMORY_PROBE = textwrap.dedent(
    """
    import resource, sys, torch
    torch.set_num_threads(1)
    import ftcore
    tokens, hidden, vocab = 2048, 64, 32000
    g = torch.Generator().manual_seed(0)
    h = torch.randn(tokens, hidden, generator=g).requires_grad_()
    w = torch.randn(vocab, hidden, generator=g).div_(8).requires_grad_()  # in place: a freed temporary would hide peaks
    y = torch.randint(0, vocab, (tokens,), generator=g)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if sys.argv[1] == "fused":
        ftcore.ops.linear_cross_entropy(h, w, y, chunk_tokens=64).backward()
    else:
        torch.nn.functional.cross_entropy(h @ w.T, y).backward()
    print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
    """
)


def test_no_tokens_by_vocab_tensor_is_allocated():
    """Peak resident memory growth of forward + backward, in a fresh process each: the fused op's is far below one
    (tokens × vocab) fp32 tensor (262 MB here); the plain path's is several of them."""
    logits_bytes = 2048 * 32000 * 4

    def peak(mode):
        out = subprocess.run([sys.executable, "-c", _MEMORY_PROBE, mode], capture_output=True, text=True, check=True)
        return int(out.stdout.strip().splitlines()[-1])

    fused, plain = peak("fused"), peak("plain")
    assert plain > logits_bytes, plain  # the probe sees whole logits when they exist
    assert fused < 0.25 * logits_bytes, (fused, logits_bytes)


# ---- causal_lm_loss ---------------------------------------------------------------------------------------


def _masked_batch(seed=0):
    b = batch(seed=seed, size=3, length=12)
    b["labels"] = b["labels"].clone()
    b["labels"][0, :4] = -100  # a prompt
    return b


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2-tied"])
def test_causal_lm_loss_equals_the_models_loss_and_gradients(make):
    model, b = make(), _masked_batch()
    want = model(**b).loss
    want.backward()
    want_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    got = ftcore.causal_lm_loss(model, b)
    got.backward()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want_grads[n], rtol=1e-5, atol=1e-6, msg=n)


def test_causal_lm_loss_trains_ftcore_deltas_as_the_plain_loss_does():
    model, b = tiny_llama(), _masked_batch(1)
    ftcore.apply(model, ftcore.SparseDeltaConfig(density=0.05, target_modules="all-linear", exclude_modules=["lm_head"]))
    twin = copy.deepcopy(model)
    model(**b).loss.backward()
    ftcore.causal_lm_loss(twin, b, num_items_in_batch=int((b["labels"][:, 1:] != -100).sum())).backward()
    for p, q in zip(ftcore.trainable_parameters(model), ftcore.trainable_parameters(twin)):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-7)


def test_causal_lm_loss_through_a_peft_lora_model():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    b = _masked_batch(4)
    want = model(**b).loss
    want.backward()
    want_grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad()
    got = ftcore.causal_lm_loss(model, b)
    got.backward()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    for p, g in zip([p for p in model.parameters() if p.requires_grad], want_grads):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-7)
    lora_head = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["lm_head"]))
    with pytest.raises(ValueError, match="LM head carries an adapter"):
        ftcore.causal_lm_loss(lora_head, b)


def test_a_model_that_scales_its_logits_is_refused():
    model = tiny_llama()
    model.config.logits_scaling = 8.0  # as Granite's config does
    with pytest.raises(ValueError, match="logits_scaling"):
        ftcore.causal_lm_loss(model, _masked_batch())


def test_an_adapter_on_the_lm_head_is_refused():
    model = tiny_llama()
    ftcore.apply(model, ftcore.SparseDeltaConfig(density=0.05, target_modules=["lm_head"]))
    with pytest.raises(ValueError, match="LM head carries an adapter"):
        ftcore.causal_lm_loss(model, _masked_batch())


def test_given_weights_are_aligned_with_the_labels():
    model, b = tiny_llama(), _masked_batch(2)
    weights = torch.rand(b["labels"].shape, generator=torch.Generator().manual_seed(0))
    got = ftcore.causal_lm_loss(model, b, weighting="given", token_weights=weights)
    logits = model(**b).logits[:, :-1]
    labels = b["labels"][:, 1:]
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="none", ignore_index=-100)
    want = (weights[:, 1:].reshape(-1) * nll).sum() / (labels != -100).sum()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


# ---- the KL anchor ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_kl_anchor_gradient_equals_a_two_model_reference(direction):
    """The base's distribution from the same model under ftcore.disable equals a separate copy of the base model:
    values and delta gradients agree to float64 rounding."""
    torch.manual_seed(0)
    base = tiny_llama(dtype=torch.float64)
    model = copy.deepcopy(base)
    ftcore.apply(model, ftcore.SparseDeltaConfig(density=0.05, target_modules="all-linear", exclude_modules=["lm_head"]))
    with torch.no_grad():
        for p in ftcore.trainable_parameters(model):
            p.normal_(0, 0.05)  # a model that has moved away from its base
    b = _masked_batch(3)
    twin = copy.deepcopy(model)
    strength = 0.3
    got = ftcore.causal_lm_loss(model, b, kl_strength=strength, kl_direction=direction, chunk_tokens=5)
    got.backward()

    out = twin(**b)
    with torch.no_grad():
        base_logits = base(**{k: v for k, v in b.items() if k != "labels"}).logits
    log_p = torch.log_softmax(out.logits[:, :-1], -1)
    log_q = torch.log_softmax(base_logits[:, :-1], -1)
    valid = b["labels"][:, 1:] != -100
    if direction == "forward":
        per_token = (log_q.exp() * (log_q - log_p)).sum(-1)
    else:
        per_token = (log_p.exp() * (log_p - log_q)).sum(-1)
    labels = b["labels"][:, 1:]
    ce = F.cross_entropy(out.logits[:, :-1].reshape(-1, log_p.shape[-1]), labels.reshape(-1), ignore_index=-100)  # in fp64 (HF's loss upcasts to fp32 only)
    want = ce + strength * per_token[valid].sum() / valid.sum()
    want.backward()
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for p, q in zip(ftcore.trainable_parameters(model), ftcore.trainable_parameters(twin)):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-12)


def test_kl_anchor_needs_an_adapted_model():
    with pytest.raises(ValueError, match="ftcore-adapted"):
        ftcore.causal_lm_loss(tiny_llama(), _masked_batch(), kl_strength=0.1)


def test_fused_loss_trainer_takes_the_trainers_steps(tmp_path):
    """Two optimizer steps of 2 accumulated micro-batches: FusedLossTrainer (num_items_in_batch passed through)
    ends where the plain Trainer ends."""
    from transformers import Trainer, TrainingArguments

    data = [{k: v[0] for k, v in _masked_batch(seed).items()} for seed in range(8)]

    def train(cls, **kw):
        model = tiny_llama()
        ftcore.apply(model, ftcore.SparseDeltaConfig(density=0.05, target_modules="all-linear", exclude_modules=["lm_head"]))
        args = TrainingArguments(
            output_dir=str(tmp_path / cls.__name__), per_device_train_batch_size=2, gradient_accumulation_steps=2,
            max_steps=2, learning_rate=1e-2, report_to=[], save_strategy="no", use_cpu=True, seed=0,
            dataloader_drop_last=True, logging_strategy="no", prediction_loss_only=True, per_device_eval_batch_size=2,
            label_names=["labels"],
        )
        trainer = cls(model=model, args=args, train_dataset=data, eval_dataset=data[:4], **kw)
        trainer.train()
        return [p.detach().clone() for p in ftcore.trainable_parameters(model)], trainer.evaluate()["eval_loss"]

    (plain, plain_eval), (fused, fused_eval) = train(Trainer), train(ftcore.FusedLossTrainer)
    for p, q in zip(plain, fused):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)
    assert abs(plain_eval - fused_eval) < 1e-5, (plain_eval, fused_eval)


@pytest.mark.parametrize("weighting", WEIGHTINGS)
def test_every_device_matches_the_reference(device, weighting):
    """The CPU row kernels and, on a GPU, the CUDA ones (logits kept in bf16 there, sums in fp32)."""
    h, w, y, tw = _case(seed=11, tokens=(5, 9), hidden=40, vocab=1000, dtype=torch.float32)
    kw = dict(weighting=weighting, token_weights=tw if weighting == "given" else None, tau=0.5, chunk_tokens=7)
    want = _reference_grads(h, w, y, **kw)
    on = lambda t: None if t is None else t.to(device)  # noqa: E731
    got = _op_grads(on(h), on(w), on(y), **{**kw, "token_weights": on(kw["token_weights"])})
    for g, r in zip(got, want):
        torch.testing.assert_close(g.double().cpu(), r, rtol=2e-5, atol=2e-6)
    got16 = _op_grads(on(h).bfloat16(), on(w).bfloat16(), on(y), **{**kw, "token_weights": on(kw["token_weights"])})
    for g, r in zip(got16, want):
        torch.testing.assert_close(g.double().cpu(), r, rtol=5e-2, atol=5e-3)
