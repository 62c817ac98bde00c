"""A decoder's attention weights, on demand: one forward pass inside
:func:`~lmforge.models.decoder.recording_attention`, which computes softmax(QK^T / sqrt(hs))
explicitly; every other forward keeps the fused SDPA kernel."""

from __future__ import annotations

import numpy as np
import torch

from lmforge.errors import UserError
from lmforge.models.decoder import recording_attention


@torch.no_grad()
def attention_weights(model, ids: torch.Tensor) -> list[np.ndarray]:
    """Per layer, (heads, T, T) attention of the one sequence ``ids`` (1, T)."""
    with recording_attention() as weights:
        model(ids)
    if not weights:
        raise UserError(f"{type(model).__name__} has no attention to draw (a recurrent model)")
    return [w[0].float().cpu().numpy() for w in weights]
