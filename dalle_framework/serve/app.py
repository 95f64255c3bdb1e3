"""The app: run facts for the page, the Host and body checks before the app, the routes."""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import math
import re
import secrets
import socket
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Optional

from pydantic import ValidationError

from .. import rundir
from ..errors import UsageError, problem_lines, validation_problems

from .api import PAGE_SETTINGS, ErrorOut, GenerateRequest, JobOut, Limits
from .jobs import JobQueue, NotCancellable, QueueFull, _Job

if TYPE_CHECKING:  # the model side is imported where it is used: `dalle serve --help` loads no torch
    from ..pipeline import Pipeline

PAGE_FILES = {"/": ("serve.html", "text/html"), "/app.js": ("serve.js", "text/javascript"), "/app.css": ("serve.css", "text/css")}
MAX_REQUEST_BYTES = 64 * 1024  # a generate request is a caption and a few numbers, well under 1 KiB
MAX_JSON_DEPTH = 32  # run files nest a few levels; a deeper one would overflow the /run response's encoder
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "[::1]"})
# A Host header: a name (perhaps ending in the root's dot) or IPv4 address, or an IPv6 address in brackets; then an optional port.
_HOST = re.compile(r"(?P<name>\[[0-9a-f:.]+\]|[a-z0-9_-]+(?:\.[a-z0-9_-]+)*\.?)(?::(?P<port>[0-9]{1,5}))?")



# ----------------------------------------------------------------------------- run facts


def run_info(pipeline: Pipeline, limits: Limits) -> dict[str, Any]:
    """What ``GET /run`` answers: the recipe's components, each stage's held-out metrics, defaults, limits."""
    from ..interfaces import ImageCodec

    recipe = pipeline.recipe
    run_dir = Path(pipeline.run_dir)
    codec = pipeline.part(ImageCodec)
    components: dict[str, Any] = {}
    blocks = {"data": recipe.data, "tokenizer": recipe.tokenizer, **recipe.stages}
    for kind, block in blocks.items():
        entry: dict[str, Any] = {"name": block.name, "params": block.params.model_dump(mode="json")}
        meta = _read_json(run_dir / kind / rundir.META_FILE)
        if meta is not None:
            entry.update({key: meta.get(key) for key in ("plugin", "step", "seconds", "metrics")})
        components[kind] = entry
    return {
        "run": run_dir.name,
        "recipe": recipe.name,
        "description": recipe.description,
        "examples": _example_captions(pipeline),
        "device": str(pipeline.device),
        "image_size": int(codec.image_size),
        "grid": list(codec.grid),
        "reranker": pipeline.scorer() is not None,
        "components": components,
        "evaluation": _read_json(run_dir / "eval" / "report.json"),
        "defaults": recipe.generate.model_dump(mode="json"),
        "limits": limits.model_dump(),
    }


def _example_captions(pipeline: Pipeline, count: int = 10) -> list[str]:
    """Captions to offer on the page: the recipe's own, else held-out ones of its data (none if unreadable)."""
    if pipeline.recipe.generate.captions:
        return list(pipeline.recipe.generate.captions)[:count]
    try:
        return list(dict.fromkeys(pipeline.data.captions("heldout")))[:count]
    except (UsageError, OSError):
        return []


def _read_json(path: Path) -> Optional[dict[str, Any]]:
    """A JSON object file of the run, as strict JSON for the page; None when it is missing, unreadable,
    not a regular file, not an object or nested absurdly deep (the page shows what there is)."""
    try:
        data = rundir.read_json(path)
        return _strict_json(data) if isinstance(data, dict) else None
    except (UsageError, OSError, ValueError):
        return None


def _strict_json(value: Any, depth: int = 0) -> Any:
    """``value`` with NaN and infinities (a metric that could not be computed) as null, as the page's JSON has no
    such numbers; ValueError when nested past ``MAX_JSON_DEPTH``."""
    if depth > MAX_JSON_DEPTH:
        raise ValueError(f"nested over {MAX_JSON_DEPTH} levels deep")
    if isinstance(value, dict):
        return {key: _strict_json(item, depth + 1) for key, item in value.items()}
    if isinstance(value, list):
        return [_strict_json(item, depth + 1) for item in value]
    return None if isinstance(value, float) and not math.isfinite(value) else value


# ----------------------------------------------------------------------------- the socket and what reaches the app


def host_name(text: str) -> str:
    """``text`` as a Host header names it: lower case, an IPv6 address in brackets. ValueError if it is no host name."""
    name = text.strip().lower()
    with contextlib.suppress(ValueError):
        if ipaddress.ip_address(name).version == 6:
            name = f"[{name}]"
    match = _HOST.fullmatch(name)
    if match is None or match["port"]:
        raise ValueError(f"{text!r} is not a host name; give a name or address without a port, e.g. pictures.example.org")
    return name


def is_loopback(host: str) -> bool:
    """Whether a server bound to ``host`` is reachable from this machine only."""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host.lower() == "localhost"


def host_names(bound: str, extra: Iterable[str] = ()) -> frozenset[str]:
    """The Host header names a server bound to ``bound`` answers to: that one, loopback's names when it is
    a loopback address, and ``extra`` (``--allowed-host``)."""
    names = {host_name(bound), *map(host_name, extra)}
    return frozenset(names | LOOPBACK_NAMES if is_loopback(bound) else names)


def listen_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port`` for uvicorn to serve on; one that cannot be bound is a
    UsageError naming ``--host`` or ``--port`` and the fix."""
    address = host.strip("[]")  # an IPv6 address may come bracketed, as in a URL
    try:
        family, kind, proto, _, where = socket.getaddrinfo(address, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as exc:
        raise UsageError(f"--host {host}: cannot be resolved ({exc.strerror}); give an address of this machine, e.g. 127.0.0.1") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: a restart can rebind at once
    try:
        sock.bind(where)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise UsageError(f"--port {port}: already in use on {host}; stop what serves there or choose another --port") from None
        if exc.errno == errno.EADDRNOTAVAIL:
            raise UsageError(f"--host {host}: not an address of this machine; give one of its own (127.0.0.1: this machine only)") from None
        if exc.errno == errno.EACCES:
            raise UsageError(f"--port {port}: permission denied (ports below 1024 need privileges); choose --port 1024 or above") from None
        raise UsageError(f"--host {host} --port {port}: cannot bind ({exc.strerror}); choose another --host or --port") from None
    return sock


class RequestGuard:
    """ASGI middleware that answers, before the app reads a byte of the request:

    - 400/403 to a request without exactly one Host header naming one of ``allowed_hosts``: a page that
      rebinds its own domain to this machine's address can send requests here, but with its domain as Host;
    - 411 to a body without a Content-Length (chunked bodies have no length up front), 400 to a bad one,
      413 to one over ``MAX_REQUEST_BYTES``, so no body is buffered or parsed past the bound.
    """

    def __init__(self, app: Any, allowed_hosts: Iterable[str]) -> None:
        self.app = app
        self.allowed_hosts = frozenset(map(host_name, allowed_hosts))

    async def __call__(self, scope, receive, send) -> None:
        refusal = self.refusal(scope) if scope["type"] == "http" else None
        if refusal is None:
            return await self.app(scope, receive, send)
        from starlette.responses import JSONResponse

        status, detail = refusal
        # The body of a refused request is never read, so the connection cannot carry another one.
        await JSONResponse({"detail": detail}, status, headers={"Connection": "close"})(scope, receive, send)

    def refusal(self, scope) -> Optional[tuple[int, str]]:
        """(status, message) for a request to refuse, else None."""
        headers: dict[bytes, list[bytes]] = {}
        for name, value in scope["headers"]:
            headers.setdefault(name, []).append(value)
        hosts = headers.get(b"host", [])
        host = _HOST.fullmatch(hosts[0].decode("latin-1").lower()) if len(hosts) == 1 else None
        if host is None:
            return 400, "Host: send exactly one Host header naming this server (HTTP/1.1 requires it)"
        if host["name"] not in self.allowed_hosts:
            return 403, f"Host {host['name']}: not a name this server answers to; if it is one, restart dalle serve with --allowed-host {host['name']}"
        if b"transfer-encoding" in headers:
            return 411, "Transfer-Encoding: not accepted; send the body with a Content-Length"
        lengths = headers.get(b"content-length")
        if lengths is None:
            return None if scope["method"] in ("GET", "HEAD", "OPTIONS") else (411, "Content-Length: required; send the body with its length")
        if len(lengths) != 1 or not lengths[0].isdigit():
            return 400, "Content-Length: give one whole number of bytes"
        # Digits counted first: int() refuses numbers of over 4300 digits.
        if len(lengths[0]) > len(str(MAX_REQUEST_BYTES)) or int(lengths[0]) > MAX_REQUEST_BYTES:
            return 413, f"Content-Length: over this server's bound of {MAX_REQUEST_BYTES} bytes; a request is a caption and a few options"
        return None


# ----------------------------------------------------------------------------- the app


def create_app(pipeline: Pipeline, limits: Optional[Limits] = None, *, allowed_hosts: Iterable[str] = LOOPBACK_NAMES):
    """The FastAPI app over a loaded :class:`~dalle_framework.pipeline.Pipeline` (codec and prior trained),
    answering requests whose Host header is one of ``allowed_hosts`` (see :func:`host_names`)."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response

    from ..interfaces import Prior

    limits = limits or Limits()
    jobs = JobQueue(pipeline, limits)
    info = run_info(pipeline, limits)  # also loads the codec, so a broken run fails at start
    pipeline.part(Prior)  # load the prior now, not on the first request
    pages = {route: (resources.files("dalle_framework").joinpath("static", name).read_bytes(), kind) for route, (name, kind) in PAGE_FILES.items()}

    @asynccontextmanager
    async def lifespan(app):
        yield
        jobs.close()

    app = FastAPI(
        title="dalle serve",
        description=f"Text-to-image generation from the trained run `{info['run']}` (recipe `{info['recipe']}`).",
        version="1",
        lifespan=lifespan,
        docs_url=None,  # Swagger UI and ReDoc load scripts from a CDN; the schema is at /openapi.json
        redoc_url=None,
    )
    app.state.jobs = jobs
    app.add_middleware(RequestGuard, allowed_hosts=allowed_hosts)
    errors = {422: {"model": ErrorOut}, 404: {"model": ErrorOut}}

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError):
        """One readable line per problem: ``candidates: Input should be greater than or equal to 1``."""
        detail = validation_problems(exc, name=lambda loc: ".".join(map(str, loc[1:])) or "body")  # loc[0] is "body"
        return JSONResponse({"detail": detail}, status_code=422)

    def page(route: str):
        body, kind = pages[route]
        return lambda: Response(body, media_type=kind)

    for route in pages:
        app.add_api_route(route, page(route), methods=["GET"], include_in_schema=False)

    @app.get("/run", summary="the run: recipe components, held-out metrics, generation defaults, limits")
    def get_run() -> dict[str, Any]:
        return info

    _add_job_routes(app, pipeline, limits, jobs, errors)
    return app


def _add_job_routes(app: Any, pipeline: Pipeline, limits: Limits, jobs: JobQueue, errors: dict[int, Any]) -> None:
    """The job API: queue a generation, list, poll and cancel jobs, fetch their PNGs."""
    from fastapi import HTTPException
    from fastapi.responses import JSONResponse, Response

    @app.post(
        "/generate",
        status_code=202,
        response_model=JobOut,
        responses={**errors, 400: {"model": ErrorOut}, 429: {"model": ErrorOut}},
        summary="queue a generation job; poll GET /jobs/{id} for progress and the images",
    )
    def generate(request: GenerateRequest) -> JobOut:
        job = _new_job(pipeline, limits, request)
        try:
            jobs.submit(job)
        except QueueFull as exc:
            raise HTTPException(429, str(exc), headers={"Retry-After": "5"}) from None
        return jobs.describe(job.id)

    def unknown(job_id: str) -> HTTPException:
        return HTTPException(404, f"no job {job_id!r} here (finished jobs are kept until {limits.max_results} newer ones finish)")

    @app.get("/jobs", response_model=list[JobOut], summary="the jobs held, newest first: waiting, running and the last finished ones")
    def list_jobs() -> list[JobOut]:
        return jobs.history()

    @app.get("/jobs/{job_id}", response_model=JobOut, responses=errors, summary="a job's status, progress and, when done, its images")
    def get_job(job_id: str) -> JobOut:
        out = jobs.describe(job_id)
        if out is None:
            raise unknown(job_id)
        return out

    @app.post(
        "/jobs/{job_id}/cancel",
        response_model=JobOut,
        responses={202: {"model": JobOut}, 404: {"model": ErrorOut}, 409: {"model": ErrorOut}},
        summary="cancel a job: a queued one is dropped (200, cancelled); a running one stops at its next drawn token (202, poll it)",
    )
    def cancel_job(job_id: str):
        try:
            out = jobs.cancel(job_id)
        except NotCancellable as exc:
            raise HTTPException(409, str(exc)) from None
        if out is None:
            raise unknown(job_id)
        return JSONResponse(out.model_dump(mode="json"), status_code=200 if out.status == "cancelled" else 202)

    @app.get(
        "/images/{image_id}.png",
        response_class=Response,
        responses={200: {"content": {"image/png": {}}}, 404: {"model": ErrorOut}},
        summary="a PNG this server generated",
    )
    def get_image(image_id: str):
        png = jobs.image(image_id)
        if png is None:
            raise HTTPException(404, f"no image {image_id!r} here (images are evicted with their job)")
        return Response(png, media_type="image/png", headers={"Cache-Control": "private, max-age=3600"})


def _new_job(pipeline: Pipeline, limits: Limits, request: GenerateRequest):
    """Check ``request`` against the recipe and the bounds; a problem raises 422/400 naming the field."""
    from fastapi import HTTPException

    defaults = pipeline.recipe.generate
    caption = request.caption.strip()
    # Left-out sizes take the recipe's defaults, cut to this server's bounds.
    candidates = request.candidates or min(defaults.candidates, limits.max_candidates)
    keep = request.keep or min(defaults.keep, candidates, limits.max_keep)
    problems = []
    if not caption:
        problems.append("caption: give some words to draw")
    if len(caption) > limits.max_caption_chars:
        problems.append(f"caption: {len(caption)} characters, over this server's bound of {limits.max_caption_chars} (max_caption_chars)")
    if candidates > limits.max_candidates:
        problems.append(f"candidates: {candidates} is over this server's bound of {limits.max_candidates} (max_candidates)")
    if keep > limits.max_keep:
        problems.append(f"keep: {keep} is over this server's bound of {limits.max_keep} (max_keep)")
    if keep > candidates:
        problems.append(f"keep: {keep} is more than candidates ({candidates})")
    changes = {name: getattr(request, name) for name in PAGE_SETTINGS if getattr(request, name) is not None}
    try:
        sampling = defaults.sampling.with_changes(changes)
    except ValidationError as exc:
        problems += problem_lines(exc)
    if problems:
        raise HTTPException(422, "; ".join(problems))
    try:
        seen_as = pipeline.tokenizer.decode(pipeline.tokenizer.encode([caption]))[0]
    except (UsageError, ValueError, AssertionError) as exc:
        raise HTTPException(400, f"caption: the tokenizer cannot read it ({exc})") from None
    seed = request.seed if request.seed is not None else secrets.randbelow(2**31)
    return _Job(id=secrets.token_urlsafe(12), caption=caption, seen_as=seen_as, candidates=candidates, keep=keep, sampling=sampling, seed=seed)
