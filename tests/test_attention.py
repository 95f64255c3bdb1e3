"""Attention masks for [text | image] sequences and the kernels that execute them."""

from __future__ import annotations

import pytest
import torch

from dalle_framework import UsageError, attention
from dalle_framework.attention import (
    PATTERNS,
    Layout,
    block_density,
    block_mask,
    causal_attention,
    conv_kernel,
    dense_mask,
    flex_attention_fn,
    get_rule,
    kernel_calls,
    kernel_for,
    key_table,
    pattern_attention,
    reference_attention,
    register_pattern,
    reset_kernel_calls,
)

SMALL = Layout(6, (4, 4))  # the paper's Fig. 11 toy: 6 text tokens, a 4x4 grid
WIDE = Layout(8, (8, 8))  # 72 positions: several 16-blocks, some of them empty
ALL = sorted(PATTERNS)
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


def image_keys(mask: torch.Tensor, layout: Layout, j: int) -> set[int]:
    """Image-relative keys that image query ``j`` may attend to."""
    t = layout.text_len
    return set((mask[t + j, t:].nonzero().flatten()).tolist())


def test_registry_holds_the_paper_and_project_patterns():
    assert {"causal", "row", "column", "conv", "fixed", "bigbird"} <= set(PATTERNS)
    with pytest.raises(UsageError, match="unknown attention pattern 'diagonal'"):
        get_rule("diagonal")


def test_register_pattern_adds_a_rule_usable_everywhere():
    name = "test-self-only"

    @register_pattern(name)
    def self_only(q, k, layout):
        return k == q

    try:
        mask = dense_mask(name, SMALL)
        assert all(image_keys(mask, SMALL, j) == {j} for j in range(SMALL.image_len))
        with pytest.raises(AssertionError, match="already registered"):
            register_pattern(name)(self_only)
    finally:
        del PATTERNS[name]


@pytest.mark.parametrize("pattern", ALL)
@pytest.mark.parametrize("layout", [SMALL, WIDE, Layout(3, (5, 7))], ids=str)
def test_shared_rules_causal_text_and_image_sees_text(pattern, layout):
    mask = dense_mask(pattern, layout)
    L, t = layout.seq_len, layout.text_len
    assert mask.shape == (L, L) and mask.dtype == torch.bool
    assert not torch.triu(mask, diagonal=1).any(), "a query sees a later key"
    assert torch.equal(mask[:t, :t], torch.ones(t, t, dtype=torch.bool).tril()), "text is not plain causal"
    assert not mask[:t, t:].any(), "text sees image"
    assert mask[t:, :t].all(), "an image token does not see all text"
    assert mask.diagonal().all(), "every position sees itself"


def test_row_mask_has_extent_w_plus_one():
    for layout in (SMALL, WIDE, Layout(2, (3, 5))):
        w = layout.grid[1]
        mask = dense_mask("row", layout)
        for j in range(layout.image_len):
            assert image_keys(mask, layout, j) == set(range(max(0, j - w), j + 1))
        assert len(image_keys(mask, layout, layout.image_len - 1)) == w + 1


def test_column_mask_sees_the_targets_column_above_and_itself():
    layout = WIDE
    w = layout.grid[1]
    mask = dense_mask("column", layout)
    for j in range(layout.image_len):
        target_col = (j + 1) % w
        expected = {k for k in range(j + 1) if k % w == target_col} | {j}
        assert image_keys(mask, layout, j) == expected


def test_conv_kernel_scales_the_papers_11_at_32():
    assert conv_kernel((32, 32)) == 11
    assert conv_kernel((16, 16)) == 5
    assert conv_kernel((8, 8)) == 3
    assert conv_kernel((4, 4)) == 3
    assert conv_kernel((64, 64)) == 23
    assert all(conv_kernel((h, h)) % 2 == 1 for h in range(1, 80))


@pytest.mark.parametrize("grid", [(8, 8), (16, 16)])
def test_conv_mask_is_a_causal_square_neighbourhood_of_the_target(grid):
    layout = Layout(4, grid)
    h, w = grid
    r = conv_kernel(grid) // 2
    mask = dense_mask("conv", layout)
    target_row, target_col = h // 2, w // 2  # interior target
    j = target_row * w + target_col - 1  # the query that predicts it
    expected = {
        rr * w + cc
        for rr in range(target_row - r, target_row + 1)
        for cc in range(target_col - r, target_col + r + 1)
        if rr * w + cc <= j
    }
    assert image_keys(mask, layout, j) == expected
    assert len(expected) == r * (2 * r + 1) + r


def test_sparse_patterns_are_sparser_than_causal_at_the_paper_shape():
    paper = Layout(256, (32, 32))
    dense = dense_mask("causal", paper).sum()
    for name in ("row", "column", "conv", "fixed", "bigbird"):
        assert dense_mask(name, paper).sum() < 0.7 * dense, name
    # block-sparse execution skips blocks: the row mask needs well under the causal blocks
    assert block_density("row", paper) < block_density("causal", paper)


def test_masks_are_cached_per_pattern_layout_and_device():
    assert dense_mask("row", SMALL) is dense_mask("row", SMALL)
    assert dense_mask("row", SMALL) is not dense_mask("column", SMALL)
    assert dense_mask("row", SMALL, "cpu") is dense_mask("row", SMALL, torch.device("cpu"))
    assert block_mask("row", SMALL, "cpu") is block_mask("row", SMALL, "cpu")


def qkv(layout: Layout, seed: int = 0, heads: int = 2, dim: int = 16):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(3, 2, heads, layout.seq_len, dim, generator=g).unbind(0)


@pytest.mark.parametrize("pattern", ALL)
@pytest.mark.parametrize("layout,block", [(SMALL, 128), (WIDE, 16)], ids=["small-128", "wide-16"])
def test_flex_block_sparse_sdpa_and_reference_agree(pattern, layout, block):
    q, k, v = qkv(layout)
    reference = reference_attention(q, k, v, dense_mask(pattern, layout))
    sdpa = pattern_attention(q, k, v, pattern=pattern, layout=layout, backend="sdpa")
    with torch.no_grad():  # flex has no backward on CPU; eager forward materialises the scores
        flex = flex_attention_fn(False)(q, k, v, block_mask=block_mask(pattern, layout, "cpu", block_size=block))
        via_api = pattern_attention(q, k, v, pattern=pattern, layout=layout, backend="flex", compiled=False)
    torch.testing.assert_close(sdpa, reference, atol=1e-5, rtol=0)
    torch.testing.assert_close(flex, reference, atol=1e-5, rtol=0)
    torch.testing.assert_close(via_api, reference, atol=1e-5, rtol=0)


def test_block_mask_skips_empty_blocks():
    layout = WIDE
    bm = block_mask("row", layout, "cpu", block_size=16)
    dense = dense_mask("row", layout)
    n = -(-layout.seq_len // 16)
    padded = torch.nn.functional.pad(dense, (0, n * 16 - layout.seq_len, 0, n * 16 - layout.seq_len))
    needed = padded.reshape(n, 16, n, 16).any(dim=(1, 3))
    computed = bm.to_dense()[0, 0].bool()
    assert torch.equal(computed, needed)
    assert not needed.all(), "the test layout must have empty blocks to skip"


@pytest.mark.parametrize("pattern", ALL)
def test_partial_rows_match_the_full_computation(pattern):
    """What a KV cache step computes: queries [start, start+n) against keys [0, start+n)."""
    layout = WIDE
    q, k, v = qkv(layout, seed=1)
    full = pattern_attention(q, k, v, pattern=pattern, layout=layout, backend="sdpa")
    for start, n in [(0, 10), (9, 1), (40, 3), (layout.seq_len - 1, 1)]:
        part = pattern_attention(
            q[:, :, start : start + n], k[:, :, : start + n], v[:, :, : start + n], pattern=pattern, layout=layout, q_start=start
        )
        torch.testing.assert_close(part, full[:, :, start : start + n], atol=1e-5, rtol=0)
        # a KV cache passes all its slots: the unwritten ones (junk here) must be masked out
        junk_k, junk_v = k.clone(), v.clone()
        junk_k[:, :, start + n :], junk_v[:, :, start + n :] = 1e3, -1e3
        whole = pattern_attention(q[:, :, start : start + n], junk_k, junk_v, pattern=pattern, layout=layout, q_start=start)
        torch.testing.assert_close(whole, full[:, :, start : start + n], atol=1e-5, rtol=0)


def test_causal_attention_matches_reference_for_full_prefix_and_step():
    layout = SMALL
    q, k, v = qkv(layout, seed=2)
    full = causal_attention(q, k, v)
    torch.testing.assert_close(full, reference_attention(q, k, v, dense_mask("causal", layout)), atol=1e-5, rtol=0)
    for start, n in [(5, 1), (4, 6), (0, 3)]:
        part = causal_attention(q[:, :, start : start + n], k[:, :, : start + n], v[:, :, : start + n], q_start=start)
        torch.testing.assert_close(part, full[:, :, start : start + n], atol=1e-5, rtol=0)
        whole_cache = causal_attention(q[:, :, start : start + n], k * 1.0, v * 1.0, q_start=start)
        torch.testing.assert_close(whole_cache, full[:, :, start : start + n], atol=1e-5, rtol=0)


def test_sdpa_backward_runs_through_a_sparse_mask():
    q, k, v = (t.requires_grad_() for t in qkv(SMALL, seed=3))
    pattern_attention(q, k, v, pattern="conv", layout=SMALL).sum().backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in (q, k, v))


@pytest.mark.slow
def test_compiled_flex_matches_reference_on_cpu():
    """Compiled flex on CPU (forward only; ~20 s cold compile per ENVIRONMENT.md)."""
    layout = Layout(16, (8, 8))
    q, k, v = qkv(layout, seed=4)
    with torch.no_grad():
        for pattern in ("row", "column", "conv"):
            out = pattern_attention(q, k, v, pattern=pattern, layout=layout, backend="flex", compiled=True)
            ref = reference_attention(q, k, v, dense_mask(pattern, layout))
            torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- which kernel runs


def test_kernel_choice_for_training_prefill_and_decode_shapes():
    paper = Layout(256, (32, 32))
    L = paper.seq_len
    choose = lambda **kw: kernel_for(layout=paper, **{"lq": L - 1, "lk": L - 1, **kw})  # noqa: E731
    # training feeds L - 1 tokens: block-sparse on GPU, SDPA on the CPU (flex has no CPU backward)
    assert choose(device_type="cuda") == "flex"
    assert choose(device_type="cuda", lq=L, lk=L) == "flex"
    assert choose(device_type="cpu") == "sdpa-mask"
    assert choose(device_type="cpu", backend="flex") == "flex"
    assert choose(device_type="cuda", backend="sdpa") == "sdpa-mask"
    assert choose(device_type="cuda", dropout_p=0.1) == "sdpa-mask"  # flex has no dropout
    # sampling: the prefill of a caption stays on SDPA (no flex compile per prompt length) ...
    assert choose(device_type="cuda", lq=256, lk=256) == "sdpa-mask"
    assert choose(device_type="cuda", lq=1, lk=L, q_start=700) == "sdpa-mask"
    # ... and a static decode step gathers the keys of a narrow pattern when that skips enough work
    pos = torch.tensor(700)
    many = 64 * 8 * 64  # 64 rows x 8 heads x head_dim 64 per key slot
    assert choose(device_type="cuda", lq=1, lk=L, q_start=pos, pattern="row", slot_elements=many) == "sdpa-gather"
    assert choose(device_type="cpu", lq=1, lk=L, q_start=pos, pattern="conv", slot_elements=many) == "sdpa-gather"
    assert choose(device_type="cpu", lq=1, lk=L, q_start=pos, pattern="row", slot_elements=4 * 32) == "sdpa-mask"
    assert choose(device_type="cuda", lq=1, lk=L, q_start=pos, pattern="causal", slot_elements=many) == "sdpa-mask"


def test_kernel_calls_record_what_ran(monkeypatch):
    monkeypatch.setattr(attention, "GATHER_MIN_ELEMENTS", 0)
    reset_kernel_calls()
    layout = SMALL
    q, k, v = qkv(layout)
    n = layout.seq_len - 1  # a training-shaped call
    with torch.no_grad():
        pattern_attention(q[:, :, :n], k[:, :, :n], v[:, :, :n], pattern="row", layout=layout, backend="flex", compiled=False)
    pattern_attention(q[:, :, :n], k[:, :, :n], v[:, :, :n], pattern="row", layout=layout)
    pattern_attention(q[:, :, 9:10], k, v, pattern="column", layout=layout, q_start=torch.tensor(9))
    causal_attention(q, k, v)
    assert kernel_calls() == {
        "row": {"flex": 1, "sdpa-mask": 1}, "column": {"sdpa-gather": 1}, "dense": {"sdpa-causal": 1},
    }
    reset_kernel_calls()
    assert kernel_calls() == {}


@pytest.mark.parametrize("pattern", ALL)
def test_flex_at_the_training_length_matches_the_reference(pattern):
    """Training feeds L - 1 tokens; the block mask is built for that length (not a multiple of the block)."""
    layout = WIDE
    n = layout.seq_len - 1
    q, k, v = (t[:, :, :n] for t in qkv(layout, seed=5))
    reference = reference_attention(q, k, v, dense_mask(pattern, layout)[:n, :n])
    with torch.no_grad():
        out = pattern_attention(q, k, v, pattern=pattern, layout=layout, backend="flex", compiled=False)
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=0)
    assert block_mask(pattern, layout, "cpu", length=n).shape[-2:] == (n, n)


@pytest.mark.parametrize("gather", [True, False], ids=["gather", "mask-row"])
@pytest.mark.parametrize("pattern", ALL)
def test_decode_steps_at_device_positions_match_the_full_computation(pattern, gather, monkeypatch):
    """A static decode step: one query at a 0-d tensor position over every cache slot (junk beyond it)."""
    monkeypatch.setattr(attention, "GATHER_MIN_ELEMENTS", 0 if gather else 1 << 60)
    layout = WIDE
    q, k, v = qkv(layout, seed=6)
    full = pattern_attention(q, k, v, pattern=pattern, layout=layout, backend="sdpa")
    table = key_table(pattern, layout)
    if pattern in ("row", "column", "conv"):  # the paper's layers gather few keys
        assert table is not None and table[0].shape[1] <= layout.seq_len // 2
    if pattern == "causal":
        assert table is None
    for start in (layout.text_len, 40, layout.seq_len - 1):
        junk_k, junk_v = k.clone(), v.clone()
        junk_k[:, :, start + 1 :], junk_v[:, :, start + 1 :] = 1e3, -1e3
        step = pattern_attention(q[:, :, start : start + 1], junk_k, junk_v, pattern=pattern, layout=layout, q_start=torch.tensor(start))
        torch.testing.assert_close(step, full[:, :, start : start + 1], atol=1e-5, rtol=0)
    # several queries at a tensor position use the mask rows
    rows = pattern_attention(q[:, :, 30:33], k, v, pattern=pattern, layout=layout, q_start=torch.tensor(30))
    torch.testing.assert_close(rows, full[:, :, 30:33], atol=1e-5, rtol=0)
    dense_step = causal_attention(q[:, :, 40:41], k, v, q_start=torch.tensor(40))
    torch.testing.assert_close(dense_step, causal_attention(q, k, v)[:, :, 40:41], atol=1e-5, rtol=0)


def test_key_table_lists_exactly_the_allowed_keys():
    layout = WIDE
    for pattern in ALL:
        table = key_table(pattern, layout)
        if table is None:
            continue
        index, valid = table
        mask = dense_mask(pattern, layout)
        for row in range(layout.seq_len):
            assert index[row][valid[row]].tolist() == mask[row].nonzero().flatten().tolist()
