"""Completions and chat completions on the decoding engine (``/v1/completions``,
``/v1/chat/completions``), streamed or whole.

Every choice of a request is one sequence of the run's batcher, all submitted at once so that they
decode together. The batcher's thread puts each sampled token straight into the request's asyncio
queue (``loop.call_soon_threadsafe``); the event loop turns tokens into text pieces (stop strings,
held-back UTF-8, log-probabilities placed by character) and sends them. No thread per choice.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from dataclasses import dataclass
from typing import AsyncIterator, Callable

from fastapi import FastAPI
from fastapi.responses import StreamingResponse

from lmforge.generate import PromptScores, SamplingParams, Scored
from lmforge.generate.text import TextStream
from lmforge.serve.common import APIError, Metrics, too_busy
from lmforge.serve.logprobs import Piece, Pieces, Placer, chat_logprobs, completion_logprobs, placed_prompt
from lmforge.serve.protocol import MAX_SEQUENCES_PER_REQUEST, ChatRequest, CompletionRequest, SamplingRequest
from lmforge.serve.served import ServedRun


@dataclass
class Finished:
    """A choice has ended: ``{"completion_tokens", "finish_reason"}``."""

    value: dict


class _ToLoop:
    """The ``out`` of one sequence (see ``ContinuousBatcher.submit``): the batcher's thread hands
    each item to the request's queue as ``(choice index, item)``, in order."""

    def __init__(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue, index: int):
        self.loop, self.queue, self.index = loop, queue, index

    def put(self, item) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (self.index, item))
        except RuntimeError:  # the request's event loop is closed: nobody reads this any more
            pass


class Choice:
    """One choice: its sequence in the batcher and the text pipeline its tokens go through.

    ``echo`` (the prompt's text) comes first, as its own piece, scored too when ``logprobs`` is set
    (the batcher then sends the prompt's scores first).
    """

    def __init__(self, served: ServedRun, ids: list[int], params: SamplingParams, echo: str | None, out: _ToLoop):
        self.served, self.echo, self.scored = served, echo, params.logprobs is not None
        self.empty_prompt = not ids
        start = len(echo) if echo is not None else 0
        self.text = TextStream(served.run.tokenizer, list(params.stop), params.eos_id)
        self.placed: list[tuple[Scored, int]] = []
        self.placer = Placer(served.token_text, start)
        self.pieces = Pieces(self.placed, start, params.eos_id)
        self.done = False
        # An empty prompt starts from the end-of-text token, as a new document would.
        self.reader = served.batcher.submit(ids or [served.eot or 0], params, out=out)

    def opening(self) -> list[Piece]:
        """What is shown before any token: an unscored echo."""
        return [Piece(self.echo)] if self.echo is not None and not self.scored else []

    def feed(self, item) -> list[Piece]:
        """The pieces one item from the batcher (a token, the prompt's scores, or None at the end) makes."""
        if isinstance(item, BaseException):
            raise item
        if isinstance(item, PromptScores):
            return [Piece(self.echo, [] if self.empty_prompt else placed_prompt(item, self.served.token_text))]
        if item is None:
            return self.finish()
        if isinstance(item, Scored):
            self.placed.append(self.placer.place(item))
            item = item.id
        out = [self.pieces.piece(t) for t in self.text.push(item)]
        return out + self.finish() if self.text.ended else out

    def finish(self) -> list[Piece]:
        self.done = True
        self.reader.close()  # ended early (a stop string): the batcher drops the sequence
        return [self.pieces.piece(t) for t in self.text.end()] + self.pieces.last()


class Completions:
    """The two generating endpoints and what they share: request checks, sampling parameters, the
    choices' stream, and the limit on sequences in flight."""

    def __init__(self, served: ServedRun, metrics: Metrics, max_concurrency: int):
        self.served, self.metrics = served, metrics
        # Sequences (prompts x n) one request may ask for, and all requests together: the
        # amplification of one request (500 prompts x n 16 = 8,000 generations) is refused up front.
        self.max_live = MAX_SEQUENCES_PER_REQUEST * max(1, max_concurrency // 4)
        self.live = 0  # sequences submitted and not ended (read and written on the event loop only)

    def install(self, app: FastAPI) -> None:
        app.add_api_route("/v1/completions", self.completions, methods=["POST"])
        app.add_api_route("/v1/chat/completions", self.chat, methods=["POST"])

    # ------------------------------------------------------------------------------- endpoints
    async def completions(self, req: CompletionRequest):
        s = self.served
        prompt = req.prompt
        prompts = [prompt] if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)) else prompt
        if not prompts or any(len(p) == 0 and not isinstance(p, str) for p in prompts):
            raise APIError(400, "prompt must not be empty", param="prompt")
        self.count_sequences(len(prompts), req)
        ids = await asyncio.to_thread(lambda: [self.check(req, p) for p in prompts])  # off the event loop
        limits = [self.max_tokens(req, x) for x in ids]
        echoes = [(p if isinstance(p, str) else s.run.tokenizer.decode(p)) if req.echo else None for p in prompts]
        specs = [(x, limit, echo) for x, limit, echo in zip(ids, limits, echoes)]
        rid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())

        def logprobs(tokens):
            return None if req.logprobs is None else completion_logprobs(tokens, s.token_text)
        if req.stream:
            def chunk(index, piece, finish, first):
                return {"id": rid, "object": "text_completion", "created": created, "model": s.name,
                        "choices": [{"index": index, "text": piece.text if piece else "",
                                     "logprobs": logprobs(piece.tokens) if piece else None, "finish_reason": finish}]}
            return self.stream(req, specs, self.stops(req), req.logprobs, s.eot, chunk)
        choices, usage = await self.whole(req, specs, self.stops(req), req.logprobs, s.eot)
        return {"id": rid, "object": "text_completion", "created": created, "model": s.name,
                "choices": [{"index": k, "text": t, "logprobs": logprobs(tokens), "finish_reason": f}
                            for k, (t, tokens, f) in enumerate(choices)], "usage": usage}

    async def chat(self, req: ChatRequest):
        s = self.served
        if req.top_logprobs is not None and not req.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        self.count_sequences(1, req)
        ids = await asyncio.to_thread(lambda: self.check(req, s.render_chat(req.messages)))
        top = (req.top_logprobs or 0) if req.logprobs else None
        # Without a limit an answer may take the rest of the context (up to the cap), as in OpenAI's API.
        specs = [(ids, self.max_tokens(req, ids, default=None), None)]
        stop = self.stops(req, s.chat_template.get("stop", []))
        rid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())

        def logprobs(tokens):
            return None if top is None else chat_logprobs(tokens, s.token_text)
        if req.stream:
            def chunk(index, piece, finish, first):
                delta = {} if piece is None else \
                    ({"role": "assistant", "content": piece.text} if first else {"content": piece.text})
                return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": s.name,
                        "choices": [{"index": index, "delta": delta, "logprobs": logprobs(piece.tokens) if piece else None,
                                     "finish_reason": finish}]}
            return self.stream(req, specs, stop, top, s.turn_end, chunk)
        choices, usage = await self.whole(req, specs, stop, top, s.turn_end)
        return {"id": rid, "object": "chat.completion", "created": created, "model": s.name,
                "choices": [{"index": k, "message": {"role": "assistant", "content": t}, "logprobs": logprobs(tokens),
                             "finish_reason": f} for k, (t, tokens, f) in enumerate(choices)], "usage": usage}

    # ------------------------------------------------------------------------- request checks
    def check(self, req: SamplingRequest, prompt: str | list[int]) -> list[int]:
        """The prompt's token ids; 400 for a prompt past the context or ids outside the vocabulary."""
        s = self.served
        s.require("generator", req.model, "completions")
        req.refuse_unsupported()
        if isinstance(prompt, str):
            ids = s.run.tokenizer.encode(prompt, add_special_tokens=False).ids
        else:
            ids, vocab = list(prompt), s.run.model.config.vocab_size
            if any(not 0 <= t < vocab for t in ids):
                raise APIError(400, f"prompt token ids must be in [0, {vocab})", param="prompt")
        if len(ids) >= s.context:
            raise APIError(400, f"the prompt has {len(ids)} tokens; this model's context is {s.context}",
                           param="prompt", code="context_length_exceeded")
        self.logit_bias(req)
        return ids

    def logit_bias(self, req: SamplingRequest) -> dict[int, float] | None:
        """The request's ``logit_bias`` as {token id: bias}; 400 for ids outside the vocabulary or
        biases outside [-100, 100] (OpenAI's range)."""
        if not req.logit_bias:
            return None
        vocab, bias = self.served.run.model.config.vocab_size, {}
        for key, value in req.logit_bias.items():
            if not (key.isascii() and key.isdigit()) or not 0 <= int(key) < vocab or not -100 <= value <= 100:
                raise APIError(400, f"logit_bias maps token ids in [0, {vocab}) to values in [-100, 100]; "
                                    f"got {key!r}: {value}", param="logit_bias")
            bias[int(key)] = value
        return bias

    def max_tokens(self, req: SamplingRequest, ids: list[int], default: int | None = 16) -> int:
        """The request's token limit (``default`` None: what is left of the context); 400 past the cap."""
        cap = self.served.cap
        given = getattr(req, "max_completion_tokens", None) or req.max_tokens
        if given is None:
            given = default if default is not None else min(cap, self.served.context - len(ids))
        if given > cap:
            raise APIError(400, f"max_tokens {given} is over this server's cap of {cap}", param="max_tokens")
        return given

    @staticmethod
    def stops(req: SamplingRequest, extra: list[str] = ()) -> list[str]:
        given = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        return given + list(extra)

    def count_sequences(self, n_prompts: int, req: SamplingRequest) -> None:
        k = n_prompts * req.n
        if k > MAX_SEQUENCES_PER_REQUEST:
            raise APIError(400, f"{n_prompts} prompt(s) x n {req.n} = {k} sequences; at most "
                                f"{MAX_SEQUENCES_PER_REQUEST} per request", param="prompt")
        if self.live + k > self.max_live:
            raise too_busy(f"{self.live} sequences are being generated (at most {self.max_live}); retry shortly")

    def params(self, req: SamplingRequest, max_tokens: int, seed: int | None, stop: list[str],
               logprobs: int | None, echo: bool, end: int | None) -> SamplingParams:
        return SamplingParams(max_tokens=max_tokens, temperature=req.temperature,
                              top_k=req.top_k if req.top_k and req.top_k > 0 else None, top_p=req.top_p,
                              seed=seed, presence_penalty=req.presence_penalty,
                              frequency_penalty=req.frequency_penalty, logit_bias=self.logit_bias(req),
                              logprobs=logprobs, prompt_logprobs=echo and logprobs is not None, eos_id=end,
                              stop=tuple(stop))

    # ---------------------------------------------------------------------- the choices' stream
    async def pieces(self, req: SamplingRequest, specs: list[tuple[list[int], int, str | None]], stop: list[str],
                     logprobs: int | None, end: int | None) -> AsyncIterator[tuple[int, Piece | Finished]]:
        """(choice index, text piece or :class:`Finished`) of every choice as they come; choice
        index = prompt * n + j for ``specs`` = [(prompt ids, max tokens, echo)]. Leaving early
        (a client gone) cancels the choices still running."""
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()
        choices: list[Choice] = []
        try:
            for ids, limit, echo in specs:
                for j in range(req.n):
                    seed = None if req.seed is None else req.seed + j
                    params = self.params(req, limit, seed, stop, logprobs, echo is not None, end)
                    choices.append(Choice(self.served, ids, params, echo, _ToLoop(loop, queue, len(choices))))
                    self.live += 1
            for k, c in enumerate(choices):
                for p in c.opening():
                    yield k, p
            running = len(choices)
            while running:
                k, item = await queue.get()
                c = choices[k]
                if c.done:
                    continue  # what the batcher sent before it saw the sequence cancelled
                for p in c.feed(item):
                    yield k, p
                if c.done:
                    running -= 1
                    self.live -= 1
                    self.metrics.count_tokens(len(specs[k // req.n][0]), c.text.sampled)
                    yield k, Finished(c.text.result)
        finally:
            for c in choices:
                if not c.done:
                    c.reader.close()
                    self.live -= 1

    async def whole(self, req, specs, stop, logprobs, end) -> tuple[list[tuple[str, list, str]], dict]:
        """Non-streaming: every choice's (text, scored tokens, finish reason), and the usage."""
        n = len(specs) * req.n
        pieces, results = [[] for _ in range(n)], [None] * n
        async with contextlib.aclosing(self.pieces(req, specs, stop, logprobs, end)) as items:
            async for index, item in items:
                if isinstance(item, Finished):
                    results[index] = item.value
                else:
                    pieces[index].append(item)
        choices = [("".join(x.text for x in p), [t for x in p for t in x.tokens], r["finish_reason"])
                   for p, r in zip(pieces, results)]
        return choices, usage_of(specs, req, sum(r["completion_tokens"] for r in results))

    def stream(self, req, specs, stop, logprobs, end, make_chunk: Callable) -> StreamingResponse:
        """Server-Sent Events: each choice opens with its role chunk, ends with its finish reason;
        then the usage if asked for, then ``[DONE]``."""
        async def events():
            started, completion_tokens = set(), 0
            async with contextlib.aclosing(self.pieces(req, specs, stop, logprobs, end)) as items:
                async for index, item in items:
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
                yield sse({**last, "choices": [], "usage": usage_of(specs, req, completion_tokens)})
            yield "data: [DONE]\n\n"
        return _ClosingStreamingResponse(events(), media_type="text/event-stream")


def sse(obj) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def usage_of(specs, req: SamplingRequest, completion_tokens: int) -> dict:
    prompt_tokens = sum(len(ids) for ids, _, _ in specs) * req.n
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


class _ClosingStreamingResponse(StreamingResponse):
    """Closes its body generator when the response ends, however it ends. When a client
    disconnects, Starlette cancels the streaming task wherever it is; if that is outside the
    generator (at a ``send``), the generator stays suspended at a ``yield`` and the generation
    behind it stops only when the generator is finalised (the whole answer generated for nobody)."""

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()
