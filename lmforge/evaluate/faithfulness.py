"""Faithfulness of an attribution, measured rather than assumed (DeYoung et al., ERASER, 2020).

Deletion: remove the features in the order an attribution ranks them (most supporting first) and
watch the explained score fall; insertion: start from the baseline and put them back in that
order. Over ``STEPS`` equal fractions of the features:

- comprehensiveness (AOPC) = mean over k of score(x) - score(x without its top k): higher is better;
- sufficiency (AOPC) = mean over k of score(x) - score(baseline plus only the top k): lower is better.

The same curves for random orders (``RANDOM_ORDERS`` of them, seeded) are the bar a method must
clear: an attribution no better than random says nothing about the model.
"""

from __future__ import annotations

import numpy as np
import torch

STEPS = 10
RANDOM_ORDERS = 8


def fractions(n: int) -> list[int]:
    """How many features are removed/inserted at each point of the curve: 0, ..., n."""
    return sorted({round(n * i / STEPS) for i in range(STEPS + 1)})


def curves(subject, order: torch.Tensor) -> dict:
    """Deletion and insertion curves of ``subject`` (:class:`~lmforge.explain.attribution.Subject`)
    for features ranked by ``order`` (n,), most supporting first."""
    n = subject.n
    ks = fractions(n)
    chosen = torch.zeros(len(ks), n, dtype=torch.bool)
    for row, k in enumerate(ks):
        chosen[row, order[:k]] = True
    deleted = subject.scores(subject.with_features(chosen, present=False))
    inserted = subject.scores(subject.with_features(chosen, present=True))
    return {"fraction": [k / max(n, 1) for k in ks], "deletion": deleted.tolist(), "insertion": inserted.tolist()}


def aopc(c: dict) -> dict:
    d, i = np.array(c["deletion"]), np.array(c["insertion"])
    full = d[0]  # nothing removed: the score of the input itself
    return {"comprehensiveness": float(np.mean(full - d[1:])) if len(d) > 1 else 0.0,
            "sufficiency": float(np.mean(full - i[1:])) if len(i) > 1 else 0.0}


def random_curves(subject, seed: int = 0) -> dict:
    """Deletion and insertion curves averaged over ``RANDOM_ORDERS`` random orders."""
    g = torch.Generator().manual_seed(seed)
    runs = [curves(subject, torch.randperm(subject.n, generator=g)) for _ in range(RANDOM_ORDERS)]
    return {k: (np.mean([r[k] for r in runs], axis=0).tolist() if k != "fraction" else runs[0][k]) for k in runs[0]}


def evaluate(subject, attributions: dict[str, torch.Tensor]) -> dict:
    """Curves and AOPC of each method's per-feature attributions, and of random orders."""
    out = {}
    for method, per_feature in attributions.items():
        c = curves(subject, torch.argsort(per_feature, descending=True, stable=True))
        out[method] = {**c, **aopc(c)}
    r = random_curves(subject)
    out["random"] = {**r, **aopc(r)}
    return out


def summarize(items: list[dict]) -> dict:
    """Per method, mean AOPC figures and mean curves over explained inputs (``evaluate`` results).
    Curves of inputs with different feature counts are averaged at the same fractions."""
    methods = list(items[0])
    out = {}
    for m in methods:
        rows = [it[m] for it in items]
        grid = np.linspace(0, 1, STEPS + 1)
        mean_curve = lambda key: np.mean([np.interp(grid, r["fraction"], r[key]) for r in rows], axis=0)  # noqa: E731
        out[m] = {"comprehensiveness": float(np.mean([r["comprehensiveness"] for r in rows])),
                  "sufficiency": float(np.mean([r["sufficiency"] for r in rows])),
                  "fraction": grid.tolist(), "deletion": mean_curve("deletion").tolist(),
                  "insertion": mean_curve("insertion").tolist()}
    return out


def verdict(summary: dict) -> str:
    """Which method's ranking to trust: the highest comprehensiveness minus sufficiency, and whether
    it beats random order."""
    gap = {m: v["comprehensiveness"] - v["sufficiency"] for m, v in summary.items()}
    methods = [m for m in gap if m != "random"]
    best = max(methods, key=gap.get)
    r = gap["random"]
    if gap[best] <= r:
        return (f"no method beats random order on these inputs (best: {best}, comprehensiveness - sufficiency "
                f"{gap[best]:+.3f} vs random {r:+.3f}): do not trust these attributions")
    return (f"most faithful: {best} (comprehensiveness - sufficiency {gap[best]:+.3f} vs random {r:+.3f})")
