"""How good a generator's images are, offline: the Fréchet distance between real and generated
images in the feature space of an image classifier lmforge trained on the same data (FID's
recipe, with that classifier in Inception's place), beside the same distance between two sets of
real images (held-out vs training), which is what a perfect generator would score at that sample
size; and the classifier's label entropy on the samples (low: each looks like one class) and of
their mean prediction (high, up to log2 of the classes: all classes are generated).
"""

from __future__ import annotations

import numpy as np
import torch

from lmforge.models.vision import pixels_to_input

BATCH = 512


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to features ``a`` (N, D) and ``b`` (M, D):
    |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)). The trace of the root is the sum of the
    square roots of the eigenvalues of S_a^(1/2) S_b S_a^(1/2), which is symmetric (no complex
    matrix square root needed)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    w, v = np.linalg.eigh(s_a)
    root_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = root_a @ s_b @ root_a
    lam = np.linalg.eigvalsh((m + m.T) / 2)
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * np.sqrt(np.clip(lam, 0, None)).sum())


def _entropy_bits(p: np.ndarray) -> np.ndarray:
    return -(p * np.log2(np.clip(p, 1e-12, 1))).sum(-1)


class Judge:
    """Scores images against real ones with ``classifier`` (an image-classify run's model).

    ``reference`` (training images) and ``heldout`` (real images it never trained on), uint8
    (N, H, W, C): the generated sets it scores should have ``len(heldout)`` images, so that
    ``fid_real`` is the figure at the same sample size."""

    def __init__(self, classifier, reference: np.ndarray, heldout: np.ndarray, device):
        self.classifier, self.device = classifier.eval(), device
        self.ref = self.features(pixels_to_input(torch.from_numpy(np.array(reference))))[0]
        held, probs = self.features(pixels_to_input(torch.from_numpy(np.array(heldout))))
        self.n = len(heldout)
        self.real = {"fid_real": frechet_distance(held, self.ref), **self._entropies(probs, "_real")}

    @torch.no_grad()
    def features(self, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Penultimate features (N, D) and class probabilities (N, K) of images in [0, 1] (N, C, H, W)."""
        m, feats, probs = self.classifier, [], []
        for i in range(0, len(x), BATCH):
            h = m.trunk((x[i:i + BATCH].to(self.device) - m.mean) / m.std)
            feats.append(h.float().cpu().numpy())
            probs.append(m.head(h).float().softmax(-1).cpu().numpy())
        return np.concatenate(feats), np.concatenate(probs)

    @staticmethod
    def _entropies(probs: np.ndarray, suffix: str = "") -> dict[str, float]:
        return {f"label_entropy{suffix}": float(_entropy_bits(probs).mean()),
                f"class_entropy{suffix}": float(_entropy_bits(probs.mean(0)))}

    def score(self, images: torch.Tensor) -> dict[str, float]:
        """``fid``, ``label_entropy``, ``class_entropy`` of generated images (N, C, H, W) in [0, 1],
        with the real images' figures beside them (``*_real``)."""
        feats, probs = self.features(images)
        return {"fid": frechet_distance(feats, self.ref), **self._entropies(probs), **self.real}
