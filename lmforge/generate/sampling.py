"""How a continuation is sampled and when it stops: one :class:`SamplingParams` for every caller
(the CLI verbs, chat, evaluation samples, the server, the support app), and the per-sequence
:class:`Sampler` that the decoding engine applies to each step's logits.

Order of operations on a step's logits (1, V), as in OpenAI's API and vLLM: penalties and logit
bias first, then temperature, top-k and top-p. Log-probabilities (``logprobs``) are the model's own
distribution, before any of them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch


GREEDY_BELOW = 1e-5  # temperatures this small sample the likeliest token anyway


@dataclass(frozen=True)
class SamplingParams:
    """What to sample and when to stop (the engine stops at ``max_tokens``, at ``eos_id`` — which is
    yielded —, or when the reader stops reading; ``stop`` strings are cut by the text layer)."""

    max_tokens: int = 200
    temperature: float = 1.0  # 0 (or below GREEDY_BELOW): greedy
    top_k: int | None = None  # keep the k likeliest tokens (None or 0: all)
    top_p: float | None = None  # nucleus sampling (None or 1: all)
    seed: int | None = None  # a private generator per sequence; None: torch's global one
    presence_penalty: float = 0.0  # subtracted from the logit of every token generated so far
    frequency_penalty: float = 0.0  # ... times the number of times it was generated
    logit_bias: dict[int, float] | None = None  # added to those tokens' logits
    logprobs: int | None = None  # None: plain ids; k: each token a Scored with k alternatives
    prompt_logprobs: bool = False  # first deliver a PromptScores for the prompt's own tokens
    eos_id: int | None = None
    stop: tuple[str, ...] = field(default=())

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    @property
    def penalised(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty)


class Scored(NamedTuple):
    """A token with its log-probability and the ``k`` likeliest tokens' (id, log-probability)."""
    id: int
    logprob: float | None  # None for a prompt's first token: nothing precedes it
    top: list[tuple[int, float]]


class PromptScores(NamedTuple):
    """The prompt's tokens, each scored by the model given the tokens before it."""
    tokens: list[Scored]


def score_rows(logits: torch.Tensor, chosen: torch.Tensor, k: int) -> list[Scored]:
    """Per row of ``logits`` (N, V): the log-probability of ``chosen`` (N,) and the top ``k``."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    picked = logp.gather(1, chosen[:, None].to(logp.device))[:, 0].tolist()
    top_v, top_i = logp.topk(min(k, logp.size(-1)), dim=-1) if k else (logp[:, :0], chosen[:, None][:, :0])
    return [Scored(int(t), lp, list(zip(ti, tv)))
            for t, lp, ti, tv in zip(chosen.tolist(), picked, top_i.tolist(), top_v.tolist())]


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Pick the next id for each row of ``logits`` (B, V); temperature 0 (or below
    ``GREEDY_BELOW``, where dividing by it overflows float32) means greedy."""
    if temperature < GREEDY_BELOW:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and 0 < top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and 0 < top_p < 1:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # Drop a token when the tokens before it already reach top_p (the first always stays).
        drop = (cum - sorted_logits.softmax(dim=-1)) >= top_p
        drop[..., 0] = False  # rounding must not drop the likeliest token too (top_p near 0)
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


class Sampler:
    """One sequence's sampling state: its params, its random generator and the counts of the tokens
    it generated (kept only when a penalty needs them)."""

    def __init__(self, params: SamplingParams, device: torch.device, generator: torch.Generator | None = None):
        self.params = params
        if generator is None and params.seed is not None:
            generator = torch.Generator(device=device).manual_seed(params.seed)
        self.generator = generator
        self.counts: dict[int, int] = {}

    def choose(self, logits: torch.Tensor, greedy: int | None = None) -> int | Scored:
        """The next token from ``logits`` (1, V), scored if the params ask for it. ``greedy`` is the
        row's argmax when the caller already has it (a batch's argmax is one call for all rows)."""
        p = self.params
        scores = logits
        if self.counts or p.logit_bias:
            logits = logits.clone()
            greedy = None  # the argmax was taken before these changes
        if self.counts:
            ids = torch.tensor(list(self.counts), device=logits.device)
            times = torch.tensor(list(self.counts.values()), dtype=logits.dtype, device=logits.device)
            logits[0, ids] -= p.frequency_penalty * times + p.presence_penalty
        if p.logit_bias:
            ids = torch.tensor(list(p.logit_bias), device=logits.device)
            logits[0, ids] += torch.tensor(list(p.logit_bias.values()), dtype=logits.dtype, device=logits.device)
        if p.greedy and greedy is not None:
            if p.logprobs is None:
                return greedy
            token = torch.tensor([greedy])
        else:
            token = sample_next(logits, p.temperature, p.top_k, p.top_p, self.generator)
        return int(token[0]) if p.logprobs is None else score_rows(scores, token, p.logprobs)[0]

    def seen(self, token: int) -> None:
        """Count a generated token (for the penalties)."""
        if self.params.penalised:
            self.counts[token] = self.counts.get(token, 0) + 1
