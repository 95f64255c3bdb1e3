"""`dalle_framework.footprint` (`dalle inspect`): parameter counts, FLOPs per token and training memory, on the meta device."""

from __future__ import annotations

import resource
import types

import pytest
import torch
from pydantic import Field
from torch import nn

import dalle_framework
from dalle_framework import Prior, Tokenizer, UsageError, hookimpl
from dalle_framework.footprint import inspect_recipe, parameter_counts
from dalle_framework.metrics import flops_per_token

CODEC = {  # the shapes demo's small dVAE: 8x8 grid of 128 codes
    "name": "gumbel-dvae",
    "params": {"image_size": 32, "vocab_size": 128, "width": 32, "channel_mults": [1, 2, 2], "blocks_per_group": 1, "decoder_stem_width": 32},
}
PAPER_CODEC = {"name": "gumbel-dvae", "params": {"image_size": 256, "vocab_size": 8192, "width": 256, "channel_mults": [1, 2, 4, 8], "blocks_per_group": 2}}
PAPER_PRIOR = {"dim": 3968, "depth": 64, "heads": 62, "head_dim": 64}


class TinyPrior(Prior):
    """Embeddings + a stack of square Linear layers + an image head: counts are easy by hand."""

    seen_devices: list = []

    class Params(dalle_framework.Params):
        dim: int = Field(16, description="width")
        depth: int = Field(2, description="layers")

    def __init__(self, params, *, text_vocab_size, text_len, image_vocab_size, grid):
        super().__init__()
        d = params.dim
        self.params = params
        self.seq_len = text_len + grid[0] * grid[1]
        self.text_emb = nn.Embedding(text_vocab_size, d)
        self.image_emb = nn.Embedding(image_vocab_size, d)
        self.pos = nn.Parameter(torch.zeros(text_len + grid[0] * grid[1], d))
        self.layers = nn.ModuleList(nn.Linear(d, d) for _ in range(params.depth))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, image_vocab_size, bias=False)
        TinyPrior.seen_devices.append(self.pos.device.type)

    def loss(self, text, image_tokens):
        raise NotImplementedError

    def generate(self, text, sampling, prime=None, generator=None, on_step=None):
        raise NotImplementedError

    def flops_per_token(self):
        counts = parameter_counts(self)
        return flops_per_token(counts["non_embedding"], n_layers=self.params.depth, seq_len=self.seq_len, d_attn=self.params.dim)


class PaperTokenizer(Tokenizer):
    """The paper's text side: 16384 BPE ids, 256 per caption (encode is not needed here)."""

    class Params(dalle_framework.Params):
        vocab_size: int = Field(16384, description="BPE vocabulary")
        text_len: int = Field(256, description="tokens per caption")

    def __init__(self, params, **runtime):
        self.vocab_size, self.text_len = params.vocab_size, params.text_len

    def encode(self, texts):
        raise NotImplementedError

    def decode(self, ids):
        raise NotImplementedError


@pytest.fixture
def inline(manager):
    plugin = types.ModuleType("inline_test_plugin")
    plugin.dalle_register_priors = hookimpl(lambda registry: registry.register(TinyPrior, name="tiny-prior"))
    plugin.dalle_register_tokenizers = hookimpl(lambda registry: registry.register(PaperTokenizer, name="paper-tokenizer"))
    manager.add_plugin(plugin, name="inline-test-plugin")
    yield manager
    manager.remove_plugin("inline-test-plugin")


def recipe(prior: dict, *, tokenizer: dict | None = None, codec: dict | None = None, **train) -> dict:
    return {
        "name": "tiny",
        "data": {"name": "shapes"},
        "tokenizer": tokenizer or {"name": "words", "params": {"vocab": ["a", "red", "circle"], "text_len": 8}},
        "codec": codec or CODEC,
        "prior": {**prior, "train": {"batch_size": 4, "steps": 10, **train}},
    }


def max_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


# ----------------------------------------------------------------------------- pieces


def test_parameter_counts_split_embeddings_and_count_tied_weights_once():
    model = nn.Module()
    model.emb = nn.Embedding(10, 4)
    model.pos = nn.Parameter(torch.zeros(3, 4))  # a lookup table held directly: embedding
    model.proj = nn.Linear(4, 6)
    model.norm = nn.LayerNorm(4)
    model.out = nn.Linear(4, 10, bias=False)
    model.out.weight = model.emb.weight  # tied: a matmul too, counted once, as compute
    counts = parameter_counts(model)
    assert counts["total"] == 40 + 12 + (24 + 6) + 8
    assert counts["embedding"] == 12
    assert counts["non_embedding"] == counts["total"] - 12
    assert counts["largest_layer"] == 40


def test_flops_formula():
    flops = flops_per_token(1000, n_layers=2, seq_len=10, d_attn=8)
    assert flops["forward"] == 2 * 1000 + 2 * 2 * 10 * 8
    assert flops["train"] == 3 * flops["forward"]
    assert flops_per_token(1000, n_layers=None, seq_len=10, d_attn=None)["forward"] == 2000  # unknown shape: 2N


def test_flops_formula_counts_the_keys_a_query_sees():
    assert flops_per_token(1000, n_layers=2, seq_len=10, d_attn=8, attended=5)["forward"] == 2 * 1000 + 2 * 2 * 10 * 8
    assert flops_per_token(1000, n_layers=2, seq_len=10, d_attn=8, attended=2)["forward"] == 2 * 1000 + 2 * 2 * 4 * 8


def zero3_memory(total, largest, *, gpus_per_node, nodes):
    from dalle_engines import DeepSpeedEngine

    engine = DeepSpeedEngine(DeepSpeedEngine.Params(zero_stage=3))
    return engine.memory_estimate(total_params=total, largest_layer_params=largest, gpus_per_node=gpus_per_node, nodes=nodes)


def test_zero3_memory_uses_deepspeeds_estimator_and_offload_helps():
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    mem = zero3_memory(10**9, 10**7, gpus_per_node=8, nodes=2)
    _, gpu, _ = estimate_zero3_model_states_mem_needs(10**9, 10**7, 8, 2, cpu_offload=False, cpu_offload_params=False)
    assert mem["gpu"]["gpu_gib_per_gpu"] == round(gpu / 2**30, 2)
    assert mem["gpu"]["gpu_gib_per_gpu"] > mem["offload_optimizer"]["gpu_gib_per_gpu"] > mem["offload_optimizer_and_params"]["gpu_gib_per_gpu"]
    more = zero3_memory(10**9, 10**7, gpus_per_node=8, nodes=4)
    assert more["gpu"]["gpu_gib_per_gpu"] < mem["gpu"]["gpu_gib_per_gpu"]  # more GPUs, smaller shards


def test_each_engine_estimates_its_own_memory():
    from dalle_engines import DeepSpeedEngine, TorchEngine

    plain = TorchEngine().memory_estimate(total_params=10**9, largest_layer_params=10**7, gpus_per_node=8, nodes=1)
    assert plain["gpu"]["gpu_gib_per_gpu"] == round(16e9 / 2**30, 2)  # fp32 weights, grads, two Adam moments
    zero2 = DeepSpeedEngine(DeepSpeedEngine.Params(zero_stage=2)).memory_estimate(
        total_params=10**9, largest_layer_params=10**7, gpus_per_node=8, nodes=1
    )
    assert zero2["gpu"]["gpu_gib_per_gpu"] < plain["gpu"]["gpu_gib_per_gpu"]  # gradients and Adam states sharded


# ----------------------------------------------------------------------------- whole recipes


def test_inspect_tiny_recipe_counts_by_hand(inline):
    TinyPrior.seen_devices.clear()
    report = inspect_recipe(recipe({"name": "tiny-prior", "params": {"dim": 16, "depth": 3}}, grad_accum=2), gpus_per_node=2, nodes=1)
    assert TinyPrior.seen_devices == ["meta"]  # built on the meta device
    assert report["tokenizer"] == {"class": "WordTokenizer", "vocab_size": 5, "text_len": 8}
    assert report["codec"]["grid"] == [8, 8] and report["codec"]["vocab_size"] == 128
    assert report["codec"]["params"]["total"] > 0
    prior = report["prior"]
    d, seq = 16, 8 + 64
    embedding = 5 * d + 128 * d + seq * d
    non_embedding = 3 * (d * d + d) + 2 * d + d * 128
    assert prior["params"]["embedding"] == embedding
    assert prior["params"]["non_embedding"] == non_embedding
    assert prior["params"]["largest_layer"] == max(seq * d, 128 * d)  # the image head
    flops = prior["flops_per_token"]
    assert (flops["n_layers"], flops["d_attn"], flops["seq_len"]) == (3, 16, seq)
    assert flops["forward"] == 2 * non_embedding + 2 * 3 * seq * d
    assert prior["train"]["tokens_per_step"] == 4 * 2 * 2 * seq  # batch * accum * gpus * seq_len
    assert prior["train"]["flops"] == pytest.approx(flops["train"] * prior["train"]["tokens_per_step"] * 10)
    assert prior["memory"]["engine"] == "torch" and prior["memory"]["gpu"]["gpu_gib_per_gpu"] >= 0


def test_inspect_a_huge_prior_allocates_nothing(inline):
    before = max_rss_gib()
    report = inspect_recipe(recipe({"name": "tiny-prior", "params": {"dim": 32768, "depth": 16}}))
    assert report["prior"]["params"]["total"] > 17e9  # 70 GB of fp32 if it were real
    assert max_rss_gib() - before < 1.0


@pytest.mark.parametrize("name,extra", [("dense-transformer", {}), ("sparse-transformer", {"layers": ["row", "column", "row", "row"]})])
def test_paper_configuration_is_about_12b_parameters(inline, name, extra):
    before = max_rss_gib()
    report = inspect_recipe(
        recipe({"name": name, "params": {**PAPER_PRIOR, **extra}}, tokenizer={"name": "paper-tokenizer"}, codec=PAPER_CODEC),
        gpus_per_node=8, nodes=64,
    )
    assert max_rss_gib() - before < 1.0
    prior = report["prior"]
    assert 11.5e9 < prior["params"]["total"] < 12.5e9, prior["params"]
    assert prior["params_human"].endswith("B")
    assert prior["flops_per_token"]["seq_len"] == 256 + 1024
    assert prior["flops_per_token"]["forward"] == pytest.approx(2 * prior["params"]["non_embedding"], rel=0.03)


def test_paper_recipe_file_inspects_without_allocating(manager):
    before = max_rss_gib()
    report = inspect_recipe("dalle-paper", gpus_per_node=8, nodes=1)
    assert max_rss_gib() - before < 1.0
    assert 11.5e9 < report["prior"]["params"]["total"] < 13e9
    memory = report["prior"]["memory"]  # the recipe trains the prior with DeepSpeed ZeRO-3
    assert memory["engine"] == "deepspeed" and memory["zero_stage"] == 3
    assert memory["gpu"]["gpu_gib_per_gpu"] > memory["offload_optimizer_and_params"]["gpu_gib_per_gpu"]
    sparse = report["prior"]["flops_per_token"]
    # the paper's sparse layers see far fewer keys than dense causal attention would
    assert sparse["attention_forward"] < 2 * 64 * (256 + 1024) * 62 * 64 / 2
    # every stage is counted, the open_clip reranker (ViT-B-32: 151M parameters) too
    assert "error" not in report["reranker"] and 150e6 < report["reranker"]["params"]["total"] < 152e6


def test_bad_cluster_shape_is_a_usage_error(inline):
    with pytest.raises(UsageError, match="gpus_per_node"):
        inspect_recipe(recipe({"name": "tiny-prior"}), gpus_per_node=0)
