"""``lmforge serve``: an OpenAI-compatible HTTP API over a run directory (FastAPI + uvicorn).

Endpoints: ``GET /health`` (no auth), ``GET /v1/models[/{id}]``, ``POST /v1/completions`` and
``POST /v1/chat/completions`` (OpenAI request/response schemas; ``stream: true`` gives Server-Sent
Events ending with ``data: [DONE]``; ``logprobs``, and for completions ``echo``, so that a
harness can score text), ``/v1/embeddings``, ``/v1/classify``, ``/v1/explain``, and vLLM's
``/tokenizer_info``, ``/tokenize`` and ``/detokenize``. Errors are OpenAI-style objects, never
stack traces; a parameter this server cannot honour (``best_of``, tools, ...) is refused with a
400, not ignored.

The server by role: the request schemas (protocol.py), the loaded run (served.py), completions and
chat on the decoding served (completions.py), the encoder endpoints (encoders.py), what every
lmforge HTTP app shares (common.py); this module routes to them and adds the model, tokenizer and
page endpoints.
"""

from __future__ import annotations

import asyncio
import html
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse

from lmforge.chat import NOT_CHAT_TRAINED, jinja_chat_template
from lmforge.data.tokenizer import EOT
from lmforge.serve.access import Access, Key, digest
from lmforge.serve.common import APIError, Metrics, install_api_basics
from lmforge.serve.completions import Completions
from lmforge.serve.encoders import Encoders
from lmforge.serve.protocol import DetokenizeRequest, TokenizeRequest
from lmforge.serve.served import ServedRun

CHAT_PAGE = Path(__file__).parent / "static" / "chat.html"


def create_app(served: ServedRun, api_key: str | None = None, max_concurrency: int = 16,
               allowed_hosts: list[str] | None = None, keys: list[Key] | None = None,
               audit_log: str | Path | None = None, audit_text: bool = False) -> FastAPI:
    """The app over ``served``. ``api_key`` (admin) and ``keys`` (:mod:`lmforge.serve.access`):
    without either every endpoint is open; with them every endpoint but ``/health`` needs a key,
    and ``/metrics`` an admin key."""
    app = FastAPI(title="lmforge", docs_url=None, redoc_url=None)
    metrics = Metrics()
    if served.batcher is not None:
        b = served.batcher
        metrics.gauge("lmforge_decode_steps", "Batched decode steps run so far", lambda: b.steps_run)
        metrics.gauge("lmforge_decode_batch_rows_max", "The most sequences decoded together in one step",
                      lambda: b.max_rows_seen)
        metrics.gauge("lmforge_sequences_running", "Sequences holding a batch slot", lambda: len(b.active))
        metrics.gauge("lmforge_sequences_waiting", "Sequences waiting for a batch slot", lambda: len(b.waiting))

    keys = list(keys or []) + ([Key("api-key", "admin", digest(api_key))] if api_key else [])
    access = Access(keys, audit_log, audit_text)

    def check_auth(request: Request) -> JSONResponse | None:
        path = request.url.path
        if path == "/health":
            return None
        # The chat page may take the key in its address once: /?api_key=KEY.
        page = path == "/" and request.method == "GET"
        return access.check(request, admin=path == "/metrics", page_param="api_key" if page else None, open_=not keys)

    install_api_basics(app, metrics, check_auth, max_concurrency, allowed_hosts=allowed_hosts, access=access)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": served.name}

    def model_card() -> dict:
        return {"id": served.name, "object": "model", "created": served.created, "owned_by": "lmforge",
                "max_model_len": served.context, "chat_trained": served.chat_trained}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model}")
    async def model(model: str):
        if model not in (served.name, "lmforge"):
            raise APIError(404, f"unknown model {model!r}; this server serves {served.name!r}", param="model",
                           code="model_not_found")
        return model_card()

    # The tokenizer, as vLLM's server exposes it (a harness such as lm-evaluation-harness finds these
    # and needs no local copy of the tokenizer): ids without special tokens unless asked.
    @app.get("/tokenizer_info")
    async def tokenizer_info():
        end = served.chat_template.get("end_token") or (EOT if served.eot is not None else None)
        specials = {"eos_token": end, "bos_token": served.chat_template.get("bos_token") or None, "pad_token": None}
        return {**specials, "tokenizer_class": "lmforge", "model_max_length": served.context,
                "vocab_size": served.tokenizer().get_vocab_size(),
                "chat_template": jinja_chat_template(served.chat_template) if served.kind == "generator" else None}

    @app.post("/tokenize")
    async def tokenize(req: TokenizeRequest):
        served.tokenizer()

        def encode() -> list[int]:
            with served.encoder_lock:  # an encoder's embedding requests set the tokenizer's padding
                return served.run.tokenizer.encode(req.prompt, add_special_tokens=req.add_special_tokens).ids
        ids = await asyncio.to_thread(encode)
        return {"tokens": ids, "count": len(ids), "max_model_len": served.context}

    @app.post("/detokenize")
    async def detokenize(req: DetokenizeRequest):
        served.tokenizer()
        if any(not 0 <= t < served.run.tokenizer.get_vocab_size() for t in req.tokens):
            raise APIError(400, f"token ids must be in [0, {served.run.tokenizer.get_vocab_size()})", param="tokens")
        return {"prompt": served.run.tokenizer.decode(req.tokens, skip_special_tokens=False)}

    Completions(served, metrics, max_concurrency).install(app)
    Encoders(served, metrics).install(app)

    @app.get("/", response_class=HTMLResponse)
    async def chat_page():
        if served.kind != "generator" and served.images:  # nothing to chat with; say what it serves
            return HTMLResponse(f"<p>{html.escape(served.name)} is an image classifier: POST images to "
                                "<code>/v1/classify</code>.</p>", status_code=404)
        notice = "" if served.chat_trained else \
            f'<p id="notice" role="status">{html.escape(served.name)} {html.escape(NOT_CHAT_TRAINED)}.</p>'
        return CHAT_PAGE.read_text(encoding="utf-8").replace("{{MODEL}}", html.escape(served.name)) \
            .replace("{{NOTICE}}", notice)

    return app


def serve(run_dir: str | Path, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          max_tokens_cap: int = 1024, max_concurrency: int = 16, max_batch: int = 16,
          compile: bool = False, max_context: int | None = None, allowed_hosts: list[str] | None = None,
          keys: list[Key] | None = None, audit_log: str | None = None, audit_text: bool = False,
          ssl: dict | None = None) -> None:
    """Serve ``run_dir`` until stopped; ``ssl`` ({"ssl_certfile", "ssl_keyfile"}) makes it HTTPS."""
    import uvicorn

    from lmforge.serve.common import allowed_hosts_for

    served = ServedRun(run_dir, max_tokens_cap, max_batch, compile, max_context)
    if served.kind == "generator" and not served.chat_trained:
        from lmforge.progress import status

        status(f"warning: {served.name} {NOT_CHAT_TRAINED} (/v1/completions is unaffected)")
    app = create_app(served, api_key, max_concurrency, allowed_hosts_for(host, allowed_hosts), keys, audit_log,
                     audit_text)
    uvicorn.run(app, host=host, port=port, log_level="warning", **(ssl or {}))
