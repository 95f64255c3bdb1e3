"""benchmarks/gpu_check.py: the one GPU script runs on the CPU (--quick) with every section,
isolates a failing or hanging section, and summarises the targets."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(_spec)
sys.modules["gpu_check"] = gpu_check  # dataclasses look their module up while the class is built
_spec.loader.exec_module(gpu_check)


def run_script(*args: str, timeout: int = 600) -> tuple[subprocess.CompletedProcess, dict]:
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), *args], capture_output=True, text=True, cwd=ROOT, timeout=timeout
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return result, json.loads(result.stdout)


def test_quick_mode_runs_every_section_on_the_cpu(tmp_path):
    out = tmp_path / "check.json"
    _, report = run_script("--quick", "--out", str(out))
    assert json.loads(out.read_text()) == {k: v for k, v in report.items() if k != "written"}
    sections = report["sections"]
    assert list(sections) == list(gpu_check.SECTIONS) and report["failed_sections"] == []
    assert sections["train_1b_compiled"] == {"skipped": "not run with --quick"}
    for name in set(gpu_check.SECTIONS) - gpu_check.SLOW_ON_CPU:
        assert sections[name].get("ok") is True, (name, sections[name])

    peak = sections["peak"]
    assert peak["device"] == "cpu" and peak["matmul"]["tflops"] > 0 and peak["copy"]["gb_per_s"] > 0

    kernels = sections["kernels"]
    assert set(kernels["training_kernel"].values()) == {"sdpa-mask"}  # flex has no backward on the CPU
    assert set(kernels["density"]) == set(gpu_check.PATTERNS)
    for name in ("row", "column", "conv"):
        entry = kernels["patterns"][name]
        assert entry["max_diff"]["flex_vs_fp32_reference"] < 0.05 and entry["ms_fwd"]["flex_128"] > 0

    runs = sections["sampling"]["runs"]
    assert sections["sampling"]["sparse_batch1_tokens_per_s"] > 0 and sections["sampling"]["sparse_batch4_tokens_per_s"] > 0
    assert runs["sparse_batch1"]["ran"] == {"draws": "host", "decode": "eager", "fallback": None}
    assert runs["sparse_batch4_guided"]["rows"] == 4
    assert set(runs["sparse_batch1"]["attention_kernels"]) == {"row", "conv"}  # the prior's two layers

    equivalence = sections["equivalence"]
    assert equivalence["all_equal"] is True and equivalence["tokens_compared"] > 0
    assert {c["sampling"] for c in equivalence["cases"]} == {"device", "device-guided-topk-topp", "host"}

    decode = sections["decode_1b"]["runs"]
    assert {(r["prior"], r["rows"]) for r in decode} == {("sparse", 1), ("sparse", 4), ("dense", 1), ("dense", 4)}
    assert all(0 < r["share_of_bound"] and r["kv_bytes_needed_per_step"] > 0 for r in decode)

    train = {r["prior"]: r for r in sections["train_1b"]["runs"]}
    assert train["sparse"]["finite"] and train["dense"]["finite"] and train["sparse"]["mfu"] > 0
    assert train["sparse"]["kernels_ran"] == {"conv": {"sdpa-mask": 2}, "row": {"sdpa-mask": 2}}
    assert train["dense"]["kernels_ran"] == {"dense": {"sdpa-causal": 4}}
    assert report["kernels_ran_in_training"]["sparse"] == train["sparse"]["kernels_ran"]

    released = sections["released_priors"]
    for name in ("malevich", "mega"):
        entry = released[name]
        assert set(entry["sampling"]) == {"batch1", "batch4"} and all(r["image_tokens_per_s"] > 0 for r in entry["sampling"].values())
        assert entry["training"]["finite"] and 0 < entry["training"]["trainable"] < entry["params"]
    assert released["mega"]["sampling"]["batch4"]["guidance_scale"] == 16.0 and released["malevich"]["dtype"] == "fp16"

    targets = {t["what"]: t for t in report["targets"]}
    assert len(targets) == 10 and all({"value", "target", "met"} <= set(t) for t in targets.values())
    assert targets["cached == recomputed on the device, token for token"]["met"] is True


def test_the_released_priors_section_trains_as_the_zero_recipes_do():
    """Its shapes and frozen layers are the shipped recipes' (the GPU run measures what a user would run)."""
    from dalle_framework.recipe import load_recipe

    for name, recipe in (("malevich", "rudalle-malevich-zero"), ("mega", "dalle-mega-zero")):
        block = load_recipe(recipe).stages["prior"]
        spec = gpu_check.SHAPES["gpu"]["released"][name]
        assert gpu_check.RELEASED_FREEZE[name] == block.freeze and spec["name"] == block.name
        assert block.params.model_dump() == {**block.params.model_dump(), **spec["params"]}
        # the recipe's other params are the defaults the section builds with: the released shape
        assert type(block.params)().model_dump() == {**block.params.model_dump(), "grad_checkpointing": False}


def test_a_failing_or_hanging_section_is_recorded_and_isolated(monkeypatch):
    def boom(ctx):
        ctx.out["measured"] = 1
        ctx.publish()
        raise ValueError("no such kernel")

    monkeypatch.setitem(gpu_check.SECTIONS, "boom", boom)
    monkeypatch.setitem(gpu_check.SECTIONS, "hang", lambda ctx: time.sleep(60))
    failed = gpu_check.run_section("boom", quick=True, peaks={}, limit=30, engine="torch")
    assert failed["measured"] == 1 and failed["error"] == "ValueError: no such kernel" and "trace" in failed
    start = time.monotonic()
    hung = gpu_check.run_section("hang", quick=True, peaks={}, limit=1, engine="torch")
    assert "timed_out" in hung and time.monotonic() - start < 10


def test_sections_filter_and_device_names():
    assert gpu_check.device_slug("NVIDIA H200") == "h200" and gpu_check.device_slug("NVIDIA H100 80GB HBM3") == "h100-80gb"
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--sections", "nope"],
                            capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 2 and "unknown section" in result.stderr


@pytest.mark.slow
def test_quick_training_under_deepspeed_and_with_compiled_blocks(tmp_path):
    """The GPU run trains under DeepSpeed ZeRO-2 (and with compiled blocks): the same code on the CPU."""
    _, report = run_script("--quick", "--sections", "train_1b,train_1b_compiled", "--engine", "deepspeed",
                           "--budget", "1500", "--out", str(tmp_path / "ds.json"), timeout=1800)
    runs = {r["prior"]: r for r in report["sections"]["train_1b"]["runs"]}
    assert runs["sparse"]["engine"] == "deepspeed (ZeRO-2)" and runs["sparse"]["finite"] and runs["dense"]["finite"]
    compiled = report["sections"]["train_1b_compiled"]["runs"][0]
    assert compiled["compile_blocks"] is True and compiled["finite"]
    assert compiled["kernels_ran"] == runs["sparse"]["kernels_ran"]  # attention runs outside the compiled graphs
