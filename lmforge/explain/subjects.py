"""What is explained, built from a run and one input (:class:`~lmforge.explain.attribution.Subject`).

- a text classifier's probability of a class, features: the text's tokens (special tokens fixed);
- an image classifier's probability of a class, features: square patches of pixels (about
  ``PATCHES`` x ``PATCHES`` of them; IG still attributes every pixel);
- a decoder's log-likelihood of an answer after a prompt, features: the prompt's tokens (the
  answer is fixed, so only the prompt is credited).
"""

from __future__ import annotations

import numpy as np
import torch

from lmforge.data.tokenizer import encode_truncated, neutral_id, token_label
from lmforge.errors import UserError
from lmforge.explain.attribution import Subject

PATCHES = 8  # an image is cut into about this many patches per side


def _token_features(special: list[int]) -> tuple[torch.Tensor, list[int]]:
    """(1, T) feature ids of tokens (0..n-1 for ordinary tokens, n for special ones) and the
    positions of the ordinary ones."""
    free = [i for i, sp in enumerate(special) if not sp]
    feats = torch.full((1, len(special)), len(free), dtype=torch.long)
    feats[0, free] = torch.arange(len(free))
    return feats, free


def class_index(names: list[str], label: str | None, probs: torch.Tensor) -> int:
    """The class to explain: ``label`` when given, else the predicted one."""
    if label is None:
        return int(probs.argmax())
    if label not in names:
        raise UserError(f"label {label!r} is not a class of this run ({', '.join(names[:10])})")
    return names.index(label)


def text_classifier(run, text: str, label: str | None = None, max_length: int | None = None) -> Subject:
    model, tok = run.model, run.tokenizer
    enc = encode_truncated(tok, text, min(max_length or run.config.task.max_length, model.config.block_size))
    feats, free = _token_features(enc.special_tokens_mask)
    if not free:
        raise UserError(f"nothing to explain in {text[:40]!r}: it has no tokens")
    device = run.device
    ids = torch.tensor([enc.ids], device=device)
    baseline = ids.clone()
    baseline[0, free] = neutral_id(tok)
    mask = torch.ones_like(ids)

    def probs(x: torch.Tensor) -> torch.Tensor:
        return model.classify(x, mask.expand(len(x), -1)).float().softmax(-1)

    with torch.no_grad():
        p = probs(ids)[0].cpu()
    c = class_index(run.labels, label, p)
    return Subject(ids, baseline, feats.to(device), lambda x: probs(x)[:, c], [token_label(tok, enc.ids[i]) for i in free],
                   layer=model.token_embedding(), spans=[tuple(enc.offsets[i]) for i in free],
                   meta={"input": text, "explained": f"P({run.labels[c]})", "label": run.labels[c],
                         "score": float(p[c]), "predicted": run.labels[int(p.argmax())]}, model=model)


def patch_grid(h: int, w: int) -> tuple[torch.Tensor, int]:
    """(H, W) long patch id of every pixel and the patch side."""
    side = max(1, round(max(h, w) / PATCHES))
    cols = -(-w // side)
    r = torch.arange(h)[:, None] // side
    c = torch.arange(w)[None, :] // side
    return r * cols + c, side


def image_classifier(run, pixels: np.ndarray, label: str | None = None, source: str = "") -> Subject:
    """``pixels``: uint8 (H, W, C) of the run's input shape."""
    from lmforge.models.vision import pixels_to_input

    model = run.model
    x = pixels_to_input(torch.from_numpy(np.array(pixels))[None]).to(run.device)  # a copy: memmapped splits are read-only
    grid, side = patch_grid(x.size(2), x.size(3))
    n = int(grid.max()) + 1
    feats = grid.expand(1, x.size(1), -1, -1).contiguous().to(run.device)

    def probs(inp: torch.Tensor) -> torch.Tensor:
        return model.classify(inp).float().softmax(-1)

    with torch.no_grad():
        p = probs(x)[0].cpu()
    c = class_index(run.labels, label, p)
    cols = -(-x.size(3) // side)
    names = [f"pixel ({i // cols}, {i % cols})" if side == 1 else
             f"rows {(i // cols) * side}-{(i // cols + 1) * side - 1}, cols {(i % cols) * side}-{(i % cols + 1) * side - 1}"
             for i in range(n)]
    return Subject(x, torch.zeros_like(x), feats, lambda inp: probs(inp)[:, c], names,
                   meta={"input": source, "explained": f"P({run.labels[c]})", "label": run.labels[c],
                         "score": float(p[c]), "predicted": run.labels[int(p.argmax())], "patch": side,
                         "pixels": pixels}, model=model)


def decoder_answer(run, prompt: str, answer: str | None = None, max_tokens: int = 16) -> Subject:
    """The log-likelihood of ``answer`` (default: the model's greedy continuation of
    ``max_tokens`` tokens) after ``prompt``, attributed to the prompt's tokens."""
    from lmforge.generate import generate_ids

    model, tok = run.model, run.tokenizer
    enc = tok.encode(prompt, add_special_tokens=False)
    if not enc.ids:
        raise UserError("give a non-empty --prompt to explain")
    device = run.device
    prompt_ids = torch.tensor([enc.ids], device=device)
    if answer is None:
        new = [int(t[0]) for t in generate_ids(model, prompt_ids, max_tokens, temperature=0.0)]
    else:
        new = tok.encode(answer, add_special_tokens=False).ids
        if not new:
            raise UserError("--answer is empty: give the text whose likelihood to explain")
    P = len(enc.ids)
    ids = torch.tensor([enc.ids + new], device=device)
    if ids.size(1) > model.config.block_size:
        raise UserError(f"prompt and answer are {ids.size(1)} tokens; the model reads at most {model.config.block_size}")
    feats, free = _token_features(list(enc.special_tokens_mask) + [1] * len(new))
    baseline = ids.clone()
    baseline[0, free] = neutral_id(tok)
    targets = ids[:, P:]

    def loglik(x: torch.Tensor) -> torch.Tensor:
        logits = model(x)[0][:, P - 1:-1].float()  # the predictions of the answer's tokens
        return logits.log_softmax(-1).gather(-1, targets.expand(len(x), -1)[..., None])[..., 0].sum(-1)

    with torch.no_grad():
        score = float(loglik(ids)[0])
    text = tok.decode(new)
    return Subject(ids, baseline, feats.to(device), loglik, [token_label(tok, enc.ids[i]) for i in free],
                   layer=model.token_embedding(), spans=[tuple(enc.offsets[i]) for i in free],
                   meta={"input": prompt, "answer": text, "explained": f"log P(answer {text[:40]!r} | prompt)",
                         "score": score, "answer_tokens": len(new)}, model=model)
