"""The one decoding engine: every continuation lmforge samples (``generate``, chat, evaluation
samples, the server, the support app, the parity checks) is decoded here.

:class:`ContinuousBatcher` schedules many generations of one decoder together, and new ones join
between steps. For the server, one thread owns the model while any sequence is in flight (it
exits when there is none and the next submission starts it again); an inline batcher (the shared
engines of :func:`engine_for`) has no thread: a reader with nothing to read runs the next round
itself, one reader at a time. Each sequence holds a row ("slot") of one preallocated KV cache.
Every round (1) drops sequences whose reader went away,
(2) admits waiting sequences into free slots, prefilling their prompts together (one forward
pass) into their rows and sampling each one's first token, and (3) runs one decode step over the
occupied rows, each at its own position, and samples every row with that sequence's own
:class:`~lmforge.generate.sampling.Sampler`. A request that arrives while others are decoding
therefore starts at the next step instead of waiting for them to finish.

The decode step runs over the first ``n`` rows only, ``n`` the smallest power of two covering the
highest occupied slot (slots are handed out lowest first), so a lone request does not pay for a
full batch. Each such ``n`` has its own :class:`DecodeStep` (a CUDA graph on CUDA), made when the
batcher starts, before any row holds a sequence.

A full context shifts rather than stops (as nanoGPT's sampler and llama.cpp's context shift do):
when a sequence's row is full and it still has tokens to generate, its last half context is
prefilled again into its row and decoding goes on from there. A server that wants an answer to
end at the context sets ``max_tokens`` to what the context leaves (lmforge's server does so by
default).

A sequence may ask for log-probabilities (``logprobs=k``): each token then comes as a
:class:`~lmforge.generate.sampling.Scored` (its log-probability under the model and the ``k``
likeliest alternatives), and ``prompt_logprobs`` first delivers a
:class:`~lmforge.generate.sampling.PromptScores` for the prompt's own tokens (scoring a text, as
evaluation harnesses do, with ``max_tokens=0``).

Each row is computed independently of the others and draws from its own generator, so a sequence
samples the same tokens alone as among others, up to float rounding of batched matrix products
(in float32 on CPU the tests find the tokens identical: tests/test_batching.py, and 16 concurrent
streams against one-at-a-time in tests/test_serve.py).

:func:`generate_ids` is the synchronous face of the same engine for a fixed batch of prompts of
one length (the CLI, parity checks and benchmarks): one engine per model and shape, made once and
reused, so compilation and graph capture happen on the first call only.
"""

from __future__ import annotations

import heapq
import queue
import threading
import weakref
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Iterator

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from lmforge.device import compile_fn
from lmforge.generate.sampling import PromptScores, Sampler, SamplingParams, Scored, sample_next, score_rows
from lmforge.models.decoder import Decoder
from lmforge.progress import progress


class MatVecLinear(TorchFunctionMode):
    """Linear layers on at most ``max_rows`` rows as a multiply and a sum over the input features.

    For ``torch.compile`` on the CPU only: inductor fuses the two into one vectorised loop that
    streams each weight matrix once, about twice the memory bandwidth of the BLAS matrix-vector
    product ``addmm`` calls for a row or two (decoding reads every weight once per token, so it
    is bound by that bandwidth; bench/RESULTS.md section 13). Eager, the product would be
    materialised; with more rows the BLAS kernel wins.
    """

    def __init__(self, max_rows: int = 4):
        super().__init__()
        self.max_rows = max_rows

    def applies(self, x: torch.Tensor) -> bool:
        return x.numel() <= self.max_rows * x.size(-1)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear and self.applies(args[0]):
            x, weight = args[0], args[1]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            y = (x.unsqueeze(-2) * weight).sum(-1)  # (..., out): weight (out, in) is read row by row
            return y if bias is None else y + bias
        return func(*args, **kwargs)


class DecodeStep:
    """One decoding step for a fixed batch and cache: ids (B,) at position ``pos`` -> logits (B, V).

    Every call is the same computation on the same buffers (the cache is static; the position is a
    device tensor), so on CUDA the step is captured once as a CUDA graph and replayed: one launch
    per token instead of one per kernel. ``compile`` first fuses the step with ``torch.compile``.
    Garbage written while warming up lands at positions no query can see until they are rewritten.
    """

    def __init__(self, model: Decoder, cache, pos: int, compile: bool = False, cuda_graph: bool | None = None,
                 per_row: bool = False):
        device, batch = cache.device, cache.batch_size
        self.ids = torch.zeros(batch, 1, dtype=torch.long, device=device)
        # One position for the whole batch, or (per_row) one per row: rows at different lengths.
        self.pos = torch.full((batch, 1) if per_row else (1,), pos, dtype=torch.long, device=device)

        linear_mode = MatVecLinear if compile and device.type == "cpu" else nullcontext

        def step() -> torch.Tensor:
            with linear_mode():
                logits, _ = model(self.ids, cache=cache, input_pos=self.pos, last_only=True)
            return logits[:, -1, :]

        if compile:
            # On CPU, freezing treats the weights as constants (and pre-packs them for oneDNN where
            # the BLAS path remains, batches over MatVecLinear's 4 rows; measured 430 vs 375
            # tokens/s before the rewrite, bench/RESULTS.md), so the step must be made after
            # training, as generation always is. The C++ wrapper calls the kernels
            # without Python in between: 15-25% more tokens/s at batch 1 for ~20 s more compiling
            # (bench/RESULTS.md section 12). :class:`MatVecLinear` turns the few-row linear layers
            # into fused reductions (section 13).
            options = {"freezing": True, "cpp_wrapper": True} if device.type == "cpu" else None
            self.fn = compile_fn(step, fullgraph=True, dynamic=False, options=options)
        else:
            self.fn = step
        self.graph = None
        if cuda_graph if cuda_graph is not None else device.type == "cuda":
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                for _ in range(3):  # warm-up (and compilation) outside the capture
                    self.fn()
            torch.cuda.current_stream(device).wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.out = self.fn()

    def __call__(self, ids: torch.Tensor, pos: int | torch.Tensor) -> torch.Tensor:
        self.ids.copy_(ids[:, None])
        if isinstance(pos, torch.Tensor):
            self.pos.copy_(pos.view_as(self.pos))
        else:
            self.pos.fill_(pos)
        if self.graph is None:
            return self.fn()
        self.graph.replay()
        return self.out


@dataclass
class _Sequence:
    # The tokens in the row or going into it: the prompt, then each generated token; after a context
    # shift the last half of them, prefilled again.
    tokens: list[int]
    params: SamplingParams
    sampler: Sampler
    out: queue.Queue = field(default_factory=queue.Queue)  # tokens, then None (or an exception); see submit
    cancelled: bool = False
    shifting: bool = False  # the row is full: prefill ``prompt`` again before the next step
    slot: int = -1
    pos: int = 0  # tokens in the cache = position of the next token fed
    last: int = 0  # the token to feed at the next step
    generated: int = 0


class _Reader:
    """The items of one sequence as the batcher puts them out. Closing it (or dropping it), even
    before the first item was read, cancels the sequence: the batcher frees its slot at its next step.
    Of an inline batcher, a reader with nothing to read runs the batcher's next round itself."""

    def __init__(self, seq: _Sequence, batcher: "ContinuousBatcher"):
        self.seq, self.batcher = seq, batcher

    def __iter__(self) -> "_Reader":
        return self

    def __next__(self):
        if self.seq.cancelled:  # closed (or read to its end) before
            raise StopIteration
        if self.batcher.inline:
            while self.seq.out.empty():
                self.batcher.drive(self.seq)
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
                 max_len: int | None = None, inline: bool = False):
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self.model = model
        # Tokens per sequence (prompt and answer): the model's context, or less (the cache is
        # max_batch rows of it, allocated here).
        self.block = min(model.config.block_size, max_len or model.config.block_size)
        self.device = next(model.parameters()).device
        self.max_batch = max_batch
        self.free = list(range(max_batch))  # a heap: the lowest free slot first
        self.active: dict[int, _Sequence] = {}
        self.waiting: list[_Sequence] = []
        self.cond = threading.Condition()
        self.thread: threading.Thread | None = None  # running while a sequence waits or decodes
        # inline: no thread; the readers run the rounds (one at a time), each while it waits. In one
        # caller's thread that saves a thread switch per token (the GIL handed over twice).
        self.inline = inline
        self.driving = threading.Lock()
        self.steps_run = 0  # decode steps so far (tests and metrics read it)
        self.max_rows_seen = 0  # the most sequences decoded in one step
        sizes, n = [], 1
        while n < max_batch:
            sizes.append(n)
            n *= 2
        sizes.append(max_batch)
        # The thread decodes under no_grad whatever mode the caller is in (grad modes are per
        # thread): a cache made under a caller's inference_mode could not be written there.
        with torch.inference_mode(False), torch.no_grad():
            self.cache = model.new_cache(max_batch, self.block)
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

    def submit(self, prompt: list[int], params: SamplingParams, generator: torch.Generator | None = None,
               out=None) -> Iterator[int | Scored | PromptScores]:
        """Queue one generation; iterate the result for its new tokens as they are sampled.

        Generation ends after ``params.max_tokens`` (0: only the prompt is read, for its scores) or
        after ``params.eos_id`` (which is yielded). Closing the iterator early cancels the sequence
        and frees its slot. With ``params.logprobs`` tokens come as :class:`Scored`;
        ``params.prompt_logprobs`` first yields a :class:`PromptScores`. ``generator`` replaces the
        one ``params.seed`` would make (rows of one fixed batch may share one).

        ``out`` (an object with ``put(item)``, called from the batcher's thread) receives the items
        instead: each token, then None at the end or the exception that failed the sequence. An
        event loop's queue behind it needs no thread per reader. The returned iterator then only
        cancels (``close()``); it is not to be read.
        """
        if not prompt:
            raise ValueError("the prompt must have at least one token")
        if len(prompt) > self.block:
            raise ValueError(f"the prompt has {len(prompt)} tokens; the context is {self.block}")
        if out is not None and self.inline:
            raise ValueError("an inline batcher is driven by its readers: it cannot deliver to `out`")
        seq = _Sequence(list(prompt), params, Sampler(params, self.device, generator))
        if out is not None:
            seq.out = out
        with self.cond:
            self.waiting.append(seq)
            if self.thread is None and not self.inline:
                self.thread = threading.Thread(target=self._loop, name="lmforge-batcher", daemon=True)
                self.thread.start()
            self.cond.notify()
        return _Reader(seq, self)

    # ------------------------------------------------------------------------------- the thread
    def _loop(self) -> None:
        while self._round():
            pass

    def drive(self, seq: _Sequence) -> None:
        """Run a round for a reader of an inline batcher unless another reader's round, which this
        one waited for, already gave ``seq`` something to read."""
        with self.driving:
            if seq.out.empty():
                self._round()

    def _round(self) -> bool:
        """Release cancelled sequences, admit waiting ones (and prefill them and those whose context
        shifts), run one decode step; False when nothing is left (a thread then ends)."""
        with self.cond:
            for slot in [s for s, q in self.active.items() if q.cancelled]:
                self._release(slot)
            if not self.waiting and not self.active:
                self.thread = None  # the next submit starts another
                return False
            admitted = [q for q in self.active.values() if q.shifting]
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
        return True

    def _fail(self, seqs: list[_Sequence], error: BaseException) -> None:
        with self.cond:
            for seq in seqs:
                if self.active.get(seq.slot) is seq:
                    seq.out.put(error)
                    self._release(seq.slot)

    def _advance(self, seq: _Sequence, logits: torch.Tensor, greedy: int | None = None) -> None:
        """Sample and emit ``seq``'s next token; a failure there fails that sequence alone."""
        try:
            self._emit(seq, seq.sampler.choose(logits, greedy))
        except Exception as e:
            self._fail([seq], e)

    def _release(self, slot: int) -> None:
        del self.active[slot]
        heapq.heappush(self.free, slot)

    def _emit(self, seq: _Sequence, token: int | Scored) -> None:
        seq.out.put(token)
        seq.generated += 1
        seq.last = token = token.id if isinstance(token, Scored) else token
        seq.sampler.seen(token)
        seq.tokens.append(token)
        if seq.generated >= seq.params.max_tokens or token == seq.params.eos_id:
            self._finish(seq)
        elif seq.pos >= self.block:  # the row is full: go on from its last half context
            seq.tokens = seq.tokens[-(self.block // 2):]
            seq.shifting = True

    def _finish(self, seq: _Sequence) -> None:
        seq.out.put(None)
        with self.cond:
            self._release(seq.slot)

    def _prefill(self, seqs: list[_Sequence]) -> None:
        """The prompts in one forward pass (right-padded to the longest), their caches (keys and
        values, or a recurrent state) copied into their slots, and each one's next token sampled."""
        lengths = [len(s.tokens) for s in seqs]
        x = torch.zeros(len(seqs), max(lengths), dtype=torch.long)
        for i, s in enumerate(seqs):
            x[i, :lengths[i]] = torch.tensor(s.tokens)
        scratch = self.model.new_cache(len(seqs), max(lengths))
        logits, hidden = self.model.prefill(x.to(self.device), torch.tensor(lengths, device=self.device), scratch,
                                            return_hidden=True)
        slots = torch.tensor([s.slot for s in seqs], device=self.device)
        self.cache.write_rows(slots, scratch)
        for i, seq in enumerate(seqs):
            seq.pos = lengths[i]
            if seq.params.prompt_logprobs and not seq.shifting:  # token j scored by the logits at j - 1
                scored = score_rows(self.model.lm_head(hidden[i, :lengths[i] - 1]),
                                    torch.tensor(seq.tokens[1:], dtype=torch.long), seq.params.logprobs or 0)
                seq.out.put(PromptScores([Scored(seq.tokens[0], None, [])] + scored))
            seq.shifting = False
            if seq.params.max_tokens <= 0:
                self._finish(seq)
            else:
                self._advance(seq, logits[i:i + 1])

    def _step(self) -> None:
        with self.cond:
            rows = {slot: seq for slot, seq in self.active.items() if not seq.shifting}
        if not rows:
            return
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


_engines: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_engines_lock = threading.Lock()


def engine_for(model: Decoder, max_batch: int, max_len: int, compile: bool = False,
               cuda_graph: bool | None = None) -> ContinuousBatcher:
    """The model's engine for this many rows of this length, made once and shared by every caller
    (concurrent callers are batched together). Keyed by the weights' storage, so moving or casting
    the model gets a fresh one. Only the latest few shapes are kept per model."""
    w = model.token_embedding().weight
    key = (max_batch, max_len, compile, cuda_graph, w.device, w.dtype, w.data_ptr())
    with _engines_lock:
        per_model = _engines.setdefault(model, {})
        if key not in per_model:
            while len(per_model) >= 4:
                per_model.pop(next(iter(per_model)))  # one still decoding finishes; it is only forgotten
            per_model[key] = ContinuousBatcher(model, max_batch, compile, cuda_graph, max_len=max_len, inline=True)
        return per_model[key]


def cache_length(model: Decoder, tokens: int) -> int:
    """Rows long enough for ``tokens``, rounded up to a multiple of 128 so that calls of similar
    lengths share one engine (and its compiled, captured steps), at most the model's context."""
    return min(model.config.block_size, -(-tokens // 128) * 128)


@torch.no_grad()
def generate_ids(model: Decoder, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None,
                 generator: torch.Generator | None = None, use_cache: bool = True,
                 compile: bool = False, cuda_graph: bool | None = None) -> Iterator[torch.Tensor]:
    """Yield ``max_new_tokens`` steps of new ids, each (B,), continuing ``idx`` (B, T).

    With the cache (the engine), rows draw from ``generator`` in row order. ``use_cache=False`` is
    the reference the engine is tested against: the whole context through the model at every
    step, the oldest tokens dropped past the model's context.
    """
    block = model.config.block_size
    idx = idx[:, -block:]
    if not use_cache:
        for _ in range(max_new_tokens):
            logits, _ = model(idx[:, -block:], last_only=True)
            nxt = sample_next(logits[:, -1, :], temperature, top_k, top_p, generator)
            idx = torch.cat([idx, nxt[:, None]], dim=1)
            yield nxt
        return
    params = SamplingParams(max_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p)
    engine = engine_for(model, idx.size(0), cache_length(model, idx.size(1) + max_new_tokens), compile, cuda_graph)
    readers = [engine.submit(row, params, generator) for row in idx.tolist()]
    try:
        for _ in range(max_new_tokens):
            yield torch.tensor([next(r) for r in readers], device=idx.device)
    finally:
        for r in readers:
            r.close()
