"""Token files written by ``prepare`` and the batches cut from them.

Training batches are a pure function of ``(seed, step, micro_step)``: the data position saved in
a checkpoint is just the step, and resuming reproduces the exact batches of an uninterrupted run.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from lmforge.errors import UserError


def read_meta(data_dir: str | Path) -> dict:
    """A prepared data directory's ``meta.json`` (token or image data); a missing or damaged one
    is a one-line error."""
    data_dir = Path(data_dir)
    path = data_dir / "meta.json"
    if not path.is_file():
        raise UserError(f"not a prepared data directory (no meta.json): {data_dir}; run `lmforge prepare` first")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"{path}: not valid JSON; prepare the data again") from None
    if not isinstance(meta, dict):
        raise UserError(f"{path}: not a data description; prepare the data again")
    return meta


def load_meta(data_dir: str | Path) -> dict:
    """The ``meta.json`` of a token data directory."""
    meta = read_meta(data_dir)
    if "vocab_size" not in meta:
        kind = "images (train them with --task image-classify)" if meta.get("kind") == "images" else "no token data"
        raise UserError(f"{data_dir} holds {kind}, not tokens from `lmforge prepare`")
    return meta


class TokenFile:
    """A read-only memmap of token ids."""

    def __init__(self, path: str | Path, dtype: str):
        path = Path(path)
        if not path.is_file():
            raise UserError(f"token file not found: {path}")
        self.path = path
        self.data = np.memmap(path, dtype=np.dtype(dtype), mode="r")

    def __len__(self) -> int:
        return len(self.data)

    def check_context(self, T: int) -> None:
        """Raise a clear error if the file cannot hold one window of ``T`` tokens plus a target."""
        if len(self.data) < T + 2:
            raise UserError(f"{self.path.name} holds {len(self.data)} tokens, too few for a context of "
                            f"{T}; use more data or a smaller model.block_size")

    def random_batch(self, batch_size: int, T: int, seed: int, step: int, micro: int = 0, stream: int = 0):
        """``batch_size`` random windows: inputs (B, T) and next-token targets (B, T), int64.

        ``stream`` separates independent uses of the same seed (0: training, 1: validation).
        """
        self.check_context(T)
        rng = np.random.default_rng([seed, stream, step, micro])
        return self._rows(rng.integers(0, len(self.data) - T - 1, size=batch_size), T)

    def windows(self, indices: torch.Tensor, T: int):
        """The non-overlapping windows ``indices`` (window i: inputs ``[i*T, i*T+T)``, targets one
        token on): (inputs, targets), (len(indices), T) each, int64."""
        return self._rows(indices.numpy() * T, T)

    def _rows(self, starts, T: int):
        w = torch.from_numpy(np.stack([self.data[s:s + T + 1] for s in starts]).astype(np.int64))
        return w[:, :-1], w[:, 1:]

    def sequential_batches(self, batch_size: int, T: int, max_tokens: int | None = None,
                           stride: int | None = None):
        """Windows covering the file once, every target token scored exactly once.

        Windows start every ``stride`` tokens (default ``T``: no overlap). Window i holds inputs
        ``[s, s+T)`` and targets ``[s+1, s+T]`` with ``s = i*stride``; in every window but the first,
        only the last ``stride`` targets are scored (the rest are -1), so each scored token has at
        least ``T - stride`` tokens of context. Yields (inputs, targets), int64, shorter windows
        padded (targets with -1).
        """
        stride = stride or T
        if not 0 < stride <= T:
            raise UserError(f"stride must be in 1..{T}, got {stride}")
        n = len(self.data) - 1  # number of predictable tokens
        if max_tokens is not None:
            n = min(n, max_tokens)
        starts = [0]
        while starts[-1] + T < n:
            starts.append(starts[-1] + stride)
        for i in range(0, len(starts), batch_size):
            group = starts[i:i + batch_size]
            x = np.zeros((len(group), T), dtype=np.int64)
            y = np.full((len(group), T), -1, dtype=np.int64)
            for r, s in enumerate(group):
                L = min(T, n - s)
                x[r, :L] = self.data[s:s + L]
                y[r, :L] = self.data[s + 1:s + 1 + L]
                if s > 0:
                    y[r, :T - stride] = -1  # scored by the previous window
            yield torch.from_numpy(x), torch.from_numpy(y)
