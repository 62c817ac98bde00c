"""``lmforge serve``: an OpenAI-compatible HTTP API over a run directory (FastAPI + uvicorn).

Endpoints: ``GET /health`` (no auth), ``GET /v1/models``, ``POST /v1/completions`` and
``POST /v1/chat/completions`` (OpenAI request/response schemas; ``stream: true`` gives Server-Sent
Events ending with ``data: [DONE]``). Errors are OpenAI-style objects, never stack traces.

Generation runs in a :class:`~lmforge.serve.batching.ContinuousBatcher` thread: concurrent
requests (and the ``n`` choices of one request) decode together, and a request that arrives
mid-generation joins at the next step. The event loop only moves text between queues.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import html
import json
import threading
import time
import uuid
from pathlib import Path
from typing import Literal

import torch
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, Field

from lmforge.chat import load_chat_template, render_chat
from lmforge.data.tokenizer import EOT
from lmforge.generate import text_pieces
from lmforge.serve.batching import ContinuousBatcher
from lmforge.serve.common import APIError, Metrics, install_api_basics, key_matches, request_key, unauthorized

CHAT_PAGE = Path(__file__).parent / "static" / "chat.html"


class StreamOptions(BaseModel):
    include_usage: bool = False  # a last chunk with no choices and the request's usage


class _Sampling(BaseModel):
    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = Field(default=1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None


class CompletionRequest(_Sampling):
    prompt: str | list[str]


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)


MAX_INPUTS = 256  # texts per embeddings / classify request


class EmbeddingRequest(BaseModel):
    model: str
    input: str | list[str] = Field(min_length=1)
    encoding_format: Literal["float", "base64"] = "float"  # the openai client asks for base64


class ClassifyRequest(BaseModel):
    model: str
    input: str | list[str] = Field(min_length=1)


class Engine:
    """The loaded run and, for a decoder, the batcher that generates with it."""

    def __init__(self, run_dir: str | Path, max_tokens_cap: int = 1024, max_batch: int = 16, compile: bool = False):
        from lmforge.runs import load_run

        self.run = load_run(run_dir)
        self.name = Path(run_dir).resolve().name
        self.cap = max_tokens_cap
        self.eot = self.run.tokenizer.token_to_id(EOT)
        self.kind = ("classifier" if getattr(self.run.model.config, "num_labels", 0)
                     else "encoder" if self.run.config.arch == "bert" else "generator")
        if self.run.device.type == "cuda" and torch.cuda.is_bf16_supported():
            self.run.model.to(torch.bfloat16)  # serving reads every weight per token: half the bytes
        self.batcher = ContinuousBatcher(self.run.model, max_batch, compile) if self.kind == "generator" else None
        self.encoder_lock = threading.Lock()  # encoder forwards share the tokenizer's padding state
        labels = self.run.path / "labels.json"
        self.labels = json.loads(labels.read_text(encoding="utf-8")) if self.kind == "classifier" else None
        self.chat_template = load_chat_template(run_dir)
        self.created = int(time.time())
        self.on_tokens = lambda prompt, generated: None  # set by the app (metrics)

    def render_chat(self, messages: list[ChatMessage]) -> str:
        return render_chat(self.chat_template, [m.model_dump() for m in messages])

    def check(self, req: _Sampling, prompt: str) -> list[int]:
        self.require("generator", req.model, "completions")
        max_tokens = req.max_tokens or 16
        if max_tokens > self.cap:
            raise APIError(400, f"max_tokens {max_tokens} is over this server's cap of {self.cap}", param="max_tokens")
        ids = self.run.tokenizer.encode(prompt, add_special_tokens=False).ids
        context = self.run.model.config.block_size
        if len(ids) >= context:
            raise APIError(400, f"the prompt has {len(ids)} tokens; this model's context is {context}",
                           param="prompt", code="context_length_exceeded")
        return ids

    def require(self, kind: str, model: str, what: str) -> None:
        """400 unless this server's model is ``model`` and of ``kind`` (it can serve ``what``)."""
        if self.kind != kind:
            article = "an" if self.kind[0] in "aeiou" else "a"
            raise APIError(400, f"{self.name!r} is {article} {self.kind}, not {'an' if kind[0] in 'aeiou' else 'a'} "
                                f"{kind}: it cannot serve {what}", param="model", code="unsupported_model")
        if model not in (self.name, "lmforge"):
            raise APIError(400, f"unknown model {model!r}; this server serves {self.name!r}", param="model",
                           code="model_not_found")

    def encode_inputs(self, req: EmbeddingRequest | ClassifyRequest) -> tuple[list[str], int]:
        """The request's texts and their token count; 400 past the context or the input limit."""
        texts = [req.input] if isinstance(req.input, str) else req.input
        if len(texts) > MAX_INPUTS:
            raise APIError(400, f"{len(texts)} inputs; at most {MAX_INPUTS} per request", param="input")
        context, tokens = self.run.model.config.block_size, 0
        for k, text in enumerate(texts):
            n = len(self.run.tokenizer.encode(text).ids)
            if n > context:
                raise APIError(400, f"input {k} has {n} tokens; this model's context is {context}",
                               param="input", code="context_length_exceeded")
            tokens += n
        return texts, tokens

    def embed(self, req: EmbeddingRequest):
        """(vectors, prompt tokens); run off the event loop."""
        from lmforge.embed import embed_texts

        with self.encoder_lock:  # encoding sets the tokenizer's padding state: one request at a time
            texts, tokens = self.encode_inputs(req)
            return embed_texts(self.run.model, self.run.tokenizer, texts), tokens

    def classify(self, req: ClassifyRequest):
        """(probabilities, prompt tokens); run off the event loop."""
        from lmforge.train.classify import predict_probs

        with self.encoder_lock:
            texts, tokens = self.encode_inputs(req)
            return predict_probs(self.run.model, self.run.tokenizer, texts, self.run.model.config.block_size,
                                 self.run.device), tokens

    def generate(self, ids: list[int], req: _Sampling, seed: int | None, stop: list[str]):
        """Generator of text pieces; returns {"completion_tokens", "finish_reason"}."""
        # An empty prompt starts from the end-of-text token, as a new document would.
        tokens = self.batcher.submit(ids or [self.eot or 0], req.max_tokens or 16, req.temperature, req.top_p, seed,
                                     self.eot)
        result = yield from text_pieces(tokens, self.run.tokenizer, stop, self.eot)
        self.on_tokens(len(ids), result["completion_tokens"])
        return result


class _ClosingStreamingResponse(StreamingResponse):
    """Closes its body generator when the response ends, however it ends. When a client
    disconnects, Starlette cancels the streaming task wherever it is; if that is outside the
    generator (at a ``send``), the generator stays suspended at a ``yield`` and the generation
    behind it stops only when the generator is finalised. The likely cause of what
    tests/test_serve.py's disconnect test saw about once in 8 runs: the whole answer generated for nobody."""

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()


async def _iterate_in_thread(gen):
    """Drive a blocking generator in a worker thread; yields its items, then ("__result__", value).

    If the consumer goes away (a client disconnects mid-stream), the worker stops the generator at
    its next item, which cancels the sequence and frees its batch slot.
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


def create_app(engine: Engine, api_key: str | None = None, max_concurrency: int = 16) -> FastAPI:
    app = FastAPI(title="lmforge", docs_url=None, redoc_url=None)
    metrics = Metrics()
    engine.on_tokens = lambda prompt, generated: (metrics.prompt_tokens.inc(prompt),
                                                  metrics.generated_tokens.inc(generated))
    if engine.batcher is not None:
        b = engine.batcher
        metrics.gauge("lmforge_decode_steps", "Batched decode steps run so far", lambda: b.steps_run)
        metrics.gauge("lmforge_decode_batch_rows_max", "The most sequences decoded together in one step",
                      lambda: b.max_rows_seen)
        metrics.gauge("lmforge_sequences_running", "Sequences holding a batch slot", lambda: len(b.active))
        metrics.gauge("lmforge_sequences_waiting", "Sequences waiting for a batch slot", lambda: len(b.waiting))

    def check_auth(request: Request) -> JSONResponse | None:
        if not api_key or request.url.path == "/health":
            return None
        # The chat page may take the key in its address once: /?api_key=KEY.
        page = request.url.path == "/" and request.method == "GET"
        return None if key_matches(request_key(request, "api_key" if page else None), api_key) else \
            unauthorized("invalid or missing API key")

    install_api_basics(app, metrics, check_auth, max_concurrency)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": engine.name}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": engine.name, "object": "model", "created": engine.created,
                                            "owned_by": "lmforge"}]}

    def stops(req: _Sampling, extra: list[str] = ()) -> list[str]:
        given = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        return given + list(extra)

    def choices_of(prompts_ids, req, stop) -> list:
        """One text generator per choice, prompt-major (choice index = prompt * n + j), all
        submitted at once so that they decode together."""
        return [engine.generate(ids, req, None if req.seed is None else req.seed + j, stop)
                for ids in prompts_ids for j in range(req.n)]

    async def merged(gens):
        """(choice index, text piece or ("__result__", value)) from all choices as they come."""
        queue: asyncio.Queue = asyncio.Queue()
        done = object()

        async def drain(index, gen):
            items = _iterate_in_thread(gen)
            try:
                async for item in items:
                    await queue.put((index, item))
            except Exception as e:
                await queue.put((index, ("__error__", e)))
            finally:
                await items.aclose()  # stops the generation if this choice is abandoned
                queue.put_nowait(done)

        tasks = [asyncio.create_task(drain(k, g)) for k, g in enumerate(gens)]
        try:
            remaining = len(tasks)
            while remaining:
                item = await queue.get()
                if item is done:
                    remaining -= 1
                elif isinstance(item[1], tuple) and item[1][0] == "__error__":
                    raise item[1][1]
                else:
                    yield item
        finally:
            for t in tasks:
                t.cancel()

    async def run_choices(prompts_ids, req, stop):
        """Non-streaming: every choice's text and finish reason, and the usage."""
        pieces = [[] for _ in range(len(prompts_ids) * req.n)]
        results = [None] * len(pieces)
        async for index, item in merged(choices_of(prompts_ids, req, stop)):
            if isinstance(item, tuple) and item[0] == "__result__":
                results[index] = item[1]
            else:
                pieces[index].append(item)
        choices = [("".join(p), r["finish_reason"]) for p, r in zip(pieces, results)]
        return choices, usage_of(prompts_ids, req, sum(r["completion_tokens"] for r in results))

    def sse(obj) -> str:
        return f"data: {json.dumps(obj)}\n\n"

    def usage_of(prompts_ids, req, completion_tokens: int) -> dict:
        prompt_tokens = sum(len(ids) for ids in prompts_ids) * req.n
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}

    async def stream(prompts_ids, req, stop, make_chunk):
        async def events():
            started, completion_tokens = set(), 0
            async with contextlib.aclosing(merged(choices_of(prompts_ids, req, stop))) as pieces:
                async for index, item in pieces:
                    if isinstance(item, tuple) and item[0] == "__result__":
                        completion_tokens += item[1]["completion_tokens"]
                        yield sse(make_chunk(index, None, item[1]["finish_reason"], index not in started))
                    else:
                        yield sse(make_chunk(index, item, None, index not in started))
                        started.add(index)
            if req.stream_options and req.stream_options.include_usage:
                last = make_chunk(0, None, None, False)
                yield sse({**last, "choices": [], "usage": usage_of(prompts_ids, req, completion_tokens)})
            yield "data: [DONE]\n\n"
        return _ClosingStreamingResponse(events(), media_type="text/event-stream")

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

    @app.post("/v1/embeddings")
    async def embeddings(req: EmbeddingRequest):
        engine.require("encoder", req.model, "embeddings")
        vectors, tokens = await asyncio.to_thread(engine.embed, req)
        metrics.prompt_tokens.inc(tokens)

        def encode(v):
            return base64.b64encode(v.astype("<f4").tobytes()).decode() if req.encoding_format == "base64" \
                else v.tolist()
        return {"object": "list", "model": engine.name,
                "data": [{"object": "embedding", "index": k, "embedding": encode(v)} for k, v in enumerate(vectors)],
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    @app.post("/v1/classify")
    async def classify(req: ClassifyRequest):
        engine.require("classifier", req.model, "classification")
        probs, tokens = await asyncio.to_thread(engine.classify, req)
        metrics.prompt_tokens.inc(tokens)
        return {"object": "list", "model": engine.name,
                "data": [{"index": k, "label": engine.labels[int(p.argmax())],
                          "probabilities": {name: float(x) for name, x in zip(engine.labels, p)}}
                         for k, p in enumerate(probs)],
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    @app.get("/", response_class=HTMLResponse)
    async def chat_page():
        return CHAT_PAGE.read_text(encoding="utf-8").replace("{{MODEL}}", html.escape(engine.name))

    return app


def serve(run_dir: str | Path, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          max_tokens_cap: int = 1024, max_concurrency: int = 16, max_batch: int = 16,
          compile: bool = False) -> None:
    import uvicorn

    engine = Engine(run_dir, max_tokens_cap, max_batch, compile)
    uvicorn.run(create_app(engine, api_key, max_concurrency), host=host, port=port, log_level="warning")
