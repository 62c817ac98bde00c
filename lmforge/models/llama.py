"""A Llama-family decoder: RMSNorm, rotary position embeddings, grouped-query SDPA attention and a
SwiGLU MLP; no biases except (Qwen2) on the query/key/value projections; tied or untied embeddings.

Parameter names follow Hugging Face ``LlamaForCausalLM`` (``model.layers.0.self_attn.q_proj`` ...)
and ``Qwen2ForCausalLM``, so importing and exporting is a copy. RoPE uses HF's layout (the two
halves of each head rotate together, ``rotate_half``); GGUF files store queries and keys
interleaved, which ``interop/gguf.py`` undoes on import. Everything the decoding engine, batcher
and trainer need comes from :class:`~lmforge.models.decoder.Decoder`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from lmforge.models.decoder import Decoder, KVCache, attend


@dataclass
class LlamaConfig:
    vocab_size: int | None = None  # None: taken from the tokenizer when training starts
    block_size: int = 2048  # maximum context length
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int = 2  # key/value heads; fewer than n_head is grouped-query attention
    n_embd: int = 256
    head_dim: int = 0  # 0: n_embd // n_head
    n_inner: int = 0  # SwiGLU hidden width; 0: 8/3 n_embd rounded up to a multiple of 64
    rope_theta: float = 10000.0
    # RoPE frequency scaling of the checkpoint: {} none; {"rope_type": "linear", "factor": f};
    # {"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
    # "original_max_position_embeddings"}.
    rope_scaling: dict = field(default_factory=dict)
    rms_norm_eps: float = 1e-5
    tie_embeddings: bool = True
    qkv_bias: bool = False  # Qwen2: biases on the query, key and value projections
    dropout: float = 0.0
    init_std: float = 0.02
    num_labels: int = 0  # > 0: a classification head (``score``) on the last real token's state


def resolved(c: LlamaConfig) -> LlamaConfig:
    """``c`` with the derived widths (``head_dim``, ``n_inner`` given as 0) filled in."""
    return replace(c, head_dim=c.head_dim or c.n_embd // c.n_head,
                   n_inner=c.n_inner or 64 * math.ceil(8 * c.n_embd / 3 / 64))


def check_config(c: LlamaConfig) -> None:
    """Shape errors as one readable line (the config module turns them into exit 2)."""
    from lmforge.errors import UserError

    try:
        _check(resolved(c))
    except ValueError as e:
        raise UserError(str(e)) from None


def _check(c: LlamaConfig) -> None:
    if c.n_kv_head < 1 or c.n_head % c.n_kv_head:
        raise ValueError(f"model.n_head ({c.n_head}) must be a multiple of model.n_kv_head ({c.n_kv_head})")
    if c.head_dim % 2:
        raise ValueError(f"the head size ({c.head_dim}) must be even for rotary embeddings")
    kind = (c.rope_scaling or {}).get("rope_type", "default")
    if kind not in ("default", "linear", "llama3"):
        raise ValueError(f"model.rope_scaling type {kind!r} is not supported (linear, llama3)")


def rope_frequencies(c: LlamaConfig) -> torch.Tensor:
    """The inverse frequencies (head_dim / 2,) of each rotated pair, after the checkpoint's scaling."""
    c = resolved(c)
    inv = 1.0 / (c.rope_theta ** (torch.arange(0, c.head_dim, 2, dtype=torch.int64).float() / c.head_dim))
    s = c.rope_scaling or {}
    kind = s.get("rope_type", s.get("type", "default"))
    if kind == "linear":
        return inv / s["factor"]
    if kind == "llama3":  # Llama 3.1: long wavelengths slowed down, short ones kept, a blend between
        factor, lo, hi = s["factor"], s.get("low_freq_factor", 1.0), s.get("high_freq_factor", 4.0)
        old = s.get("original_max_position_embeddings", 8192)
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old / lo, inv / factor, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        mid = (1 - smooth) * scaled / factor + smooth * scaled
        between = (wavelen >= old / hi) & (wavelen <= old / lo)
        return torch.where(between, mid, scaled)
    return inv


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of ``x`` (B, nh, T, hs) with ``cos``/``sin`` (T, hs) or (B, 1, T, hs)."""
    half = x.size(-1) // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in float32 whatever the activations' dtype (as HF does)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, c: LlamaConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = c.n_head, c.n_kv_head, c.head_dim
        self.dropout = c.dropout
        self.q_proj = nn.Linear(c.n_embd, c.n_head * c.head_dim, bias=c.qkv_bias)
        self.k_proj = nn.Linear(c.n_embd, c.n_kv_head * c.head_dim, bias=c.qkv_bias)
        self.v_proj = nn.Linear(c.n_embd, c.n_kv_head * c.head_dim, bias=c.qkv_bias)
        self.o_proj = nn.Linear(c.n_head * c.head_dim, c.n_embd, bias=False)

    def forward(self, x, cos, sin, cache: KVCache | None = None, layer: int = 0,
                input_pos: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, nkv, T, hs)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        y = attend(q, k, v, cache, layer, input_pos, mask, self.dropout if self.training else 0.0)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))


class SwiGLU(nn.Module):
    def __init__(self, c: LlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(c.n_embd, c.n_inner, bias=False)
        self.up_proj = nn.Linear(c.n_embd, c.n_inner, bias=False)
        self.down_proj = nn.Linear(c.n_inner, c.n_embd, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, c: LlamaConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(c.n_embd, c.rms_norm_eps)
        self.self_attn = Attention(c)
        self.post_attention_layernorm = RMSNorm(c.n_embd, c.rms_norm_eps)
        self.mlp = SwiGLU(c)
        self.dropout = nn.Dropout(c.dropout)

    def forward(self, x, cos, sin, cache=None, layer=0, input_pos=None, mask=None) -> torch.Tensor:
        x = x + self.dropout(self.self_attn(self.input_layernorm(x), cos, sin, cache, layer, input_pos, mask))
        return x + self.dropout(self.mlp(self.post_attention_layernorm(x)))


class Llama(Decoder):
    check_config = staticmethod(check_config)
    lora_targets = ("q_proj", "v_proj")  # finetune.lora's default (as PEFT's for Llama)

    def __init__(self, config: LlamaConfig):
        super().__init__()
        if config.vocab_size is None:
            raise ValueError("LlamaConfig.vocab_size must be set before building the model")
        config = resolved(config)
        _check(config)
        self.config = config
        self.model = nn.ModuleDict(dict(
            embed_tokens=nn.Embedding(config.vocab_size, config.n_embd),
            layers=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            norm=RMSNorm(config.n_embd, config.rms_norm_eps),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.num_labels:
            self.score = nn.Linear(config.n_embd, config.num_labels, bias=False)  # as HF LlamaForSequenceClassification
        self.activation_checkpointing = False  # set by the trainer (train.activation_checkpointing)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=config.init_std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
        if config.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        # cos/sin of every position (block_size, head_dim), in float32 as HF computes them; not
        # saved with the weights (they follow from the config).
        angles = torch.outer(torch.arange(config.block_size).float(), rope_frequencies(config))
        angles = torch.cat((angles, angles), dim=-1)
        self.register_buffer("rope_cos", angles.cos(), persistent=False)
        self.register_buffer("rope_sin", angles.sin(), persistent=False)

    def token_embedding(self) -> nn.Embedding:
        return self.model.embed_tokens

    def cache_shape(self) -> tuple[int, int, int]:
        return self.config.n_layer, self.config.n_kv_head, self.config.head_dim

    def blocks(self) -> nn.ModuleList:
        """The repeated blocks, bottom to top (FSDP units, activation checkpointing, layer-wise rates)."""
        return self.model.layers

    def mlp_neurons(self) -> list[tuple[list[nn.Linear], nn.Linear]]:
        """Per block, the MLP's neurons: (the Linear layers whose output rows they are, the Linear
        whose input columns they are). Structured pruning keeps the same neurons in each and
        rebuilds the model with ``n_inner`` that many."""
        return [([b.mlp.gate_proj, b.mlp.up_proj], b.mlp.down_proj) for b in self.model.layers]

    def attention_layers(self) -> list["Attention"]:
        """Per block, its attention (``q_proj``/``k_proj``/``v_proj``/``o_proj``, ``n_head``,
        ``n_kv_head``, ``head_dim``): structured pruning of heads keeps the same number in each and
        rebuilds the model with ``n_head``/``n_kv_head`` that many (``head_dim`` unchanged)."""
        return [b.self_attn for b in self.model.layers]

    def embeddings(self) -> list[nn.Module]:
        """The modules below the first block (the lowest layer for layer-wise learning rates)."""
        return [self.model.embed_tokens]

    @staticmethod
    def classification_config(config: LlamaConfig, num_labels: int) -> LlamaConfig:
        return replace(config, num_labels=num_labels)

    def num_params(self, non_embedding: bool = False) -> int:
        """Unique parameters (a tied head counted once); ``non_embedding`` leaves out the token
        embedding unless it is also the output head (as the FLOP count needs)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and not self.config.tie_embeddings:
            n -= self.model.embed_tokens.weight.numel()
        return n

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token: 6N for the matmuls plus attention scores (PaLM appendix B)."""
        c, T = self.config, seq_len or self.config.block_size
        return 6 * self.num_params(non_embedding=True) + 12 * c.n_layer * c.n_head * c.head_dim * T

    def _trunk(self, idx, pos, cache=None, mask=None) -> torch.Tensor:
        x = self.model.embed_tokens(idx)  # (B, T, C)
        dtype = x.dtype
        cos, sin = self.rope_cos[pos].to(dtype), self.rope_sin[pos].to(dtype)  # (T, hs) or (B, T, hs)
        if pos.dim() == 2:
            cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, hs): broadcast over heads
        for i, block in enumerate(self.model.layers):
            if self.activation_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, cos, sin, None, i, pos, mask, use_reentrant=False)
            else:
                x = block(x, cos, sin, cache, i, pos, mask)
        return self.model.norm(x)
