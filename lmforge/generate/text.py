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
    """Turn a stream of token ids into text pieces as soon as they are safe to show (see
    :class:`TextStream`). Returns (as the generator's value) :attr:`TextStream.result`. Stopping
    early closes ``tokens`` (a server's batcher then frees the sequence's slot)."""
    text = TextStream(tokenizer, stop, eot_id)
    try:
        for t in tokens:
            yield from text.push(t)
            if text.ended:
                break
    finally:
        if hasattr(tokens, "close"):
            tokens.close()
    yield from text.end()
    return text.result


class TextStream:
    """Token ids in (:meth:`push`), text pieces out as soon as they are safe to show.

    Ends at ``eot_id`` or at any ``stop`` string (which is not shown); :meth:`end` then gives
    what was held back. Text is held back while it might be the start of a stop string or ends
    inside a UTF-8 character. Push-style, so that a reader that must not block (an event loop fed
    by the batcher's thread) and a plain iterator (:func:`text_pieces`) share it.
    """

    def __init__(self, tokenizer, stop: list[str] | None = None, eot_id: int | None = None):
        self.tokenizer, self.eot_id = tokenizer, eot_id
        self.stop = [s for s in (stop or []) if s]
        self.longest = max((len(s) for s in self.stop), default=0)
        self.ids: list[int] = []
        # Decoding only a window keeps this linear in the continuation's length: ``ids[start:read]``
        # were already turned into text and are decoded again only as context (so that tokenizers
        # whose decoding depends on the neighbour, e.g. WordPiece's "##" or a leading space, stay
        # exact); ``ids[read:]`` are new. The window moves on after every complete piece.
        self.start = self.read = 0
        self.text = ""  # the whole continuation decoded so far, shown or held back
        self.emitted = 0  # characters of ``text`` already shown
        self.sampled = 0
        self.finish = "length"
        self.ended = False  # by the end-of-text token or a stop string: push no more
        self.cut = False  # by a stop string: nothing held back is shown

    @property
    def result(self) -> dict:
        """``{"completion_tokens": n, "finish_reason": "stop"|"length"}``."""
        return {"completion_tokens": self.sampled, "finish_reason": self.finish}

    def _new_text(self) -> str:
        decode = self.tokenizer.decode
        return decode(self.ids[self.start:])[len(decode(self.ids[self.start:self.read])):]

    def push(self, token: int) -> list[str]:
        """The pieces (none or one) that ``token`` makes safe to show."""
        self.sampled += 1
        if self.eot_id is not None and token == self.eot_id:
            self.finish, self.ended = "stop", True
            return []
        self.ids.append(token)
        piece = self._new_text()
        if not piece or piece.endswith("\ufffd"):
            return []  # nothing to show yet, or a multi-byte character is not complete yet
        searched = max(self.emitted, len(self.text) - self.longest + 1, 0)  # no stop string ends before this
        text = self.text = self.text + piece
        self.start, self.read = self.read, len(self.ids)
        hits = [i for i in (text.find(s, searched) for s in self.stop) if i >= 0]
        if hits:
            self.finish, self.ended, self.cut = "stop", True, True
            cut = min(hits)
            return [text[self.emitted:cut]] if cut > self.emitted else []
        safe = len(text)
        for s in self.stop:  # hold back a suffix that could grow into a stop string
            for k in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:k]):
                    safe = min(safe, len(text) - k)
                    break
        if safe <= self.emitted:
            return []
        shown, self.emitted = text[self.emitted:safe], safe
        return [shown]

    def end(self) -> list[str]:
        """The text held back, once the tokens have ended (unless a stop string cut them)."""
        if self.cut:
            return []
        self.text += self._new_text()
        shown, self.emitted = self.text[self.emitted:], len(self.text)
        return [shown] if shown else []
