"""Masked-language-model pretraining for encoders: BERT's dynamic masking.

Each window of the token stream becomes ``[CLS] tokens [SEP]``; 15% of the ordinary tokens are
chosen as targets, and of those 80% are replaced by ``[MASK]``, 10% by a random token and 10% left
unchanged. The mask is drawn afresh for every batch from a generator seeded by (seed, step,
micro-batch), so a resumed run sees exactly the masks of an uninterrupted one. The loss is the
cross-entropy on the chosen positions only; accuracy is measured on the same positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from lmforge.errors import UserError
from lmforge.models import MODELS
from lmforge.tasks.lm import TokenTask

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


def mlm_loss(call, model, inputs: torch.Tensor, targets: torch.Tensor):
    """(mean cross-entropy, accuracy) over the masked positions. ``call`` runs the encoder's
    forward (through DDP when wrapped); ``model`` is the plain model, whose head it applies."""
    keep = targets >= 0
    hidden = call(inputs)[keep]  # only the masked positions go through the vocabulary projection
    logits = model.mlm_logits(hidden).float()
    loss = F.cross_entropy(logits, targets[keep])
    accuracy = (logits.argmax(-1) == targets[keep]).float().mean()
    return loss, accuracy.detach()


@dataclass
class MLMOptions:
    name: str = "mlm"


class MLMTask(TokenTask):
    """Masked-token pretraining of an encoder on a WordPiece data directory."""

    name = "mlm"
    ARCHS = ("bert",)
    Options = MLMOptions
    METRICS = ("loss", "mlm_accuracy")

    def __init__(self, cfg, run=None):
        if not hasattr(MODELS[cfg.arch].model, "mlm_logits"):
            raise UserError("--task mlm trains an encoder: use a BERT preset (bert-debug, bert-mini, bert-base)")
        super().__init__(cfg, run)
        self.special = self.meta.get("special_ids") or {}
        missing = [t for t in ("[PAD]", "[CLS]", "[SEP]", "[MASK]") if t not in self.special]
        if missing:
            raise UserError(f"masked-LM training needs a WordPiece data directory (`lmforge prepare "
                            f"--tokenizer wordpiece`); this tokenizer lacks {', '.join(missing)}")

    def window_batch(self, data, step, micro, stream):
        t = self.cfg.train
        return mlm_batch(data, t.batch_size, self.window, t.seed, step, micro, stream, self.special,
                         self.meta["vocab_size"])

    def loss_and_metrics(self, call, model, batch):
        loss, accuracy = mlm_loss(call, model, *batch)
        return loss, {"mlm_accuracy": accuracy}
