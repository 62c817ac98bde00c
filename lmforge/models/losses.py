"""Cross-entropy over the vocabulary without materialising all the logits at once.

The output projection and the loss are fused and computed in row chunks: each chunk's logits
(rows × V) are made, turned into the loss and, in the same pass, into the gradients of the hidden
states and of the projection weight (softmax minus one-hot), then dropped. Peak memory for the
logits falls from N × V to chunk × V, and the separate log-softmax, its backward and the zero-fill
of the full gradient disappear; on a 2-core CPU this is the difference measured in
bench/RESULTS.md.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int):
        # h (N, C), weight (V, C), targets (N,) with -1 for ignored rows.
        n_valid = (targets >= 0).sum().clamp(min=1)
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h = torch.empty_like(h)
        grad_w = torch.zeros_like(weight, dtype=torch.float32)
        for s in range(0, h.size(0), chunk):
            hs, ts = h[s:s + chunk], targets[s:s + chunk]
            keep = (ts >= 0).unsqueeze(1).to(h.dtype)  # (n, 1): 0 for ignored rows
            idx = ts.clamp(min=0).unsqueeze(1)
            logits = (hs @ weight.t()).float()  # (n, V)
            top = logits.amax(dim=1, keepdim=True)
            target_logit = logits.gather(1, idx)
            g = torch.softmax(logits, dim=1)  # one exp per logit (logsumexp, then exp, took two)
            # log-sum-exp from the largest logit, whose probability is >= 1/V and so never underflows.
            lse = top - g.amax(dim=1, keepdim=True).log()
            total += ((lse - target_logit) * keep).sum()
            g.scatter_add_(1, idx, torch.full_like(lse, -1.0))  # minus one-hot: d(sum loss)/d logits
            # Ignored rows: zeroed on the (n, C) sides, not by another pass over the (n, V) gradient.
            grad_h[s:s + chunk] = (g.to(h.dtype) @ weight) * keep
            grad_w.addmm_(g.t(), (hs * keep).float())
        ctx.save_for_backward(grad_h, grad_w.to(weight.dtype), n_valid)
        return total / n_valid

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w, n_valid = ctx.saved_tensors
        scale = grad_out / n_valid
        return grad_h * scale.to(grad_h.dtype), grad_w * scale.to(grad_w.dtype), None, None


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         chunk: int = 1024) -> torch.Tensor:
    """Mean cross-entropy of ``h @ weight.T`` against ``targets`` (-1 ignored), chunked over rows.

    ``h`` (..., C), ``weight`` (V, C), ``targets`` (...). With gradients enabled the fused path
    above is used; otherwise the logits are still only made one chunk at a time.
    """
    h = h.reshape(-1, h.size(-1))
    targets = targets.reshape(-1)
    if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(h, weight, targets, chunk)
    total = torch.zeros((), dtype=torch.float32, device=h.device)
    for s in range(0, h.size(0), chunk):
        logits = (h[s:s + chunk] @ weight.t()).float()
        total += F.cross_entropy(logits, targets[s:s + chunk], ignore_index=-1, reduction="sum")
    return total / (targets >= 0).sum().clamp(min=1)
