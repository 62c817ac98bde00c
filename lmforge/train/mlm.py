"""Masked-language-model pretraining for encoders: BERT's dynamic masking.

Each window of the token stream becomes ``[CLS] tokens [SEP]``; 15% of the ordinary tokens are
chosen as targets, and of those 80% are replaced by ``[MASK]``, 10% by a random token and 10% left
unchanged. The mask is drawn afresh for every batch from a generator seeded by (seed, step,
micro-batch), so a resumed run sees exactly the masks of an uninterrupted one. The loss is the
cross-entropy on the chosen positions only; accuracy is measured on the same positions.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

MASK_PROB, REPLACE_MASK, REPLACE_RANDOM = 0.15, 0.8, 0.1


def mask_tokens(x: torch.Tensor, special: dict[str, int], vocab_size: int, gen: torch.Generator):
    """(B, T-2) ids -> inputs (B, T) with [CLS]/[SEP] and masking applied, targets (B, T), -1 = ignore."""
    B = x.size(0)
    inputs = torch.cat([torch.full((B, 1), special["[CLS]"]), x, torch.full((B, 1), special["[SEP]"])], dim=1)
    targets = torch.full_like(inputs, -1)
    candidates = torch.ones_like(inputs, dtype=torch.bool)
    for token in special.values():
        candidates &= inputs != token
    chosen = (torch.rand(inputs.shape, generator=gen) < MASK_PROB) & candidates
    if not chosen.any():  # a tiny batch with no target: take its first ordinary token
        chosen.view(-1)[candidates.view(-1).nonzero()[0]] = True
    targets[chosen] = inputs[chosen]
    r = torch.rand(inputs.shape, generator=gen)
    random_ids = torch.randint(len(special), vocab_size, inputs.shape, generator=gen)
    inputs = torch.where(chosen & (r < REPLACE_MASK), special["[MASK]"], inputs)
    swap = chosen & (r >= REPLACE_MASK) & (r < REPLACE_MASK + REPLACE_RANDOM)
    inputs = torch.where(swap, random_ids, inputs)
    return inputs, targets


def mlm_batch(data, batch_size: int, T: int, seed: int, step: int, micro: int, stream: int,
              special: dict[str, int], vocab_size: int):
    """A reproducible masked batch: a function of (seed, stream, step, micro) only."""
    x, _ = data.random_batch(batch_size, T - 2, seed, step, micro, stream)
    gen = torch.Generator().manual_seed(int(np.random.default_rng([seed, stream, step, micro]).integers(2**62)))
    return mask_tokens(x, special, vocab_size, gen)


def mlm_loss(model, inputs: torch.Tensor, targets: torch.Tensor):
    """(mean cross-entropy, accuracy) over the masked positions."""
    keep = targets >= 0
    hidden = model(inputs)[keep]  # only the masked positions go through the vocabulary projection
    head = getattr(model, "module", model)  # under DDP, the wrapped model has the head
    logits = head.mlm_logits(hidden).float()
    loss = F.cross_entropy(logits, targets[keep])
    accuracy = (logits.argmax(-1) == targets[keep]).float().mean()
    return loss, accuracy.detach()
