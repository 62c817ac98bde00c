"""A GPT-2-style decoder: pre-LayerNorm blocks, causal SDPA attention, GELU MLP, learned positions,
tied input/output embeddings.

Parameter names follow Hugging Face ``GPT2LMHeadModel`` key by key (``transformer.h.0.attn.c_attn``
...), so importing or exporting GPT-2 checkpoints is a copy (HF stores its Conv1D weights
transposed relative to our ``nn.Linear``). Decoding, the cache and saving come from
:class:`~lmforge.models.decoder.Decoder`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from lmforge.models.decoder import Decoder, KVCache, attend
from lmforge.models.init import PREV_TOKEN_SCALE, SINUSOIDAL_RMS, previous_token_head, sinusoidal_positions

__all__ = ["GPT", "GPTConfig", "KVCache"]


@dataclass
class GPTConfig:
    vocab_size: int | None = None  # None: taken from the tokenizer when training starts
    block_size: int = 256  # maximum context length
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 256
    n_inner: int | None = None  # MLP width; None: 4 * n_embd (smaller after lmforge compress --prune)
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
        y = attend(q, k, v, cache, layer, input_pos, mask, self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        inner = config.n_inner or 4 * config.n_embd
        self.c_fc = nn.Linear(config.n_embd, inner, bias=config.bias)
        self.c_proj = nn.Linear(inner, config.n_embd, bias=config.bias)
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


class GPT(Decoder):
    lora_targets = ("c_attn",)  # finetune.lora's default: the query/key/value projection (as PEFT's)
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

    def mlp_neurons(self) -> list[tuple[list[nn.Linear], nn.Linear]]:
        """Per block, the MLP's neurons: (the Linear layers whose output rows they are, the Linear
        whose input columns they are). Structured pruning keeps the same neurons in each and
        rebuilds the model with ``n_inner`` that many."""
        return [([b.mlp.c_fc], b.mlp.c_proj) for b in self.transformer.h]

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

    def _trunk(self, idx, pos, cache=None, mask=None) -> torch.Tensor:
        """Embeddings, blocks and the final norm: hidden states (B, T, C)."""
        # Per-example gradients (train.dp) need the position embedding's input batched, as the token one's.
        rows = pos.expand(idx.size(0), -1) if pos.dim() == 1 and torch.is_grad_enabled() else pos
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(rows))  # (B, T, C)
        for i, block in enumerate(self.transformer.h):
            if self.activation_checkpointing and self.training and torch.is_grad_enabled():
                # Keep only each block's input; recompute its activations in the backward pass.
                x = checkpoint(block, x, None, i, pos, mask, use_reentrant=False)
            else:
                x = block(x, cache, i, pos, mask)
        return self.transformer.ln_f(x)

    def token_embedding(self) -> nn.Embedding:
        return self.transformer.wte

    def cache_shape(self) -> tuple[int, int, int]:
        c = self.config
        return c.n_layer, c.n_head, c.n_embd // c.n_head
