"""What every lmforge HTTP app shares (``lmforge serve``, ``lmforge support serve``): OpenAI-style
error objects, the API-key check, body-size and concurrency limits, and Prometheus metrics.

Errors are ``{"error": {"message", "type", "param", "code"}}`` with the right 4xx, never a stack
trace. Requests past ``max_concurrency`` in flight are answered 429 (not queued).
"""

from __future__ import annotations

import time
from typing import Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

MAX_BODY_BYTES = 1_000_000


RETRY_AFTER = {"Retry-After": "1"}  # seconds, on every 429


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code


def too_busy(message: str) -> APIError:
    return APIError(429, message, "rate_limit_error", code="rate_limit_exceeded")


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def unauthorized(message: str) -> JSONResponse:
    return JSONResponse(error_body(message, "authentication_error", code="invalid_api_key"), status_code=401)


def request_key(request: Request, query_param: str | None = None) -> str:
    """The key a request presents: ``Authorization: Bearer KEY``, or (for a page) ``?query_param=KEY``."""
    if query_param and query_param in request.query_params:
        return request.query_params[query_param]
    auth = request.headers.get("authorization", "")
    return auth[7:] if auth.startswith("Bearer ") else ""


class Metrics:
    """Prometheus metrics of one app (its own registry, so several apps can live in one process)."""

    def __init__(self, prefix: str = "lmforge"):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter(f"{prefix}_requests_total", "HTTP requests by endpoint and status",
                                ["endpoint", "status"], registry=self.registry)
        self.latency = Histogram(f"{prefix}_request_seconds", "Request latency (until the last byte of a stream)",
                                 ["endpoint"], registry=self.registry,
                                 buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
        self.prompt_tokens = Counter(f"{prefix}_prompt_tokens_total", "Prompt tokens processed", registry=self.registry)
        self.generated_tokens = Counter(f"{prefix}_generated_tokens_total", "Tokens generated", registry=self.registry)
        self.in_flight = Gauge(f"{prefix}_requests_in_flight", "Requests being served", registry=self.registry)

    def count_tokens(self, prompt: int = 0, generated: int = 0) -> None:
        """Tokens read and written for the request being served (also its key's and its audit line's)."""
        from lmforge.serve.access import request_usage

        self.prompt_tokens.inc(prompt)
        self.generated_tokens.inc(generated)
        usage = request_usage.get()
        if usage is not None:
            usage["prompt_tokens"] += prompt
            usage["completion_tokens"] += generated

    def gauge(self, name: str, help_: str, read: Callable[[], float]) -> None:
        """A gauge read from ``read()`` whenever /metrics is scraped."""
        from prometheus_client import Gauge

        Gauge(name, help_, registry=self.registry).set_function(read)

    def response(self) -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)


async def _after(body, done):
    """Pass a response body through, then call ``done()`` (also when the client goes away)."""
    try:
        async for chunk in body:
            yield chunk
    finally:
        done()


LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")


def allowed_hosts_for(bind: str, extra: list[str] | None = None) -> list[str] | None:
    """The ``Host`` names a server bound to ``bind`` answers: on a loopback address only loopback
    names (and ``extra``), so that a web page on another site cannot reach it through DNS
    rebinding; None (any) on a public address unless ``extra`` names them."""
    if bind in ("127.0.0.1", "localhost", "::1") or bind.startswith("127."):
        return list(LOOPBACK_NAMES) + [bind] + list(extra or [])
    return list(extra) if extra else None


def host_name(header: str) -> str:
    """``example.com:8000`` -> ``example.com``; ``[::1]:8000`` -> ``[::1]``."""
    if header.startswith("["):
        return header[:header.find("]") + 1]
    return header.split(":", 1)[0]


class BodyLimit:
    """ASGI middleware: reads a request's whole body before the app does and answers 413 as soon
    as more than ``max_body`` bytes arrive — with or without a ``Content-Length`` (a chunked body
    is counted as it is read, never buffered past the limit); then hands the app the body."""

    def __init__(self, app, max_body: int = MAX_BODY_BYTES):
        self.app, self.max_body = app, max_body

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left before the body was complete
                return
            size += len(message.get("body", b""))
            if size > self.max_body:
                too_large = JSONResponse(error_body(f"request body over {self.max_body} bytes",
                                                    "invalid_request_error"), status_code=413)
                return await too_large(scope, receive, send)
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        replayed = False
        scope["lmforge.body"] = b"".join(chunks)  # for the audit log's text

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()  # afterwards: the disconnect a streaming response listens for
        await self.app(scope, replay, send)


def install_api_basics(app: FastAPI, metrics: Metrics, check_auth: Callable[[Request], JSONResponse | None],
                       max_concurrency: int, max_body: int = MAX_BODY_BYTES,
                       allowed_hosts: list[str] | None = None, access=None) -> None:
    """Error handlers, the host / auth / size / concurrency guard, and request metrics for ``app``.

    ``check_auth(request)`` returns None to let a request through (the key it presented in
    ``request.state.key``), or the response refusing it. ``allowed_hosts`` (see
    :func:`allowed_hosts_for`): other ``Host`` headers are refused (400). ``access``
    (:class:`~lmforge.serve.access.Access`): the keys' rate limits and the audit log.
    """
    app.add_middleware(BodyLimit, max_body=max_body)  # innermost: behind the guard and the metrics

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return JSONResponse(error_body(exc.message, exc.type, exc.param, exc.code), status_code=exc.status,
                            headers=RETRY_AFTER if exc.status == 429 else None)

    @app.exception_handler(RequestValidationError)
    async def _validation(request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return JSONResponse(error_body(f"{where or 'body'}: {first.get('msg', 'invalid request')}",
                                       "invalid_request_error", where or None), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, exc: StarletteHTTPException):
        return JSONResponse(error_body(str(exc.detail), "invalid_request_error"), status_code=exc.status_code)

    in_flight = {"n": 0}

    @app.middleware("http")
    async def _guard(request: Request, call_next):
        if allowed_hosts is not None and host_name(request.headers.get("host", "")) not in allowed_hosts:
            return JSONResponse(error_body(f"this server does not answer for host {request.headers.get('host')!r} "
                                           "(start it with --allowed-host NAME to add one)", "invalid_request_error"),
                                status_code=400)
        refused = check_auth(request)
        if refused is not None:
            return refused
        key = getattr(request.state, "key", None)
        over = access.over_limit(key) if access is not None and key is not None else None
        if over is not None:
            return JSONResponse(error_body(over + "; retry shortly", "rate_limit_error", code="rate_limit_exceeded"),
                                status_code=429, headers=RETRY_AFTER)
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > max_body:
            return JSONResponse(error_body(f"request body over {max_body} bytes", "invalid_request_error"),
                                status_code=413)
        if request.method != "POST":
            return await call_next(request)
        if in_flight["n"] >= max_concurrency:
            return JSONResponse(error_body(f"more than {max_concurrency} requests in flight; retry shortly",
                                           "rate_limit_error", code="rate_limit_exceeded"), status_code=429,
                                headers=RETRY_AFTER)
        in_flight["n"] += 1
        try:
            response = await call_next(request)
        except BaseException:
            in_flight["n"] -= 1
            raise
        # A request holds its slot until the last byte is sent (a stream: until it ends or the
        # client leaves).
        response.body_iterator = _after(response.body_iterator, lambda: in_flight.__setitem__("n", in_flight["n"] - 1))
        return response

    def endpoint_of(request: Request) -> str:
        """The route's path template (bounded label values), or "other"."""
        for route in app.routes:
            if route.matches(request.scope)[0] == Match.FULL:
                return route.path
        return "other"

    # Added last, so outermost: refused requests (401, 413, 429) are counted too.
    @app.middleware("http")
    async def _measure(request: Request, call_next):
        from lmforge.serve.access import request_usage

        endpoint, t0 = endpoint_of(request), time.perf_counter()
        usage = {"prompt_tokens": 0, "completion_tokens": 0}
        request_usage.set(usage)  # the endpoints' tasks and threads see this one dict
        metrics.in_flight.inc()
        try:
            response = await call_next(request)
        except BaseException:
            metrics.in_flight.dec()
            metrics.requests.labels(endpoint, "500").inc()
            audit(request, endpoint, 500, t0, usage)
            raise

        def finish():
            metrics.in_flight.dec()
            metrics.requests.labels(endpoint, str(response.status_code)).inc()
            metrics.latency.labels(endpoint).observe(time.perf_counter() - t0)
            audit(request, endpoint, response.status_code, t0, usage)
        response.body_iterator = _after(response.body_iterator, finish)
        return response

    def audit(request: Request, endpoint: str, status: int, t0: float, usage: dict) -> None:
        if access is None:
            return
        key = getattr(request.state, "key", None)
        access.record(key, usage["prompt_tokens"] + usage["completion_tokens"])
        access.audit({"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                      "key": key.name if key else None, "role": key.role if key else None,
                      "method": request.method, "endpoint": endpoint, "status": status, **usage,
                      "latency_ms": round((time.perf_counter() - t0) * 1000, 1)}, request.scope.get("lmforge.body"))

    @app.get("/metrics")
    async def _prometheus():
        return metrics.response()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args: list[str], env: dict | None = None, timeout: float = 120.0, command: list[str] | None = None,
                 verify: str | None = None):
    """``python -m lmforge ARGS --port P`` (or ``COMMAND ARGS --port P``) on a free port (a server
    command: ``serve``, ``support serve``, a container's entry); returns ``(process, base_url)``
    once ``/health`` answers 200, polled with a deadline. The caller terminates the process.
    ``verify`` (a CA or self-signed certificate file): the server speaks HTTPS."""
    import os
    import subprocess
    import sys

    import httpx

    port = free_port()
    proc = subprocess.Popen([*(command or [sys.executable, "-m", "lmforge"]), *args, "--port", str(port)],
                            stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    base = f"{'https' if verify else 'http'}://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(base + "/health", timeout=1, verify=verify or True).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"{' '.join(command or ['lmforge', *args[:1]])} did not start: "
                               + proc.stderr.read().decode()[-2000:])
        time.sleep(0.2)
