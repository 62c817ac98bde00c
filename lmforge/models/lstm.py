"""An LSTM language model: token embedding -> stacked LSTM layers (dropout between) -> linear head,
tied to the embedding by default (Press & Wolf 2017; the last layer's hidden size is then the
embedding size, as in AWD-LSTM).

It is a :class:`~lmforge.models.decoder.Decoder`, so the LM task trains it on the same token data
as a GPT, ``eval`` gives its bits per byte and ``generate``/``serve`` sample from it. Its "cache"
is the recurrent state, :class:`LSTMState`: (h, c) per layer, a fixed shape whatever the length,
so generation is not bounded by ``block_size`` (that is the training window, the length gradients
flow back through). A one-token step is written out as the cell's equations on the layers' own
weights, which ``torch.compile`` and CUDA graphs take (``nn.LSTM`` itself breaks the graph).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from lmforge.errors import UserError
from lmforge.models.decoder import Decoder

INITS = ("default", "orthogonal")


@dataclass
class LSTMConfig:
    vocab_size: int | None = None  # None: taken from the tokenizer when training starts
    block_size: int = 256  # training window (truncated backpropagation through time)
    n_layer: int = 2
    n_embd: int = 256  # embedding size (and, tied, the last layer's hidden size)
    n_hidden: int = 512  # hidden size of the other layers (of all of them when untied)
    dropout: float = 0.0  # on the embeddings, between layers and on the output
    tie_embeddings: bool = True
    num_labels: int = 0  # > 0: a classification head (``score``) on the last real token's state
    # default: PyTorch's uniform(+-1/sqrt(hidden)); orthogonal: recurrent matrices orthogonal,
    # input matrices Glorot-uniform, forget-gate bias 1 (Jozefowicz et al. 2015) — 0.1 nats worse
    # after 150 and 300 steps on the quickstart corpus (bench/RESULTS.md section 25).
    init: str = "default"
    embedding_std: float = 1.0


class LSTMState:
    """The recurrent state of a batch: ``h[layer]``, ``c[layer]`` (B, hidden) each, updated in place.

    It has the cache protocol the decoding engine and the batcher use (``pos``, ``max_len``,
    :meth:`rows`, :meth:`write_rows`, ``batch_size``, ``device``). ``pos`` counts the tokens fed;
    a forward from ``pos == 0`` starts from zeros. There is no length limit (``max_len``).
    """

    def __init__(self, sizes: list[int], batch_size: int, device, dtype):
        self.h = [torch.zeros(batch_size, n, device=device, dtype=dtype) for n in sizes]
        self.c = [torch.zeros(batch_size, n, device=device, dtype=dtype) for n in sizes]
        self.max_len = sys.maxsize
        self.pos = 0

    @property
    def batch_size(self) -> int:
        return self.h[0].size(0)

    @property
    def device(self) -> torch.device:
        return self.h[0].device

    def rows(self, start: int, stop: int) -> "LSTMState":
        view = object.__new__(LSTMState)
        view.h = [t[start:stop] for t in self.h]
        view.c = [t[start:stop] for t in self.c]
        view.max_len, view.pos = self.max_len, 0
        return view

    def write_rows(self, slots: torch.Tensor, other: "LSTMState") -> None:
        """Put ``other``'s rows (one per slot) into rows ``slots`` of this state."""
        for mine, theirs in ((self.h, other.h), (self.c, other.c)):
            for layer in range(len(mine)):
                mine[layer][slots] = theirs[layer].to(mine[layer].dtype)


def cell_step(layer: nn.LSTM, x: torch.Tensor, h: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One time step of a one-layer ``nn.LSTM`` on ``x`` (B, in): the new (h, c), (B, hidden) each.
    PyTorch's gate order: input, forget, cell, output."""
    gates = (F.linear(x, layer.weight_ih_l0, layer.bias_ih_l0) + F.linear(h, layer.weight_hh_l0, layer.bias_hh_l0))
    i, f, g, o = gates.chunk(4, dim=-1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c), c


class LSTM(Decoder):
    lora_targets = ()  # no linear projections to adapt (finetune.lora needs explicit targets)

    def __init__(self, config: LSTMConfig):
        super().__init__()
        if config.vocab_size is None:
            raise ValueError("LSTMConfig.vocab_size must be set before building the model")
        self.check_config(config)
        self.config = c = config
        self.wte = nn.Embedding(c.vocab_size, c.n_embd)
        sizes = self.hidden_sizes(c)
        self.layers = nn.ModuleList(nn.LSTM(c.n_embd if i == 0 else sizes[i - 1], n, batch_first=True)
                                    for i, n in enumerate(sizes))
        self.drop = nn.Dropout(c.dropout)
        self.lm_head = nn.Linear(sizes[-1], c.vocab_size, bias=False)
        if c.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        if c.num_labels:
            self.score = nn.Linear(sizes[-1], c.num_labels, bias=False)
        self.activation_checkpointing = False  # set by the trainer; not used (the LSTM is one kernel)
        # N(0, 1) embeddings (PyTorch's default): AWD-LSTM's uniform(+-0.1) learns nothing beyond
        # unigram frequencies for hundreds of steps at Adam's rates (bench/RESULTS.md section 25).
        nn.init.normal_(self.wte.weight, std=c.embedding_std)
        if not c.tie_embeddings:
            nn.init.normal_(self.lm_head.weight, std=0.02)
        if c.init == "orthogonal":
            for layer in self.layers:
                nn.init.xavier_uniform_(layer.weight_ih_l0)
                for gate in layer.weight_hh_l0.chunk(4, dim=0):
                    nn.init.orthogonal_(gate)
                nn.init.zeros_(layer.bias_ih_l0)
                nn.init.zeros_(layer.bias_hh_l0)
                n = layer.hidden_size
                nn.init.ones_(layer.bias_ih_l0[n:2 * n])  # forget gate: remember by default

    @staticmethod
    def hidden_sizes(c: LSTMConfig) -> list[int]:
        return [c.n_embd if c.tie_embeddings and i == c.n_layer - 1 else c.n_hidden for i in range(c.n_layer)]

    @staticmethod
    def check_config(c: LSTMConfig) -> None:
        for key in ("n_layer", "n_embd", "n_hidden", "block_size"):
            if getattr(c, key) <= 0:
                raise UserError(f"model.{key} must be positive, got {getattr(c, key)}")
        if c.init not in INITS:
            raise UserError(f"model.init must be one of {', '.join(INITS)}, got {c.init!r}")

    def blocks(self) -> nn.ModuleList:
        return self.layers

    def embeddings(self) -> list[nn.Module]:
        return [self.wte]

    def token_embedding(self) -> nn.Embedding:
        return self.wte

    @staticmethod
    def classification_config(config: LSTMConfig, num_labels: int) -> LSTMConfig:
        return replace(config, num_labels=num_labels)

    def num_params(self, non_embedding: bool = False) -> int:
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self, seq_len: int | None = None) -> float:
        return 6 * self.num_params()  # every weight is used once per token (no attention term)

    def new_cache(self, batch_size: int, max_len: int | None = None) -> LSTMState:
        p = self.wte.weight
        return LSTMState(self.hidden_sizes(self.config), batch_size, p.device, p.dtype)

    def _run(self, x: torch.Tensor, cache: LSTMState | None, fresh: bool,
             lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Embedded input (B, T, n_embd) through the layers, from ``cache``'s state (zeros when
        ``fresh`` or without one), which is left holding the state after each row's last token
        (the ``lengths``-th, for right-padded rows). -> (B, T, hidden)."""
        x = self.drop(x)
        T = x.size(1)
        if cache is not None and fresh:
            for t in cache.h + cache.c:
                t.zero_()
        for i, layer in enumerate(self.layers):
            if cache is None:
                x = layer(x)[0]
            elif T == 1 and lengths is None:  # a decode step: the cell's equations (compilable)
                h, c = cell_step(layer, x[:, 0], cache.h[i].to(x.dtype), cache.c[i].to(x.dtype))
                cache.h[i].copy_(h)
                cache.c[i].copy_(c)
                x = h[:, None]
            else:
                state = (cache.h[i][None].to(x.dtype), cache.c[i][None].to(x.dtype))
                if lengths is not None:
                    packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
                    out, (h, c) = layer(packed, state)
                    x = pad_packed_sequence(out, batch_first=True, total_length=T)[0]
                else:
                    x, (h, c) = layer(x, state)
                cache.h[i].copy_(h[0])
                cache.c[i].copy_(c[0])
            if i < len(self.layers) - 1:
                x = self.drop(x)
        return self.drop(x)

    def _trunk(self, idx, pos, cache=None, mask=None) -> torch.Tensor:
        return self._run(self.wte(idx), None, True)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, cache: LSTMState | None = None,
                last_only: bool = False, loss_chunk: int = 0, input_pos: torch.Tensor | None = None,
                segments: torch.Tensor | None = None):
        """As :meth:`Decoder.forward`; ``input_pos`` only marks a call that continues the state
        (positions do not enter an LSTM). Packed rows (``segments``) are not supported."""
        if segments is not None:
            raise ValueError("the LSTM does not train on packed sequences")
        fresh = cache is not None and input_pos is None and cache.pos == 0
        x = self._run(self.wte(idx), cache, fresh)
        if cache is not None and input_pos is None:
            cache.pos += idx.size(1)
        return self.logits_and_loss(x, targets, last_only, loss_chunk)

    def prefill(self, idx, lengths, cache, return_hidden: bool = False):
        """Right-padded prompts (B, T) of ``lengths`` into an empty state: (B, V) logits at each
        row's last real token, the state left there (padding never enters it)."""
        x = self._run(self.wte(idx), cache, True, lengths)
        cache.pos = idx.size(1)
        logits = self.lm_head(x[torch.arange(idx.size(0), device=idx.device), lengths - 1])
        return (logits, x) if return_hidden else logits

