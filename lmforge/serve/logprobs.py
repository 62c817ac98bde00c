"""Log-probabilities in the OpenAI formats: which tokens a piece of text carries, and how to show them.

The batcher scores tokens (:class:`~lmforge.generate.sampling.Scored`); text reaches the client in
pieces that do not line up with tokens (a character can span two byte-level tokens, a stop string
cuts a token, text is held back while it may start a stop string). Each scored token is therefore
placed at the character offset where its text starts in the choice's whole text, and a piece
carries the tokens that start inside it: concatenated over a choice, the pieces carry every token
whose text starts before the end of the returned text, whatever the streaming split, and the
end-of-text token if one ended it. Tokens past a stop string start at or after that end and are left out.
"""

from __future__ import annotations

import codecs
from dataclasses import dataclass, field
from typing import Generator

from lmforge.data.tokenizer import token_bytes
from lmforge.generate.sampling import PromptScores, Scored

MAX_LOGPROBS = 20  # alternatives per token (OpenAI: 5 for completions, 20 for chat)


@dataclass(frozen=True)
class Piece:
    """Text for the client and the scored tokens (with their character offsets) that start in it."""
    text: str
    tokens: list[tuple[Scored, int]] = field(default_factory=list)


class TokenText:
    """Each token id's bytes and the string shown for it (special tokens by their name)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.bytes = token_bytes(tokenizer)

    def __call__(self, token: int) -> str:
        raw = self.bytes[token]
        return raw.decode("utf-8", errors="replace") if raw else (self.tokenizer.id_to_token(token) or "")


class Placer:
    """Character offsets of a stream of tokens in the text they decode to, starting at ``start``.

    A token's offset is the number of whole characters decoded before its bytes: a token that
    completes a character another token began shares that token's offset.
    """

    def __init__(self, text: TokenText, start: int = 0):
        self.text = text
        self.chars = start
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def place(self, scored: Scored) -> tuple[Scored, int]:
        at = self.chars
        self.chars += len(self.decoder.decode(self.text.bytes[scored.id]))
        return scored, at


def placed_prompt(scores: PromptScores, text: TokenText) -> list[tuple[Scored, int]]:
    placer = Placer(text)
    return [placer.place(s) for s in scores.tokens]


def split_by_offset(pieces: Generator[str, None, dict], placed: list[tuple[Scored, int]],
                    start: int, eot_id: int | None = None) -> Generator[Piece, None, dict]:
    """Attach to each text piece (the text from character ``start`` on) the placed tokens that start
    in it; ``placed`` may grow while the pieces are read (it is filled as tokens are consumed).
    An end-of-text token that ended the text comes last, in a piece of its own with no text (it was
    sampled: a harness that asks for one token after a prompt expects its entry).
    Returns what ``pieces`` returns; closing this closes ``pieces``."""
    end, sent = start, 0
    try:
        while True:
            try:
                text = next(pieces)
            except StopIteration as stop:
                if sent < len(placed) and placed[sent][0].id == eot_id:
                    yield Piece("", placed[sent:sent + 1])
                return stop.value
            end += len(text)
            upto = sent
            while upto < len(placed) and placed[upto][1] < end:
                upto += 1
            yield Piece(text, placed[sent:upto])
            sent = upto
    finally:
        pieces.close()


def completion_logprobs(tokens: list[tuple[Scored, int]], text: TokenText) -> dict:
    """The legacy completions format: parallel lists, alternatives as {token text: log-probability}."""
    return {"tokens": [text(s.id) for s, _ in tokens],
            "token_logprobs": [s.logprob for s, _ in tokens],
            "top_logprobs": [None if s.logprob is None else {text(i): lp for i, lp in s.top} for s, _ in tokens],
            "text_offset": [at for _, at in tokens]}


def chat_logprobs(tokens: list[tuple[Scored, int]], text: TokenText) -> dict:
    """The chat format: one object per token with its bytes and its alternatives."""
    def one(token: int, logprob: float) -> dict:
        return {"token": text(token), "logprob": logprob, "bytes": list(text.bytes[token])}
    return {"content": [{**one(s.id, s.logprob), "top_logprobs": [one(i, lp) for i, lp in s.top]}
                        for s, _ in tokens], "refusal": None}
