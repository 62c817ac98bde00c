"""What every decoder family shares: the KV cache and the :class:`Decoder` base class.

A family (GPT, Llama) writes its embeddings, blocks and final norm as ``_trunk``; the base class
turns them into what the spine asks of a generator — logits and loss (:meth:`Decoder.forward`),
a batched prefill of right-padded prompts, last-token classification, a cache, and saving with a
tied head left out — so the decoding engine, the continuous batcher, the trainer and the server
treat every decoder alike.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmforge.models.losses import linear_cross_entropy


class KVCache:
    """Preallocated keys and values: per layer, ``(B, n_kv_head, max_len, head_dim)`` each.

    Shapes never change while decoding: a step writes its keys and values at its positions and
    attends over the whole buffer with a mask of the positions filled so far, so one decode step
    is the same computation every time (what CUDA graphs and ``torch.compile`` need).
    ``pos`` is the number of positions already filled; :meth:`Decoder.forward` advances it.
    What the decoding engine and the batcher use of a cache (``pos``, ``max_len``, ``batch_size``,
    ``device``, :meth:`rows`, :meth:`write_rows`) is all a recurrent family's state needs to offer
    (``models/lstm.py``).
    """

    def __init__(self, n_layer: int, n_kv_head: int, head_dim: int, batch_size: int, max_len: int,
                 device: torch.device | str, dtype: torch.dtype):
        shape = (batch_size, n_kv_head, max_len, head_dim)
        # One tensor per layer, not one (n_layer, ...) tensor: an in-place write into a view of a
        # shared buffer makes torch.compile copy the whole buffer on every step.
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.key_pos = torch.arange(max_len, device=device)
        self.max_len = max_len
        self.pos = 0

    def mask(self, input_pos: torch.Tensor) -> torch.Tensor:
        """Bool mask: the query at position p sees the keys at positions 0..p. ``input_pos`` (T,)
        shared by all rows gives (T, max_len); (B, T), one position per row, gives (B, 1, T, max_len)."""
        if input_pos.dim() == 2:
            return (input_pos[:, :, None] >= self.key_pos)[:, None]
        return input_pos[:, None] >= self.key_pos[None, :]

    @property
    def batch_size(self) -> int:
        return self.k[0].size(0)

    @property
    def device(self) -> torch.device:
        return self.k[0].device

    def write_rows(self, slots: torch.Tensor, other: "KVCache") -> None:
        """Put ``other``'s rows (one per slot, its positions from 0) into rows ``slots`` of this cache."""
        for mine, theirs in ((self.k, other.k), (self.v, other.v)):
            for layer in range(len(mine)):
                mine[layer][slots, :, :theirs[layer].size(2)] = theirs[layer]

    def rows(self, start: int, stop: int) -> "KVCache":
        """The cache of rows ``start:stop`` as views of this one (writes land here)."""
        view = object.__new__(KVCache)
        view.k = [t[start:stop] for t in self.k]
        view.v = [t[start:stop] for t in self.v]
        view.key_pos, view.max_len, view.pos = self.key_pos, self.max_len, 0
        return view

    def update(self, layer: int, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               attend_all: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Store ``k``, ``v`` (B, n_kv_head, T, head_dim) at ``input_pos`` ((T,) for every row, or
        (B, T) per row); return what the queries attend to: the whole buffers when ``attend_all``
        (a mask hides the unfilled positions), else the new keys and values themselves."""
        ck, cv = self.k[layer], self.v[layer]
        if input_pos.dim() == 1:
            ck.index_copy_(2, input_pos, k.to(ck.dtype))
            cv.index_copy_(2, input_pos, v.to(cv.dtype))
        else:  # each row at its own positions (continuous batching)
            at = input_pos[:, None, :, None].expand(-1, k.size(1), -1, k.size(3))  # (B, n_kv_head, T, head_dim)
            ck.scatter_(2, at, k.to(ck.dtype))  # a scatter: faster than indexing by (row, position) pairs
            cv.scatter_(2, at, v.to(cv.dtype))
        if attend_all:
            return ck.to(k.dtype), cv.to(v.dtype)
        return k, v


def packed_positions(segments: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For rows of packed sequences, ``segments`` (B, T) numbering the sequence of each position:
    the positions within each sequence (B, T), restarting at 0, and the attention mask
    (B, 1, T, T) that keeps every query inside its own sequence and causal."""
    T = segments.size(1)
    i = torch.arange(T, device=segments.device)
    starts = torch.ones_like(segments, dtype=torch.bool)
    starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
    pos = i - torch.where(starts, i, 0).cummax(dim=1).values
    same = segments[:, :, None] == segments[:, None, :]
    return pos, (same & (i[:, None] >= i[None, :]))[:, None]


# While recording_attention() is active: the list every attend() call appends its weights to.
_recorded: list[torch.Tensor] | None = None


@contextmanager
def recording_attention() -> Iterator[list[torch.Tensor]]:
    """Within the block, attention is computed explicitly, softmax(QK^T / sqrt(hs)), and each
    layer's weights (B, nh, T, S) are appended to the yielded list, in call order. Outside it
    (always, when serving or training) attention stays one fused SDPA call that never forms them.
    The switch is process-wide: use it only on a model no other thread is running (explain's CLI
    does; the server explains without attention maps)."""
    global _recorded
    previous, _recorded = _recorded, []
    try:
        yield _recorded
    finally:
        _recorded = previous


def _explicit_attention(q, k, v, mask: torch.Tensor | None) -> torch.Tensor:
    """What SDPA computes, with the weights kept (eval mode: no dropout)."""
    if k.size(1) != q.size(1):  # grouped-query: each key/value head serves nh / n_kv_head query heads
        k = k.repeat_interleave(q.size(1) // k.size(1), dim=1)
        v = v.repeat_interleave(q.size(1) // v.size(1), dim=1)
    scores = (q @ k.transpose(-2, -1)).float() * q.size(-1) ** -0.5
    if mask is None:  # causal, the queries being the last T of S positions
        T, S = q.size(2), k.size(2)
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
    weights = scores.masked_fill(~mask, float("-inf")).softmax(-1)
    _recorded.append(weights.detach())
    return (weights.to(v.dtype) @ v)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: KVCache | None, layer: int,
           input_pos: torch.Tensor | None, mask: torch.Tensor | None, dropout: float) -> torch.Tensor:
    """Causal SDPA of ``q`` (B, nh, T, hs) over ``k``, ``v`` (B, n_kv_head, T, hs), through the
    cache when there is one; ``n_kv_head`` < ``nh`` is grouped-query attention. -> (B, nh, T, hs)."""
    if cache is not None:
        k, v = cache.update(layer, input_pos, k, v, attend_all=mask is not None)
    if _recorded is not None:
        return _explicit_attention(q, k, v, mask)
    gqa = bool(k.size(1) != q.size(1))  # a Python bool also when traced (ONNX export): head counts are fixed
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                          dropout_p=dropout, enable_gqa=gqa)


class Decoder(nn.Module):
    """The base of every decoder family. A subclass sets ``config`` (with ``vocab_size``,
    ``block_size``, ``n_layer``, ``num_labels``), ``lm_head`` and, when it has a classification
    head, ``score``; and implements :meth:`_trunk`, :meth:`token_embedding` and :meth:`cache_shape`."""

    # What the spine may ask of a model family (instead of checking which family it is).
    can_generate = True  # next-token logits, a KV cache and a decode step
    can_embed = False
    classifier_head = "score."  # parameter prefix of the classification head
    tied_head = True  # lm_head shares the token embedding (a family may untie it per config)

    def _trunk(self, idx: torch.Tensor, pos: torch.Tensor, cache: KVCache | None = None,
               mask: torch.Tensor | None = None) -> torch.Tensor:
        """Embeddings, blocks and the final norm: hidden states (B, T, C)."""
        raise NotImplementedError

    def token_embedding(self) -> nn.Embedding:
        raise NotImplementedError

    def cache_shape(self) -> tuple[int, int, int]:
        """(layers, key/value heads, head size) of this model's KV cache."""
        raise NotImplementedError

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                cache: KVCache | None = None, last_only: bool = False, loss_chunk: int = 0,
                input_pos: torch.Tensor | None = None, segments: torch.Tensor | None = None):
        """``idx`` (B, T) token ids -> (logits, loss).

        ``targets`` (B, T) with -1 for positions to ignore gives the mean cross-entropy. With
        ``loss_chunk`` > 0 the head and the loss are fused and computed that many rows at a time
        (:func:`~lmforge.models.losses.linear_cross_entropy`) and no logits are returned. With a
        ``cache``, ``idx`` continues the cached sequence and the cache advances by T positions;
        ``input_pos`` (T,), a device tensor of those positions, makes the call independent of
        ``cache.pos`` (a captured decode step passes it and leaves ``cache.pos`` alone); (B, T)
        gives every row its own positions (a batch of sequences at different lengths).
        ``last_only`` returns logits for the last position only, (B, 1, V). ``segments`` (B, T)
        packs several sequences in a row (:func:`packed_positions`): each attends only within
        itself, from position 0.
        """
        B, T = idx.shape
        mask = None
        if cache is not None:
            if input_pos is None:
                if cache.pos + T > cache.max_len:
                    raise ValueError(f"sequence of {cache.pos + T} tokens exceeds the cache ({cache.max_len})")
                input_pos = torch.arange(cache.pos, cache.pos + T, device=idx.device)
                fresh = cache.pos == 0  # a prefill from empty attends causally to itself alone
                cache.pos += T
            else:
                fresh = False
            mask = None if fresh else cache.mask(input_pos)
            pos = input_pos
        else:
            if T > self.config.block_size:
                raise ValueError(f"sequence of {T} tokens exceeds block_size {self.config.block_size}")
            pos = torch.arange(T, device=idx.device)
            if segments is not None:
                pos, mask = packed_positions(segments)
        return self.logits_and_loss(self._trunk(idx, pos, cache, mask), targets, last_only, loss_chunk)

    @torch.no_grad()
    def target_logprobs(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Per row, the sum of log p(target) over the positions where ``targets`` (B, T) >= 0,
        next-token targets of right-padded ``idx`` (B, T): the head runs at those positions only
        (scoring a short continuation of a long prompt costs the trunk, not T × vocabulary logits)."""
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(f"sequence of {T} tokens exceeds block_size {self.config.block_size}")
        hidden = self._trunk(idx, torch.arange(T, device=idx.device))
        rows, cols = torch.nonzero(targets >= 0, as_tuple=True)
        logp = torch.log_softmax(self.lm_head(hidden[rows, cols]).float(), dim=-1)
        picked = logp.gather(1, targets[rows, cols][:, None])[:, 0]
        return torch.zeros(B, device=idx.device).index_add_(0, rows, picked)

    def logits_and_loss(self, x: torch.Tensor, targets: torch.Tensor | None = None, last_only: bool = False,
                        loss_chunk: int = 0):
        """Hidden states (B, T, C) -> (logits, loss), as :meth:`forward` returns them."""
        if targets is not None and loss_chunk > 0:
            return None, linear_cross_entropy(x, self.lm_head.weight, targets, loss_chunk)
        if last_only:
            x = x[:, -1:, :]
        logits = self.lm_head(x)  # (B, T, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1),
                                   ignore_index=-1)
        return logits, loss

    def prefill(self, idx: torch.Tensor, lengths: torch.Tensor, cache: KVCache, return_hidden: bool = False):
        """Right-padded prompts (B, T) of ``lengths`` (B,) into an empty ``cache``: (B, V) logits at
        each row's last real token. Causal attention keeps the padding out of every real position;
        the cache holds garbage past each row's length, which its next tokens overwrite.
        ``return_hidden`` also returns the final hidden states (B, T, C), from which
        ``lm_head`` gives the logits at any position (to score the prompt itself)."""
        B, T = idx.shape
        x = self._trunk(idx, torch.arange(T, device=idx.device), cache)
        cache.pos = T
        logits = self.lm_head(x[torch.arange(B, device=idx.device), lengths - 1])
        return (logits, x) if return_hidden else logits

    def classify(self, idx: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, num_labels) logits from the state of each row's last real token (right padding;
        causal attention means padding never reaches it)."""
        # Positions (B, T) like packed rows': per-example gradients (train.dp) need the batch dimension.
        x = self._trunk(idx, torch.arange(idx.size(1), device=idx.device).expand(idx.shape))
        last = (attention_mask.sum(1) - 1).clamp(min=0) if attention_mask is not None else \
            torch.full((idx.size(0),), idx.size(1) - 1, device=idx.device)
        return self.score(x[torch.arange(idx.size(0), device=idx.device), last])

    def new_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
        """A KV cache for ``batch_size`` sequences of up to ``max_len`` (default block_size) tokens."""
        p = self.token_embedding().weight
        max_len = min(max_len or self.config.block_size, self.config.block_size)
        return KVCache(*self.cache_shape(), batch_size, max_len, p.device, p.dtype)

    def _is_tied(self) -> bool:
        return self.lm_head.weight is self.token_embedding().weight

    def state_dict_for_save(self) -> dict[str, torch.Tensor]:
        """Plain contiguous tensors, a tied ``lm_head.weight`` left out (as in HF files)."""
        tied = self._is_tied()
        return {k: v.detach().contiguous() for k, v in self.state_dict().items()
                if not (tied and k == "lm_head.weight")}

    def load_saved_state(self, state: dict[str, torch.Tensor]) -> None:
        """Inverse of :meth:`state_dict_for_save`; re-ties a tied head."""
        tied = self._is_tied()
        missing, unexpected = self.load_state_dict(state, strict=False)
        missing = [k for k in missing if not (tied and k == "lm_head.weight")]
        if missing or unexpected:
            raise ValueError(f"checkpoint does not match the model: missing {missing}, unexpected {unexpected}")
        if tied:
            self.lm_head.weight = self.token_embedding().weight
