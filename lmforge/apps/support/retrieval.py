"""Hybrid retrieval over the FAQ: dense similarity from an encoder plus a lexical BM25 score.

Dense: cosine similarity between the message's embedding and each entry's question embedding and
question+answer embedding (the better of the two). Lexical: Okapi BM25 over the entry's question
and answer, squashed into [0, 1) by ``s / (s + BM25_HALF)``. The score is
``dense + lexical_weight * lexical``; the best entry's score is the answer's confidence, which the
handoff threshold is compared with. ``lmforge support eval`` chooses the weight and the threshold
on labelled questions (``LEXICAL_WEIGHT`` until it has).

Reranking (an app built with ``support init --reranker DECODER_RUN``): the ``RERANK_K`` best
entries by that score are scored again by how likely the decoder finds the customer's question
given the entry — query likelihood, the "unsupervised passage reranker" of Sachan et al. (2022):
the mean log-probability per token of the question after ``Passage: <entry>\nPlease write a
question based on this passage.\nQuestion:``. Their score becomes ``score + rerank_weight ×
that``, and they stay ahead of the other entries; ``support eval`` fits the weight (0: no
reranking) together with the lexical weight and the threshold.
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
RERANK_K = 4  # entries the reranker scores per message
PASSAGE_TOKENS = 160  # of each entry, in the reranker's prompt (its beginning: the question and the answer's start)
BELOW = 1e3  # how far the entries past the reranked ones are put below them
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


def reranked(scores: np.ndarray, likelihood: np.ndarray | None, weight: float, k: int = RERANK_K) -> np.ndarray:
    """``scores`` (questions, entries) with each row's ``k`` best entries rescored as ``score +
    weight × likelihood`` and kept ahead of the rest (which go ``BELOW`` under). ``likelihood``
    (the same shape) needs values only where an entry is among its row's ``k`` best."""
    if likelihood is None or weight == 0:
        return scores
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    rows = np.arange(len(scores))[:, None]
    out = scores - BELOW
    out[rows, top] = scores[rows, top] + weight * likelihood[rows, top]
    return out


class QueryLikelihood:
    """How likely a decoder run finds a question given an FAQ entry: the mean log-probability per
    token of the question after the entry (see the module's docstring)."""

    PROMPT = "Passage: {passage}\nPlease write a question based on this passage.\nQuestion:"

    def __init__(self, run_dir):
        from lmforge.errors import UserError
        from lmforge.runs import load_run

        from pathlib import Path

        if not (Path(run_dir) / "config.yaml").is_file():
            raise UserError(f"--reranker must be a decoder run directory (no config.yaml in {run_dir})")
        self.path = str(run_dir)
        self.run = load_run(run_dir)
        if not self.run.model.can_generate or getattr(self.run.model.config, "num_labels", 0):
            raise UserError(f"the reranker must be a decoder run (GPT or Llama); {run_dir} is {self.run.config.arch}")
        self.run.model.eval()
        self.lock = threading.Lock()

    def scores(self, question: str, entries: list[FaqEntry]) -> np.ndarray:
        """(len(entries),) mean log-probabilities of ``question``'s tokens given each entry."""
        import torch

        if not entries:
            return np.zeros(0)
        tok, model = self.run.tokenizer, self.run.model
        ids = lambda text: tok.encode(text, add_special_tokens=False).ids  # noqa: E731
        q = ids(" " + question.strip())[:64]
        head, tail = (ids(part) for part in self.PROMPT.split("{passage}"))
        room = min(PASSAGE_TOKENS, model.config.block_size - len(head) - len(tail) - len(q))
        if room < 1:
            raise ValueError(f"the reranker's context ({model.config.block_size} tokens) cannot hold a question")
        rows = [head + ids(f"{e.question}\n{e.answer}")[:room] + tail for e in entries]
        width = max(len(r) for r in rows) + len(q)
        x = torch.zeros(len(rows), width, dtype=torch.long)
        y = torch.full((len(rows), width), -1, dtype=torch.long)
        for i, prefix in enumerate(rows):  # right-padded: a causal model's earlier positions never see the pad
            seq = prefix + q
            x[i, :len(seq)] = torch.tensor(seq)
            y[i, len(prefix) - 1:len(seq) - 1] = torch.tensor(q)
        device = next(model.parameters()).device
        with self.lock:
            logp = model.target_logprobs(x.to(device), y.to(device))
        return (logp / len(q)).cpu().numpy()


class Retriever:
    """Ranks FAQ entries for a message. ``embed(texts) -> (N, D)`` unit vectors (the encoder);
    ``reranker`` a :class:`QueryLikelihood` (used when ``rerank_weight`` is not 0)."""

    def __init__(self, entries: list[FaqEntry], q_vectors: np.ndarray, qa_vectors: np.ndarray, embed,
                 lexical_weight: float = LEXICAL_WEIGHT, reranker: QueryLikelihood | None = None,
                 rerank_weight: float = 0.0):
        self.entries, self.q, self.qa, self.embed = entries, q_vectors, qa_vectors, embed
        self.lexical_weight, self.reranker, self.rerank_weight = lexical_weight, reranker, rerank_weight
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
        if self.reranker is not None and self.rerank_weight:
            top = np.argsort(-score, kind="stable")[:RERANK_K]
            likelihood = np.zeros_like(score)
            try:
                likelihood[top] = self.reranker.scores(text, [self.entries[i] for i in top])
                score = reranked(score[None], likelihood[None], self.rerank_weight)[0]
            except Exception as e:  # noqa: BLE001 - a failing reranker must not cost the customer the answer
                import sys

                print(f"[lmforge] support: reranking failed ({type(e).__name__}: {e}); using the fused ranking",
                      file=sys.stderr, flush=True)
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
