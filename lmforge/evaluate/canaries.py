"""How much a language model memorised planted secrets: the exposure of Carlini et al., "The
Secret Sharer" (USENIX Security 2019).

A canary is a line with its secret in braces, ``the access code is {839201}``. Candidates are the
same line with the secret redrawn at random, character class by character class (a digit for a
digit, a lower-case letter for one, and so on; other characters kept). The model scores every
text by its log-likelihood; the canary's rank among ``n`` candidates gives the sampled exposure
``log2((n + 1) / rank)``: about 1 bit when the canary is no likelier than a random secret,
``log2(n + 1)`` (the most ``n`` candidates can show) when it beats them all. Training on the
canary raises it; differential privacy should keep it near the floor.
"""

from __future__ import annotations

import math
import re
import string
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lmforge.errors import UserError

SECRET = re.compile(r"\{([^{}]+)\}")
CLASSES = (string.digits, string.ascii_lowercase, string.ascii_uppercase)


def read_canaries(path: str | Path) -> list[tuple[str, str, str]]:
    """(prefix, secret, suffix) per non-empty line of ``path``; each line needs one ``{secret}``."""
    from lmforge.data.labeled import read_utf8

    out = []
    for n, line in enumerate(read_utf8(Path(path), "canaries file").splitlines(), 1):
        if not line.strip():
            continue
        found = SECRET.findall(line)
        if len(found) != 1 or not any(ch in c for c in CLASSES for ch in found[0]):
            raise UserError(f"{path}:{n}: a canary line holds one {{secret}} with letters or digits in it")
        m = SECRET.search(line)
        out.append((line[:m.start()], m.group(1), line[m.end():]))
    if not out:
        raise UserError(f"{path}: no canaries in it")
    return out


def redraw(secret: str, rng: np.random.Generator) -> str:
    """``secret`` with every digit and letter replaced by a random one of its class."""
    out = []
    for ch in secret:
        cls = next((c for c in CLASSES if ch in c), None)
        out.append(cls[rng.integers(len(cls))] if cls else ch)
    return "".join(out)


@torch.no_grad()
def log_likelihoods(model, tokenizer, texts: list[str], batch_size: int = 64) -> np.ndarray:
    """Each text's log-likelihood (nats) under ``model``, after the document separator."""
    from lmforge.data.tokenizer import separator_id

    device = next(model.parameters()).device
    start = separator_id(tokenizer)
    ids = [[start] + e.ids for e in tokenizer.encode_batch(texts, add_special_tokens=False)]
    T = model.config.block_size
    if max(map(len, ids)) > T:
        raise UserError(f"a canary is longer than the model's context ({T} tokens)")
    out = []
    model.eval()
    for i in range(0, len(ids), batch_size):
        chunk = ids[i:i + batch_size]
        L = max(map(len, chunk))
        x = torch.zeros(len(chunk), L, dtype=torch.long)
        y = torch.full((len(chunk), L), -1, dtype=torch.long)
        for r, seq in enumerate(chunk):
            x[r, :len(seq)] = torch.tensor(seq)
            y[r, :len(seq) - 1] = torch.tensor(seq[1:])
        logits = model(x.to(device))[0].float()
        logp = -F.cross_entropy(logits.transpose(1, 2), y.to(device), ignore_index=-1, reduction="none")
        out.append(logp.sum(1).cpu().numpy())
    return np.concatenate(out)


def exposure(model, tokenizer, canaries: list[tuple[str, str, str]], candidates: int = 1000,
             seed: int = 0) -> dict:
    """The sampled exposure of each canary among ``candidates`` redrawn secrets."""
    if candidates < 1:
        raise UserError(f"--candidates must be positive, got {candidates}")
    rng = np.random.default_rng(seed)
    rows = []
    for prefix, secret, suffix in canaries:
        others = set()
        space = math.prod(len(next((c for c in CLASSES if ch in c), " ")) for ch in secret)
        while len(others) < min(candidates, space - 1):
            s = redraw(secret, rng)
            if s != secret:
                others.add(s)
        texts = [prefix + secret + suffix] + [prefix + s + suffix for s in sorted(others)]
        scores = log_likelihoods(model, tokenizer, texts)
        rank = 1 + int((scores[1:] > scores[0]).sum())  # 1: the canary is the likeliest
        n = len(texts) - 1
        rows.append({"canary": prefix + secret + suffix, "candidates": n, "rank": rank,
                     "exposure": math.log2((n + 1) / rank), "max_exposure": math.log2(n + 1),
                     "log_likelihood": float(scores[0]), "median_candidate_log_likelihood": float(np.median(scores[1:]))})
    ex = [r["exposure"] for r in rows]
    return {"canaries": rows, "mean_exposure": float(np.mean(ex)), "max_exposure": float(np.max(ex))}
