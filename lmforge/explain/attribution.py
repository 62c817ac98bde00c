"""Attribution methods on one :class:`Subject`, through Captum.

A subject is any model input with a set of features (tokens of a text, patches of an image) and
one scalar score per input (a class's probability, an answer's log-likelihood). Every method
answers with one attribution per feature, positive where the feature raises the score:

- ``ig``: Integrated Gradients from the baseline to the input — along the token embeddings for
  text (Captum's ``LayerIntegratedGradients``), along the pixels for images. Its attributions sum to
  score(input) - score(baseline) (completeness); Captum's convergence delta says how far off they
  are, and the integral is refined until that is within ``IG_TOLERANCE`` of the difference.
- ``occlusion``: the score's drop when one feature alone is set to its baseline.
- ``shap``: KernelSHAP, a weighted linear fit of the score over random subsets of present
  features: model-agnostic, no gradients.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

IG_STEPS = 64  # the path integral's first resolution; doubled up to IG_MAX_STEPS while the
IG_MAX_STEPS = 1024  # completeness error exceeds IG_TOLERANCE of |score(input) - score(baseline)|
IG_TOLERANCE = 0.05
SHAP_SAMPLES = 256
BATCH = 32  # model inputs per forward call inside every method


@dataclass
class Subject:
    """One input to explain, as every method and the faithfulness curves see it.

    ``inputs``/``baseline``: (1, ...) model inputs (token ids or pixels); the baseline is the
    input with every feature absent (padding tokens, a black image). ``features``: (1, ...) long,
    same shape, the feature of each element: 0..n-1, and ``n`` for elements never perturbed
    (special tokens, the answer being explained). ``score``: (B, ...) -> (B,). ``layer``: the
    module whose output IG integrates along (a token embedding), None for the input itself;
    ``model``: the model ``score`` runs.
    ``names``: a display name per feature; ``spans``: each feature's (start, end) in the text.
    """

    inputs: torch.Tensor
    baseline: torch.Tensor
    features: torch.Tensor
    score: Callable[[torch.Tensor], torch.Tensor]
    names: list[str]
    layer: torch.nn.Module | None = None
    spans: list[tuple[int, int]] = field(default_factory=list)
    meta: dict = field(default_factory=dict)  # what is explained, for the report
    model: torch.nn.Module | None = None  # the model behind ``score``

    @property
    def n(self) -> int:
        return len(self.names)

    def element_map(self, attr: torch.Tensor) -> torch.Tensor:
        """A method's attribution (1, ...) per input element -> per position: (T,) for tokens
        (summed over the embedding), (H, W) for images (summed over channels)."""
        if attr.dim() == self.inputs.dim() + 1:  # along a layer: (1, T, C)
            return attr[0].sum(-1)
        return attr[0] if self.inputs.dim() == 2 else attr[0].sum(0)

    def map_features(self) -> torch.Tensor:
        return self.features[0] if self.features.dim() == 2 else self.features[0, 0]

    def per_feature(self, element_map: torch.Tensor) -> torch.Tensor:
        """(n,) the attribution of each feature: the sum over its elements."""
        out = torch.zeros(self.n + 1, dtype=torch.float64)
        out.scatter_add_(0, self.map_features().flatten(), element_map.flatten().double())
        return out[:self.n]

    def with_features(self, chosen: torch.Tensor, present: bool) -> torch.Tensor:
        """(len(chosen), ...) inputs: row i keeps (present) or removes (not present) the features of
        boolean row ``chosen[i]`` (n,), everything else the other way."""
        keep = torch.cat([chosen, torch.zeros(len(chosen), 1, dtype=torch.bool)], 1)  # the fixed id: never chosen
        sel = keep[:, self.features[0]]  # (R, ...)
        if not present:
            return torch.where(sel, self.baseline, self.inputs)
        fixed = self.features[0] == self.n
        return torch.where(sel | fixed, self.inputs, self.baseline)

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """score() of a batch of inputs, cut to ``BATCH`` rows per call, without gradients."""
        with torch.no_grad():
            return torch.cat([self.score(x[i:i + BATCH]).float() for i in range(0, len(x), BATCH)])


@dataclass
class Attribution:
    method: str
    per_feature: torch.Tensor  # (n,)
    element_map: torch.Tensor  # (T,) or (H, W)
    delta: float | None = None  # IG: completeness error |sum - (score(x) - score(baseline))|


def attribute(method: str, s: Subject) -> Attribution:
    """One method's attributions of ``s`` (``METHODS``)."""
    from captum.attr import FeatureAblation, IntegratedGradients, KernelShap, LayerIntegratedGradients

    delta = None
    if method == "ig" and s.model is not None and any(
            type(m).__module__.startswith("torch.ao.nn.quantized") for m in s.model.modules()):
        from lmforge.errors import UserError

        raise UserError("int8 layers have no gradients: explain this run with occlusion or shap "
                        "(or its float source run with ig)")
    if method == "ig":
        ig = LayerIntegratedGradients(s.score, s.layer) if s.layer is not None else IntegratedGradients(s.score)
        gap = float((s.scores(s.inputs) - s.scores(s.baseline)).abs().max())
        steps = IG_STEPS
        while True:  # a sharp model needs a finer path integral: steps double until complete
            attr, d = ig.attribute(s.inputs, s.baseline, n_steps=steps, internal_batch_size=BATCH,
                                   return_convergence_delta=True)
            delta = float(d.abs().max())
            if delta <= IG_TOLERANCE * gap + 1e-4 or steps >= IG_MAX_STEPS:
                break
            steps *= 2
    elif method == "occlusion":
        with torch.no_grad():  # one feature (token, patch) at a time set to its baseline
            attr = FeatureAblation(s.score).attribute(s.inputs, baselines=s.baseline, feature_mask=s.features,
                                                      perturbations_per_eval=BATCH)
    elif method == "shap":
        with torch.no_grad():
            torch.manual_seed(0)  # KernelSHAP draws its subsets from the global generator
            attr = KernelShap(s.score).attribute(s.inputs, baselines=s.baseline, feature_mask=s.features,
                                                 n_samples=max(SHAP_SAMPLES, 4 * s.n), perturbations_per_eval=BATCH)
    else:
        raise ValueError(f"unknown attribution method {method!r}")
    attr = attr.detach().float()
    if method == "ig":
        emap = s.element_map(attr)
        return Attribution(method, s.per_feature(emap).float(), emap, delta)
    # The perturbation methods give every element (every channel) its feature's whole value.
    emap = attr[0] if s.inputs.dim() == 2 else attr[0, 0]
    counts = torch.bincount(s.map_features().flatten(), minlength=s.n + 1)[:s.n].double().clamp(min=1)
    return Attribution(method, (s.per_feature(emap) / counts).float(), emap)
