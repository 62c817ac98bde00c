"""``lmforge support serve``: the customer chat page, the agent page and their JSON API.

Customer side (the API key, when one is set, on every endpoint but ``/health``):
``GET /`` (the page; the key may come once as ``/?api_key=KEY``), ``POST /api/messages``
``{customer_id, text, conversation_id?, client_message_id?, stream?}`` (``stream``: server-sent
events, a written answer's sentences while the decoder writes them, then the reply),
``GET /api/conversations/{id}?customer_id=&after=`` (new messages since ``after``: how the page
sees an agent's reply), ``GET /api/customers/{id}`` (a returning customer's history).

Agent side (always its own key, ``--agent-key`` or ``LMFORGE_AGENT_KEY``): ``GET /agent`` (the
page; ``/agent?agent_key=KEY`` once), ``GET /api/agent/queue``, ``GET /api/agent/conversations/{id}``,
``POST /api/agent/conversations/{id}/reply`` ``{text}``, ``POST /api/agent/conversations/{id}/hand-back``.

Errors, limits and metrics are those of ``lmforge serve`` (:mod:`lmforge.serve.common`).
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from fastapi import FastAPI, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel

from lmforge.apps.support.assistant import Assistant, Forbidden
from lmforge.apps.support.store import NotFound
from lmforge.serve.access import Access, Key, digest
from lmforge.serve.common import Metrics, install_api_basics

STATIC = Path(__file__).parent / "static"


def page(name: str) -> str:
    """A page from ``static/`` with the script both pages share (``support.js``) inlined."""
    shared = (STATIC / "support.js").read_text(encoding="utf-8")
    return (STATIC / name).read_text(encoding="utf-8").replace("<!-- support.js -->", f"<script>\n{shared}</script>", 1)


class CustomerMessage(BaseModel):
    customer_id: str
    text: str
    conversation_id: str | None = None
    client_message_id: str | None = None  # the client's idempotency key: a retry is stored once
    stream: bool = False  # server-sent events: a written answer's text while it is written, then the reply


class AgentMessage(BaseModel):
    text: str


AFTER = Query(0, ge=0, le=2**63 - 1)  # a message id: what SQLite's integers hold


def create_app(assistant: Assistant, agent_key: str, api_key: str | None = None, max_concurrency: int = 32,
               allowed_hosts: list[str] | None = None, keys: list[Key] | None = None,
               audit_log: str | Path | None = None, audit_text: bool = False) -> FastAPI:
    """The support app. The agent pages need an admin key (``agent_key``, or an admin of ``keys``);
    the customer endpoints a key (``api_key``, or any of ``keys``) when there is one; ``/metrics``
    then an admin key."""
    if not agent_key:
        raise ValueError("the agent pages need a key")
    app = FastAPI(title="lmforge support", docs_url=None, redoc_url=None)
    metrics = Metrics("lmforge_support")
    from prometheus_client import Counter, Histogram

    messages = Counter("lmforge_support_messages_total", "Messages stored, by author", ["role"], registry=metrics.registry)
    handoffs = Counter("lmforge_support_handoffs_total", "Conversations handed to a human, by reason", ["reason"],
                       registry=metrics.registry)
    confidence = Histogram("lmforge_support_answer_confidence", "Confidence of the answers given from the FAQ",
                           registry=metrics.registry,  # reranked confidences can be below 0
                           buckets=(-0.5, 0.0, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.3))
    failures = Counter("lmforge_support_generation_failures_total", "Written answers that failed (the FAQ's answer "
                       "was given instead)", registry=metrics.registry)
    metrics.gauge("lmforge_support_queue_length", "Conversations waiting for or with a human",
                  lambda: len(assistant.store.queue()))

    def on_event(kind, value=None):
        if kind == "customer_message":
            messages.labels("customer").inc()
        elif kind == "agent_message":
            messages.labels("agent").inc()
        elif kind == "answered":
            messages.labels("assistant").inc()
            confidence.observe(value)
        elif kind == "handoff":
            messages.labels("assistant").inc()
            handoffs.labels(value).inc()
        elif kind == "generation_failed":
            failures.inc()
    assistant.on_event = on_event

    customer_keys = list(keys or []) + ([Key("api-key", "user", digest(api_key))] if api_key else [])
    access = Access(customer_keys + [Key("agent-key", "admin", digest(agent_key))], audit_log, audit_text)

    def check_auth(request: Request) -> JSONResponse | None:
        path = request.url.path
        if path == "/health":
            return None
        if path == "/agent" or path.startswith("/api/agent/"):
            page = path == "/agent" and request.method == "GET"
            return access.check(request, admin=True, page_param="agent_key" if page else None, what="agent key")
        page = path == "/" and request.method == "GET"
        return access.check(request, admin=path == "/metrics" and bool(customer_keys),
                            page_param="api_key" if page else None, open_=not customer_keys)

    install_api_basics(app, metrics, check_auth, max_concurrency, allowed_hosts=allowed_hosts, access=access)

    @app.exception_handler(Forbidden)
    async def _forbidden(request, exc: Forbidden):
        return JSONResponse({"error": {"message": str(exc), "type": "permission_error", "param": "customer_id",
                                       "code": "customer_token_required"}}, status_code=403)

    @app.exception_handler(NotFound)
    async def _not_found(request, exc: NotFound):
        return JSONResponse({"error": {"message": str(exc), "type": "not_found_error", "param": None, "code": None}},
                            status_code=404)

    @app.exception_handler(ValueError)
    async def _bad_value(request, exc: ValueError):
        return JSONResponse({"error": {"message": str(exc), "type": "invalid_request_error", "param": None,
                                       "code": None}}, status_code=400)

    async def call(fn, *args):
        """Blocking work (SQLite, the encoder) off the event loop."""
        return await asyncio.to_thread(fn, *args)

    @app.get("/health")
    async def health():
        return {"status": "ok", "faq_entries": len(assistant.retriever.entries), "threshold": assistant.threshold}

    @app.get("/", response_class=HTMLResponse)
    async def customer_page():
        return page("customer.html")

    @app.get("/agent", response_class=HTMLResponse)
    async def agent_page():
        return page("agent.html")

    def customer_of(request: Request, customer_id: str) -> str:
        """The customer a read speaks for, if its token is theirs (403 otherwise)."""
        return assistant.check_customer(customer_id, request.headers.get("x-customer-token"),
                                        request.headers.get("x-customer-token-from") == "address")

    running: set = set()  # streamed answers being written (kept referenced until they are stored)

    def reply_json(reply) -> dict:
        out = {"conversation_id": reply.conversation_id, "status": reply.status,
               "handoff_reason": reply.handoff_reason, "messages": reply.messages}
        if reply.customer_token:
            out["customer_token"] = reply.customer_token
        return out

    @app.post("/api/messages")
    async def customer_message(msg: CustomerMessage, request: Request):
        def handle(on_text=None):
            return reply_json(assistant.handle(
                msg.customer_id, msg.text, msg.conversation_id, msg.client_message_id,
                token=request.headers.get("x-customer-token"),
                from_address=request.headers.get("x-customer-token-from") == "address", check=True, on_text=on_text))
        if not msg.stream:
            return await call(handle)
        return await stream_reply(handle)

    async def stream_reply(handle) -> StreamingResponse:
        """``{"stream": true}``: server-sent events, ``{"type": "text", "text": …}`` for each sentence
        of a written answer as it is released, then ``{"type": "reply", …}`` with what the plain
        request returns (the stored messages: the page shows those in place of the text). A bad
        request is still refused with its 4xx before the stream starts. A client that leaves
        mid-answer does not stop it: the exchange is stored whole, so a retry with its
        ``client_message_id`` gets the reply."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def work():
            try:
                result = ("reply", handle(lambda text: loop.call_soon_threadsafe(events.put_nowait, ("text", text))))
            except Exception as e:  # noqa: BLE001 - raised in the request below, or sent as an error event
                result = ("error", e)
            loop.call_soon_threadsafe(events.put_nowait, result)
        running.add(future := loop.run_in_executor(None, work))
        future.add_done_callback(running.discard)
        first = await events.get()
        if first[0] == "error":
            raise first[1]  # nothing sent yet: the handlers above answer with the usual status

        async def body():
            kind, value = first
            while True:
                if kind == "text":
                    yield sse({"type": "text", "text": value})
                elif kind == "reply":
                    yield sse({"type": "reply", **value})
                    return
                else:
                    yield sse({"type": "error", "error": {"message": str(value), "type": "server_error"}})
                    return
                kind, value = await events.get()
        return StreamingResponse(body(), media_type="text/event-stream")

    @app.get("/api/conversations/{conversation_id}")
    async def customer_conversation(conversation_id: str, customer_id: str, request: Request, after: int = AFTER):
        return await call(assistant.conversation, conversation_id, customer_of(request, customer_id), after)

    @app.get("/api/customers/{customer_id}")
    async def customer_history(customer_id: str, request: Request):
        return await call(assistant.history, customer_of(request, customer_id))

    @app.get("/api/agent/queue")
    async def agent_queue():
        return {"conversations": await call(assistant.store.queue)}

    @app.get("/api/agent/conversations/{conversation_id}")
    async def agent_conversation(conversation_id: str, after: int = AFTER):
        conv = await call(assistant.conversation, conversation_id, None, after)
        customer = assistant.store.customer(conv["customer_id"]) or {}
        return {**conv, "customer_name": customer.get("name")}

    @app.post("/api/agent/conversations/{conversation_id}/reply")
    async def agent_reply(conversation_id: str, msg: AgentMessage):
        return await call(assistant.agent_reply, conversation_id, msg.text)

    @app.post("/api/agent/conversations/{conversation_id}/hand-back")
    async def hand_back(conversation_id: str):
        return await call(assistant.hand_back, conversation_id)

    return app


def sse(obj: dict) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def serve(app_dir, host: str = "127.0.0.1", port: int = 8100, api_key: str | None = None, agent_key: str | None = None,
          generate_run=None, max_concurrency: int = 32, allowed_hosts: list[str] | None = None,
          keys: list[Key] | None = None, audit_log: str | None = None, audit_text: bool = False,
          ssl: dict | None = None) -> None:
    import secrets
    import sys

    import uvicorn

    if not agent_key:
        agent_key = secrets.token_urlsafe(16)
        print(f"lmforge support: no --agent-key given; this run's agent key is {agent_key}", file=sys.stderr, flush=True)
    assistant = Assistant(app_dir, generate_run)
    from lmforge.serve.common import allowed_hosts_for

    app = create_app(assistant, agent_key, api_key, max_concurrency, allowed_hosts_for(host, allowed_hosts), keys,
                     audit_log, audit_text)
    uvicorn.run(app, host=host, port=port, log_level="warning", **(ssl or {}))
