"""Streaming text from the decoding engine: pieces of a continuation as soon as they are safe to
show (complete UTF-8, not possibly the start of a stop string)."""

from __future__ import annotations

from typing import Generator, Iterator

from lmforge.generate.engine import cache_length, engine_for
from lmforge.generate.sampling import SamplingParams
from lmforge.models.decoder import Decoder


SHARED_ROWS = 4  # rows of a text engine: concurrent callers (support conversations) decode together


def stream_text(model: Decoder, tokenizer, prompt: str, params: SamplingParams,
                prompt_ids: list[int] | None = None, compile: bool = False) -> Generator[str, None, dict]:
    """Yield text pieces of one continuation of ``prompt`` (or of ``prompt_ids``); see :func:`text_pieces`.

    Decoded by the model's shared engine (:func:`~lmforge.generate.engine.engine_for`), one row of
    it. ``compile`` fuses the decode step with ``torch.compile``, for one row only (each batch size
    is compiled on its own). A prompt past the model's context keeps its last tokens.
    """
    ids = prompt_ids if prompt_ids is not None else tokenizer.encode(prompt, add_special_tokens=False).ids
    ids = (ids or ([params.eos_id] if params.eos_id is not None else [0]))[-model.config.block_size:]
    engine = engine_for(model, 1 if compile else SHARED_ROWS, cache_length(model, len(ids) + params.max_tokens),
                        compile)
    return (yield from text_pieces(engine.submit(ids, params), tokenizer, list(params.stop), params.eos_id))


def text_pieces(tokens: Iterator[int], tokenizer, stop: list[str] | None = None,
                eot_id: int | None = None) -> Generator[str, None, dict]:
    """Turn a stream of token ids into text pieces as soon as they are safe to show.

    Stops at ``eot_id``, at any ``stop`` string (which is not emitted), or when ``tokens`` ends.
    Text is held back while it might be the start of a stop string or ends inside a UTF-8 character.
    Returns (as the generator's value) ``{"completion_tokens": n, "finish_reason": "stop"|"length"}``.
    Stopping early closes ``tokens`` (a server's batcher then frees the sequence's slot).
    """
    stop = [s for s in (stop or []) if s]
    longest = max((len(s) for s in stop), default=0)
    ids: list[int] = []
    # Decoding only a window keeps this linear in the continuation's length: ``ids[start:read]``
    # were already turned into text and are decoded again only as context (so that tokenizers
    # whose decoding depends on the neighbour, e.g. WordPiece's "##" or a leading space, stay
    # exact); ``ids[read:]`` are new. The window moves on after every complete piece.
    start = read = 0
    text = ""  # the whole continuation decoded so far, shown or held back
    sampled, finish = 0, "length"
    emitted = 0  # characters of ``text`` already yielded

    def new_text() -> str:
        return tokenizer.decode(ids[start:])[len(tokenizer.decode(ids[start:read])):]

    try:
        for t in tokens:
            sampled += 1
            if eot_id is not None and t == eot_id:
                finish = "stop"
                break
            ids.append(t)
            piece = new_text()
            if not piece or piece.endswith("\ufffd"):
                continue  # nothing to show yet, or a multi-byte character is not complete yet
            searched = max(emitted, len(text) - longest + 1, 0)  # no stop string ends before this
            text += piece
            start, read = read, len(ids)
            hits = [i for i in (text.find(s, searched) for s in stop) if i >= 0]
            if hits:
                cut = min(hits)
                if cut > emitted:
                    yield text[emitted:cut]
                return {"completion_tokens": sampled, "finish_reason": "stop"}
            safe = len(text)
            for s in stop:  # hold back a suffix that could grow into a stop string
                for k in range(min(len(s) - 1, len(text)), 0, -1):
                    if text.endswith(s[:k]):
                        safe = min(safe, len(text) - k)
                        break
            if safe > emitted:
                yield text[emitted:safe]
                emitted = safe
    finally:
        if hasattr(tokens, "close"):
            tokens.close()
    text += new_text()
    if len(text) > emitted:
        yield text[emitted:]
    return {"completion_tokens": sampled, "finish_reason": finish}
