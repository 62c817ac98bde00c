"""Structured pruning: whole MLP neurons (transformers), convolution channels (CNNs) or hidden
units (MLPs) go, and the model is rebuilt at the smaller width, so it is actually smaller and
faster (a mask would change neither).

A neuron j of a block's MLP is one output row of its input Linear layers (GPT's ``c_fc``, Llama's
gate and up projections, BERT's intermediate dense) and one input column of its output layer. Its
importance is ``mean |a_j| * ||W_out[:, j]||``: how much it adds to the block's output on
calibration inputs (the run's own validation data), or, with no data, ``||W_in[j]|| *
||W_out[:, j]||`` from the weights alone. Each block keeps its most important neurons, the same
number in every block (the config has one ``n_inner``), rounded to a multiple of 8 for the kernels.
An image family's layers each keep their units of the highest mean |activation| on the
calibration images (the family slices its own layers: ``pruned(keep)``).

Attention heads (``--prune-heads``, decoders whose config states ``head_dim``: the Llama family)
go the same way: head h's importance is the sum over its ``head_dim`` input columns of ``o_proj``
of ``mean |a_j| * ||W_o[:, j]||`` (or ``||W_q[h]|| * ||W_o[:, h]||`` from the weights alone).
With grouped-query attention each key/value head keeps the same number of its query heads (the
most important of its group); where every query head has its own key/value head, whole heads go,
keys and values with them. The same number is kept in every block (the config has one
``n_head``).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch
import torch.nn as nn

from lmforge.errors import UserError


def kept_width(inner: int, fraction: float) -> int:
    if not 0.0 < fraction < 1.0:
        raise UserError(f"--prune takes the fraction of MLP neurons to remove, in (0, 1); got {fraction}")
    keep = inner - round(inner * fraction)
    if inner >= 64:
        keep = max(8, keep // 8 * 8)
    if keep < 1:
        raise UserError(f"--prune {fraction} would remove every one of the {inner} MLP neurons")
    return keep


@torch.no_grad()
def mean_activations(model: nn.Module, modules: list[nn.Module], calibrate: Callable[[nn.Module], None],
                     inputs: bool) -> list[torch.Tensor]:
    """Per module, the mean |activation| of each unit over what ``calibrate(model)`` runs through
    it: of its input, units on the last axis (``inputs``), or of its output, units on axis 1."""
    sums: list[torch.Tensor | float] = [0.0] * len(modules)
    counts = [0] * len(modules)

    def hook(i):
        def record(module, args, out=None):
            a = (args[0] if inputs else out).detach().float().abs()
            a = a.reshape(-1, a.size(-1)) if inputs else a.transpose(0, 1).reshape(a.size(1), -1).t()
            sums[i] = sums[i] + a.sum(0).cpu()
            counts[i] += a.size(0)
        return record

    handles = [m.register_forward_pre_hook(hook(i)) if inputs else m.register_forward_hook(hook(i))
               for i, m in enumerate(modules)]
    try:
        calibrate(model)
    finally:
        for h in handles:
            h.remove()
    if not all(counts):
        raise UserError("the calibration data ran no input through the model")
    return [s / c for s, c in zip(sums, counts)]


@torch.no_grad()
def importance(model: nn.Module, calibrate: Callable[[nn.Module], None] | None = None) -> list[torch.Tensor]:
    """Per block, (n_inner,) importance of each MLP neuron (see the module docstring)."""
    units = model.mlp_neurons()
    out_norm = [out.weight.float().norm(dim=0) for _, out in units]
    if calibrate is None:
        return [torch.stack([r.weight.float().norm(dim=1) for r in rows]).prod(0) * n
                for (rows, _), n in zip(units, out_norm)]
    acts = mean_activations(model, [out for _, out in units], calibrate, inputs=True)
    return [a * n for a, n in zip(acts, out_norm)]


def prune_layers(model: nn.Module, fraction: float, calibrate: Callable[[nn.Module], None]) -> tuple[nn.Module, dict]:
    """Image families (``prunable_layers()`` / ``pruned(keep)``: CNN channels, MLP units): each
    layer keeps its units of the highest mean |activation| on the calibration inputs."""
    layers = model.prunable_layers()
    acts = mean_activations(model, [m for _, m in layers], calibrate, inputs=False)
    keep = [torch.topk(a, kept_width(width, fraction)).indices.sort().values for a, (width, _) in zip(acts, layers)]
    with torch.no_grad():
        pruned = model.pruned(keep)
    return pruned.eval(), {"widths": [[w for w, _ in layers], [len(k) for k in keep]],
                           "params": [_count(model), _count(pruned)], "importance": "activations"}


def prune(model: nn.Module, fraction: float, calibrate: Callable | None = None) -> tuple[nn.Module, dict]:
    """A new, smaller model: MLP neurons of transformers (:func:`prune_mlp`), channels and units of
    the image families (:func:`prune_layers`)."""
    if hasattr(model, "mlp_neurons"):
        return prune_mlp(model, fraction, calibrate)
    if hasattr(model, "prunable_layers") and calibrate is not None:
        return prune_layers(model, fraction, calibrate)
    raise UserError(f"--prune thins transformers (MLP neurons), CNNs (channels) and MLPs (units); "
                    f"{type(model).__name__} has nothing it can remove")


def prune_mlp(model: nn.Module, fraction: float, calibrate: Callable | None = None) -> tuple[nn.Module, dict]:
    """A new model with ``fraction`` of every block's MLP neurons removed, and what was done."""
    units = model.mlp_neurons()
    inner = units[0][1].in_features
    keep = kept_width(inner, fraction)
    scores = importance(model, calibrate)
    names = {id(m): n for n, m in model.named_modules()}
    state = model.state_dict_for_save()
    for (rows, out), score in zip(units, scores):
        idx = torch.topk(score, keep).indices.sort().values
        for r in rows:
            n = names[id(r)]
            state[f"{n}.weight"] = state[f"{n}.weight"][idx].contiguous()
            if r.bias is not None:
                state[f"{n}.bias"] = state[f"{n}.bias"][idx].contiguous()
        n = names[id(out)]
        state[f"{n}.weight"] = state[f"{n}.weight"][:, idx].contiguous()
    config = dataclasses.replace(model.config, n_inner=keep)
    pruned = type(model)(config)
    pruned.load_saved_state(state)
    before, after = _count(model), _count(pruned)
    return pruned.eval(), {"widths": [[inner] * len(units), [keep] * len(units)], "params": [before, after],
                           "importance": "activations" if calibrate else "weights"}


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def kept_heads(n_head: int, n_kv_head: int, fraction: float) -> tuple[int, int]:
    """(query heads, key/value heads) left after removing ``fraction`` of the query heads."""
    if not 0.0 < fraction < 1.0:
        raise UserError(f"--prune-heads takes the fraction of attention heads to remove, in (0, 1); got {fraction}")
    group = n_head // n_kv_head
    if group > 1:  # grouped-query attention: fewer queries per key/value head
        keep = group - round(group * fraction)
        if keep < 1:
            raise UserError(f"--prune-heads {fraction} would remove every query head of a group of {group}")
        return keep * n_kv_head, n_kv_head
    keep = n_kv_head - round(n_kv_head * fraction)
    if keep < 1:
        raise UserError(f"--prune-heads {fraction} would remove every one of the {n_head} heads")
    return keep, keep


@torch.no_grad()
def head_importance(model: nn.Module, calibrate: Callable[[nn.Module], None] | None = None) -> list[torch.Tensor]:
    """Per block, (n_head,) importance of each query head (see the module docstring)."""
    layers = model.attention_layers()
    out_norms = [a.o_proj.weight.float().norm(dim=0) for a in layers]  # (n_head * head_dim,)
    if calibrate is None:
        per_col = [a.q_proj.weight.float().view(a.n_head, -1).norm(dim=1).repeat_interleave(a.head_dim) * n
                   for a, n in zip(layers, out_norms)]
    else:
        acts = mean_activations(model, [a.o_proj for a in layers], calibrate, inputs=True)
        per_col = [x * n for x, n in zip(acts, out_norms)]
    return [c.view(a.n_head, a.head_dim).sum(1) for c, a in zip(per_col, layers)]


def prune_heads(model: nn.Module, fraction: float, calibrate: Callable | None = None) -> tuple[nn.Module, dict]:
    """A new model with ``fraction`` of every block's query heads removed, and what was done."""
    if not hasattr(model, "attention_layers"):
        raise UserError(f"--prune-heads removes attention heads of Llama-family decoders; {type(model).__name__} "
                        "has none it can rebuild smaller")
    layers = model.attention_layers()
    n_head, n_kv, hd = layers[0].n_head, layers[0].n_kv_head, layers[0].head_dim
    new_head, new_kv = kept_heads(n_head, n_kv, fraction)
    group, new_group = n_head // n_kv, new_head // new_kv
    names = {id(m): n for n, m in model.named_modules()}
    state = model.state_dict_for_save()

    def rows(t: torch.Tensor, heads: torch.Tensor) -> torch.Tensor:  # the rows of these heads, in order
        return t.view(-1, hd, *t.shape[1:])[heads].reshape(-1, *t.shape[1:]).contiguous()

    for attn, score in zip(layers, head_importance(model, calibrate)):
        by_group = score.view(n_kv, group)
        if group > 1:  # each group keeps its best queries; every key/value head stays
            queries = torch.cat([g * group + torch.topk(by_group[g], new_group).indices.sort().values
                                 for g in range(n_kv)])
            kv = torch.arange(n_kv)
        else:
            queries = kv = torch.topk(score, new_head).indices.sort().values
        for proj, heads in ((attn.q_proj, queries), (attn.k_proj, kv), (attn.v_proj, kv)):
            n = names[id(proj)]
            state[f"{n}.weight"] = rows(state[f"{n}.weight"], heads)
            if proj.bias is not None:
                state[f"{n}.bias"] = rows(state[f"{n}.bias"], heads)
        n = names[id(attn.o_proj)]
        cols = (queries[:, None] * hd + torch.arange(hd)).reshape(-1)
        state[f"{n}.weight"] = state[f"{n}.weight"][:, cols].contiguous()
    config = dataclasses.replace(model.config, n_head=new_head, n_kv_head=new_kv, head_dim=hd)
    pruned = type(model)(config)
    pruned.load_saved_state(state)
    return pruned.eval(), {"widths": [[n_head] * len(layers), [new_head] * len(layers)],
                           "params": [_count(model), _count(pruned)], "units": "attention heads",
                           "importance": "activations" if calibrate else "weights"}
