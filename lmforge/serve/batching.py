"""Continuous batching: many generations share one decode step, and new ones join between steps.

One thread owns the model. Each sequence holds a row ("slot") of one preallocated KV cache. Every
iteration the thread (1) drops sequences whose reader went away, (2) admits waiting sequences into
free slots, prefilling their prompts together (one forward pass) into their rows and sampling each
one's first token, and (3) runs one
decode step over the occupied rows, each at its own position, and samples every row with that
request's own settings and random generator. A request that arrives while others are decoding
therefore starts at the next step instead of waiting for them to finish.

The decode step runs over the first ``n`` rows only, ``n`` the smallest power of two covering the
highest occupied slot (slots are handed out lowest first), so a lone request does not pay for a
full batch. Each such ``n`` has its own :class:`~lmforge.generate.DecodeStep` (a CUDA graph on
CUDA), made when the batcher starts, before any row holds a sequence.

A sequence may ask for log-probabilities (``logprobs=k``): each token then comes as a
:class:`Scored` (its log-probability under the model and the ``k`` likeliest alternatives), and
``prompt_logprobs`` first delivers a :class:`PromptScores` for the prompt's own tokens (scoring a
text, as evaluation harnesses do, with ``max_new_tokens=0``). They are the model's own
distribution, before temperature and top-p.

With the same weights, prompt and seed, a sequence samples what :func:`~lmforge.generate.stream_text`
samples alone: each row is computed independently of the others and draws from the request's own
generator in the same order. Batched matrix products may round differently from single-row ones,
so this is exact only up to float rounding; in float32 on CPU the tests find the tokens identical
(tests/test_batching.py, and 16 concurrent streams against one-at-a-time in tests/test_serve.py).
"""

from __future__ import annotations

import heapq
import queue
import threading
from dataclasses import dataclass, field
from typing import Iterator, NamedTuple

import torch

from lmforge.generate import GREEDY_BELOW, DecodeStep, sample_next
from lmforge.models.decoder import Decoder
from lmforge.progress import progress


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


@dataclass
class _Sequence:
    prompt: list[int]
    max_new_tokens: int
    temperature: float
    top_p: float | None
    generator: torch.Generator | None
    eos_id: int | None
    logprobs: int | None = None  # None: plain ids; k: each token a Scored with k alternatives
    prompt_logprobs: bool = False  # deliver a PromptScores before the first token
    presence_penalty: float = 0.0  # subtracted from the logit of every token generated so far
    frequency_penalty: float = 0.0  # ... times the number of times it was generated
    counts: dict[int, int] = field(default_factory=dict)  # generated tokens, counted when a penalty is set
    logit_bias: dict[int, float] | None = None  # added to those tokens' logits before sampling
    out: queue.Queue = field(default_factory=queue.Queue)  # ids, then None (or an exception)
    cancelled: bool = False
    slot: int = -1
    pos: int = 0  # tokens in the cache = position of the next token fed
    last: int = 0  # the token to feed at the next step
    generated: int = 0


class _Reader:
    """The items of one sequence as the batcher puts them out. Closing it (or dropping it), even
    before the first item was read, cancels the sequence: the batcher frees its slot at its next step."""

    def __init__(self, seq: _Sequence):
        self.seq = seq

    def __iter__(self) -> "_Reader":
        return self

    def __next__(self):
        item = self.seq.out.get()
        if item is None:
            self.close()
            raise StopIteration
        if isinstance(item, BaseException):
            self.close()
            raise item
        return item

    def close(self) -> None:
        self.seq.cancelled = True

    __del__ = close


class ContinuousBatcher:
    """Schedules generations of one decoder together; :meth:`submit` returns an iterator of new ids."""

    def __init__(self, model: Decoder, max_batch: int = 16, compile: bool = False, cuda_graph: bool | None = None,
                 max_len: int | None = None):
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self.model = model
        # Tokens per sequence (prompt and answer): the model's context, or less (the cache is
        # max_batch rows of it, allocated here).
        self.block = min(model.config.block_size, max_len or model.config.block_size)
        self.device = next(model.parameters()).device
        self.max_batch = max_batch
        self.cache = model.new_cache(max_batch, self.block)
        self.free = list(range(max_batch))  # a heap: the lowest free slot first
        self.active: dict[int, _Sequence] = {}
        self.waiting: list[_Sequence] = []
        self.cond = threading.Condition()
        self.steps_run = 0  # decode steps so far (tests and metrics read it)
        self.max_rows_seen = 0  # the most sequences decoded in one step
        sizes, n = [], 1
        while n < max_batch:
            sizes.append(n)
            n *= 2
        sizes.append(max_batch)
        with torch.no_grad():
            self.steps = {n: DecodeStep(model, self.cache.rows(0, n), 0, compile, cuda_graph, per_row=True)
                          for n in sizes}
            # Compile every batch size now, not in the first requests that need it (a captured
            # CUDA graph step was compiled while it was captured).
            cold = [(n, step) for n, step in self.steps.items() if compile and step.graph is None]
            if cold:
                bar = progress(total=len(cold), desc="compiling decode steps", unit="batch size")
                for n, step in cold:
                    zeros = torch.zeros(n, dtype=torch.long, device=self.device)
                    step(zeros, zeros)  # writes at position 0, which the row's next prefill rewrites
                    bar.update(1)
                bar.close()
        self.thread = threading.Thread(target=self._loop, name="lmforge-batcher", daemon=True)
        self.thread.start()

    def submit(self, prompt: list[int], max_new_tokens: int, temperature: float = 1.0, top_p: float | None = None,
               seed: int | None = None, eos_id: int | None = None, logprobs: int | None = None,
               prompt_logprobs: bool = False, presence_penalty: float = 0.0,
               frequency_penalty: float = 0.0, logit_bias: dict[int, float] | None = None,
               ) -> Iterator[int | Scored | PromptScores]:
        """Queue one generation; iterate the result for its new token ids as they are sampled.

        Generation ends after ``max_new_tokens`` (0: only the prompt is read, for its scores),
        after ``eos_id`` (which is yielded), or when the context is full. Closing the iterator early
        cancels the sequence and frees its slot. With ``logprobs`` (the number of alternatives,
        0 or more) tokens come as :class:`Scored`; ``prompt_logprobs`` first yields a
        :class:`PromptScores` (with ``logprobs`` alternatives at each prompt token). The penalties
        are OpenAI's: before sampling, each token's logit is lowered by ``presence_penalty`` if it
        was generated before and by ``frequency_penalty`` times the number of times it was;
        ``logit_bias`` adds its value to its tokens' logits.
        """
        if not prompt:
            raise ValueError("the prompt must have at least one token")
        if len(prompt) >= self.block:
            raise ValueError(f"the prompt has {len(prompt)} tokens; the context is {self.block}")
        gen = torch.Generator(device=self.device).manual_seed(seed) if seed is not None else None
        seq = _Sequence(list(prompt), max_new_tokens, temperature, top_p if top_p and top_p < 1 else None, gen, eos_id,
                        logprobs, prompt_logprobs, presence_penalty, frequency_penalty,
                        logit_bias=dict(logit_bias) if logit_bias else None)
        with self.cond:
            self.waiting.append(seq)
            self.cond.notify()
        return self._read(seq)

    @staticmethod
    def _read(seq: _Sequence) -> "_Reader":
        return _Reader(seq)

    # ------------------------------------------------------------------------------- the thread
    def _loop(self) -> None:
        while True:
            with self.cond:
                while not self.waiting and not self.active:
                    self.cond.wait()
                for slot in [s for s, q in self.active.items() if q.cancelled]:
                    self._release(slot)
                admitted = []
                while self.waiting and self.free:
                    seq = self.waiting.pop(0)
                    if seq.cancelled:
                        continue
                    seq.slot = heapq.heappop(self.free)
                    self.active[seq.slot] = seq
                    admitted.append(seq)
            # A failure fails only the sequences it concerns (a forward pass: those in it; sampling:
            # that sequence), and the batcher goes on serving the others.
            with torch.no_grad():
                if admitted:
                    try:
                        self._prefill(admitted)
                    except BaseException as e:
                        self._fail(admitted, e)
                if self.active:
                    try:
                        self._step()
                    except BaseException as e:
                        self._fail(list(self.active.values()), e)

    def _fail(self, seqs: list[_Sequence], error: BaseException) -> None:
        with self.cond:
            for seq in seqs:
                if self.active.get(seq.slot) is seq:
                    seq.out.put(error)
                    self._release(seq.slot)

    def _advance(self, seq: _Sequence, logits: torch.Tensor, greedy: int | None = None) -> None:
        """Sample and emit ``seq``'s next token; a failure there fails that sequence alone."""
        try:
            self._emit(seq, self._sample(seq, logits, greedy))
        except Exception as e:
            self._fail([seq], e)

    def _release(self, slot: int) -> None:
        del self.active[slot]
        heapq.heappush(self.free, slot)

    def _emit(self, seq: _Sequence, token: int | Scored) -> None:
        seq.out.put(token)
        seq.generated += 1
        seq.last = token = token.id if isinstance(token, Scored) else token
        if seq.presence_penalty or seq.frequency_penalty:
            seq.counts[token] = seq.counts.get(token, 0) + 1
        if seq.generated >= seq.max_new_tokens or token == seq.eos_id or seq.pos >= self.block:
            self._finish(seq)

    def _finish(self, seq: _Sequence) -> None:
        seq.out.put(None)
        with self.cond:
            self._release(seq.slot)

    def _sample(self, seq: _Sequence, logits: torch.Tensor, greedy: int | None = None) -> int | Scored:
        """The next token of ``seq`` from its logits (1, V), scored if the sequence asked for it
        (scores are the model's: before penalties, logit bias, temperature and top-p)."""
        scores = logits
        penalised = bool(seq.counts)  # kept only when a penalty is set
        if penalised or seq.logit_bias:
            logits = logits.clone()
            greedy = None  # the batch's argmax was taken before these changes
        if penalised:
            ids = torch.tensor(list(seq.counts), device=logits.device)
            times = torch.tensor(list(seq.counts.values()), dtype=logits.dtype, device=logits.device)
            logits[0, ids] -= seq.frequency_penalty * times + seq.presence_penalty
        if seq.logit_bias:
            ids = torch.tensor(list(seq.logit_bias), device=logits.device)
            logits[0, ids] += torch.tensor(list(seq.logit_bias.values()), dtype=logits.dtype, device=logits.device)
        if seq.temperature < GREEDY_BELOW and greedy is not None:
            if seq.logprobs is None:
                return greedy
            token = torch.tensor([greedy])
        else:
            token = sample_next(logits, seq.temperature, None, seq.top_p, seq.generator)
        return int(token[0]) if seq.logprobs is None else score_rows(scores, token, seq.logprobs)[0]

    def _prefill(self, seqs: list[_Sequence]) -> None:
        """All newly admitted prompts in one forward pass (right-padded to the longest), their caches
        (keys and values, or a recurrent state) copied into their slots, and each one's first token sampled."""
        lengths = [len(s.prompt) for s in seqs]
        x = torch.zeros(len(seqs), max(lengths), dtype=torch.long)
        for i, s in enumerate(seqs):
            x[i, :lengths[i]] = torch.tensor(s.prompt)
        scratch = self.model.new_cache(len(seqs), max(lengths))
        logits, hidden = self.model.prefill(x.to(self.device), torch.tensor(lengths, device=self.device), scratch,
                                            return_hidden=True)
        slots = torch.tensor([s.slot for s in seqs], device=self.device)
        self.cache.write_rows(slots, scratch)
        for i, seq in enumerate(seqs):
            seq.pos = lengths[i]
            if seq.prompt_logprobs:  # token j scored by the logits at j - 1
                scored = score_rows(self.model.lm_head(hidden[i, :lengths[i] - 1]),
                                    torch.tensor(seq.prompt[1:], dtype=torch.long), seq.logprobs or 0)
                seq.out.put(PromptScores([Scored(seq.prompt[0], None, [])] + scored))
            if seq.max_new_tokens <= 0:
                self._finish(seq)
            else:
                self._advance(seq, logits[i:i + 1])

    def _step(self) -> None:
        with self.cond:
            rows = dict(self.active)
        top = max(rows) + 1
        n = next(size for size in self.steps if size >= top)
        ids = torch.zeros(n, dtype=torch.long)
        pos = torch.zeros(n, dtype=torch.long)  # idle rows write at 0, which a prefill rewrites
        for slot, seq in rows.items():
            ids[slot], pos[slot] = seq.last, seq.pos
        logits = self.steps[n](ids.to(self.device), pos.to(self.device))
        greedy = logits.argmax(dim=-1).tolist()
        self.steps_run += 1
        self.max_rows_seen = max(self.max_rows_seen, len(rows))
        for slot, seq in rows.items():
            seq.pos += 1
            self._advance(seq, logits[slot:slot + 1], greedy[slot])
