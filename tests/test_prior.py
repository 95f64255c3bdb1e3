"""The dense and sparse transformer priors: loss, heads, padding, guidance, KV cache."""

from __future__ import annotations

import contextlib

import pytest
import torch
from pydantic import ValidationError

import copy
from unittest import mock

from dalle_framework import PAD_ID, Prior, Sampling, attention
from dalle_framework.attention import PATTERNS, kernel_calls, reset_kernel_calls
from dalle_framework.decoding import StepRunner, resolve_decode
from dalle_framework.plugins import PluginManager
from dalle_framework.sampling import (
    TokenDrawer,
    counter_uniform,
    filter_logits,
    guided_logits,
    gumbel_tokens,
    resolve_draws,
    sample_tokens,
    split_guidance,
)
from dalle_transformer import DenseTransformer, SparseTransformer

TEXT_VOCAB, TEXT_LEN, IMAGE_VOCAB, GRID = 24, 6, 16, (4, 4)
N = GRID[0] * GRID[1]
TINY = dict(dim=32, depth=3, heads=4)


def build(cls=DenseTransformer, **params):
    torch.manual_seed(0)
    return cls(cls.Params(**{**TINY, **params}), text_vocab_size=TEXT_VOCAB, text_len=TEXT_LEN, image_vocab_size=IMAGE_VOCAB, grid=GRID)


def captions(batch: int = 3, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(1, TEXT_VOCAB, (batch, TEXT_LEN), generator=g)
    lengths = torch.randint(1, TEXT_LEN + 1, (batch,), generator=g)
    return text.masked_fill(torch.arange(TEXT_LEN)[None] >= lengths[:, None], PAD_ID)  # right padding


def codes(batch: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, IMAGE_VOCAB, (batch, N), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- registration and shapes


def test_plugin_registers_both_priors_and_builds_from_a_spec():
    manager = PluginManager()
    registry = manager.registry("prior")
    assert {"dense-transformer", "sparse-transformer"} <= set(registry.names())
    prior = registry.build(
        {"name": "sparse-transformer", "params": {"dim": 32, "depth": 2, "heads": 2, "layers": ["row", "conv"]}},
        text_vocab_size=TEXT_VOCAB, text_len=TEXT_LEN, image_vocab_size=IMAGE_VOCAB, grid=GRID,
    )
    assert isinstance(prior, Prior) and prior.layer_patterns() == ["row", "conv"]


def test_sparse_params_default_to_the_paper_layout_and_reject_unknown_patterns():
    prior = build(SparseTransformer, depth=6)
    assert prior.layer_patterns() == ["row", "column", "row", "row", "row", "conv"]
    cycled = build(SparseTransformer, depth=5, layers=["row", "column"], final_layer=None)
    assert cycled.layer_patterns() == ["row", "column", "row", "column", "row"]
    with pytest.raises(ValidationError, match="unknown attention pattern"):
        SparseTransformer.Params(layers=["row", "diagonal"])
    with pytest.raises(ValidationError):
        DenseTransformer.Params(dim=64, typo=1)


@pytest.mark.parametrize("cls", [DenseTransformer, SparseTransformer])
def test_loss_shapes_and_finite(cls):
    prior = build(cls)
    text, image = captions(), codes()
    out = prior(text, image)
    assert set(out) == {"loss", "text_loss", "image_loss"}
    assert all(torch.isfinite(torch.as_tensor(v)) for v in out.values())
    # near uniform at init: ln(vocab) nats per token
    assert abs(out["image_loss"].item() - torch.log(torch.tensor(IMAGE_VOCAB)).item()) < 0.3
    expected = out["text_loss"] / 8 + 7 * out["image_loss"] / 8
    torch.testing.assert_close(out["loss"].detach(), expected)
    text_logits, image_logits = prior.logits(text, image)
    assert text_logits.shape == (3, TEXT_LEN - 1, TEXT_VOCAB)
    assert image_logits.shape == (3, N, IMAGE_VOCAB)


def test_wrong_shapes_are_refused():
    prior = build()
    with pytest.raises(AssertionError, match="image_tokens must be"):
        prior.loss(captions(), codes()[:, :5])


def toy_batch(batch: int = 16, seed: int = 0):
    """Caption word c in 1..4 decides the image: code j = (c + j) mod V."""
    g = torch.Generator().manual_seed(seed)
    word = torch.randint(1, 5, (batch,), generator=g)
    text = torch.zeros(batch, TEXT_LEN, dtype=torch.long)
    text[:, 0] = word
    image = (word[:, None] + torch.arange(N)[None]) % IMAGE_VOCAB
    return text, image


@pytest.mark.parametrize("cls", [DenseTransformer, SparseTransformer])
def test_loss_falls_on_a_toy_task(cls):
    prior = build(cls, rotary=True, mlp="geglu")
    opt = torch.optim.AdamW(prior.parameters(), lr=3e-3)
    first = None
    for step in range(50):
        out = prior.loss(*toy_batch(seed=step))
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        first = first if first is not None else out["image_loss"].item()
    assert out["image_loss"].item() < 0.25 * first, (first, out["image_loss"].item())
    # and it samples what it learnt: the caption decides the image
    prior.eval()
    text, image = toy_batch(4, seed=99)
    sampled = prior.generate(text, Sampling(top_k=1), generator=torch.Generator().manual_seed(0))
    assert (sampled == image).float().mean() > 0.9


# ----------------------------------------------------------------------------- heads, padding, caption dropout


def test_text_and_image_heads_never_mix():
    prior = build()
    text, image = captions(), codes()
    text_logits, image_logits = prior.logits(text, image)
    # text predictions do not depend on image tokens (causal) nor on the image head
    with torch.no_grad():
        prior.image_head.weight.add_(1.0)
    text_logits2, _ = prior.logits(text, (image + 1) % IMAGE_VOCAB)
    torch.testing.assert_close(text_logits, text_logits2)
    # sampling only ever yields image codes even though the text vocab is larger
    out = prior.generate(captions(8), Sampling(temperature=5.0), generator=torch.Generator().manual_seed(0))
    assert out.shape == (8, N) and out.max() < IMAGE_VOCAB and out.min() >= 0


def test_padding_embedding_depends_on_position():
    prior = build()
    pads = torch.full((1, TEXT_LEN), PAD_ID)
    emb = prior.embed(pads)[0]
    assert not torch.allclose(emb[1], emb[2])
    torch.testing.assert_close(emb, prior.text_pad_emb + prior.text_pos)
    with torch.no_grad():
        prior.text_pad_emb[3].add_(1.0)
    changed = (prior.embed(pads)[0] - emb).abs().sum(dim=-1) > 0
    assert changed.tolist() == [i == 3 for i in range(TEXT_LEN)]
    # a real word at a position does not use that position's padding vector
    word = pads.clone()
    word[0, 3] = 5
    torch.testing.assert_close(prior.embed(word)[0, 3], prior.text_emb.weight[5] + prior.text_pos[3])


def test_caption_dropout_only_in_training():
    prior = build(caption_dropout=0.999)
    text, image = captions(4), codes(4)
    prior.eval()
    cond = prior.loss(text, image)["loss"]
    uncond = prior.loss(torch.full_like(text, PAD_ID), image)["loss"]
    assert not torch.allclose(cond, uncond)
    torch.testing.assert_close(prior.loss(text, image)["loss"], cond)  # eval: never dropped
    prior.train()  # no dropout layers are active, so only the caption changes
    torch.manual_seed(0)
    torch.testing.assert_close(prior.loss(text, image)["loss"], uncond)


def test_tied_image_embedding_and_gradient_checkpointing():
    tied = build(tie_image_embedding=True)
    assert tied.image_head.weight is tied.image_emb.weight
    plain, ckpt = build(depth=2), build(depth=2, grad_checkpointing=True)
    ckpt.load_state_dict(plain.state_dict())
    text, image = captions(), codes()
    for model in (plain, ckpt):
        model.train()
        model.loss(text, image)["loss"].backward()
    for (name, a), (_, b) in zip(plain.named_parameters(), ckpt.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=name)


def test_zero_text_weight_measures_text_loss_without_training_the_text_head():
    prior = build(text_loss_weight=0.0)
    out = prior.loss(captions(), codes())
    out["loss"].backward()
    assert out["text_loss"] > 0
    assert prior.text_head.weight.grad is None
    assert prior.image_head.weight.grad is not None
    torch.testing.assert_close(out["loss"], 7 * out["image_loss"] / 8)


def test_sparse_backends_agree_on_the_loss():
    sdpa = build(SparseTransformer, attention_backend="sdpa", layers=sorted(PATTERNS), depth=len(PATTERNS))
    flex = build(SparseTransformer, attention_backend="flex", layers=sorted(PATTERNS), depth=len(PATTERNS))
    flex.load_state_dict(sdpa.state_dict())
    text, image = captions(), codes()
    with torch.no_grad():
        torch.testing.assert_close(flex.loss(text, image)["loss"], sdpa.loss(text, image)["loss"], atol=1e-5, rtol=0)


def test_training_shaped_calls_run_the_chosen_kernel_in_every_layer():
    """Training feeds L - 1 tokens; a forced flex backend must run flex there (it used to fall back)."""
    layers = ["row", "column", "conv"]
    flex = build(SparseTransformer, attention_backend="flex", layers=layers, final_layer=None, depth=3)
    auto = build(SparseTransformer, layers=layers, final_layer=None, depth=3)
    text, image = captions(), codes()
    reset_kernel_calls()
    with torch.no_grad():  # flex has no backward on the CPU
        flex.loss(text, image)
    assert kernel_calls() == {name: {"flex": 1} for name in layers}
    reset_kernel_calls()
    auto.loss(text, image)["loss"].backward()  # auto on the CPU: SDPA with the mask, trainable
    assert kernel_calls() == {name: {"sdpa-mask": 1} for name in layers}
    reset_kernel_calls()
    build(DenseTransformer).loss(text, image)
    assert kernel_calls() == {"dense": {"sdpa-causal": TINY["depth"]}}


def test_a_dense_pattern_prior_matches_the_dense_prior():
    dense = build(DenseTransformer)
    sparse = build(SparseTransformer, layers=["causal"], final_layer=None)
    sparse.load_state_dict(dense.state_dict())
    text, image = captions(), codes()
    torch.testing.assert_close(sparse.loss(text, image)["loss"], dense.loss(text, image)["loss"], atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- sampling and the KV cache

PRIORS = [("dense", DenseTransformer, {})] + [
    (f"sparse-{name}", SparseTransformer, {"layers": [name], "final_layer": None}) for name in sorted(PATTERNS)
] + [("sparse-paper-rotary", SparseTransformer, {"depth": 5, "rotary": True})]
SAMPLINGS = {
    "plain": Sampling(),
    "guided": Sampling(guidance_scale=3.0),
    "topk-topp": Sampling(top_k=5, top_p=0.9, temperature=0.8),
    "device-draws": Sampling(draws="device"),
    "device-guided-topk-topp": Sampling(draws="device", guidance_scale=3.0, top_k=5, top_p=0.9, temperature=0.8),
}


@pytest.mark.parametrize("sampling", list(SAMPLINGS), ids=str)
@pytest.mark.parametrize("name,cls,params", PRIORS, ids=[p[0] for p in PRIORS])
def test_cached_generation_equals_recomputation(name, cls, params, sampling, monkeypatch):
    # decode steps of sparse layers gather their keys only at large shapes: force it for half the cases
    monkeypatch.setattr(attention, "GATHER_MIN_ELEMENTS", 0 if sampling.startswith("device") else 1 << 60)
    prior = build(cls, **params)
    text, prime = captions(), codes()[:, :3]
    results = {}
    for use_cache in (True, False):
        for primed in (None, prime):
            s = SAMPLINGS[sampling].model_copy(update={"use_cache": use_cache})
            out = prior.generate(text, s, prime=primed, generator=torch.Generator().manual_seed(7))
            results[use_cache, primed is not None] = out
    assert torch.equal(results[True, False], results[False, False])
    assert torch.equal(results[True, True], results[False, True])
    assert torch.equal(results[True, True][:, :3], prime)
    assert not torch.equal(results[True, True], results[True, False])


def test_cache_computes_only_the_new_token():
    prior = build()
    seen: list[int] = []
    handle = prior.blocks[0].attn.qkv.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[1]))
    try:
        prior.generate(captions(2), Sampling(), generator=torch.Generator().manual_seed(0))
    finally:
        handle.remove()
    assert seen == [TEXT_LEN] + [1] * (N - 1)  # one prefill of the caption, then one token per step


@pytest.mark.parametrize("cls", [DenseTransformer, SparseTransformer])
def test_device_draws_never_read_the_device_from_the_host(cls, monkeypatch):
    """With device draws, nothing per token waits for the host (one-time mask tables aside)."""
    monkeypatch.setattr(attention, "GATHER_MIN_ELEMENTS", 0)
    prior = build(cls)
    sampling = Sampling(draws="device", top_k=5, top_p=0.9, guidance_scale=2.0)
    text = captions()
    expected = prior.generate(text, sampling, generator=torch.Generator().manual_seed(0))  # builds cached tables

    def host_read(*args, **kwargs):
        raise AssertionError("a tensor was read on the host while decoding")

    reads = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__index__", "__float__")
    with contextlib.ExitStack() as stack:
        for name in reads:
            stack.enter_context(mock.patch.object(torch.Tensor, name, host_read))
        out = prior.generate(text, sampling, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, expected)
    assert prior.last_decode == {"draws": "device", "decode": "eager", "fallback": None}


@pytest.mark.parametrize("use_cache", [True, False])
def test_on_step_reports_every_drawn_position(use_cache):
    prior = build(SparseTransformer)
    calls: list[tuple[int, int]] = []
    prior.generate(captions(2), Sampling(use_cache=use_cache), on_step=lambda d, t: calls.append((d, t)))
    assert calls == [(i, N) for i in range(1, N + 1)]
    calls.clear()
    prior.generate(captions(2), Sampling(use_cache=use_cache), prime=codes(2)[:, :5], on_step=lambda d, t: calls.append((d, t)))
    assert calls == [(i, N) for i in range(6, N + 1)]


def test_guidance_batches_both_branches_and_changes_samples():
    prior = build()
    with torch.no_grad():  # an untrained model has near-uniform logits that barely read the caption
        prior.text_pad_emb.mul_(50.0)
        prior.image_head.weight.mul_(100.0)
    text = captions(2)
    rows: list[int] = []
    handle = prior.blocks[0].attn.qkv.register_forward_hook(lambda m, i, o: rows.append(i[0].shape[0]))
    try:
        guided = prior.generate(text, Sampling(guidance_scale=4.0), generator=torch.Generator().manual_seed(0))
    finally:
        handle.remove()
    assert set(rows) == {4}, "conditional and unconditional rows must run as one batch of 2B"
    plain = prior.generate(text, Sampling(), generator=torch.Generator().manual_seed(0))
    assert not torch.equal(guided, plain)


def test_same_generator_same_samples_and_mode_restored():
    prior = build(SparseTransformer, resid_dropout=0.1)
    prior.train()
    text = captions()
    a = prior.generate(text, Sampling(), generator=torch.Generator().manual_seed(3))
    b = prior.generate(text, Sampling(), generator=torch.Generator().manual_seed(3))
    c = prior.generate(text, Sampling(), generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert prior.training, "generate must restore training mode"


# ----------------------------------------------------------------------------- sampling helpers


def test_filter_logits_top_k_and_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]]))
    kept = lambda out: torch.isfinite(out)[0].tolist()  # noqa: E731
    assert kept(filter_logits(logits, top_k=2)) == [True, True, False, False, False]
    assert kept(filter_logits(logits, top_p=0.6)) == [True, True, False, False, False]
    assert kept(filter_logits(logits, top_p=0.5)) == [True, False, False, False, False]
    assert kept(filter_logits(logits, top_p=0.01)) == [True, False, False, False, False]
    assert kept(filter_logits(logits, top_k=3, top_p=0.99)) == [True, True, True, False, False]
    assert all(kept(filter_logits(logits)))
    shuffled = logits[:, [3, 0, 4, 1, 2]]
    assert kept(filter_logits(shuffled, top_p=0.6)) == [False, True, False, True, False]


def test_sample_tokens_respects_filters_and_generator():
    logits = torch.randn(64, 10, generator=torch.Generator().manual_seed(0))
    greedy = sample_tokens(logits, Sampling(top_k=1))
    assert torch.equal(greedy, logits.argmax(-1))
    draws = sample_tokens(logits.repeat(20, 1), Sampling(top_k=3), generator=torch.Generator().manual_seed(1))
    top3 = logits.topk(3, dim=-1).indices.repeat(20, 1)
    assert (draws[:, None] == top3).any(dim=-1).all()
    same = sample_tokens(logits, Sampling(), generator=torch.Generator().manual_seed(5))
    assert torch.equal(same, sample_tokens(logits, Sampling(), generator=torch.Generator().manual_seed(5)))
    cold = sample_tokens(logits, Sampling(temperature=1e-4), generator=torch.Generator().manual_seed(5))
    assert torch.equal(cold, greedy)


def test_guidance_combination():
    cond, uncond = torch.tensor([[2.0, 0.0]]), torch.tensor([[1.0, 1.0]])
    torch.testing.assert_close(guided_logits(cond, uncond, 1.0), cond)
    torch.testing.assert_close(guided_logits(cond, uncond, 0.0), uncond)
    torch.testing.assert_close(guided_logits(cond, uncond, 3.0), torch.tensor([[4.0, -2.0]]))
    torch.testing.assert_close(split_guidance(torch.cat([cond, uncond]), 3.0), torch.tensor([[4.0, -2.0]]))


def test_counter_noise_is_a_pure_function_of_seed_step_row_and_token():
    cpu = torch.device("cpu")
    a = counter_uniform(7, 3, 4, 50, cpu)
    assert torch.equal(a, counter_uniform(torch.tensor(7), torch.tensor(3), 4, 50, cpu))
    assert torch.equal(a[:2], counter_uniform(7, 3, 2, 50, cpu)), "a row's noise does not depend on the batch size"
    assert not torch.equal(a, counter_uniform(7, 4, 4, 50, cpu)) and not torch.equal(a, counter_uniform(8, 3, 4, 50, cpu))
    assert 0 < a.min() and a.max() < 1
    many = counter_uniform(1, 0, 400, 500, cpu)
    assert abs(float(many.mean()) - 0.5) < 0.01 and abs(float(many.std()) - 12**-0.5) < 0.01


def test_gumbel_draws_follow_the_filtered_softmax():
    logits = torch.log(torch.tensor([0.5, 0.25, 0.15, 0.07, 0.03]))
    rows = logits.expand(20000, -1)
    draws = gumbel_tokens(rows, Sampling(), seed=3, step=0)
    freq = torch.bincount(draws, minlength=5).float() / len(draws)
    torch.testing.assert_close(freq, logits.softmax(-1), atol=0.015, rtol=0)
    top2 = gumbel_tokens(rows, Sampling(top_k=2), seed=3, step=0)
    assert set(top2.tolist()) == {0, 1}
    freq2 = torch.bincount(top2, minlength=2).float() / len(top2)
    torch.testing.assert_close(freq2, torch.tensor([2 / 3, 1 / 3]), atol=0.015, rtol=0)
    assert torch.equal(gumbel_tokens(rows[:4], Sampling(temperature=1e-4), seed=1, step=9), torch.zeros(4, dtype=torch.long))
    assert torch.equal(draws, gumbel_tokens(rows, Sampling(), seed=3, step=0))


def test_draws_and_decode_modes_resolve_by_device():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_draws(Sampling(), cpu) == "host" and resolve_draws(Sampling(), cuda) == "device"
    assert resolve_draws(Sampling(draws="device"), cpu) == "device"
    assert resolve_decode(Sampling(), cpu) == "eager" and resolve_decode(Sampling(), cuda) == "graph"
    assert resolve_decode(Sampling(decode="graph"), cpu) == "eager"  # nothing to capture off CUDA
    assert resolve_decode(Sampling(decode="compile"), cpu) == "compile"
    logits = torch.randn(6, 9, generator=torch.Generator().manual_seed(0))
    host = TokenDrawer(Sampling(), cpu, torch.Generator().manual_seed(2))
    assert torch.equal(host.draw(logits, 0), sample_tokens(logits, Sampling(), torch.Generator().manual_seed(2)))
    runner = StepRunner(lambda: torch.ones(2), "graph", cpu)
    assert runner.used == "eager" and torch.equal(runner(), torch.ones(2))


def test_a_decode_step_that_fails_to_compile_runs_eagerly(monkeypatch):
    """A failed compile (or CUDA graph capture) falls back to the eager step and says so."""

    def broken_compile(fn, **kwargs):
        def compiled():
            raise RuntimeError("no compiler here")

        return compiled

    monkeypatch.setattr(torch, "compile", broken_compile)
    calls: list[int] = []
    runner = StepRunner(lambda: calls.append(1) or torch.ones(1), "compile", torch.device("cpu"))
    with pytest.warns(UserWarning, match="running eagerly"):
        assert torch.equal(runner(), torch.ones(1))
    runner()
    assert runner.used == "eager" and "no compiler here" in runner.fallback and len(calls) == 2
    prior = build(SparseTransformer)
    sampling = Sampling(draws="device", decode="compile", guidance_scale=2.0)
    with pytest.warns(UserWarning, match="running eagerly"):
        out = prior.generate(captions(), sampling, generator=torch.Generator().manual_seed(2))
    assert prior.last_decode["decode"] == "eager" and "no compiler here" in prior.last_decode["fallback"]
    reference = prior.generate(captions(), sampling.model_copy(update={"use_cache": False}), generator=torch.Generator().manual_seed(2))
    assert torch.equal(out, reference)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_sparse_prior_trains_the_same_way_under_deepspeed_zero(stage):
    """One model code path: under ZeRO-2 and ZeRO-3 (bf16) the sparse prior runs its chosen kernels and learns."""
    from dalle_framework.plugins import registry
    from dalle_framework.recipe import TrainConfig

    config = TrainConfig(steps=20, lr=3e-3, batch_size=3, precision="bf16", engine={"name": "deepspeed", "params": {"zero_stage": stage}})
    engine = registry("engine").build(config.engine)
    torch.manual_seed(0)
    with engine.model_context(config):
        prior = SparseTransformer(SparseTransformer.Params(**TINY), text_vocab_size=TEXT_VOCAB, text_len=TEXT_LEN,
                                  image_vocab_size=IMAGE_VOCAB, grid=GRID)
    run = engine.prepare(prior, config)
    text, image = captions(), codes()
    reset_kernel_calls()
    losses = [run.step(text, image)["loss"] for _ in range(12)]
    assert kernel_calls() == {name: {"sdpa-mask": 12} for name in ("row", "column", "conv")}
    assert losses[-1] < 0.8 * losses[0], losses


@pytest.mark.slow
@pytest.mark.parametrize("draws", ["device", "host"])
def test_compiled_decode_step_equals_recomputation_on_cpu(draws):
    """The same static step, compiled by torch.compile (inductor, CPU): token for token."""
    for cls, params in [(DenseTransformer, {}), (SparseTransformer, {"rotary": True})]:
        prior = build(cls, **params)
        text, prime = captions(), codes()[:, :3]
        base = Sampling(draws=draws, guidance_scale=2.0, top_k=6)
        compiled = prior.generate(text, base.model_copy(update={"decode": "compile"}), prime=prime, generator=torch.Generator().manual_seed(1))
        assert prior.last_decode["decode"] == "compile" and prior.last_decode["fallback"] is None
        recomputed = prior.generate(text, base.model_copy(update={"use_cache": False}), prime=prime, generator=torch.Generator().manual_seed(1))
        assert torch.equal(compiled, recomputed), cls.__name__


@pytest.mark.slow
def test_compiled_blocks_train_like_eager_blocks():
    eager = build(SparseTransformer, dim=32, depth=2, grad_checkpointing=True)
    compiled = build(SparseTransformer, dim=32, depth=2, grad_checkpointing=True, compile_blocks=True)
    compiled.load_state_dict(eager.state_dict())
    text, image = captions(), codes()
    losses = [m.loss(text, image)["loss"] for m in (eager, compiled)]
    torch.testing.assert_close(losses[1], losses[0], atol=1e-5, rtol=1e-5)
    for loss in losses:
        loss.backward()
    for (name, a), b in zip(eager.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(b.grad, a.grad, atol=1e-5, rtol=1e-4, msg=name)
    # a deep copy (EMA weights) computes with its own parameters, not the original's
    twin = copy.deepcopy(compiled)
    with torch.no_grad():
        for param in twin.parameters():
            param.zero_()
    assert twin.loss(text, image)["loss"].item() != losses[1].item()
    torch.testing.assert_close(compiled.loss(text, image)["loss"], losses[1])
