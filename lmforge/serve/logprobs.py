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


class Pieces:
    """Text pieces of one choice (its text from character ``start`` on) with the placed tokens that
    start in each; ``placed`` may grow between calls (it is filled as tokens arrive)."""

    def __init__(self, placed: list[tuple[Scored, int]], start: int = 0, eot_id: int | None = None):
        self.placed, self.eot_id = placed, eot_id
        self.end, self.sent = start, 0  # characters so far; placed tokens already carried

    def piece(self, text: str) -> Piece:
        self.end += len(text)
        upto = self.sent
        while upto < len(self.placed) and self.placed[upto][1] < self.end:
            upto += 1
        tokens, self.sent = self.placed[self.sent:upto], upto
        return Piece(text, tokens)

    def last(self) -> list[Piece]:
        """After the text: an end-of-text token that ended it, in a piece of its own with no text
        (it was sampled: a harness that asks for one token after a prompt expects its entry)."""
        if self.sent < len(self.placed) and self.placed[self.sent][0].id == self.eot_id:
            self.sent += 1
            return [Piece("", self.placed[self.sent - 1:self.sent])]
        return []


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
