"""`dalle serve`: the JSON API through FastAPI's TestClient, hostile requests over raw sockets to a
real `dalle serve` process, and the page in a real headless Chromium.

All run on a tiny shapes-demo run trained by `dalle run` inside the test module
in seconds. The browser test also runs on another run when DALLE_SERVE_RUN names
one (how the README's screenshot is taken; DALLE_SERVE_SCREENSHOT copies it out).
"""

from __future__ import annotations

import http.client
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

import pytest
import torch

from conftest import ROOT, returns_within, run_cli

CAPTION = "a green square in the top left"
# Candidates of a job that runs for seconds on the tiny run (about 0.1 s per 64), long enough to cancel midway.
LONG = 10_000
# shapes-demo made tiny: 2 samples per caption, small models, a few steps each.
TINY = [
    "device=cpu",
    "data.params.samples_per_caption=2",
    "data.params.heldout_samples_per_caption=1",
    "codec.params.width=16",
    "codec.params.vocab_size=32",
    "codec.params.code_dim=16",
    "codec.params.decoder_stem_width=16",
    "codec.train.steps=6",
    "codec.train.eval_every=6",
    "prior.params.dim=32",
    "prior.params.depth=1",
    "prior.params.heads=2",
    "prior.train.steps=6",
    "prior.train.eval_every=6",
    "reranker.params.config.embed_dim=16",
    "reranker.params.config.vision_cfg={image_size: 32, patch_size: 16, width: 16, layers: 1, head_width: 8}",
    "reranker.params.config.text_cfg={context_length: 16, width: 16, heads: 2, layers: 1}",
    "reranker.train.steps=4",
    "reranker.train.batch_size=32",
    "reranker.train.eval_every=4",
    "generate.candidates=4",
    "generate.keep=2",
    "evaluate.captions=2",
    "evaluate.candidates=2",
    "evaluate.rounds=1",
    "evaluate.batches=1",
]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """shapes-demo with tiny overrides, trained, sampled and evaluated by `dalle run` (seconds)."""
    from dalle_framework.cli import main
    from dalle_framework.plugins import PluginManager, set_plugin_manager

    run = tmp_path_factory.mktemp("serve") / "shapes-tiny"
    set_plugin_manager(PluginManager())
    try:
        assert main(["run", "shapes-demo", f"output_dir={run}", *TINY, "--quiet"]) == 0
    finally:
        set_plugin_manager(None)
    return run


@pytest.fixture(scope="module")
def pipe(tiny_run):
    from dalle_framework.pipeline import Pipeline

    return Pipeline.load(tiny_run)


def client_for(pipeline, **limits):
    from fastapi.testclient import TestClient

    from dalle_framework.serve import Limits, create_app

    return TestClient(create_app(pipeline, Limits(**limits)), base_url="http://localhost")  # a Host the app answers to


def wait(client, job_id: str, timeout: float = 120.0) -> dict:
    """Poll GET /jobs/{id} until the job has ended: done, failed or cancelled."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/jobs/{job_id}").json()
        if job["status"] in ("done", "failed", "cancelled"):
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} still {job['status']} after {timeout} s")


def generate(client, **body) -> dict:
    response = client.post("/generate", json={"caption": CAPTION, **body})
    assert response.status_code == 202, response.text
    return wait(client, response.json()["id"])


def png(client, url: str) -> bytes:
    response = client.get(url)
    assert response.status_code == 200 and response.headers["content-type"] == "image/png", response.text
    return response.content


# ----------------------------------------------------------------------------- the API


def test_generate_returns_ranked_pngs_with_scores(pipe):
    from PIL import Image

    with client_for(pipe) as client:
        job = generate(client, candidates=4, keep=3, seed=5, top_k=8, temperature=0.9, guidance_scale=1.5)
        assert job["status"] == "done", job["error"]
        assert job["seed"] == 5 and job["candidates"] == 4 and job["keep"] == 3
        assert job["sampling"]["top_k"] == 8 and job["sampling"]["guidance_scale"] == 1.5
        assert job["seen_as"] == CAPTION and job["queue_position"] is None
        assert job["progress"]["total"] == 4 * 64 and job["progress"]["done"] == job["progress"]["total"]
        scores = [image["score"] for image in job["images"]]
        assert [image["rank"] for image in job["images"]] == [1, 2, 3]
        assert all(isinstance(s, float) for s in scores) and scores == sorted(scores, reverse=True)
        for image in job["images"]:
            with Image.open(io.BytesIO(png(client, image["url"]))) as im:
                assert im.format == "PNG" and im.size == (32, 32)
        with Image.open(io.BytesIO(png(client, job["grid_url"]))) as grid:
            assert grid.size[0] > 3 * 64 and grid.size[1] >= 64  # a caption column, three upscaled images


def test_same_seed_and_options_give_the_same_png_bytes(pipe):
    with client_for(pipe) as client:
        options = {"candidates": 3, "keep": 2, "seed": 11, "top_p": 0.9}
        first, second = generate(client, **options), generate(client, **options)
        other = generate(client, **{**options, "seed": 12})
        pngs = lambda job: [png(client, image["url"]) for image in job["images"]]  # noqa: E731
        assert first["images"][0]["url"] != second["images"][0]["url"]  # fresh ids, same pixels
        assert pngs(first) == pngs(second)
        assert [i["score"] for i in first["images"]] == [i["score"] for i in second["images"]]
        assert pngs(first) != pngs(other)
        unseeded = generate(client, candidates=2, keep=1)
        assert isinstance(unseeded["seed"], int)  # a fresh seed, reported so the job can be repeated
        again = generate(client, candidates=2, keep=1, seed=unseeded["seed"])
        assert pngs(unseeded) == pngs(again)


@pytest.mark.parametrize(
    "body, field, bound",
    [
        ({"candidates": 5}, "candidates", "4 (max_candidates)"),
        ({"candidates": 4, "keep": 3}, "keep", "2 (max_keep)"),
        ({"caption": "a red circle in the top left corner"}, "caption", "20 (max_caption_chars)"),
    ],
)
def test_requests_over_a_bound_get_422_naming_field_and_bound(pipe, body, field, bound):
    with client_for(pipe, max_candidates=4, max_keep=2, max_caption_chars=20) as client:
        response = client.post("/generate", json={"caption": "a red circle", **body})
        assert response.status_code == 422
        detail = response.json()["detail"]
        assert detail.startswith(f"{field}:") and bound in detail, detail


def test_left_out_sizes_take_the_recipe_defaults_cut_to_the_bounds(pipe):
    with client_for(pipe) as client:
        job = generate(client, seed=0)
        assert (job["candidates"], job["keep"]) == (4, 2) and job["status"] == "done"  # the run's generate block
    with client_for(pipe, max_candidates=3, max_keep=1) as client:
        job = generate(client, seed=0)
        assert (job["candidates"], job["keep"], len(job["images"])) == (3, 1, 1)


def test_a_job_over_the_time_bound_is_stopped_with_a_message(pipe):
    with client_for(pipe, max_seconds=1e-6) as client:
        job = generate(client, candidates=2, keep=1, seed=0)
        assert job["status"] == "failed" and "max_seconds" in job["error"] and job["images"] == []
        assert 0 < job["progress"]["done"] < job["progress"]["total"]  # stopped after the first token


@pytest.mark.parametrize(
    "body, message",
    [
        ({}, "caption: Field required"),
        ({"caption": "   "}, "caption: give some words"),
        ({"caption": "a red circle", "candidates": "many"}, "candidates: Input should be a valid integer"),
        ({"caption": "a red circle", "candidates": 0}, "candidates: Input should be greater than or equal to 1"),
        ({"caption": "a red circle", "top_p": 1.5}, "top_p: Input should be less than or equal to 1"),
        ({"caption": "a red circle", "temperature": -1}, "temperature: Input should be greater than or equal to 0.0001"),
        ({"caption": "a red circle", "temperature": 1e-300}, "temperature: Input should be greater than or equal to 0.0001"),
        ({"caption": "a red circle", "temperature": 1e300}, "temperature: Input should be less than or equal to 10000"),
        ({"caption": "a red circle", "guidance_scale": 1e300}, "guidance_scale: Input should be less than or equal to 1000"),
        ({"caption": "a red circle", "guidance": 1e300}, "guidance: Input should be less than or equal to 1000"),  # the older name
        ({"caption": "a red circle", "top_p": 1e300}, "top_p: Input should be less than or equal to 1"),
        ({"caption": "a red circle", "seed": 1e300}, "seed: "),
        ({"caption": "a red circle", "candidates": 1e300}, "candidates: "),
        ({"caption": ["a red circle"]}, "caption: Input should be a valid string"),
        ([CAPTION], "body: Input should be a valid dictionary"),
        ({"caption": "a red circle", "candidates": 2, "keep": 3}, "keep: 3 is more than candidates (2)"),
        ({"caption": "a red circle", "colour": "red"}, "colour: unknown key (not a field of this block)"),
    ],
)
def test_bad_input_gets_422_with_a_message(pipe, body, message):
    with client_for(pipe) as client:
        response = client.post("/generate", json=body)
        assert response.status_code == 422 and message in response.json()["detail"], response.text


@pytest.mark.parametrize(
    "body, status, message",
    [
        (b"{not json", 422, "JSON"),
        (b'{"caption": "a red circle", "temperature": NaN}', 422, "temperature: Input should be a finite number"),
        (b'{"caption": "a red circle", "guidance_scale": -Infinity}', 422, "guidance_scale: Input should be a finite number"),
        (b"[" * 50_000, 400, "error parsing the body"),  # nested past the parser's recursion limit
    ],
)
def test_a_body_that_is_not_json_or_has_no_numbers_json_knows_gets_4xx(pipe, body, status, message):
    with client_for(pipe) as client:
        response = client.post("/generate", content=body, headers={"content-type": "application/json"})
        assert response.status_code == status and message in response.json()["detail"], response.text


class Gated:
    """The real pipeline, except that each generate() first waits for the test to open a gate.

    Records how many generate() calls overlap, to show that the worker runs one at a time.
    """

    def __init__(self, pipeline) -> None:
        self._pipeline = pipeline
        self.gate = threading.Event()
        self.entered = threading.Semaphore(0)
        self._lock = threading.Lock()
        self.active = self.most_active = 0
        self.spans: list[tuple[float, float]] = []

    def __getattr__(self, name):
        return getattr(self._pipeline, name)

    def generate(self, *args, **kwargs):
        with self._lock:
            self.active += 1
            self.most_active = max(self.most_active, self.active)
        self.entered.release()
        start = time.monotonic()
        try:
            assert self.gate.wait(60), "the test never opened the gate"
            return self._pipeline.generate(*args, **kwargs)
        finally:
            with self._lock:
                self.active -= 1
                self.spans.append((start, time.monotonic()))


def test_concurrent_requests_are_queued_and_run_one_at_a_time(pipe):
    gated = Gated(pipe)
    with client_for(gated, max_queue=3) as client:
        # Three clients post at once; the worker takes one, the others wait in line.
        with ThreadPoolExecutor(3) as pool:
            posts = list(pool.map(lambda seed: client.post("/generate", json={"caption": CAPTION, "candidates": 2, "keep": 1, "seed": seed}), range(3)))
        assert [p.status_code for p in posts] == [202] * 3
        ids = [p.json()["id"] for p in posts]
        assert gated.entered.acquire(timeout=60)  # one job is inside generate()
        jobs = [client.get(f"/jobs/{i}").json() for i in ids]
        assert sorted(j["status"] for j in jobs) == ["queued", "queued", "running"]
        assert sorted(j["queue_position"] or 0 for j in jobs) == [0, 1, 2]
        full = client.post("/generate", json={"caption": CAPTION})
        assert full.status_code == 429 and "max_queue=3" in full.json()["detail"] and full.headers["retry-after"]
        gated.gate.set()
        done = [wait(client, i) for i in ids]
    assert [j["status"] for j in done] == ["done"] * 3
    assert gated.most_active == 1 and len(gated.spans) == 3
    spans = sorted(gated.spans)
    assert all(end <= next_start for (_, end), (next_start, _) in zip(spans, spans[1:]))


def test_unknown_ids_404_and_no_path_reaches_the_run_directory(pipe, tiny_run):
    with client_for(pipe, max_results=1) as client:
        assert client.get("/jobs/nope").status_code == 404
        assert "no job 'nope'" in client.get("/jobs/nope").json()["detail"]
        assert client.get("/images/nope.png").status_code == 404
        secret = (tiny_run / "recipe.yaml").read_bytes()
        for path in [
            "/images/..%2Frecipe.yaml",
            "/images/..%2F..%2Frecipe.yaml.png",
            "/images/%2e%2e/%2e%2e/recipe.yaml",
            "/app.js/../recipe.yaml",
            "/recipe.yaml",
            "/prior/model.safetensors",
            "/static/serve.js",
            "/" + str(tiny_run / "recipe.yaml"),
        ]:
            response = client.get(path)
            assert response.status_code == 404 and secret not in response.content, path
        # Finished jobs beyond max_results are evicted with their images.
        first = generate(client, candidates=2, keep=1, seed=0)
        assert client.get(first["images"][0]["url"]).status_code == 200
        generate(client, candidates=2, keep=1, seed=1)
        assert client.get(f"/jobs/{first['id']}").status_code == 404
        assert client.get(first["images"][0]["url"]).status_code == 404


def test_history_lists_the_jobs_held_newest_first(pipe):
    with client_for(pipe, max_results=2) as client:
        assert client.get("/jobs").json() == []
        captions = [CAPTION, "a red circle in the center", "a blue triangle in the bottom right"]
        ended = [generate(client, caption=caption, candidates=2, keep=1, seed=seed) for seed, caption in enumerate(captions)]
        listed = client.get("/jobs").json()
        # Newest first; the oldest left with its images once max_results newer ones finished.
        assert [job["id"] for job in listed] == [ended[2]["id"], ended[1]["id"]]
        assert listed == [ended[2], ended[1]]  # each as GET /jobs/{id} shows it
        assert [job["caption"] for job in listed] == captions[:0:-1] and [job["seed"] for job in listed] == [2, 1]
        for job in listed:
            assert png(client, job["images"][0]["url"]).startswith(b"\x89PNG") and png(client, job["grid_url"])


def test_cancel_drops_a_queued_job_and_stops_a_running_one(pipe):
    with client_for(pipe, max_candidates=LONG) as client:
        post = lambda seed, candidates: client.post("/generate", json={"caption": CAPTION, "candidates": candidates, "keep": 1, "seed": seed}).json()  # noqa: E731
        long, waiting, after = post(0, LONG), post(1, 2), post(2, 2)
        deadline = time.monotonic() + 60
        while client.get(f"/jobs/{long['id']}").json()["progress"]["done"] == 0:
            assert time.monotonic() < deadline, "the long job drew no token within 60 s"
            time.sleep(0.01)

        dropped = client.post(f"/jobs/{waiting['id']}/cancel")
        assert dropped.status_code == 200, dropped.text
        assert dropped.json()["status"] == "cancelled" and dropped.json()["queue_position"] is None
        assert client.get(f"/jobs/{after['id']}").json()["queue_position"] == 1  # moved up
        assert [(job["id"], job["status"]) for job in client.get("/jobs").json()] == [
            (after["id"], "queued"), (waiting["id"], "cancelled"), (long["id"], "running")
        ]
        again = client.post(f"/jobs/{waiting['id']}/cancel")
        assert again.status_code == 409 and "already cancelled" in again.json()["detail"]

        stopping = client.post(f"/jobs/{long['id']}/cancel")
        assert stopping.status_code == 202, stopping.text  # stops at its next drawn token
        assert stopping.json()["status"] == "running" and stopping.json()["cancel_requested"] is True
        stopped = wait(client, long["id"])
        assert stopped["status"] == "cancelled" and stopped["images"] == [] and stopped["grid_url"] is None and stopped["error"] is None
        assert 0 < stopped["progress"]["done"] < stopped["progress"]["total"] == LONG * 64  # stopped midway

        next_job = wait(client, after["id"])
        assert next_job["status"] == "done" and len(next_job["images"]) == 1 and png(client, next_job["images"][0]["url"])
        never_ran = client.get(f"/jobs/{waiting['id']}").json()
        assert never_ran["status"] == "cancelled" and never_ran["elapsed"] is None and never_ran["progress"]["done"] == 0


def test_cancel_of_an_ended_or_unknown_job_is_refused_with_a_message(pipe):
    with client_for(pipe) as client:
        unknown = client.post("/jobs/nope/cancel")
        assert unknown.status_code == 404 and "no job 'nope'" in unknown.json()["detail"]
        done = generate(client, candidates=2, keep=1, seed=0)
        refused = client.post(f"/jobs/{done['id']}/cancel")
        assert refused.status_code == 409, refused.text
        assert refused.json()["detail"] == f"job {done['id']!r} is already done; only a queued or running job can be cancelled"
        assert client.get(f"/jobs/{done['id']}").json() == done and png(client, done["images"][0]["url"])  # untouched
    with client_for(pipe, max_seconds=1e-6) as client:
        failed = generate(client, candidates=2, keep=1, seed=0)
        refused = client.post(f"/jobs/{failed['id']}/cancel")
        assert failed["status"] == "failed" and refused.status_code == 409 and "already failed" in refused.json()["detail"]


@pytest.mark.parametrize("own", [None, "The shapes demo, as a child recipe words it."])
def test_a_derived_recipe_shows_its_own_description_not_its_parents(tiny_run, tmp_path, own):
    """`extends:` merges child over parent, but a parent's description describes another experiment: the page
    shows the child's, or says the child has none and what it derives from."""
    from dalle_framework.pipeline import Pipeline
    from dalle_framework.recipe import dump, load_recipe

    child = tmp_path / "shapes-child.yaml"
    child.write_text("extends: shapes-demo\nname: shapes-child\n" + (f"description: {own}\n" if own else ""))
    parent = load_recipe("shapes-demo").description
    assert parent and parent != own
    run = tmp_path / "run"  # the tiny run as if trained from the child: its stored recipe is the resolved child
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("tb"))
    (run / "recipe.yaml").write_text(dump(load_recipe(child, TINY)))
    with client_for(Pipeline.load(run)) as client:
        shown = client.get("/run").json()
    derived = "Derived from shapes-demo; it has no description of its own (set `description:`)."
    assert shown["recipe"] == "shapes-child" and shown["description"] == (own or derived) and parent not in shown["description"]


def test_run_page_and_openapi(pipe, tiny_run):
    with client_for(pipe, max_candidates=9) as client:
        run = client.get("/run").json()
        assert run["recipe"] == "shapes-demo" and run["run"] == tiny_run.name and run["reranker"] is True
        assert {k: v["name"] for k, v in run["components"].items()} == {
            "data": "shapes", "tokenizer": "words", "codec": "vq-vae", "prior": "dense-transformer", "reranker": "clip"
        }
        assert run["components"]["prior"]["step"] == 6 and "bits_per_image_token" in run["components"]["prior"]["metrics"]
        assert run["components"]["codec"]["plugin"] == "vqvae"
        report = json.loads((tiny_run / "eval" / "report.json").read_text())
        assert run["evaluation"]["generation"] == report["generation"]
        assert run["limits"]["max_candidates"] == 9 and run["defaults"]["candidates"] == 4
        assert run["examples"] and all(isinstance(c, str) for c in run["examples"])

        page = client.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert 'id="caption"' in page.text and 'id="generate"' in page.text
        assert "http" not in page.text.split("<body>")[0]  # no CDN: every script and style is served here
        for asset, kind in (("/app.js", "text/javascript"), ("/app.css", "text/css")):
            response = client.get(asset)
            assert response.status_code == 200 and response.headers["content-type"].startswith(kind)
        assert "http://" not in client.get("/app.js").text and "https://" not in client.get("/app.js").text

        schema = client.get("/openapi.json").json()
        assert {"/generate", "/jobs", "/jobs/{job_id}", "/jobs/{job_id}/cancel", "/run", "/images/{image_id}.png"} <= set(schema["paths"])
        request = schema["components"]["schemas"]["GenerateRequest"]["properties"]
        assert {"caption", "candidates", "keep", "top_k", "top_p", "temperature", "guidance_scale", "seed"} == set(request)
        assert all(field.get("description") for field in request.values())
        for setting in ("top_k", "top_p", "temperature", "guidance_scale"):  # the page shows these beside its boxes
            assert "higher" in request[setting]["description"] and "lower" in request[setting]["description"], setting
        assert "429" in schema["paths"]["/generate"]["post"]["responses"]
        assert {"200", "202", "404", "409"} <= set(schema["paths"]["/jobs/{job_id}/cancel"]["post"]["responses"])


def test_run_files_that_block_never_end_or_cannot_be_shown_are_unavailable_on_the_page(tiny_run, tmp_path):
    """The page reads eval/report.json and each stage's meta.json, whatever lies there: none of these may hang
    it, fill its memory or break GET /run; each is shown as unavailable (null)."""
    from dalle_framework.pipeline import Pipeline

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("tb"))
    pipeline = Pipeline.load(run)

    def page_run() -> dict:
        with client_for(pipeline) as client:
            response = client.get("/run")
            assert response.status_code == 200, response.text
            return response.json()

    report = run / "eval" / "report.json"
    deep = '{"x": ' * 900 + "1" + "}" * 900  # parses, but is past what /run's encoder takes
    for what, plant in {
        "a FIFO (an open that waits for a writer)": os.mkfifo,
        "a link to /dev/zero (a read that never ends)": lambda path: path.symlink_to("/dev/zero"),
        "nested past the parser": lambda path: path.write_text("[" * 100_000),
        "nested past the page": lambda path: path.write_text(deep),
        "not an object": lambda path: path.write_text("[1, 2]"),
    }.items():
        report.unlink()
        plant(report)
        assert returns_within(30, page_run)["evaluation"] is None, what
    report.unlink()
    report.write_text('{"generation": {"fid": NaN, "clip_score": 0.25}}')  # a metric that could not be computed
    assert returns_within(30, page_run)["evaluation"] == {"generation": {"fid": None, "clip_score": 0.25}}
    (run / "data").mkdir()
    os.mkfifo(run / "data" / "meta.json")
    assert "step" not in returns_within(30, page_run)["components"]["data"]


def test_progress_is_reported_per_token(pipe):
    from dalle_framework.interfaces import Sampling

    text = pipe.tokenizer.encode([CAPTION, CAPTION]).to(pipe.device)
    steps: list[tuple[int, int]] = []
    prime = torch.zeros(2, 8, dtype=torch.long)
    pipe.prior.generate(text, Sampling(), prime=prime, on_step=lambda done, total: steps.append((done, total)))
    assert steps == [(d, 64) for d in range(9, 65)]  # primed positions count as done

    calls: list[tuple[int, int]] = []
    pipe.generate([CAPTION, "a red circle in the center"], candidates=3, keep=1, seed=0, batch_size=4, on_progress=lambda d, t: calls.append((d, t)))
    done = [d for d, _ in calls]
    assert {t for _, t in calls} == {2 * 3 * 64} and done == sorted(done) and done[-1] == 2 * 3 * 64
    assert len(calls) == 2 * 64  # two batches (4 + 2 rows), one call per token position


def test_serve_cli_refuses_bad_runs_and_bounds(tmp_path, tiny_run):
    missing = run_cli("serve", str(tmp_path))
    assert missing.returncode == 2 and "not a run directory" in missing.stderr and "Traceback" not in missing.stderr
    bad = run_cli("serve", str(tiny_run), "--max-queue", "0")
    assert bad.returncode == 2 and "--max-queue" in bad.stderr


def test_serve_cli_refuses_ports_and_hosts_it_cannot_bind(tiny_run, capsys):
    from dalle_framework.cli import main

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        for args, expected in (
            (["--port", "99999"], "--port: 99999 is out of range; give 1 to 65535"),
            (["--port", "-1"], "--port: -1 is out of range; give 1 to 65535"),
            (["--port", str(busy)], f"--port {busy}: already in use on 127.0.0.1; stop what serves there or choose another --port"),
            (["--host", "192.0.2.1"], "--host 192.0.2.1: not an address of this machine"),  # TEST-NET-1: nobody's own address
            (["--host", "bad host"], "--host: 'bad host' is not a host name"),
            (["--allowed-host", "pictures.example:80"], "--allowed-host: 'pictures.example:80' is not a host name"),
        ):
            assert main(["serve", str(tiny_run), "--device", "cpu", *args]) == 2, args
            err = capsys.readouterr().err
            assert expected in err and "Traceback" not in err, (args, err)


def grid_size(rows: int, columns: int) -> tuple[int, int]:
    """A captioned grid of 32 px images (scaled to 64) with scores: caption column, then the cells."""
    return (4 + 180 + 4 + columns * (64 + 4), 4 + rows * (64 + 15 + 4))


def test_run_grids_carry_captions_and_scores(tiny_run, tmp_path):
    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with Image.open(tiny_run / "samples.png") as samples:  # dalle run: 4 held-out captions, keep 2
        assert samples.size == grid_size(4, 2)
    with Image.open(tiny_run / "eval" / "generated.png") as generated:  # dalle evaluate: 2 captions x 1 round, best 2
        assert generated.size == grid_size(2, 2)
    out = tmp_path / "grid.png"
    result = run_cli("generate", str(tiny_run), CAPTION, "a red circle in the center", "-n", "3", "--keep", "3", "--out", str(out), "--quiet")
    assert result.returncode == 0, result.stderr
    with Image.open(out) as grid:
        assert grid.size == grid_size(2, 3)
    events = EventAccumulator(str(tiny_run / "tb" / "prior"))
    events.Reload()
    preview = events.Images("prior/preview")[-1]
    with Image.open(io.BytesIO(preview.encoded_image_string)) as image:  # 4 held-out captions, one image each, no scores
        assert image.size == (4 + 180 + 4 + 68, 4 + 4 * 68)


# ----------------------------------------------------------------------------- a real `dalle serve`


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


ALLOWED_HOST = "pictures.example"


@pytest.fixture(scope="module")
def served(request, tmp_path_factory):
    """A real `dalle serve` process on a free port, also answering to ALLOWED_HOST and taking LONG candidates; yields its URL."""
    run = os.environ.get("DALLE_SERVE_RUN") or str(request.getfixturevalue("tiny_run"))
    port = _free_port()
    tmp_path = tmp_path_factory.mktemp("served")
    log = open(tmp_path / "serve.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "dalle_framework", "serve", run, "--port", str(port), "--device", "cpu", "--allowed-host", ALLOWED_HOST,
         "--max-candidates", str(LONG)],
        cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        import urllib.request

        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"{url}/run", timeout=5).read()
                break
            except OSError:
                assert server.poll() is None, (tmp_path / "serve.log").read_text()
                assert time.monotonic() < deadline, "dalle serve did not answer within 120 s"
                time.sleep(0.5)
        yield url
    finally:
        server.terminate()
        server.wait(30)
        log.close()


def request(url: str, method: str, path: str, headers: list[tuple[str, str]], body: bytes = b"") -> tuple[int, bytes, Optional[str]]:
    """One raw HTTP/1.1 request with exactly ``headers`` (nothing added, duplicates kept) on a fresh connection;
    (status, body, Connection header). A server that does not answer within 10 s fails the test."""
    head = "".join(f"{name}: {value}\r\n" for name, value in headers)
    where = urllib.parse.urlsplit(url)
    with socket.create_connection((where.hostname, where.port), timeout=10) as connection:
        connection.sendall(f"{method} {path} HTTP/1.1\r\n{head}\r\n".encode("latin-1") + body)
        response = http.client.HTTPResponse(connection)
        response.begin()
        return response.status, response.read(), response.getheader("connection")


def test_only_the_bound_host_names_are_answered(served):
    """A DNS-rebinding page reaches this server under its own domain: the Host header names it, and is refused."""
    port = urllib.parse.urlsplit(served).port
    for host in (f"127.0.0.1:{port}", "127.0.0.1", "localhost", f"LocalHost:{port}", f"[::1]:{port}", ALLOWED_HOST, f"{ALLOWED_HOST}:{port}"):
        status, body, _ = request(served, "GET", "/run", [("Host", host)])
        assert status == 200 and json.loads(body)["limits"], host
    for host in ("rebound.example", f"rebound.example:{port}", "127.0.0.1.rebound.example", f"{ALLOWED_HOST}.rebound.example", "localhost."):
        for method, path in (("GET", "/run"), ("GET", "/"), ("POST", "/generate")):
            status, body, _ = request(served, method, path, [("Host", host), ("Content-Length", "0")])
            assert status == 403 and "--allowed-host" in json.loads(body)["detail"], (host, path, body)
    malformed = ([("Host", "rebound.example@127.0.0.1")], [("Host", "")], [("Host", "localhost"), ("Host", "rebound.example")], [])
    for headers in malformed:  # h11 itself refuses a missing or repeated Host; the app refuses the rest
        status, _, _ = request(served, "GET", "/run", headers)
        assert status == 400, headers
    with socket.create_connection(("127.0.0.1", port), timeout=10) as connection:  # HTTP/1.0 may leave Host out
        connection.sendall(b"GET /run HTTP/1.0\r\n\r\n")
        response = http.client.HTTPResponse(connection)
        response.begin()
        assert response.status == 400 and "Host" in json.loads(response.read())["detail"]


def test_request_bodies_are_bounded_before_they_are_read(served):
    from dalle_framework.serve import MAX_REQUEST_BYTES

    host = ("Host", "localhost")
    json_body = ("Content-Type", "application/json")
    # 20 MB announced, 4 KB sent: the answer comes at once, without waiting for (or reading) the rest.
    started = time.monotonic()
    status, body, connection = request(served, "POST", "/generate", [host, json_body, ("Content-Length", str(20 * 2**20))], b'{"caption": "' + b"x" * 4000)
    assert status == 413 and f"{MAX_REQUEST_BYTES} bytes" in json.loads(body)["detail"] and connection == "close"
    assert time.monotonic() - started < 5
    assert request(served, "POST", "/generate", [host, json_body, ("Content-Length", str(MAX_REQUEST_BYTES + 1))])[0] == 413
    status, body, _ = request(served, "POST", "/generate", [host, json_body])
    assert status == 411 and "Content-Length: required" in json.loads(body)["detail"]
    status, body, _ = request(served, "POST", "/generate", [host, json_body, ("Transfer-Encoding", "chunked")], b"5\r\nhello\r\n0\r\n\r\n")
    assert status == 411 and "Content-Length" in json.loads(body)["detail"]
    for length in ("-1", "twelve", "1e3", "9" * 5000):  # h11 refuses these before the app sees them
        assert request(served, "POST", "/generate", [host, json_body, ("Content-Length", length)])[0] == 400, length
    within = json.dumps({"caption": "x" * 1000}).encode()  # read and parsed: over max_caption_chars, not over the body bound
    status, body, _ = request(served, "POST", "/generate", [host, json_body, ("Content-Length", str(len(within)))], within)
    assert status == 422 and "max_caption_chars" in json.loads(body)["detail"]


def test_host_names_are_the_bound_address_and_loopback_aliases_only_on_loopback():
    from dalle_framework.serve import LOOPBACK_NAMES, host_names

    assert host_names("127.0.0.1") == LOOPBACK_NAMES and host_names("::1") == LOOPBACK_NAMES
    assert host_names("localhost", ["Pictures.Example"]) == LOOPBACK_NAMES | {"pictures.example"}
    assert host_names("0.0.0.0") == {"0.0.0.0"}  # every interface: clients' names must be given (--allowed-host)
    assert host_names("192.168.1.5", [ALLOWED_HOST]) == {"192.168.1.5", ALLOWED_HOST}
    assert host_names("2001:db8::1") == {"[2001:db8::1]"}


@pytest.mark.parametrize(
    "headers, status",
    [
        ({"host": "localhost", "content-length": "-1"}, 400),
        ({"host": "localhost", "content-length": "0x10"}, 400),
        ({"host": "localhost", "content-length": "１２"}, 400),  # fullwidth digits: isdigit() on str would take them
        ({"host": "localhost"}, 411),
        ({"host": "localhost", "content-length": "65537"}, 413),
        ({"host": "localhost", "content-length": "65536"}, None),
    ],
)
def test_the_guard_checks_lengths_itself(headers, status):
    """What h11 already refuses in front of the app, the guard refuses too, for a server that lets it through."""
    from dalle_framework.serve import LOOPBACK_NAMES, RequestGuard

    scope = {"type": "http", "method": "POST", "headers": [(k.encode(), v.encode()) for k, v in headers.items()]}
    refusal = RequestGuard(None, LOOPBACK_NAMES).refusal(scope)
    assert (refusal and refusal[0]) == status, refusal


# ----------------------------------------------------------------------------- a real browser


def _browser_paths() -> tuple[str, str]:
    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    driver = shutil.which("chromedriver") or "/usr/bin/chromedriver"
    missing = [p for p in (chromium, driver) if not Path(p).exists()]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("the selenium package (pip install -e '.[test]')")
    if missing:
        message = f"no headless browser ({', '.join(missing)} missing); apt-get install chromium chromium-driver"
        if os.environ.get("DALLE_REQUIRE_DATA") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return chromium, driver


def api(url: str, path: str, body: Optional[dict] = None) -> dict:
    """GET ``path``, or POST ``body`` to it (an empty body, with its length, when None and the path cancels)."""
    import urllib.request

    data = json.dumps(body).encode() if body is not None else (b"" if path.endswith("/cancel") else None)
    call = urllib.request.Request(url + path, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(call, timeout=30) as response:
        return json.load(response)


def download_name(caption: str, seed: int, what: str) -> str:
    """The file name the page gives a download: caption slug, seed, then rank1, rank2, ... or grid."""
    return f"{'-'.join(caption.lower().split())}-seed{seed}-{what}.png"


@pytest.mark.slow
def test_page_in_headless_chromium(served, tmp_path):
    chromium, driver_path = _browser_paths()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1400,1000"):
        options.add_argument(flag)
    browser = webdriver.Chrome(service=Service(driver_path), options=options)
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    browser.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
    status = lambda: browser.find_element(By.ID, "status").text  # noqa: E731

    def fill(**boxes) -> None:
        for name, value in boxes.items():
            box = browser.find_element(By.ID, name)
            box.clear()
            box.send_keys(str(value))

    def generate_on_page(**boxes) -> str:
        """Fill the form, generate, wait for the kept images to load; the job's id."""
        fill(**boxes)
        browser.find_element(By.ID, "generate").click()
        loaded = "return [...document.querySelectorAll('#results img')].every(i => i.complete && i.naturalWidth > 0)"
        WebDriverWait(browser, 300).until(
            lambda b: len(b.find_elements(By.CSS_SELECTOR, "#results figure")) == int(boxes["keep"]) and b.execute_script(loaded)
            and not b.find_element(By.ID, "generate").get_attribute("disabled")
        )
        return browser.find_element(By.ID, "results").get_attribute("data-job")

    try:
        browser.get(served + "/")
        WebDriverWait(browser, 30).until(lambda b: b.find_element(By.ID, "components").text.strip())
        assert "dense-transformer" in browser.find_element(By.ID, "components").text
        WebDriverWait(browser, 30).until(lambda b: b.find_element(By.ID, "guidance_scale-explain").text)
        for setting in ("top_k", "top_p", "temperature", "guidance_scale"):  # one line each on raising or lowering it
            explanation = browser.find_element(By.ID, f"{setting}-explain").text
            assert "higher" in explanation and "lower" in explanation, setting
        assert not browser.find_element(By.ID, "cancel").is_displayed()

        first = generate_on_page(caption=CAPTION, candidates=16, keep=4, seed=3)
        figures = browser.find_elements(By.CSS_SELECTOR, "#results figure")
        scores = [float(f.get_attribute("data-score")) for f in figures]
        assert scores == sorted(scores, reverse=True), scores
        assert [f.get_attribute("data-rank") for f in figures] == ["1", "2", "3", "4"]
        assert "score" in figures[0].text and "seed 3" in status()
        assert browser.find_element(By.ID, "metrics").text.strip() != "none recorded"

        # A download link per image and one for the grid, named by caption, seed and rank; each fetches the PNG served.
        links = browser.find_elements(By.CSS_SELECTOR, "#results a.download") + [browser.find_element(By.ID, "grid-download")]
        names = [link.get_attribute("download") for link in links]
        assert names == [download_name(CAPTION, 3, f"rank{rank}") for rank in range(1, 5)] + [download_name(CAPTION, 3, "grid")]
        job = api(served, f"/jobs/{first}")
        assert [link.get_attribute("href") for link in links] == [served + i["url"] for i in job["images"]] + [served + job["grid_url"]]
        fetched = browser.execute_async_script(
            "const done = arguments[arguments.length - 1];"
            "Promise.all(arguments[0].map((a) => fetch(a.href).then((r) => r.arrayBuffer())"
            "  .then((b) => Array.from(new Uint8Array(b).slice(0, 8)))))"
            ".then(done, (e) => done(String(e)));",
            links,
        )
        assert fetched == [list(b"\x89PNG\r\n\x1a\n")] * 5, fetched
        links[-1].click()  # the browser saves the grid under its download name
        saved = downloads / names[-1]
        WebDriverWait(browser, 30).until(lambda b: saved.is_file() and not list(downloads.glob("*.crdownload")))
        import urllib.request

        assert saved.read_bytes() == urllib.request.urlopen(served + job["grid_url"], timeout=30).read()

        # A second result; the history lists both, newest first, and clicking the earlier one shows it again.
        second = generate_on_page(caption="a red circle in the center", candidates=2, keep=1, seed=4)
        WebDriverWait(browser, 30).until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "#history li")) == 2)
        entries = browser.find_elements(By.CSS_SELECTOR, "#history li")
        assert [e.get_attribute("data-job") for e in entries] == [second, first]
        assert "a red circle in the center" in entries[0].text and CAPTION in entries[1].text and "seed 3" in entries[1].text
        entries[1].find_element(By.TAG_NAME, "button").click()
        shown = [img.get_attribute("src") for img in browser.find_elements(By.CSS_SELECTOR, "#results img")]
        assert shown == [served + image["url"] for image in job["images"]] and "seed 3" in status()
        assert browser.find_element(By.ID, "grid-download").get_attribute("download") == names[-1]
        shot = tmp_path / "serve.png"
        assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
        if os.environ.get("DALLE_SERVE_SCREENSHOT"):
            shutil.copyfile(shot, os.environ["DALLE_SERVE_SCREENSHOT"])

        # Behind a long job the page's job waits, showing its place in line; Cancel drops it before it runs.
        blocker = api(served, "/generate", {"caption": CAPTION, "candidates": LONG, "keep": 1, "seed": 0})
        fill(caption=CAPTION, candidates=2, keep=1, seed=5)
        browser.find_element(By.ID, "generate").click()
        WebDriverWait(browser, 30).until(lambda b: "position 1" in status())
        cancel = browser.find_element(By.ID, "cancel")
        assert cancel.is_displayed()
        cancel.click()
        WebDriverWait(browser, 30).until(lambda b: status() == "cancelled before it ran")
        assert not cancel.is_displayed() and not browser.find_elements(By.CSS_SELECTOR, "#results figure")
        dropped = next(j for j in api(served, "/jobs") if j["seed"] == 5)
        assert dropped["status"] == "cancelled" and dropped["elapsed"] is None
        api(served, f"/jobs/{blocker['id']}/cancel")

        # A running job: Cancel stops it midway.
        fill(caption=CAPTION, candidates=LONG, keep=1, seed=6)
        browser.find_element(By.ID, "generate").click()
        WebDriverWait(browser, 60).until(lambda b: "drawing image tokens" in status())
        cancel.click()
        WebDriverWait(browser, 60).until(lambda b: status().startswith("cancelled after"))
        stopped = next(j for j in api(served, "/jobs") if j["seed"] == 6)
        assert stopped["status"] == "cancelled" and 0 < stopped["progress"]["done"] < stopped["progress"]["total"]
        assert api(served, f"/jobs/{blocker['id']}")["status"] == "cancelled"
        WebDriverWait(browser, 30).until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "#history li[data-status=cancelled]")) == 3)
    finally:
        browser.quit()


def test_an_untrained_run_is_refused_before_anything_loads(tmp_path):
    """`dalle serve` asks the pipeline whether the run can generate: a codec and a prior with weights."""
    from dalle_framework import UsageError
    from dalle_framework.pipeline import Pipeline

    pipe = Pipeline.from_recipe("shapes-demo", [f"output_dir={tmp_path / 'empty'}"], device="cpu")
    with pytest.raises(UsageError, match=r"nothing to serve: no trained ImageCodec; train the run first \(`dalle train .*empty`\)"):
        pipe.check_can_generate(what="nothing to serve")
    assert pipe._components == {}  # nothing was built to find out


def test_the_pages_settings_are_samplings_fields_with_their_bounds():
    """The request's sampling fields are made from Sampling's: the same names and the same bounds."""
    from pydantic import ValidationError as Invalid

    from dalle_framework import Sampling
    from dalle_framework.serve.api import PAGE_SETTINGS, GenerateRequest

    assert set(PAGE_SETTINGS) <= set(Sampling.model_fields) and set(PAGE_SETTINGS) <= set(GenerateRequest.model_fields)
    for name, value in {"temperature": 1e5, "top_k": 0, "top_p": 1.5, "guidance_scale": 1001}.items():
        for model in (Sampling, GenerateRequest):
            with pytest.raises(Invalid, match=name):
                model.model_validate({"caption": "x", name: value} if model is GenerateRequest else {name: value})
    assert GenerateRequest.model_validate({"caption": "x", "guidance": 3}).guidance_scale == 3  # the older name
