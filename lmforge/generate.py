"""Sampling from a decoder (GPT, Llama, LSTM): greedy, temperature, top-k, top-p; KV cache; streaming
text with stop strings.

The token loop (:func:`generate_ids`) is batched and yields one (B,) tensor of new ids per step;
:func:`stream_text` turns a single sequence into text pieces as soon as they are complete UTF-8.
"""

from __future__ import annotations

import weakref
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Generator, Iterator

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from lmforge.device import compile_fn
from lmforge.models.decoder import Decoder, KVCache


GREEDY_BELOW = 1e-5  # temperatures this small sample the likeliest token anyway


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
class _Decoder:
    cache: KVCache
    step: DecodeStep | None = None
    busy: bool = False  # a generation is using the cache (another one gets a private decoder)


_decoders: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _decoder(model: Decoder, batch_size: int, max_len: int, compile: bool, cuda_graph: bool | None) -> _Decoder:
    """The model's static cache and captured step for this batch size and length, made once.

    Reusing them keeps graph capture and compilation out of every call after the first (a server
    calls with the same shapes again and again). Keyed by the weights' storage, so moving or
    casting the model gets fresh ones. Only the latest few shapes are kept.
    """
    w = model.token_embedding().weight
    key = (batch_size, max_len, compile, cuda_graph, w.device, w.dtype, w.data_ptr())
    per_model = _decoders.setdefault(model, {})
    if key in per_model and per_model[key].busy:  # a second generation in flight: its own buffers
        return _Decoder(model.new_cache(batch_size, max_len))
    if key not in per_model:
        while len(per_model) >= 4:
            per_model.pop(next(iter(per_model)))
        per_model[key] = _Decoder(model.new_cache(batch_size, max_len))
    return per_model[key]


@torch.no_grad()
def generate_ids(model: Decoder, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None,
                 generator: torch.Generator | None = None, use_cache: bool = True,
                 compile: bool = False, cuda_graph: bool | None = None) -> Iterator[torch.Tensor]:
    """Yield ``max_new_tokens`` steps of new ids, each (B,), continuing ``idx`` (B, T).

    With the cache, the prompt is prefilled once and each step feeds one token through a
    :class:`DecodeStep` (a CUDA graph on CUDA). The next step is launched before the current ids
    are yielded, so the device keeps working while the caller reads them. Past the model's
    context the oldest tokens are dropped: the cache is refilled from the last half context.
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
    # The cache length is rounded up to a multiple of 128 so that calls of similar lengths share
    # one compiled, captured step (positions past the sequence are masked, never read as keys).
    max_len = min(block, -(-(idx.size(1) + max_new_tokens) // 128) * 128)
    decoder = _decoder(model, idx.size(0), max_len, compile, cuda_graph)
    decoder.busy = True
    try:
        yield from _decode(model, decoder, idx, max_new_tokens, temperature, top_k, top_p, generator,
                           compile, cuda_graph)
    finally:
        decoder.busy = False


def _decode(model, decoder, idx, max_new_tokens, temperature, top_k, top_p, generator, compile, cuda_graph):
    block = model.config.block_size
    cache = decoder.cache
    cache.pos = 0
    logits = model(idx, cache=cache, last_only=True)[0][:, -1, :]
    recent = [idx]
    for i in range(max_new_tokens):
        nxt = sample_next(logits, temperature, top_k, top_p, generator)  # (B,)
        if i + 1 < max_new_tokens:
            if cache.pos == cache.max_len:  # context full: restart from the last half of it
                context = torch.cat(recent + [nxt[:, None]], dim=1)[:, -(block // 2):]
                recent, cache.pos = [context], 0
                logits = model(context, cache=cache, last_only=True)[0][:, -1, :]
            else:
                decoder.step = decoder.step or DecodeStep(model, cache, cache.pos, compile, cuda_graph)
                logits = decoder.step(nxt, cache.pos)
                cache.pos += 1
                recent.append(nxt[:, None])
        yield nxt


def stream_text(model: Decoder, tokenizer, prompt: str, max_new_tokens: int = 200, temperature: float = 0.8,
                top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                stop: list[str] | None = None, eot_id: int | None = None,
                prompt_ids: list[int] | None = None, compile: bool = False) -> Generator[str, None, dict]:
    """Yield text pieces of one continuation of ``prompt`` (or of ``prompt_ids``); see :func:`text_pieces`.
    ``compile`` fuses the decode step with ``torch.compile`` (:class:`DecodeStep`)."""
    device = next(model.parameters()).device
    ids = prompt_ids if prompt_ids is not None else tokenizer.encode(prompt, add_special_tokens=False).ids
    ids = ids or ([eot_id] if eot_id is not None else [0])
    gen = None
    if seed is not None:
        gen = torch.Generator(device=device).manual_seed(seed)
    x = torch.tensor([ids], dtype=torch.long, device=device)
    tokens = (int(nxt[0]) for nxt in generate_ids(model, x, max_new_tokens, temperature, top_k, top_p, gen,
                                                  compile=compile))
    return (yield from text_pieces(tokens, tokenizer, stop, eot_id))


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
