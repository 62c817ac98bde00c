"""``lmforge serve``: an OpenAI-compatible HTTP API over a run directory (FastAPI + uvicorn).

Endpoints: ``GET /health`` (no auth), ``GET /v1/models``, ``POST /v1/completions`` and
``POST /v1/chat/completions`` (OpenAI request/response schemas; ``stream: true`` gives Server-Sent
Events ending with ``data: [DONE]``). Errors are OpenAI-style objects, never stack traces.

This first version generates one request at a time (a lock around the model, generation in a
worker thread so the event loop stays free); continuous batching is the next step.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from pathlib import Path
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from lmforge.data.tokenizer import EOT
from lmforge.generate import stream_text

MAX_BODY_BYTES = 1_000_000
# The chat template used when the run directory has no chat_template.json: each message on its own
# lines after a role marker, then the assistant marker; generation stops at the next user marker.
DEFAULT_CHAT_TEMPLATE = {"system": "### System:\n{content}\n\n", "user": "### User:\n{content}\n\n",
                         "assistant": "### Assistant:\n{content}\n\n", "generation_prompt": "### Assistant:\n",
                         "stop": ["### User:", "### System:"]}


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class _Sampling(BaseModel):
    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = Field(default=1, ge=1, le=16)
    stream: bool = False


class CompletionRequest(_Sampling):
    prompt: str | list[str]


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)


class Engine:
    """The loaded run and the lock that serialises generation."""

    def __init__(self, run_dir: str | Path, max_tokens_cap: int = 1024):
        from lmforge.runs import load_run

        self.run = load_run(run_dir)
        self.name = Path(run_dir).resolve().name
        self.cap = max_tokens_cap
        self.lock = threading.Lock()
        self.eot = self.run.tokenizer.token_to_id(EOT)
        path = Path(run_dir) / "chat_template.json"
        self.chat_template = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else DEFAULT_CHAT_TEMPLATE
        self.created = int(time.time())
        self.on_tokens = lambda prompt, generated: None  # set by the app (metrics)

    def render_chat(self, messages: list[ChatMessage]) -> str:
        t = self.chat_template
        return "".join(t[m.role].format(content=m.content) for m in messages) + t["generation_prompt"]

    def check(self, req: _Sampling, prompt: str) -> list[int]:
        if self.run.config.arch != "gpt" or getattr(self.run.model.config, "num_labels", 0):
            kind = "a classifier" if getattr(self.run.model.config, "num_labels", 0) else "an encoder"
            raise APIError(400, f"{self.name!r} is {kind}, not a text generator: it cannot serve completions",
                           param="model", code="unsupported_model")
        if req.model not in (self.name, "lmforge"):
            raise APIError(400, f"unknown model {req.model!r}; this server serves {self.name!r}", param="model",
                           code="model_not_found")
        max_tokens = req.max_tokens or 16
        if max_tokens > self.cap:
            raise APIError(400, f"max_tokens {max_tokens} is over this server's cap of {self.cap}", param="max_tokens")
        ids = self.run.tokenizer.encode(prompt, add_special_tokens=False).ids
        context = self.run.model.config.block_size
        if len(ids) >= context:
            raise APIError(400, f"the prompt has {len(ids)} tokens; this model's context is {context}",
                           param="prompt", code="context_length_exceeded")
        return ids

    def generate(self, ids: list[int], req: _Sampling, seed: int | None, stop: list[str]):
        """Generator of text pieces; returns {"completion_tokens", "finish_reason"}."""
        with self.lock:
            result = yield from stream_text(self.run.model, self.run.tokenizer, "", req.max_tokens or 16,
                                            req.temperature, None, req.top_p if req.top_p < 1 else None, seed,
                                            stop, self.eot, prompt_ids=ids)
        self.on_tokens(len(ids), result["completion_tokens"])
        return result


async def _iterate_in_thread(gen):
    """Drive a blocking generator in a worker thread; yields its items, then ("__result__", value).

    If the consumer goes away (a client disconnects mid-stream), the worker stops the generator at
    its next item, which ends the generation and frees the model for the next request.
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    done = object()
    cancelled = threading.Event()

    def work():
        try:
            while True:
                if cancelled.is_set():
                    gen.close()
                    break
                try:
                    item = next(gen)
                except StopIteration as e:
                    loop.call_soon_threadsafe(queue.put_nowait, ("__result__", e.value))
                    break
                loop.call_soon_threadsafe(queue.put_nowait, item)
        except BaseException as e:  # surface errors to the request, not the thread
            loop.call_soon_threadsafe(queue.put_nowait, ("__error__", e))
        finally:
            loop.call_soon_threadsafe(queue.put_nowait, done)

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    try:
        while True:
            item = await queue.get()
            if item is done:
                return
            if isinstance(item, tuple) and item and item[0] == "__error__":
                raise item[1]
            yield item
    finally:
        cancelled.set()


class Metrics:
    """Prometheus metrics of one app (its own registry, so several apps can live in one process)."""

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("lmforge_requests_total", "HTTP requests by endpoint and status",
                                ["endpoint", "status"], registry=self.registry)
        self.latency = Histogram("lmforge_request_seconds", "Request latency (until the last byte of a stream)",
                                 ["endpoint"], registry=self.registry,
                                 buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
        self.prompt_tokens = Counter("lmforge_prompt_tokens_total", "Prompt tokens processed", registry=self.registry)
        self.generated_tokens = Counter("lmforge_generated_tokens_total", "Tokens generated", registry=self.registry)
        self.in_flight = Gauge("lmforge_requests_in_flight", "Requests being served", registry=self.registry)


async def _after(body, done):
    """Pass a response body through, then call ``done()`` (also when the client goes away)."""
    try:
        async for chunk in body:
            yield chunk
    finally:
        done()


def create_app(engine: Engine, api_key: str | None = None, max_concurrency: int = 16) -> FastAPI:
    app = FastAPI(title="lmforge", docs_url=None, redoc_url=None)
    in_flight = {"n": 0}
    metrics = Metrics()
    engine.on_tokens = lambda prompt, generated: (metrics.prompt_tokens.inc(prompt),
                                                  metrics.generated_tokens.inc(generated))

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return JSONResponse(error_body(exc.message, exc.type, exc.param, exc.code), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _validation(request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return JSONResponse(error_body(f"{where or 'body'}: {first.get('msg', 'invalid request')}",
                                       "invalid_request_error", where or None), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, exc: StarletteHTTPException):
        return JSONResponse(error_body(str(exc.detail), "invalid_request_error"), status_code=exc.status_code)

    @app.middleware("http")
    async def _guard(request: Request, call_next):
        if request.url.path != "/health" and api_key:
            if request.headers.get("authorization", "") != f"Bearer {api_key}":
                return JSONResponse(error_body("invalid or missing API key", "authentication_error",
                                               code="invalid_api_key"), status_code=401)
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > MAX_BODY_BYTES:
            return JSONResponse(error_body(f"request body over {MAX_BODY_BYTES} bytes", "invalid_request_error"),
                                status_code=413)
        if request.method != "POST":
            return await call_next(request)
        # Past --max-concurrency, requests are refused with 429 rather than queued without bound.
        if in_flight["n"] >= max_concurrency:
            return JSONResponse(error_body(f"more than {max_concurrency} requests in flight; retry shortly",
                                           "rate_limit_error", code="rate_limit_exceeded"), status_code=429)
        in_flight["n"] += 1
        try:
            response = await call_next(request)
        except BaseException:
            in_flight["n"] -= 1
            raise
        # A response from call_next always has a body iterator; a request holds its slot until the
        # last byte is sent (a stream: until it ends or the client leaves).
        response.body_iterator = _after(response.body_iterator, lambda: in_flight.__setitem__("n", in_flight["n"] - 1))
        return response

    # Added last, so outermost: refused requests (401, 413, 429) are counted too.
    @app.middleware("http")
    async def _measure(request: Request, call_next):
        endpoint, t0 = request.url.path, time.perf_counter()
        if endpoint not in {r.path for r in app.routes}:
            endpoint = "other"  # keep label values bounded
        metrics.in_flight.inc()
        try:
            response = await call_next(request)
        except BaseException:
            metrics.in_flight.dec()
            metrics.requests.labels(endpoint, "500").inc()
            raise

        def finish():
            metrics.in_flight.dec()
            metrics.requests.labels(endpoint, str(response.status_code)).inc()
            metrics.latency.labels(endpoint).observe(time.perf_counter() - t0)
        response.body_iterator = _after(response.body_iterator, finish)
        return response

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": engine.name}

    @app.get("/metrics")
    async def prometheus():
        from fastapi.responses import Response
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": engine.name, "object": "model", "created": engine.created,
                                            "owned_by": "lmforge"}]}

    def stops(req: _Sampling, extra: list[str] = ()) -> list[str]:
        given = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        return given + list(extra)

    async def run_choices(prompts_ids, req, stop):
        """Non-streaming: every choice's text and the usage."""
        choices, completion_tokens = [], 0
        for i, ids in enumerate(prompts_ids):
            for j in range(req.n):
                seed = None if req.seed is None else req.seed + j
                pieces, result = [], None
                async for item in _iterate_in_thread(engine.generate(ids, req, seed, stop)):
                    if isinstance(item, tuple) and item[0] == "__result__":
                        result = item[1]
                    else:
                        pieces.append(item)
                completion_tokens += result["completion_tokens"]
                choices.append(("".join(pieces), result["finish_reason"]))
        prompt_tokens = sum(len(ids) for ids in prompts_ids) * req.n
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                 "total_tokens": prompt_tokens + completion_tokens}
        return choices, usage

    def sse(obj) -> str:
        return f"data: {json.dumps(obj)}\n\n"

    async def stream(prompts_ids, req, stop, make_chunk):
        async def events():
            for i, ids in enumerate(prompts_ids):
                for j in range(req.n):
                    index = i * req.n + j
                    seed = None if req.seed is None else req.seed + j
                    first = True
                    async for item in _iterate_in_thread(engine.generate(ids, req, seed, stop)):
                        if isinstance(item, tuple) and item[0] == "__result__":
                            yield sse(make_chunk(index, None, item[1]["finish_reason"], first))
                        else:
                            yield sse(make_chunk(index, item, None, first))
                            first = False
            yield "data: [DONE]\n\n"
        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest):
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        if not prompts:
            raise APIError(400, "prompt must not be empty", param="prompt")
        ids = [engine.check(req, p) for p in prompts]
        rid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        stop = stops(req)
        if req.stream:
            def chunk(index, text, finish, first):
                return {"id": rid, "object": "text_completion", "created": created, "model": engine.name,
                        "choices": [{"index": index, "text": text or "", "logprobs": None, "finish_reason": finish}]}
            return await stream(ids, req, stop, chunk)
        choices, usage = await run_choices(ids, req, stop)
        return {"id": rid, "object": "text_completion", "created": created, "model": engine.name,
                "choices": [{"index": k, "text": t, "logprobs": None, "finish_reason": f}
                            for k, (t, f) in enumerate(choices)], "usage": usage}

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest):
        prompt = engine.render_chat(req.messages)
        ids = [engine.check(req, prompt)]
        rid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        stop = stops(req, engine.chat_template.get("stop", []))
        if req.stream:
            def chunk(index, text, finish, first):
                delta = {} if text is None else ({"role": "assistant", "content": text} if first else {"content": text})
                return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": engine.name,
                        "choices": [{"index": index, "delta": delta, "finish_reason": finish}]}
            return await stream(ids, req, stop, chunk)
        choices, usage = await run_choices(ids, req, stop)
        return {"id": rid, "object": "chat.completion", "created": created, "model": engine.name,
                "choices": [{"index": k, "message": {"role": "assistant", "content": t}, "finish_reason": f}
                            for k, (t, f) in enumerate(choices)], "usage": usage}

    return app


def serve(run_dir: str | Path, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          max_tokens_cap: int = 1024, max_concurrency: int = 16) -> None:
    import uvicorn

    engine = Engine(run_dir, max_tokens_cap)
    uvicorn.run(create_app(engine, api_key, max_concurrency), host=host, port=port, log_level="warning")
