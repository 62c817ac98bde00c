"""Sampling from a GPT: greedy, temperature, top-k, top-p; KV cache; streaming text with stop strings.

The token loop (:func:`generate_ids`) is batched and yields one (B,) tensor of new ids per step;
:func:`stream_text` turns a single sequence into text pieces as soon as they are complete UTF-8.
"""

from __future__ import annotations

from typing import Iterator

import torch

from lmforge.models.gpt import GPT


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Pick the next id for each row of ``logits`` (B, V); temperature 0 means greedy."""
    if temperature <= 0:
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
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate_ids(model: GPT, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None,
                 generator: torch.Generator | None = None, use_cache: bool = True) -> Iterator[torch.Tensor]:
    """Yield ``max_new_tokens`` steps of new ids, each (B,), continuing ``idx`` (B, T).

    With the cache, the prompt is prefilled once and each step feeds one token. Past the model's
    context the oldest tokens are dropped: the cache is refilled from the last half context.
    """
    block = model.config.block_size
    idx = idx[:, -block:]
    cache = model.new_cache(idx.size(0)) if use_cache else None
    pending = idx  # tokens not yet seen by the cache
    for _ in range(max_new_tokens):
        if cache is None:
            logits, _ = model(idx[:, -block:], last_only=True)
        else:
            if cache.pos + pending.size(1) > block:
                cache.pos = 0
                pending = idx[:, -(block // 2):]
            logits, _ = model(pending, cache=cache, last_only=True)
        nxt = sample_next(logits[:, -1, :], temperature, top_k, top_p, generator)  # (B,)
        idx = torch.cat([idx, nxt[:, None]], dim=1)
        pending = nxt[:, None]
        yield nxt


def stream_text(model: GPT, tokenizer, prompt: str, max_new_tokens: int = 200, temperature: float = 0.8,
                top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                stop: list[str] | None = None, eot_id: int | None = None) -> Iterator[str]:
    """Yield text pieces of one continuation of ``prompt``.

    Stops at ``eot_id``, at any ``stop`` string (which is not emitted), or after ``max_new_tokens``.
    Text is held back while it might be the start of a stop string or ends inside a UTF-8 character.
    """
    device = next(model.parameters()).device
    ids = tokenizer.encode(prompt, add_special_tokens=False).ids or ([eot_id] if eot_id is not None else [0])
    gen = None
    if seed is not None:
        gen = torch.Generator(device=device).manual_seed(seed)
    stop = [s for s in (stop or []) if s]
    out_ids: list[int] = []
    emitted = 0  # characters of the decoded continuation already yielded
    x = torch.tensor([ids], dtype=torch.long, device=device)
    for nxt in generate_ids(model, x, max_new_tokens, temperature, top_k, top_p, gen):
        t = int(nxt[0])
        if eot_id is not None and t == eot_id:
            break
        out_ids.append(t)
        text = tokenizer.decode(out_ids)
        if text.endswith("\ufffd"):
            continue  # a multi-byte character is not complete yet
        hits = [i for i in (text.find(s) for s in stop) if i >= 0]
        if hits:
            cut = min(hits)
            if cut > emitted:
                yield text[emitted:cut]
            return
        safe = len(text)
        for s in stop:  # hold back a suffix that could grow into a stop string
            for k in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:k]):
                    safe = min(safe, len(text) - k)
                    break
        if safe > emitted:
            yield text[emitted:safe]
            emitted = safe
    text = tokenizer.decode(out_ids)
    if len(text) > emitted:
        yield text[emitted:]
