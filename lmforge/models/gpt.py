"""A GPT-2-style decoder: pre-LayerNorm blocks, causal SDPA attention, GELU MLP, learned positions,
tied input/output embeddings.

Parameter names follow Hugging Face ``GPT2LMHeadModel`` key by key (``transformer.h.0.attn.c_attn``
...), so importing or exporting GPT-2 checkpoints is a copy (HF stores its Conv1D weights
transposed relative to our ``nn.Linear``). Decoding uses a preallocated KV cache (:class:`KVCache`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from lmforge.models.init import PREV_TOKEN_SCALE, SINUSOIDAL_RMS, previous_token_head, sinusoidal_positions
from lmforge.models.losses import linear_cross_entropy


@dataclass
class GPTConfig:
    vocab_size: int | None = None  # None: taken from the tokenizer when training starts
    block_size: int = 256  # maximum context length
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 256
    dropout: float = 0.0
    bias: bool = True  # GPT-2 has biases in Linear and LayerNorm
    layer_norm_eps: float = 1e-5
    num_labels: int = 0  # > 0: a classification head (``score``) on the last real token's state
    # Initial position embeddings, learned from there either way: "normal" (GPT-2's N(0, 0.02)) or
    # "sinusoidal" (the sine/cosine table of Vaswani et al. at RMS ``SINUSOIDAL_RMS``).
    pos_init: str = "normal"
    # With pos_init="sinusoidal": the first layer's first head starts as a previous-token head
    # (:func:`previous_token_head`), the half of copying from context that a 2-layer model is slow
    # to learn by itself. Queries and keys only; learned from there like every other weight.
    prev_token_head: bool = False


class KVCache:
    """Preallocated keys and values: per layer, ``(B, nh, max_len, hs)`` each.

    Shapes never change while decoding: a step writes its keys and values at its positions and
    attends over the whole buffer with a mask of the positions filled so far, so one decode step
    is the same computation every time (what CUDA graphs and ``torch.compile`` need).
    ``pos`` is the number of positions already filled; :meth:`GPT.forward` advances it.
    """

    def __init__(self, config: GPTConfig, batch_size: int, max_len: int,
                 device: torch.device | str, dtype: torch.dtype):
        hs = config.n_embd // config.n_head
        shape = (batch_size, config.n_head, max_len, hs)
        # One tensor per layer, not one (n_layer, ...) tensor: an in-place write into a view of a
        # shared buffer makes torch.compile copy the whole buffer on every step.
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.key_pos = torch.arange(max_len, device=device)
        self.max_len = max_len
        self.pos = 0

    def mask(self, input_pos: torch.Tensor) -> torch.Tensor:
        """Bool mask: the query at position p sees the keys at positions 0..p. ``input_pos`` (T,)
        shared by all rows gives (T, max_len); (B, T), one position per row, gives (B, 1, T, max_len)."""
        if input_pos.dim() == 2:
            return (input_pos[:, :, None] >= self.key_pos)[:, None]
        return input_pos[:, None] >= self.key_pos[None, :]

    def rows(self, start: int, stop: int) -> "KVCache":
        """The cache of rows ``start:stop`` as views of this one (writes land here)."""
        view = object.__new__(KVCache)
        view.k = [t[start:stop] for t in self.k]
        view.v = [t[start:stop] for t in self.v]
        view.key_pos, view.max_len, view.pos = self.key_pos, self.max_len, 0
        return view


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0,
                input_pos: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        B, T, C = x.shape
        hs = C // self.n_head
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q = q.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        if cache is not None:
            if input_pos.dim() == 1:  # the same positions in every row
                cache.k[layer].index_copy_(2, input_pos, k.to(cache.k[layer].dtype))
                cache.v[layer].index_copy_(2, input_pos, v.to(cache.v[layer].dtype))
            else:  # (B, T): each row at its own positions (continuous batching)
                rows = torch.arange(B, device=x.device)[:, None]
                cache.k[layer][rows, :, input_pos] = k.transpose(1, 2).to(cache.k[layer].dtype)
                cache.v[layer][rows, :, input_pos] = v.transpose(1, 2).to(cache.v[layer].dtype)
            if mask is not None:  # attend over the whole buffer; the mask hides unfilled positions
                k, v = cache.k[layer].to(q.dtype), cache.v[layer].to(q.dtype)  # (B, nh, max_len, hs)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None,
            dropout_p=self.dropout if self.training else 0.0)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # GPT-2's "gelu_new" is the tanh approximation; using it keeps HF checkpoints exact.
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0,
                input_pos: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cache, layer, input_pos, mask)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    # What the spine may ask of a model family (instead of checking which family it is).
    can_generate = True  # next-token logits, a KV cache and a decode step
    can_embed = False
    classifier_head = "score."  # parameter prefix of the classification head

    def __init__(self, config: GPTConfig):
        super().__init__()
        if config.vocab_size is None:
            raise ValueError("GPTConfig.vocab_size must be set before building the model")
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied embeddings
        if config.num_labels:
            self.score = nn.Linear(config.n_embd, config.num_labels, bias=False)  # as HF GPT2ForSequenceClassification
        self.activation_checkpointing = False  # set by the trainer (train.activation_checkpointing)
        self.apply(self._init_weights)
        # GPT-2: residual projections scaled by 1/sqrt(2 * n_layer) so the residual stream's
        # variance does not grow with depth.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
        if config.pos_init == "sinusoidal":
            table = sinusoidal_positions(config.block_size, config.n_embd, rms=SINUSOIDAL_RMS)
            with torch.no_grad():
                self.transformer.wpe.weight.copy_(table)
        if config.prev_token_head:
            wq, wk = previous_token_head(config.n_embd, config.n_embd // config.n_head, PREV_TOKEN_SCALE)
            attn = self.transformer.h[0].attn
            with torch.no_grad():  # queries and keys of the first layer's first head
                attn.c_attn.weight[:wq.size(0)] = wq
                attn.c_attn.weight[config.n_embd:config.n_embd + wk.size(0)] = wk

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def blocks(self) -> nn.ModuleList:
        """The repeated blocks, bottom to top (FSDP units, activation checkpointing, layer-wise rates)."""
        return self.transformer.h

    def embeddings(self) -> list[nn.Module]:
        """The modules below the first block (the lowest layer for layer-wise learning rates)."""
        return [self.transformer.wte, self.transformer.wpe]

    @staticmethod
    def classification_config(config: GPTConfig, num_labels: int) -> GPTConfig:
        """``config`` with a classification head of ``num_labels``."""
        return replace(config, num_labels=num_labels)

    def num_params(self, non_embedding: bool = False) -> int:
        """Unique parameters (the tied head counted once); optionally without position embeddings."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.transformer.wpe.weight.numel()
        return n

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token: 6N for the matmuls plus attention scores (PaLM appendix B)."""
        c, T = self.config, seq_len or self.config.block_size
        return 6 * self.num_params(non_embedding=True) + 12 * c.n_layer * c.n_embd * T

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                cache: KVCache | None = None, last_only: bool = False, loss_chunk: int = 0,
                input_pos: torch.Tensor | None = None):
        """``idx`` (B, T) token ids -> (logits, loss).

        ``targets`` (B, T) with -1 for positions to ignore gives the mean cross-entropy. With
        ``loss_chunk`` > 0 the head and the loss are fused and computed that many rows at a time
        (:func:`~lmforge.models.losses.linear_cross_entropy`) and no logits are returned. With a
        ``cache``, ``idx`` continues the cached sequence and the cache advances by T positions;
        ``input_pos`` (T,), a device tensor of those positions, makes the call independent of
        ``cache.pos`` (a captured decode step passes it and leaves ``cache.pos`` alone); (B, T)
        gives every row its own positions (a batch of sequences at different lengths).
        ``last_only`` returns logits for the last position only, (B, 1, V).
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
        x = self._trunk(idx, pos, cache, mask)
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

    def _trunk(self, idx, pos, cache=None, mask=None) -> torch.Tensor:
        """Embeddings, blocks and the final norm: hidden states (B, T, C)."""
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))  # (B, T, C)
        for i, block in enumerate(self.transformer.h):
            if self.activation_checkpointing and self.training and torch.is_grad_enabled():
                # Keep only each block's input; recompute its activations in the backward pass.
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x, cache, i, pos, mask)
        return self.transformer.ln_f(x)

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
        x = self._trunk(idx, torch.arange(idx.size(1), device=idx.device))
        last = (attention_mask.sum(1) - 1).clamp(min=0) if attention_mask is not None else \
            torch.full((idx.size(0),), idx.size(1) - 1, device=idx.device)
        return self.score(x[torch.arange(idx.size(0), device=idx.device), last])

    def new_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
        """A KV cache for ``batch_size`` sequences of up to ``max_len`` (default block_size) tokens."""
        p = self.transformer.wte.weight
        max_len = min(max_len or self.config.block_size, self.config.block_size)
        return KVCache(self.config, batch_size, max_len, p.device, p.dtype)

    def state_dict_for_save(self) -> dict[str, torch.Tensor]:
        """Plain contiguous tensors without the tied ``lm_head.weight`` (as in HF GPT-2 files)."""
        return {k: v.detach().contiguous() for k, v in self.state_dict().items() if k != "lm_head.weight"}

    def load_saved_state(self, state: dict[str, torch.Tensor]) -> None:
        """Inverse of :meth:`state_dict_for_save`; re-ties the head."""
        missing, unexpected = self.load_state_dict(state, strict=False)
        missing = [k for k in missing if k != "lm_head.weight"]
        if missing or unexpected:
            raise ValueError(f"checkpoint does not match the model: missing {missing}, unexpected {unexpected}")
        self.lm_head.weight = self.transformer.wte.weight
