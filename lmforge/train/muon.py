"""Muon: momentum, then the update orthogonalised by a Newton-Schulz iteration, for the hidden 2-D
weights (Keller Jordan's optimizer; Moonshot's RMS matching so that AdamW's learning rate and
weight decay carry over). ``train/optim.py`` pairs it with AdamW for the other parameters
(``train.optimizer=muon``); chosen for ``micro`` by measurement (``bench/RESULTS.md`` §6, §11).
"""

from __future__ import annotations

import math

import torch


class Muon(torch.optim.Optimizer):
    """Muon (momentum, then the update orthogonalised by a Newton-Schulz iteration) for 2-D weights.

    The algorithm of ``torch.optim.Muon`` with ``adjust_lr_fn="match_rms_adamw"`` (nesterov
    momentum, quintic Newton-Schulz with Keller Jordan's coefficients, decoupled weight decay, the
    learning rate scaled by 0.2 * sqrt(max(rows, cols))), with one difference: the iteration runs
    in ``ns_dtype``. torch's runs in bfloat16 always, which on CPUs without bfloat16 units is 12x
    slower than float32 (768 x 192 matrices, 2-core EPYC) and made Muon steps 5x slower than
    AdamW's. With ``ns_dtype=torch.bfloat16`` this equals ``torch.optim.Muon`` (tested)."""

    COEFFICIENTS = (3.4445, -4.775, 2.0315)

    def __init__(self, params, lr: float = 1e-3, weight_decay: float = 0.1, momentum: float = 0.95,
                 ns_steps: int = 5, eps: float = 1e-7, ns_dtype: torch.dtype = torch.float32):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, ns_steps=ns_steps,
                                      eps=eps))
        self.ns_dtype = ns_dtype
        for group in self.param_groups:
            if any(p.dim() != 2 for p in group["params"]):
                raise ValueError("Muon takes 2-D parameters only")

    def _orthogonalise(self, updates: list[torch.Tensor], steps: int, eps: float) -> list[torch.Tensor]:
        """Newton-Schulz on each update; matrices of one shape (after turning tall ones wide) are
        iterated together as one batch of matrix products: the same arithmetic, and on a 2-core CPU
        1.2-1.4x faster than one small product at a time for `micro` (bench/RESULTS.md §10)."""
        a, b, c = self.COEFFICIENTS
        out: list[torch.Tensor | None] = [None] * len(updates)
        by_shape: dict[tuple, list[int]] = {}
        for i, g in enumerate(updates):
            rows, cols = g.shape
            by_shape.setdefault((min(rows, cols), max(rows, cols)), []).append(i)
        tall = [g.size(0) > g.size(1) for g in updates]
        for members in by_shape.values():
            x = torch.stack([updates[i].T if tall[i] else updates[i] for i in members]).to(self.ns_dtype)
            x.div_(x.norm(dim=(1, 2), keepdim=True).clamp(min=eps))  # spectral norm <= Frobenius norm <= 1
            for _ in range(steps):
                gram = x @ x.mT
                x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
            for i, xi in zip(members, x):
                out[i] = xi.T if tall[i] else xi
        return out

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, mu = group["lr"], group["momentum"]
            params, updates = [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - mu)
                params.append(p)
                updates.append(p.grad.lerp(buf, mu))  # nesterov
            for p, update in zip(params, self._orthogonalise(updates, group["ns_steps"], group["eps"])):
                p.mul_(1 - lr * group["weight_decay"])
                p.add_(update.to(p.dtype), alpha=-lr * 0.2 * math.sqrt(max(p.shape)))
        return loss
