"""Optimizers (AdamW, Adam, SGD with momentum, or Muon for the hidden matrices + AdamW for the
rest) and the learning-rate schedules (cosine with warm-up, constant, step, one-cycle)."""

from __future__ import annotations

import math

import torch

from lmforge.train.muon import Muon

OPTIMIZERS = ("adamw", "adam", "sgd", "muon")
SCHEDULES = ("cosine", "constant", "step", "onecycle")
ONECYCLE_START = 0.3  # share of the schedule the one-cycle rise takes (PyTorch's pct_start)
ONECYCLE_DIV, ONECYCLE_FINAL_DIV = 25.0, 1e4  # start at lr / 25, end at lr / 25 / 1e4 (PyTorch's defaults)


def _split(model: torch.nn.Module) -> tuple[list, list]:
    """Trainable parameters as (hidden matrices, the rest), each in ``parameters()`` order.

    Hidden matrices are the 2-D weights of Linear layers; the rest are embeddings (and the output
    head tied to them), biases and norms. ``parameters()`` yields a tied tensor once."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    matrices, rest = [], []
    for p in model.parameters():
        if p.requires_grad:
            (matrices if p.dim() >= 2 and id(p) not in embeddings else rest).append(p)
    return matrices, rest


def layer_scales(model: torch.nn.Module, decay: float) -> dict[int, float]:
    """Layer-wise learning-rate decay: ``decay ** k`` by parameter id, k counted from the top: 0
    for what sits above the blocks (head, pooler, final norm), 1 for the last block, … L for the
    first, L + 1 for the embeddings. The model declares its ``blocks()`` and ``embeddings()``."""
    blocks = model.blocks()
    top = len(blocks) + 1
    depth = {id(p): i + 1 for i, block in enumerate(blocks) for p in block.parameters()}
    depth.update({id(p): 0 for module in model.embeddings() for p in module.parameters()})
    return {id(p): decay ** (top - depth.get(id(p), top)) for p in model.parameters()}


def _by_scale(params: list, scales: dict[int, float] | None) -> list[tuple[float, list]]:
    """``params`` grouped by learning-rate scale, in first-seen order (one group without ``scales``)."""
    groups: dict[float, list] = {}
    for p in params:
        groups.setdefault(1.0 if scales is None else scales[id(p)], []).append(p)
    return list(groups.items())


def build_optimizer(model: torch.nn.Module, lr: float, weight_decay: float, betas: tuple[float, float],
                    device_type: str, kind: str = "adamw", muon_lr: float | None = None,
                    layer_decay: float = 1.0, momentum: float = 0.9, nesterov: bool = False):
    """AdamW with weight decay on hidden matrices only; or (``kind="muon"``) :class:`Muon` on the
    hidden matrices and AdamW on embeddings, head, biases and norms.

    Muon's peak learning rate is ``muon_lr`` (default ``lr``), with Moonshot's RMS matching (as
    ``adjust_lr_fn="match_rms_adamw"``), so AdamW's learning rate and weight decay carry over. Its
    group carries ``lr_scale = muon_lr / lr``, which :func:`set_lr` applies along the schedule.

    ``layer_decay`` < 1 scales each block's learning rate by :func:`layer_scales` (layer-wise
    decay, for fine-tuning: the lower blocks, which hold the most general features, move least)."""
    matrices, rest = _split(model)
    scales = layer_scales(model, layer_decay) if layer_decay != 1.0 else None
    fused = device_type in ("cuda", "cpu")  # one kernel per step; on CPU 5x faster than foreach (RESULTS §10)
    rest_groups = [{"params": ps, "weight_decay": 0.0, "lr_scale": k} for k, ps in _by_scale(rest, scales)]
    groups = [{"params": ps, "weight_decay": weight_decay, "lr_scale": k}
              for k, ps in _by_scale(matrices, scales)] + rest_groups
    if kind == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused)
    if kind == "adam":  # weight decay as an L2 term in the gradient (Keras' and torch's Adam)
        return torch.optim.Adam(groups, lr=lr, betas=betas, fused=fused)
    if kind == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov, fused=fused)
    if kind != "muon":
        raise ValueError(f"unknown optimizer {kind!r} (choose from {', '.join(OPTIMIZERS)})")
    adamw = torch.optim.AdamW(rest_groups, lr=lr, betas=betas, fused=fused)
    muon_lr = lr if muon_lr is None else muon_lr
    muon = Muon([{"params": ps, "lr_scale": k * muon_lr / lr} for k, ps in _by_scale(matrices, scales)],
                lr=muon_lr, weight_decay=weight_decay,
                ns_dtype=torch.bfloat16 if device_type == "cuda" else torch.float32)
    return Optimizers(adamw, muon)


class Optimizers:
    """Several optimizers over disjoint parameters, stepped together and saved as one.

    ``param_groups`` is the concatenation of theirs (the same dicts, so setting a group's ``lr``
    reaches the optimizer that owns it), and ``state_dict()`` numbers parameters across all of them
    in that order, the layout ``torch.optim.Optimizer.state_dict()`` has for one optimizer."""

    def __init__(self, *optimizers: torch.optim.Optimizer):
        self.optimizers = optimizers

    @property
    def param_groups(self) -> list[dict]:
        return [g for opt in self.optimizers for g in opt.param_groups]

    def step(self) -> None:
        for opt in self.optimizers:
            opt.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        state, groups, offset = {}, [], 0
        for opt in self.optimizers:
            sd = opt.state_dict()
            state.update({offset + i: s for i, s in sd["state"].items()})
            groups += [{**g, "params": [offset + i for i in g["params"]]} for g in sd["param_groups"]]
            offset += sum(len(g["params"]) for g in opt.param_groups)
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, sd: dict) -> None:
        groups, offset = list(sd["param_groups"]), 0
        for opt in self.optimizers:
            mine, groups = groups[:len(opt.param_groups)], groups[len(opt.param_groups):]
            ids = [i for g in mine for i in g["params"]]
            opt.load_state_dict({
                "state": {i - offset: sd["state"][i] for i in ids if i in sd["state"]},
                "param_groups": [{**g, "params": [i - offset for i in g["params"]]} for g in mine]})
            offset += len(ids)


def set_lr(optimizer, lr: float) -> None:
    """Set every group's learning rate to ``lr`` times its ``lr_scale`` (1 unless a group has one)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def lr_at(step: int, lr: float, warmup_steps: int, max_steps: int | None, min_lr_ratio: float,
          schedule: str = "cosine", milestones: tuple[float, ...] = (0.5, 0.75), gamma: float = 0.1) -> float:
    """The learning rate of optimizer step ``step``.

    - ``cosine``: linear warm-up over ``warmup_steps``, then cosine decay to ``lr * min_lr_ratio``
      at ``max_steps``;
    - ``constant``: the warm-up, then ``lr``;
    - ``step``: the warm-up, then ``lr`` times ``gamma`` for each of ``milestones`` (fractions of
      ``max_steps``) passed;
    - ``onecycle``: PyTorch's ``OneCycleLR`` (cosine annealing): from ``lr / 25`` up to ``lr`` over
      the first 30% of ``max_steps``, then down to ``lr / 25 / 1e4`` (no separate warm-up).

    With ``max_steps`` unknown (still being planned from a time budget) the post-warm-up value is
    the schedule's peak.
    """
    if schedule == "onecycle":
        if max_steps is None:
            return lr
        rise = float(ONECYCLE_START * max_steps) - 1
        start, end = lr / ONECYCLE_DIV, lr / ONECYCLE_DIV / ONECYCLE_FINAL_DIV
        if step <= rise:
            a, b, t = start, lr, step / rise if rise > 0 else 1.0
        else:
            a, b, t = lr, end, min(1.0, (step - rise) / max(max_steps - 1 - rise, 1e-9))
        return b + (a - b) / 2.0 * (1.0 + math.cos(math.pi * t))
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if max_steps is None or max_steps <= warmup_steps or schedule == "constant":
        return lr
    if schedule == "step":
        return lr * gamma ** sum(step >= m * max_steps for m in milestones)
    progress = min(1.0, (step - warmup_steps) / (max_steps - warmup_steps))
    min_lr = lr * min_lr_ratio
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)
