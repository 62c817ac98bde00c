"""``lmforge serve``: an OpenAI-compatible HTTP API over a run directory (FastAPI + uvicorn).

Endpoints: ``GET /health`` (no auth), ``GET /v1/models[/{id}]``, ``POST /v1/completions`` and
``POST /v1/chat/completions`` (OpenAI request/response schemas; ``stream: true`` gives Server-Sent
Events ending with ``data: [DONE]``; ``logprobs``, and for completions ``echo``, so that a
harness can score text), and vLLM's ``/tokenizer_info``, ``/tokenize`` and ``/detokenize``.
Errors are OpenAI-style objects, never stack traces; a parameter this
server cannot honour (``best_of``, tools, ...) is refused with a 400, not ignored.

Generation runs in a :class:`~lmforge.generate.engine.ContinuousBatcher` thread: concurrent
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
from dataclasses import dataclass
from pathlib import Path

import torch
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse

from lmforge.chat import (NOT_CHAT_TRAINED, chat_trained, end_token_id, jinja_chat_template, load_chat_template,
                          render_chat)
from lmforge.data.tokenizer import EOT
from lmforge.errors import UserError
from lmforge.generate import ContinuousBatcher, SamplingParams, text_pieces
from lmforge.serve.common import (APIError, Metrics, install_api_basics, key_matches, request_key, too_busy,
                                  unauthorized)
from lmforge.serve.logprobs import (Piece, Placer, TokenText, chat_logprobs, completion_logprobs, placed_prompt,
                                    split_by_offset)
from lmforge.serve.protocol import (MAX_INPUTS, MAX_SEQUENCES_PER_REQUEST, ChatMessage, ChatRequest, ClassifyRequest,
                                    CompletionRequest, DetokenizeRequest, EmbeddingRequest, ExplainRequest,
                                    SamplingRequest, TokenizeRequest)

CHAT_PAGE = Path(__file__).parent / "static" / "chat.html"
DEFAULT_MAX_CONTEXT = 2048  # tokens per sequence when the model's context is longer (serve --max-context)


class Engine:
    """The loaded run and, for a decoder, the batcher that generates with it."""

    def __init__(self, run_dir: str | Path, max_tokens_cap: int = 1024, max_batch: int = 16, compile: bool = False,
                 max_context: int | None = None):
        from lmforge.runs import load_run

        self.run = load_run(run_dir)
        self.name = Path(run_dir).resolve().name
        self.cap = max_tokens_cap
        self.images = self.run.config.task.name == "image-classify"
        self.eot = self.run.tokenizer.token_to_id(EOT) if self.run.tokenizer is not None else None
        model = self.run.model
        self.kind = ("classifier" if getattr(model.config, "num_labels", 0) else "generator" if model.can_generate
                     else "encoder")
        if self.run.device.type == "cuda" and torch.cuda.is_bf16_supported():
            self.run.model.to(torch.bfloat16)  # serving reads every weight per token: half the bytes
        # The longest prompt + answer served: the model's context, capped so that the batcher's cache
        # (max_batch rows of it, allocated up front) stays small for long-context checkpoints.
        block = getattr(model.config, "block_size", 0)  # image classifiers have no token context
        self.context = min(block, max_context or DEFAULT_MAX_CONTEXT)
        self.batcher = ContinuousBatcher(self.run.model, max_batch, compile, max_len=self.context) \
            if self.kind == "generator" else None
        self.encoder_lock = threading.Lock()  # encoder forwards share the tokenizer's padding state
        # Explanations of a generator run on a private copy of the model, one at a time: Integrated
        # Gradients hooks the embedding layer, which must never touch the batcher's forwards.
        self.explain_lock = threading.Lock()
        self.explain_run = None
        self.labels = self.run.labels if self.kind == "classifier" else None
        self.chat_template = load_chat_template(run_dir)
        self.chat_trained = self.kind == "generator" and chat_trained(run_dir)
        # A completion ends at the end of the document; a chat answer at the template's end of turn.
        self.turn_end = end_token_id(self.chat_template, self.run.tokenizer) if self.kind == "generator" else None
        self.created = int(time.time())
        self.on_tokens = lambda prompt, generated: None  # set by the app (metrics)
        self.token_text = TokenText(self.run.tokenizer) if self.kind == "generator" else None

    def render_chat(self, messages: list[ChatMessage]) -> str:
        return render_chat(self.chat_template, [{"role": "system" if m.role == "developer" else m.role,
                                                 "content": m.text(k)} for k, m in enumerate(messages)])

    def check(self, req: SamplingRequest, prompt: str | list[int]) -> list[int]:
        """The prompt's token ids; 400 for a prompt past the context or ids outside the vocabulary."""
        self.require("generator", req.model, "completions")
        req.refuse_unsupported()
        if isinstance(prompt, str):
            ids = self.run.tokenizer.encode(prompt, add_special_tokens=False).ids
        else:
            ids, vocab = list(prompt), self.run.model.config.vocab_size
            if any(not 0 <= t < vocab for t in ids):
                raise APIError(400, f"prompt token ids must be in [0, {vocab})", param="prompt")
        context = self.context
        if len(ids) >= context:
            raise APIError(400, f"the prompt has {len(ids)} tokens; this model's context is {context}",
                           param="prompt", code="context_length_exceeded")
        self.logit_bias(req)
        return ids

    def logit_bias(self, req: SamplingRequest) -> dict[int, float] | None:
        """The request's ``logit_bias`` as {token id: bias}; 400 for ids outside the vocabulary or
        biases outside [-100, 100] (OpenAI's range)."""
        if not req.logit_bias:
            return None
        vocab, bias = self.run.model.config.vocab_size, {}
        for key, value in req.logit_bias.items():
            if not (key.isascii() and key.isdigit()) or not 0 <= int(key) < vocab or not -100 <= value <= 100:
                raise APIError(400, f"logit_bias maps token ids in [0, {vocab}) to values in [-100, 100]; "
                                    f"got {key!r}: {value}", param="logit_bias")
            bias[int(key)] = value
        return bias

    def max_tokens(self, req: SamplingRequest, ids: list[int], default: int | None = 16) -> int:
        """The request's token limit (``default`` None: what is left of the context); 400 past the cap."""
        given = getattr(req, "max_completion_tokens", None) or req.max_tokens
        if given is None:
            given = default if default is not None else min(self.cap, self.context - len(ids))
        if given > self.cap:
            raise APIError(400, f"max_tokens {given} is over this server's cap of {self.cap}", param="max_tokens")
        return given

    def require(self, kind: str, model: str, what: str) -> None:
        """400 unless this server's model is ``model`` and of ``kind`` (it can serve ``what``)."""
        if self.kind != kind:
            article = "an" if self.kind[0] in "aeiou" else "a"
            raise APIError(400, f"{self.name!r} is {article} {self.kind}, not {'an' if kind[0] in 'aeiou' else 'a'} "
                                f"{kind}: it cannot serve {what}", param="model", code="unsupported_model")
        if model not in (self.name, "lmforge"):
            raise APIError(400, f"unknown model {model!r}; this server serves {self.name!r}", param="model",
                           code="model_not_found")

    def tokenizer(self):
        """The run's tokenizer; 400 for a run without one (an image classifier)."""
        if self.run.tokenizer is None:
            raise APIError(400, f"{self.name!r} is an image classifier: it has no tokenizer", param="model",
                           code="unsupported_model")
        return self.run.tokenizer

    def encode_inputs(self, req: EmbeddingRequest | ClassifyRequest) -> tuple[list[str], int]:
        """The request's texts and their token count; 400 past the context or the input limit."""
        if req.input is None:
            raise APIError(400, "give the texts to classify as 'input'", param="input")
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

    def decode_images(self, req: ClassifyRequest):
        """uint8 (N, H, W, C) of the request's images, converted and resized to the model's input;
        400 for anything that is not base64 of an image Pillow reads."""
        import binascii

        import numpy as np

        from lmforge.data.images import load_image_file

        if req.input is not None or not req.images:
            raise APIError(400, f"{self.name!r} classifies images: give them as 'images' (base64 or data URLs)",
                           param="images")
        if len(req.images) > MAX_INPUTS:
            raise APIError(400, f"{len(req.images)} images; at most {MAX_INPUTS} per request", param="images")
        m, out = self.run.model.config, []
        for k, item in enumerate(req.images):
            data = item.split(",", 1)[1] if item.startswith("data:") and "," in item else item
            try:
                out.append(load_image_file(base64.b64decode(data, validate=True), [m.height, m.width, m.in_channels]))
            except (binascii.Error, ValueError):
                raise APIError(400, f"images[{k}] is not base64", param="images") from None
            except UserError:
                raise APIError(400, f"images[{k}] is not an image Pillow can read", param="images") from None
        return np.stack(out)

    def classify(self, req: ClassifyRequest):
        """(probabilities, prompt tokens); run off the event loop."""
        from lmforge.tasks.classify import predict_probs

        if self.images:
            from lmforge.tasks.images import predict_images

            x = self.decode_images(req)
            with self.encoder_lock:
                return predict_images(self.run.model, x, self.run.device), 0
        if req.images is not None:
            raise APIError(400, f"{self.name!r} classifies texts: give them as 'input'", param="images")
        with self.encoder_lock:
            texts, tokens = self.encode_inputs(req)
            return predict_probs(self.run.model, self.run.tokenizer, texts, self.run.model.config.block_size,
                                 self.run.device), tokens

    def explain(self, req: ExplainRequest) -> dict:
        """Attributions of one input by each requested method (and their faithfulness); run off the
        event loop. Classifiers explain under the encoder lock (the hooks then touch no other
        request); generators on a private float copy of the model."""
        import copy
        import dataclasses

        from lmforge.evaluate import faithfulness
        from lmforge.explain import subjects
        from lmforge.explain.attribution import attribute

        if self.kind == "encoder":
            raise APIError(400, f"{self.name!r} is an encoder: explanations cover classifiers and generators",
                           param="model", code="unsupported_model")
        if req.model not in (self.name, "lmforge"):
            raise APIError(400, f"unknown model {req.model!r}; this server serves {self.name!r}", param="model",
                           code="model_not_found")
        try:
            if self.images:
                with self.encoder_lock:
                    x = self.decode_images(ClassifyRequest(model=req.model, images=req.images))
                    return self._explained(subjects.image_classifier(self.run, x[0], req.label), req,
                                           attribute, faithfulness)
            if req.messages is not None:
                if self.kind != "generator":
                    raise APIError(400, "'messages' applies to generators; give a classifier's text as 'input'",
                                   param="messages")
                if req.input is not None:
                    raise APIError(400, "give 'input' or 'messages', not both", param="messages")
                req = req.model_copy(update={"input": self.render_chat(req.messages)})
            if req.input is None or req.images is not None:
                raise APIError(400, "give the text to explain as 'input'", param="input")
            if self.kind == "classifier":
                with self.encoder_lock:
                    self.encode_inputs(ClassifyRequest(model=req.model, input=req.input))  # 400 past the context
                    return self._explained(subjects.text_classifier(self.run, req.input, req.label,
                                                                    self.run.model.config.block_size),
                                           req, attribute, faithfulness)
            if req.label is not None:
                raise APIError(400, "'label' applies to classifiers; a generator explains its 'answer'", param="label")
            with self.explain_lock:
                if self.explain_run is None:
                    self.explain_run = dataclasses.replace(self.run, model=copy.deepcopy(self.run.model).float())
                return self._explained(subjects.decoder_answer(self.explain_run, req.input, req.answer, req.max_tokens),
                                       req, attribute, faithfulness)
        except UserError as e:
            raise APIError(400, str(e)) from None

    @staticmethod
    def _explained(s, req: ExplainRequest, attribute, faithfulness) -> dict:
        attrs = {m: attribute(m, s) for m in dict.fromkeys(req.methods)}
        out = {k: v for k, v in s.meta.items() if k != "pixels"}
        out |= {"features": s.names, "attributions": {m: a.per_feature.tolist() for m, a in attrs.items()}}
        if s.spans:
            out["spans"] = [list(sp) for sp in s.spans]
        if "ig" in attrs:
            out["ig_delta"] = attrs["ig"].delta
        if req.faithfulness:
            f = faithfulness.evaluate(s, {m: a.per_feature for m, a in attrs.items()})
            out["faithfulness"] = {m: {k: v[k] for k in ("comprehensiveness", "sufficiency")} for m, v in f.items()}
        return out

    def generate(self, ids: list[int], req: SamplingRequest, max_tokens: int, seed: int | None, stop: list[str],
                 logprobs: int | None = None, echo: str | None = None, end: int | None = None):
        """Generator of :class:`Piece` s; returns {"completion_tokens", "finish_reason"}.

        ``logprobs`` (alternatives per token) scores every token; ``echo`` (the prompt's text)
        comes first, as its own piece, scored too when ``logprobs`` is set. Generation stops at
        the token ``end`` (default: end of text).
        """
        end = self.eot if end is None else end
        # An empty prompt starts from the end-of-text token, as a new document would.
        params = SamplingParams(max_tokens=max_tokens, temperature=req.temperature,
                                top_k=req.top_k if req.top_k and req.top_k > 0 else None, top_p=req.top_p,
                                seed=seed, presence_penalty=req.presence_penalty,
                                frequency_penalty=req.frequency_penalty, logit_bias=self.logit_bias(req),
                                logprobs=logprobs, prompt_logprobs=echo is not None and logprobs is not None,
                                eos_id=end)
        tokens = self.batcher.submit(ids or [self.eot or 0], params)
        placed, start = [], 0

        def ids_of(scored_tokens):  # places each scored token as the text reader takes it
            placer = Placer(self.token_text, start)
            for s in scored_tokens:
                placed.append(placer.place(s))
                yield s.id
        try:
            if echo is not None:
                scored = next(tokens) if logprobs is not None else None
                yield Piece(echo, placed_prompt(scored, self.token_text) if scored and ids else [])
                start = len(echo)
            pieces = text_pieces(tokens if logprobs is None else ids_of(tokens), self.run.tokenizer, stop, end)
            result = yield from split_by_offset(pieces, placed, start, end)
        finally:
            tokens.close()  # stopped early (a client gone, a stop string): the batcher drops the sequence
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


@dataclass
class Finished:
    """The last item of a generation driven in a thread: its generator's return value."""

    value: dict


@dataclass
class Failed:
    """An exception raised by a generation driven in a thread, carried to the request."""

    error: BaseException


class Live:
    """How many generations are being driven right now (a thread each), counted thread-safely."""

    def __init__(self):
        self.n, self.lock = 0, threading.Lock()

    def add(self, k: int) -> None:
        with self.lock:
            self.n += k


async def _iterate_in_thread(gen, live: Live | None = None):
    """Drive a blocking generator in a worker thread; yields its items, then :class:`Finished`.

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
                    loop.call_soon_threadsafe(queue.put_nowait, Finished(e.value))
                    break
                loop.call_soon_threadsafe(queue.put_nowait, item)
        except BaseException as e:  # surface errors to the request, not the thread
            loop.call_soon_threadsafe(queue.put_nowait, Failed(e))
        finally:
            if live is not None:
                live.add(-1)
            loop.call_soon_threadsafe(queue.put_nowait, done)

    thread = threading.Thread(target=work, daemon=True)
    if live is not None:
        live.add(1)
    thread.start()
    try:
        while True:
            item = await queue.get()
            if item is done:
                return
            if isinstance(item, Failed):
                raise item.error
            yield item
    finally:
        cancelled.set()


def create_app(engine: Engine, api_key: str | None = None, max_concurrency: int = 16,
               allowed_hosts: list[str] | None = None) -> FastAPI:
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

    install_api_basics(app, metrics, check_auth, max_concurrency, allowed_hosts=allowed_hosts)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": engine.name}

    def model_card() -> dict:
        return {"id": engine.name, "object": "model", "created": engine.created, "owned_by": "lmforge",
                "max_model_len": engine.context, "chat_trained": engine.chat_trained}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model}")
    async def model(model: str):
        if model not in (engine.name, "lmforge"):
            raise APIError(404, f"unknown model {model!r}; this server serves {engine.name!r}", param="model",
                           code="model_not_found")
        return model_card()

    # The tokenizer, as vLLM's server exposes it (a harness such as lm-evaluation-harness finds these
    # and needs no local copy of the tokenizer): ids without special tokens unless asked.
    @app.get("/tokenizer_info")
    async def tokenizer_info():
        end = engine.chat_template.get("end_token") or (EOT if engine.eot is not None else None)
        specials = {"eos_token": end, "bos_token": engine.chat_template.get("bos_token") or None, "pad_token": None}
        return {**specials, "tokenizer_class": "lmforge", "model_max_length": engine.context,
                "vocab_size": engine.tokenizer().get_vocab_size(),
                "chat_template": jinja_chat_template(engine.chat_template) if engine.kind == "generator" else None}

    @app.post("/tokenize")
    async def tokenize(req: TokenizeRequest):
        engine.tokenizer()

        def encode() -> list[int]:
            with engine.encoder_lock:  # an encoder's embedding requests set the tokenizer's padding
                return engine.run.tokenizer.encode(req.prompt, add_special_tokens=req.add_special_tokens).ids
        ids = await asyncio.to_thread(encode)
        return {"tokens": ids, "count": len(ids), "max_model_len": engine.context}

    @app.post("/detokenize")
    async def detokenize(req: DetokenizeRequest):
        engine.tokenizer()
        if any(not 0 <= t < engine.run.tokenizer.get_vocab_size() for t in req.tokens):
            raise APIError(400, f"token ids must be in [0, {engine.run.tokenizer.get_vocab_size()})", param="tokens")
        return {"prompt": engine.run.tokenizer.decode(req.tokens, skip_special_tokens=False)}

    def stops(req: SamplingRequest, extra: list[str] = ()) -> list[str]:
        given = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        return given + list(extra)

    live = Live()
    # Sequences (prompts x n) one request may ask for, and all requests together: the amplification
    # of one request (500 prompts x n 16 = 8,000 generations, a thread each) is refused up front.
    max_live = MAX_SEQUENCES_PER_REQUEST * max(1, max_concurrency // 4)

    def count_sequences(n_prompts: int, req) -> None:
        k = n_prompts * req.n
        if k > MAX_SEQUENCES_PER_REQUEST:
            raise APIError(400, f"{n_prompts} prompt(s) x n {req.n} = {k} sequences; at most "
                                f"{MAX_SEQUENCES_PER_REQUEST} per request", param="prompt")
        if live.n + k > max_live:
            raise too_busy(f"{live.n} sequences are being generated (at most {max_live}); retry shortly")

    def choices_of(prompts_ids, req, stop, limits, logprobs, echoes, end=None) -> list:
        """One generator of :class:`Piece` s per choice, prompt-major (choice index = prompt * n + j),
        all submitted at once so that they decode together."""
        return [engine.generate(ids, req, limit, None if req.seed is None else req.seed + j, stop, logprobs, echo,
                                end)
                for ids, limit, echo in zip(prompts_ids, limits, echoes) for j in range(req.n)]

    async def merged(gens):
        """(choice index, text piece or :class:`Finished`) from all choices as they come."""
        queue: asyncio.Queue = asyncio.Queue()
        done = object()

        async def drain(index, gen):
            items = _iterate_in_thread(gen, live)
            try:
                async for item in items:
                    await queue.put((index, item))
            except Exception as e:
                await queue.put((index, Failed(e)))
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
                elif isinstance(item[1], Failed):
                    raise item[1].error
                else:
                    yield item
        finally:
            for t in tasks:
                t.cancel()

    async def run_choices(gens, prompts_ids, req):
        """Non-streaming: every choice's text, scored tokens and finish reason, and the usage."""
        pieces = [[] for _ in gens]
        results = [None] * len(gens)
        async for index, item in merged(gens):
            if isinstance(item, Finished):
                results[index] = item.value
            else:
                pieces[index].append(item)
        choices = [("".join(x.text for x in p), [t for x in p for t in x.tokens], r["finish_reason"])
                   for p, r in zip(pieces, results)]
        return choices, usage_of(prompts_ids, req, sum(r["completion_tokens"] for r in results))

    def sse(obj) -> str:
        return f"data: {json.dumps(obj)}\n\n"

    def usage_of(prompts_ids, req, completion_tokens: int) -> dict:
        prompt_tokens = sum(len(ids) for ids in prompts_ids) * req.n
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}

    async def stream(gens, prompts_ids, req, make_chunk):
        async def events():
            started, completion_tokens = set(), 0
            async with contextlib.aclosing(merged(gens)) as pieces:
                async for index, item in pieces:
                    if isinstance(item, Finished):
                        completion_tokens += item.value["completion_tokens"]
                        if index not in started:  # an empty answer still opens with its role chunk
                            yield sse(make_chunk(index, Piece(""), None, True))
                            started.add(index)
                        yield sse(make_chunk(index, None, item.value["finish_reason"], False))
                    elif item.text or item.tokens:
                        yield sse(make_chunk(index, item, None, index not in started))
                        started.add(index)
            if req.stream_options and req.stream_options.include_usage:
                last = make_chunk(0, None, None, False)
                yield sse({**last, "choices": [], "usage": usage_of(prompts_ids, req, completion_tokens)})
            yield "data: [DONE]\n\n"
        return _ClosingStreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest):
        prompt = req.prompt
        prompts = [prompt] if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)) else prompt
        if not prompts or any(len(p) == 0 and not isinstance(p, str) for p in prompts):
            raise APIError(400, "prompt must not be empty", param="prompt")
        count_sequences(len(prompts), req)
        ids = await asyncio.to_thread(lambda: [engine.check(req, p) for p in prompts])  # off the event loop
        limits = [engine.max_tokens(req, x) for x in ids]
        echoes = [(p if isinstance(p, str) else engine.run.tokenizer.decode(p)) if req.echo else None for p in prompts]
        gens = choices_of(ids, req, stops(req), limits, req.logprobs, echoes)
        rid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())

        def logprobs(tokens):
            return None if req.logprobs is None else completion_logprobs(tokens, engine.token_text)
        if req.stream:
            def chunk(index, piece, finish, first):
                return {"id": rid, "object": "text_completion", "created": created, "model": engine.name,
                        "choices": [{"index": index, "text": piece.text if piece else "",
                                     "logprobs": logprobs(piece.tokens) if piece else None, "finish_reason": finish}]}
            return await stream(gens, ids, req, chunk)
        choices, usage = await run_choices(gens, ids, req)
        return {"id": rid, "object": "text_completion", "created": created, "model": engine.name,
                "choices": [{"index": k, "text": t, "logprobs": logprobs(tokens), "finish_reason": f}
                            for k, (t, tokens, f) in enumerate(choices)], "usage": usage}

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest):
        if req.top_logprobs is not None and not req.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        count_sequences(1, req)
        ids = [await asyncio.to_thread(lambda: engine.check(req, engine.render_chat(req.messages)))]
        top = (req.top_logprobs or 0) if req.logprobs else None
        # Without a limit an answer may take the rest of the context (up to the cap), as in OpenAI's API.
        limits = [engine.max_tokens(req, ids[0], default=None)]
        gens = choices_of(ids, req, stops(req, engine.chat_template.get("stop", [])), limits, top, [None],
                          engine.turn_end)
        rid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())

        def logprobs(tokens):
            return None if top is None else chat_logprobs(tokens, engine.token_text)
        if req.stream:
            def chunk(index, piece, finish, first):
                delta = {} if piece is None else \
                    ({"role": "assistant", "content": piece.text} if first else {"content": piece.text})
                return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": engine.name,
                        "choices": [{"index": index, "delta": delta, "logprobs": logprobs(piece.tokens) if piece else None,
                                     "finish_reason": finish}]}
            return await stream(gens, ids, req, chunk)
        choices, usage = await run_choices(gens, ids, req)
        return {"id": rid, "object": "chat.completion", "created": created, "model": engine.name,
                "choices": [{"index": k, "message": {"role": "assistant", "content": t}, "logprobs": logprobs(tokens),
                             "finish_reason": f} for k, (t, tokens, f) in enumerate(choices)], "usage": usage}

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

    @app.post("/v1/explain")
    async def explain(req: ExplainRequest):
        out = await asyncio.to_thread(engine.explain, req)
        return {"object": "explanation", "model": engine.name, **out}

    @app.get("/", response_class=HTMLResponse)
    async def chat_page():
        if engine.kind != "generator" and engine.images:  # nothing to chat with; say what it serves
            return HTMLResponse(f"<p>{html.escape(engine.name)} is an image classifier: POST images to "
                                "<code>/v1/classify</code>.</p>", status_code=404)
        notice = "" if engine.chat_trained else \
            f'<p id="notice" role="status">{html.escape(engine.name)} {html.escape(NOT_CHAT_TRAINED)}.</p>'
        return CHAT_PAGE.read_text(encoding="utf-8").replace("{{MODEL}}", html.escape(engine.name)) \
            .replace("{{NOTICE}}", notice)

    return app


def serve(run_dir: str | Path, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          max_tokens_cap: int = 1024, max_concurrency: int = 16, max_batch: int = 16,
          compile: bool = False, max_context: int | None = None, allowed_hosts: list[str] | None = None) -> None:
    import uvicorn

    from lmforge.serve.common import allowed_hosts_for

    engine = Engine(run_dir, max_tokens_cap, max_batch, compile, max_context)
    if engine.kind == "generator" and not engine.chat_trained:
        from lmforge.progress import status

        status(f"warning: {engine.name} {NOT_CHAT_TRAINED} (/v1/completions is unaffected)")
    uvicorn.run(create_app(engine, api_key, max_concurrency, allowed_hosts_for(host, allowed_hosts)), host=host,
                port=port, log_level="warning")
