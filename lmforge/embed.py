"""Sentence embeddings from an encoder: the mean of the last hidden states over real tokens,
L2-normalised (what sentence-transformers does for all-MiniLM-L6-v2)."""

from __future__ import annotations

import numpy as np
import torch

from lmforge.data.tokenizer import encode_batch


@torch.no_grad()
def embed_texts(model, tokenizer, texts: list[str], max_length: int | None = None, batch_size: int = 64) -> np.ndarray:
    """(N, hidden) float32 unit vectors for ``texts``, truncated to ``max_length`` tokens."""
    device = next(model.parameters()).device
    max_length = min(max_length or model.config.block_size, model.config.block_size)
    out = []
    for i in range(0, len(texts), batch_size):
        ids, mask = encode_batch(tokenizer, texts[i:i + batch_size], max_length)
        out.append(model.embed(ids.to(device), mask.to(device)).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, model.config.n_embd), dtype=np.float32)
