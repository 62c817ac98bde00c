"""Hybrid retrieval over the FAQ: dense similarity from an encoder plus a lexical BM25 score.

Dense: cosine similarity between the message's embedding and each entry's question embedding and
question+answer embedding (the better of the two). Lexical: Okapi BM25 over the entry's question
and answer, squashed into [0, 1) by ``s / (s + BM25_HALF)``. The score is
``dense + lexical_weight * lexical``; the best entry's score is the answer's confidence, which the
handoff threshold is compared with. ``lmforge support eval`` chooses the weight and the threshold
on labelled questions (``LEXICAL_WEIGHT`` until it has).
"""

from __future__ import annotations

import math
import re
import threading
from collections import Counter
from dataclasses import dataclass

import numpy as np

from lmforge.apps.support.faq import FaqEntry

LEXICAL_WEIGHT = 0.3
BM25_HALF = 6.0  # the BM25 score that counts as half a lexical match
STOPWORDS = frozenset("""a an and are as at be by can do does for from how i if in is it its me my of on or so
that the this to what when where which who why will with you your there their them then than""".split())
_WORD = re.compile(r"[a-z0-9]+")


def terms(text: str) -> list[str]:
    """Lower-cased words without stopwords, with a crude plural/verb suffix strip."""
    out = []
    for w in _WORD.findall(text.lower()):
        if w in STOPWORDS:
            continue
        for suffix in ("ing", "es", "s", "ed"):
            if len(w) > len(suffix) + 3 and w.endswith(suffix):
                w = w[: -len(suffix)]
                break
        out.append(w)
    return out


class BM25:
    """Okapi BM25 (k1 = 1.5, b = 0.75) over a fixed set of documents."""

    def __init__(self, documents: list[str], k1: float = 1.5, b: float = 0.75):
        self.k1, self.b = k1, b
        self.docs = [Counter(terms(d)) for d in documents]
        self.lengths = np.array([sum(c.values()) for c in self.docs], dtype=np.float64)
        self.avg = float(self.lengths.mean()) if len(self.docs) else 0.0
        df = Counter(t for c in self.docs for t in c)
        n = len(self.docs)
        self.idf = {t: math.log(1 + (n - f + 0.5) / (f + 0.5)) for t, f in df.items()}

    def scores(self, query: str) -> np.ndarray:
        out = np.zeros(len(self.docs))
        for t in set(terms(query)):
            idf = self.idf.get(t)
            if idf is None:
                continue
            for i, c in enumerate(self.docs):
                f = c.get(t, 0)
                if f:
                    out[i] += idf * f * (self.k1 + 1) / (f + self.k1 * (1 - self.b + self.b * self.lengths[i] / self.avg))
        return out


@dataclass
class Hit:
    entry: FaqEntry
    score: float
    dense: float
    lexical: float


class Retriever:
    """Ranks FAQ entries for a message. ``embed(texts) -> (N, D)`` unit vectors (the encoder)."""

    def __init__(self, entries: list[FaqEntry], q_vectors: np.ndarray, qa_vectors: np.ndarray, embed,
                 lexical_weight: float = LEXICAL_WEIGHT):
        self.entries, self.q, self.qa, self.embed = entries, q_vectors, qa_vectors, embed
        self.lexical_weight = lexical_weight
        self.bm25 = BM25([f"{e.question}\n{e.answer}" for e in entries])

    def components(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(dense, lexical) scores of every text against every entry, (len(texts), entries) each."""
        v = self.embed(texts)
        dense = np.maximum(v @ self.q.T, v @ self.qa.T)
        bm = np.stack([self.bm25.scores(t) for t in texts])
        return dense, bm / (bm + BM25_HALF)

    def search(self, text: str, k: int = 5) -> list[Hit]:
        if not self.entries:
            return []
        dense, lexical = (m[0] for m in self.components([text]))
        score = dense + self.lexical_weight * lexical
        order = np.argsort(-score, kind="stable")[:k]
        return [Hit(self.entries[i], float(score[i]), float(dense[i]), float(lexical[i])) for i in order]


def load_encoder(encoder_dir):
    """``embed(texts)`` from an lmforge encoder run (unit vectors, up to 256 tokens per text)."""
    from lmforge.embed import embed_texts
    from lmforge.runs import load_run

    run = load_run(encoder_dir)
    if not run.model.can_embed:
        from lmforge.errors import UserError

        raise UserError(f"the support encoder must be an encoder run (arch bert); {encoder_dir} is {run.config.arch}")
    lock = threading.Lock()  # encoding sets the tokenizer's padding state: one batch at a time

    def embed(texts: list[str]) -> np.ndarray:
        with lock:
            return embed_texts(run.model, run.tokenizer, texts, max_length=256)
    return embed
