"""Research initialisations of the GPT (``model.pos_init``, ``model.prev_token_head``), kept apart
from the model so that ``gpt.py`` reads as GPT-2 does.

- Sinusoidal position table (Vaswani et al.) as the *initial* value of the learned position
  embeddings, at a chosen RMS.
- A previous-token head: the first layer's first head starts attending from each position to the
  one before it, on top of that table — the half of copying from context that a 2-layer model is
  slow to learn by itself.

Both were chosen by measurement (``bench/RESULTS.md`` §14 and §15).
"""

from __future__ import annotations

import math

import torch

# Chosen by measurement (bench/RESULTS.md section 14): at RMS 0.02, 0.1, 0.3 and 1.0 `micro` on the
# npm corpus gave 2.148, 2.121, 2.101 and 2.139 bits/byte after 1,100 steps (random init: 2.164).
SINUSOIDAL_RMS = 0.3


def sinusoidal_frequencies(dim: int) -> torch.Tensor:
    """The ``dim // 2`` angular frequencies of the sinusoidal table, fastest first (float64)."""
    return torch.exp(-math.log(10000.0) * torch.arange(dim // 2, dtype=torch.float64) / (dim // 2))


def sinusoidal_positions(n_pos: int, dim: int, rms: float) -> torch.Tensor:
    """(n_pos, dim): sines in the first half of the features, cosines in the second, at
    wavelengths from 2*pi to 10000*2*pi, scaled so that the table's RMS is ``rms``."""
    angles = torch.arange(n_pos, dtype=torch.float64)[:, None] * sinusoidal_frequencies(dim)
    table = torch.cat([angles.sin(), angles.cos()], dim=1)
    table = torch.cat([table, torch.zeros(n_pos, dim - table.size(1), dtype=torch.float64)], dim=1)
    return (table * rms / table.pow(2).mean().sqrt()).float()


# Chosen by measurement (bench/RESULTS.md section 15): `micro` on the npm corpus after 1,100 steps
# gave 2.033, 2.023, 1.997 and 2.004 bits/byte at 1.5, 2, 3 and 4. At 3 the head starts with ~0.99
# of its attention on the previous position.
PREV_TOKEN_SCALE = 3.0


def previous_token_head(dim: int, head_size: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Query and key weights, (head_size, dim) each, for a head that attends from position i to
    i - 1 when its input is the sinusoidal table of :func:`sinusoidal_positions`.

    Keys read the ``head_size // 2`` highest-frequency (sine, cosine) pairs; queries read the same
    pairs rotated one position back (sin((i-1)w) = sin(iw)cos(w) - cos(iw)sin(w), and so on), so
    a query at i matches the key at i - 1 best. Position i's features after the first LayerNorm have
    RMS about 1 (the table dominates the small initial token embeddings), so ``scale`` sets how
    sharp the attention starts."""
    half, pairs = dim // 2, head_size // 2
    freq = sinusoidal_frequencies(dim)[:pairs]
    cos, sin = freq.cos(), freq.sin()
    rows = torch.arange(pairs)
    wq = torch.zeros(head_size, dim, dtype=torch.float64)
    wk = torch.zeros(head_size, dim, dtype=torch.float64)
    wk[rows, rows] = scale  # sines of the fastest pairs
    wk[pairs + rows, half + rows] = scale  # their cosines
    wq[rows, rows], wq[rows, half + rows] = scale * cos, -scale * sin
    wq[pairs + rows, half + rows], wq[pairs + rows, rows] = scale * cos, scale * sin
    return wq.float(), wk.float()
