"""``dalle serve``: a web page and a JSON API over a trained run.

    >>> app = create_app(Pipeline.load("runs/shapes-demo"), Limits())
    >>> uvicorn.run(app, host="127.0.0.1", port=8000)

``POST /generate`` queues a job and answers its id at once; one worker thread
runs the jobs one at a time on the model's device, reporting how many image
tokens are drawn; ``GET /jobs/{id}`` shows progress and, when done, the ranked
images as PNG URLs with their reranker scores. ``GET /jobs`` lists the jobs held
(the page's history), newest first; ``POST /jobs/{id}/cancel`` drops a queued job
or stops a running one at its next drawn token. Every bound (queue length,
candidates, keep, caption length, run time) is a :class:`Limits` field, and a
request over one is answered 4xx with a message naming the field and the bound.

The server serves only what it made: PNG bytes kept in memory under random ids,
evicted oldest first once ``max_results`` finished jobs are held, plus the page's
three files, read from the package at start. No route maps a path to a file.

Before the app sees a request, :class:`RequestGuard` refuses one whose Host header
is not a name the server answers to (403: a DNS-rebinding page names its own
domain there) and a body not framed by a Content-Length of at most
``MAX_REQUEST_BYTES`` (411/400/413, unread).

The parts: :mod:`.api` (the request and response models, :class:`Limits`), :mod:`.jobs` (the queue and
its worker), :mod:`.app` (run facts, the Host and body guard, the routes).
"""

from .api import ErrorOut, GenerateRequest, ImageOut, JobOut, Limits, Progress
from .app import LOOPBACK_NAMES, MAX_REQUEST_BYTES, RequestGuard, create_app, host_name, host_names, is_loopback, listen_socket, run_info
from .jobs import JobQueue, NotCancellable, QueueFull, png_bytes

__all__ = [
    "LOOPBACK_NAMES",
    "MAX_REQUEST_BYTES",
    "ErrorOut",
    "GenerateRequest",
    "ImageOut",
    "JobOut",
    "JobQueue",
    "Limits",
    "NotCancellable",
    "Progress",
    "QueueFull",
    "RequestGuard",
    "create_app",
    "host_name",
    "host_names",
    "is_loopback",
    "listen_socket",
    "png_bytes",
    "run_info",
]
