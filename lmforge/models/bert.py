"""A BERT-style encoder: token + position + segment embeddings, post-LayerNorm blocks, pooler,
masked-LM head with tied decoder weights, optional classification head.

Module and parameter names follow Hugging Face ``BertForMaskedLM`` / ``BertForSequenceClassification``
key by key (``bert.encoder.layer.0.attention.self.query.weight`` ...), so importing and exporting
BERT checkpoints is a copy. Attention runs through ``F.scaled_dot_product_attention`` with a
padding mask.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class BertConfig:
    vocab_size: int | None = None  # None: taken from the tokenizer
    block_size: int = 512  # maximum sequence length (position embeddings)
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 256
    n_inner: int | None = None  # MLP width; None: 4 * n_embd
    type_vocab_size: int = 2  # segments (sentence A / B)
    dropout: float = 0.1
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    mlm_head: bool = True  # masked-LM head (tied to the word embeddings)
    num_labels: int = 0  # > 0: a classification head on the pooled [CLS] output


def _linear(n_in: int, n_out: int) -> nn.Linear:
    return nn.Linear(n_in, n_out)


def _block(**modules: nn.Module) -> nn.ModuleDict:
    return nn.ModuleDict(modules)


class BertLayer(nn.Module):
    """Post-LN block: x = LN(x + attn(x)); x = LN(x + mlp(x))."""

    def __init__(self, config: BertConfig):
        super().__init__()
        C, inner = config.n_embd, config.n_inner or 4 * config.n_embd
        self.n_head, self.dropout = config.n_head, config.dropout
        self.attention = _block(
            self=_block(query=_linear(C, C), key=_linear(C, C), value=_linear(C, C)),
            output=_block(dense=_linear(C, C), LayerNorm=nn.LayerNorm(C, eps=config.layer_norm_eps)))
        self.intermediate = _block(dense=_linear(C, inner))
        self.output = _block(dense=_linear(inner, C), LayerNorm=nn.LayerNorm(C, eps=config.layer_norm_eps))
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        B, T, C = x.shape
        hs = C // self.n_head
        att = self.attention["self"]
        q, k, v = (att[n](x).view(B, T, self.n_head, hs).transpose(1, 2) for n in ("query", "key", "value"))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                           dropout_p=self.dropout if self.training else 0.0)  # (B, nh, T, hs)
        y = y.transpose(1, 2).reshape(B, T, C)
        out = self.attention["output"]
        x = out["LayerNorm"](x + self.drop(out["dense"](y)))
        h = F.gelu(self.intermediate["dense"](x))  # BERT's "gelu" is the exact (erf) form
        return self.output["LayerNorm"](x + self.drop(self.output["dense"](h)))


class BertModel(nn.Module):
    """Embeddings, encoder and pooler (HF ``BertModel``)."""

    def __init__(self, config: BertConfig):
        super().__init__()
        C = config.n_embd
        self.embeddings = _block(
            word_embeddings=nn.Embedding(config.vocab_size, C, padding_idx=config.pad_token_id),
            position_embeddings=nn.Embedding(config.block_size, C),
            token_type_embeddings=nn.Embedding(config.type_vocab_size, C),
            LayerNorm=nn.LayerNorm(C, eps=config.layer_norm_eps))
        self.embed_drop = nn.Dropout(config.dropout)
        self.encoder = _block(layer=nn.ModuleList([BertLayer(config) for _ in range(config.n_layer)]))
        self.pooler = _block(dense=_linear(C, C))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T) ids, mask 1 = token / 0 = padding -> hidden states (B, T, C)."""
        B, T = input_ids.shape
        e = self.embeddings
        # (B, T), not (T,) broadcast: per-example gradients (Opacus, train.dp) need every embedding
        # lookup to carry the batch dimension.
        pos = torch.arange(T, device=input_ids.device).expand(B, T)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        x = e["word_embeddings"](input_ids) + e["position_embeddings"](pos) + e["token_type_embeddings"](token_type_ids)
        x = self.embed_drop(e["LayerNorm"](x))
        mask = None
        if attention_mask is not None:
            mask = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, T): keys each query may see
        for layer in self.encoder["layer"]:
            x = layer(x, mask)
        return x

    def pool(self, hidden: torch.Tensor) -> torch.Tensor:
        """BERT's pooled output: tanh(dense(hidden of [CLS]))."""
        return torch.tanh(self.pooler["dense"](hidden[:, 0]))


class Bert(nn.Module):
    """``bert`` (the encoder) plus the heads the config asks for: ``cls`` (masked LM), ``classifier``."""

    can_generate = False
    can_embed = True  # sentence embeddings (mean pooling)
    classifier_head = "classifier."

    def __init__(self, config: BertConfig):
        super().__init__()
        if config.vocab_size is None:
            raise ValueError("BertConfig.vocab_size must be set before building the model")
        self.config = config
        self.bert = BertModel(config)
        C = config.n_embd
        if config.mlm_head:
            self.cls = _block(predictions=_block(
                transform=_block(dense=_linear(C, C), LayerNorm=nn.LayerNorm(C, eps=config.layer_norm_eps))))
            self.cls["predictions"].bias = nn.Parameter(torch.zeros(config.vocab_size))
        if config.num_labels:
            self.classifier = _linear(C, config.num_labels)
            self.classifier_drop = nn.Dropout(config.dropout)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def blocks(self) -> nn.ModuleList:
        """The repeated blocks, bottom to top (FSDP units, activation checkpointing, layer-wise rates)."""
        return self.bert.encoder["layer"]

    def mlp_neurons(self) -> list[tuple[list[nn.Linear], nn.Linear]]:
        """Per block, the MLP's neurons: (the Linear layers whose output rows they are, the Linear
        whose input columns they are). Structured pruning keeps the same neurons in each and
        rebuilds the model with ``n_inner`` that many."""
        return [([b.intermediate["dense"]], b.output["dense"]) for b in self.bert.encoder["layer"]]

    def embeddings(self) -> list[nn.Module]:
        """The modules below the first block (word, position, segment embeddings and their norm)."""
        return [self.bert.embeddings]

    def token_embedding(self) -> nn.Embedding:
        """The word embeddings (what attributions to tokens integrate along)."""
        return self.bert.embeddings["word_embeddings"]

    @staticmethod
    def classification_config(config: BertConfig, num_labels: int) -> BertConfig:
        """``config`` with a classification head of ``num_labels`` (and no masked-LM head)."""
        return replace(config, num_labels=num_labels, mlm_head=False)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token: 6N (without embeddings) plus attention scores."""
        c, T = self.config, seq_len or self.config.block_size
        n = self.num_params() - sum(e.weight.numel() for e in (self.bert.embeddings["position_embeddings"],
                                                               self.bert.embeddings["token_type_embeddings"]))
        return 6 * n + 12 * c.n_layer * c.n_embd * T

    def forward(self, input_ids, attention_mask=None, token_type_ids=None) -> torch.Tensor:
        return self.bert(input_ids, attention_mask, token_type_ids)

    def mlm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Vocabulary logits from hidden states; the decoder is the word embedding matrix."""
        p = self.cls["predictions"]
        h = p["transform"]["LayerNorm"](F.gelu(p["transform"]["dense"](hidden)))
        return h @ self.bert.embeddings["word_embeddings"].weight.t() + p.bias

    def classify(self, input_ids, attention_mask=None, token_type_ids=None) -> torch.Tensor:
        """(B, num_labels) logits from the pooled [CLS] output."""
        pooled = self.bert.pool(self(input_ids, attention_mask, token_type_ids))
        return self.classifier(self.classifier_drop(pooled))

    def sentence_embedding(self, input_ids, attention_mask) -> torch.Tensor:
        """Sentence embeddings: mean of the hidden states over real tokens, L2-normalised (B, C)."""
        hidden = self(input_ids, attention_mask)
        m = attention_mask.unsqueeze(-1).to(hidden.dtype)
        mean = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
        return F.normalize(mean, p=2, dim=1)

    @torch.no_grad()
    def embed(self, input_ids, attention_mask) -> torch.Tensor:
        """:meth:`sentence_embedding` without gradients (for indexing and search)."""
        return self.sentence_embedding(input_ids, attention_mask)

    def state_dict_for_save(self) -> dict[str, torch.Tensor]:
        """Plain contiguous tensors (the MLM decoder is the word embeddings and is not stored twice)."""
        return {k: v.detach().contiguous() for k, v in self.state_dict().items()}

    def load_saved_state(self, state: dict[str, torch.Tensor]) -> None:
        missing, unexpected = self.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"checkpoint does not match the model: missing {missing}, unexpected {unexpected}")
