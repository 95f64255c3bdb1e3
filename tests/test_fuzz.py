"""Property-based fuzzing of recipes and command lines: every input ends in exit 0 or 2, never a traceback.

What validates must also build: a recipe that ``dalle recipes validate`` accepts
is inspected (every stage built on the meta device) and its data source and
tokenizer are built for real. The default run tries a few dozen examples per
property; the ``slow`` pass (CI) tries a few hundred.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import ROOT
from dalle_framework.cli import main

BASE = yaml.safe_load((ROOT / "recipes" / "shapes-demo.yaml").read_text())
EXAMPLES = int(os.environ.get("DALLE_FUZZ_EXAMPLES", "40"))


def paths(node, prefix=()):
    """Every key path of a nested mapping (leaves and inner blocks)."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield (*prefix, key)
            yield from paths(value, (*prefix, key))


PATHS = sorted(set(paths(BASE)))
NASTY_STRINGS = ["", "{name}", "{nme}", "{}", "{0}", "runs/{name}/{name}", "../../../tmp/x", "pipe:touch /tmp/pwned",
                 # schemes that exist only once braces are expanded
                 "{pipe:,x}touch /tmp/pwned", "pip{e,}:touch /tmp/pwned", "{file:,pipe:}x.tar", "{a..c}{pipe:,}x",
                 "cuda", "meta", "auto", "-1", "1e999", "nan", "\x00", "é" * 50, "shapes-demo", "vq-vae", "deepspeed"]
VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.integers(min_value=-3, max_value=300),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(NASTY_STRINGS),
    st.text(max_size=20),
    st.lists(st.integers(min_value=-3, max_value=64), max_size=5),
    st.dictionaries(st.sampled_from(["name", "params", "train", "x", "steps", "config"]), st.integers(-2, 5), max_size=3),
)
MUTATION = st.one_of(
    st.tuples(st.just("set"), st.sampled_from(PATHS), VALUES),
    st.tuples(st.just("delete"), st.sampled_from(PATHS), st.none()),
    st.tuples(st.just("set"), st.sampled_from([("extends",), ("surprise",), ("prior", "train", "hflip"), ("codec", "frozen")]), VALUES),
)
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def mutate(data: dict, mutations) -> dict:
    data = copy.deepcopy(data)
    for action, path, value in mutations:
        node = data
        for key in path[:-1]:
            if not isinstance(node, dict) or not isinstance(node.get(key), dict):
                break
            node = node[key]
        else:
            if action == "delete":
                node.pop(path[-1], None)
            else:
                node[path[-1]] = value
    return data


def run(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    assert code in (0, 2), f"exit {code} for dalle {' '.join(map(str, args))}:\n{err[-3000:]}"
    assert "Traceback" not in err
    return code, out, err


def assert_builds(capsys, path: Path) -> None:
    """A recipe that validated: every stage builds on the meta device, the data source and tokenizer for real."""
    code, out, err = run(capsys, "inspect", path)
    assert code == 0, f"validated but does not build:\n{err[-3000:]}"
    report = json.loads(out)
    broken = {name: part["error"] for name, part in report.items() if isinstance(part, dict) and "error" in part}
    assert not broken, broken
    from dalle_framework.pipeline import Pipeline
    from dalle_framework.recipe import load_recipe

    pipe = Pipeline(load_recipe(path), device="cpu")
    assert pipe.data is not None and pipe.tokenizer.vocab_size >= 1


@pytest.fixture(autouse=True)
def fresh_plugins(manager):
    yield manager


@FUZZ
@given(mutations=st.lists(MUTATION, min_size=1, max_size=4))
def test_fuzzed_recipes_validate_or_say_why(tmp_path, capsys, mutations):
    data = mutate(BASE, mutations)
    data["output_dir"] = str(tmp_path / "runs" / "{name}") if isinstance(data.get("output_dir"), str) else data.get("output_dir")
    path = tmp_path / "fuzzed.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True))
    code, _, err = run(capsys, "recipes", "validate", path)
    if code == 0:
        assert_builds(capsys, path)
    else:
        assert "problem" in err or "error:" in err or "INVALID" in err


@FUZZ
@given(
    edits=st.lists(st.tuples(st.integers(min_value=0, max_value=4000), st.binary(min_size=0, max_size=8), st.integers(0, 4)), min_size=1, max_size=6)
)
def test_fuzzed_recipe_bytes_never_crash(tmp_path, capsys, edits):
    text = bytearray(yaml.safe_dump({**BASE, "output_dir": str(tmp_path / "runs" / "{name}")}).encode())
    for position, insert, remove in edits:
        position %= len(text) + 1
        text[position : position + remove] = insert
    path = tmp_path / "bytes.yaml"
    path.write_bytes(bytes(text))
    code, _, _ = run(capsys, "recipes", "validate", path)
    if code == 0:
        assert_builds(capsys, path)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    from dalle_framework.plugins import set_plugin_manager
    from test_train import tiny_recipe

    set_plugin_manager(None)
    root = tmp_path_factory.mktemp("fuzz-run")
    recipe = tiny_recipe(root / "run", **{"codec.train.steps": 2, "prior.train.steps": 2})
    (root / "tiny.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["train", str(root / "tiny.yaml"), "--quiet"]) == 0
    return root / "run"


@pytest.fixture(scope="module")
def special_files(tmp_path_factory) -> dict[str, Path]:
    """Outputs that are not regular files: a write must refuse each, and leave it as it was."""
    import socket
    import stat

    root = tmp_path_factory.mktemp("special")
    os.mkfifo(root / "fifo")
    (root / "link-to-fifo").symlink_to(root / "fifo")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(root / "socket"))
    files = {"fifo": root / "fifo", "link-to-fifo": root / "link-to-fifo", "socket": root / "socket", "directory": root}
    if os.geteuid() == 0:  # a null device node of our own, never the machine's
        os.mknod(root / "device", stat.S_IFCHR | 0o666, os.makedev(1, 3))
        files["device"] = root / "device"
    yield files
    for path in files.values():
        assert path == root or not path.resolve().is_file(), f"{path} was replaced by a regular file"
    sock.close()


SMALL = st.one_of(st.integers(min_value=-3, max_value=4).map(str), st.sampled_from(["0", "x", "", "1e3", "nan", "inf", "-inf", "99999999999999999999999"]))
FLAGS = st.one_of(
    st.tuples(st.sampled_from(["-n", "--keep", "--batch-size", "--prime-rows"]), SMALL),
    st.tuples(st.sampled_from(["--temperature", "--top-p", "--guidance", "--top-k", "--seed"]),
              st.one_of(SMALL, st.floats().map(str), st.sampled_from(["1e-300", "1e300", "5e-324", "1e-4", "1e4", "1000", "2147483648"]))),
    st.tuples(st.just("--out"), st.sampled_from(["fifo", "socket", "device", "directory", "link-to-fifo"])),
    st.tuples(st.sampled_from(["--device"]), st.sampled_from(["cpu", "cuda", "cuda:7", "bogus", "meta", "mps", ""])),
    st.tuples(st.sampled_from(["--prime"]), st.sampled_from(["/nonexistent.png", "/etc/hostname", "/dev/null"])),
    st.tuples(st.sampled_from(["--no-cache", "--quiet", "--bogus", "-v"]), st.none()),
)


@FUZZ
@given(flags=st.lists(FLAGS, max_size=5), caption=st.one_of(st.text(max_size=40), st.sampled_from(["a red circle in the top left", ""])))
def test_fuzzed_generate_arguments_exit_0_or_2(tiny_run, special_files, tmp_path, capsys, flags, caption):
    argv = ["generate", tiny_run, caption, "--out", tmp_path / "grid.png", "--quiet"]
    for flag, value in flags:
        argv += [flag] if value is None else [flag, special_files.get(value, value) if flag == "--out" else value]
    # keep successful runs cheap: the fuzzing is about arguments, not sampling many images
    if not any(flag in ("-n",) for flag, _ in flags):
        argv += ["-n", "2"]
    run(capsys, *argv)


@FUZZ
@given(overrides=st.lists(st.tuples(st.sampled_from([".".join(p) for p in PATHS]), VALUES.map(lambda v: json.dumps(v) if v == v else "nan")), min_size=1, max_size=3))
def test_fuzzed_overrides_inspect_or_say_why(capsys, overrides):
    torch.set_num_threads(1)
    run(capsys, "inspect", "shapes-demo", *[f"{key}={value}" for key, value in overrides])


JSON = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=False), st.text(max_size=8)),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.sampled_from(
        ["step", "complete", "identity", "run_id", "world_size", "data", "rng", "metrics", "block", "uses", "after", "x"]), inner, max_size=5)),
    max_leaves=12,
)
RECORDS = ["codec/meta.json", "prior/meta.json", "codec/resume.json", "prior/resume.json"]


@settings(max_examples=max(10, EXAMPLES // 4), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(record=st.sampled_from(RECORDS), value=st.one_of(JSON, st.builds(lambda d: "[" * d + "]" * d, st.integers(1000, 200_000)).map(
    lambda text: ("raw", text))), keep_keys=st.booleans())
def test_fuzzed_run_records_exit_0_or_2(tiny_run, tmp_path, capsys, record, value, keep_keys):
    """Hostile but well-formed meta.json / resume.json (any JSON, any depth, or the real record with its
    values replaced): generating and resuming end in exit 0 or 2, naming the file on 2."""
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run, run_dir, dirs_exist_ok=True)
    path = run_dir / record
    if isinstance(value, tuple):
        path.write_text(value[1])
    elif keep_keys and isinstance(value, dict):  # the real record with some values replaced
        path.write_text(json.dumps({**json.loads(path.read_text()), **value}))
    else:
        path.write_text(json.dumps(value))
    stage = record.split("/")[0]
    for args in (["generate", run_dir, "a red circle in the top left", "-n", "1", "--quiet", "--out", tmp_path / "g.png"],
                 ["train", run_dir, "--stage", stage, "--resume", "--quiet", f"{stage}.train.steps=3"]):
        code, _, err = run(capsys, *args)
        assert code == 0 or path.name in err or "error:" in err, err
