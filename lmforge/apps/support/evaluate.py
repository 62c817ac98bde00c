"""``lmforge support eval``: retrieval accuracy, the fusion weight and the handoff threshold, on
labelled questions.

Questions are JSONL ``{"question": ..., "faq_id": ID | [IDS] | "none"}``. On the covered ones:
top-1 accuracy and MRR@5 of each stage's ranking — dense (the encoder alone), lexical (BM25
alone), fused (dense + weight × lexical) and, with a reranker, reranked (the best few rescored by
a decoder's query likelihood: :mod:`~lmforge.apps.support.retrieval`) — so a user sees where the
gain comes from. The lexical and rerank weights are the ones with the best top-1 on these
questions (a rerank weight of 0 turns reranking off: it is kept only where it wins); then handoff
is "confidence below the threshold", the questions the FAQ does not cover ("none") are the ones
that should be handed off, and the threshold that maximises the F1 of that decision is chosen.
Weights and threshold are saved to the app together. Because they are fitted on these same
questions, the report also gives top-1 and handoff precision and recall with all three fitted by
5-fold cross-validation (each fold decided by weights and a threshold fitted on the other folds),
an honest estimate for new questions.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lmforge.apps.support.retrieval import RERANK_K, reranked
from lmforge.data.labeled import jsonl_objects, read_utf8
from lmforge.errors import UserError


def read_questions(path: str | Path, known_ids: set[str]) -> list[tuple[str, set[str] | None]]:
    """(question, acceptable ids or None for uncovered) per line; unknown ids are an error."""
    path = Path(path)
    out = []
    for n, obj in jsonl_objects(path, read_utf8(path, "questions file")):
        if not isinstance(obj.get("question"), str) or "faq_id" not in obj:
            raise UserError(f'{path}:{n}: expected {{"question": "...", "faq_id": ID | [IDS] | "none"}}')
        ids = obj["faq_id"]
        if ids == "none" or ids is None:
            out.append((obj["question"], None))
            continue
        ids = {str(i) for i in (ids if isinstance(ids, list) else [ids])}
        unknown = ids - known_ids
        if unknown:
            raise UserError(f"{path}:{n}: unknown FAQ id(s) {', '.join(sorted(unknown))}")
        out.append((obj["question"], ids))
    if not out:
        raise UserError(f"{path}: no questions")
    return out


def handoff_scores(conf: np.ndarray, uncovered: np.ndarray, threshold: float) -> tuple[float, float, float]:
    """(precision, recall, F1) of "hand off when confidence < threshold" against ``uncovered``."""
    handed = conf < threshold
    tp = float(np.sum(handed & uncovered))
    precision = tp / float(handed.sum()) if handed.sum() else 0.0
    recall = tp / float(uncovered.sum()) if uncovered.sum() else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, f1


def best_threshold(conf: np.ndarray, uncovered: np.ndarray) -> float:
    """The threshold with the best handoff F1 (ties: the middle of the best range)."""
    values = np.unique(conf)
    candidates = np.concatenate([[values[0] - 1e-3], (values[:-1] + values[1:]) / 2, [values[-1] + 1e-3]])
    f1 = np.array([handoff_scores(conf, uncovered, t)[2] for t in candidates])
    best = np.flatnonzero(f1 == f1.max())
    return float(candidates[best[len(best) // 2]])


FUSION_WEIGHTS = (0.0, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5)  # the lexical weights tried
RERANK_WEIGHTS = (0.0, 0.02, 0.05, 0.1, 0.2, 0.5)  # the reranker's weights tried (0: no reranking)


def ranking_figures(scores: np.ndarray, targets: np.ndarray, rows: np.ndarray | None = None) -> tuple[float, float]:
    """(top-1, MRR@5) of ranking the entries by ``scores`` (questions, entries) where
    ``targets`` (the same shape, boolean) marks the acceptable entries; over the covered ``rows``."""
    covered = targets.any(1) if rows is None else targets.any(1) & rows
    if not covered.any():
        return float("nan"), float("nan")
    top = np.argsort(-scores[covered], axis=1, kind="stable")[:, :5]
    hit = np.take_along_axis(targets[covered], top, axis=1)
    first = np.where(hit.any(1), hit.argmax(1) + 1, 0)
    return float(hit[:, 0].mean()), float(np.where(first > 0, 1.0 / np.maximum(first, 1), 0.0).mean())


def final_scores(dense, lexical, likelihood, weight: float, rerank_weight: float) -> np.ndarray:
    """The app's scores at a lexical and a rerank weight (:func:`~lmforge.apps.support.retrieval.reranked`)."""
    return reranked(dense + weight * lexical, likelihood, rerank_weight)


def fit_fusion(dense: np.ndarray, lexical: np.ndarray, targets: np.ndarray, rows: np.ndarray,
               likelihood: np.ndarray | None = None) -> tuple[float, float, float | None]:
    """(lexical weight, rerank weight, handoff threshold) fitted on the questions ``rows`` alone:
    the weights with the best top-1 (then MRR@5; ties: no or less reranking, then the smaller
    lexical weight) on their covered questions, then the threshold with the best handoff F1 on
    all of them at those weights (None without both covered and uncovered questions among them).
    Without ``likelihood`` (no reranker) the rerank weight is 0."""
    grid = [(w, mu) for mu in (RERANK_WEIGHTS if likelihood is not None else (0.0,)) for w in FUSION_WEIGHTS]
    figures = [ranking_figures(final_scores(dense, lexical, likelihood, w, mu), targets, rows) for w, mu in grid]
    best = max(range(len(grid)), key=lambda k: (np.nan_to_num(figures[k][0], nan=-1),
                                                np.nan_to_num(figures[k][1], nan=-1), -k))
    weight, rerank_weight = grid[best]
    uncovered = ~targets.any(1)
    if not (uncovered[rows].any() and (~uncovered[rows]).any()):
        return weight, rerank_weight, None
    conf = final_scores(dense, lexical, likelihood, weight, rerank_weight).max(1)
    return weight, rerank_weight, best_threshold(conf[rows], uncovered[rows])


def cross_validate(dense: np.ndarray, lexical: np.ndarray, targets: np.ndarray, folds: int = 5, seed: int = 0,
                   likelihood: np.ndarray | None = None):
    """Each fold's (test rows, lexical weight, rerank weight, threshold), fitted on the other folds
    only (:func:`fit_fusion`), so the figures on a fold are honest estimates for new questions."""
    n = len(targets)
    order = np.random.default_rng(seed).permutation(n)
    out = []
    for k in range(min(folds, n)):
        test = np.zeros(n, dtype=bool)
        test[order[k::folds]] = True
        out.append((test, *fit_fusion(dense, lexical, targets, ~test, likelihood)))
    return out


def likelihood_matrix(reranker, texts: list[str], entries, dense: np.ndarray, lexical: np.ndarray) -> np.ndarray:
    """The reranker's query likelihood (questions, entries) wherever some lexical weight of the grid
    puts an entry among a question's ``RERANK_K`` best (NaN elsewhere: never read)."""
    from lmforge.progress import status

    needed = np.zeros(dense.shape, dtype=bool)
    rows = np.arange(len(texts))[:, None]
    for w in FUSION_WEIGHTS:
        needed[rows, np.argsort(-(dense + w * lexical), axis=1, kind="stable")[:, :RERANK_K]] = True
    out = np.full(dense.shape, np.nan)
    status(f"reranking: the decoder scores {int(needed.sum())} (question, entry) pairs")
    for i, text in enumerate(texts):
        cols = np.flatnonzero(needed[i])
        out[i, cols] = reranker.scores(text, [entries[j] for j in cols])
    return out


FAITHFULNESS = ("token overlap: the share of the reply's content words (stopwords dropped, crudely stemmed) found in "
                "the question and the entries it was given; grounded = at least 0.8 of them and every `code span` "
                "verbatim in the entries; sent = the sentences `support serve --generate` would release, each only "
                "when the reply up to it is grounded")


def generation_figures(generator, questions, entries, final: np.ndarray, targets: np.ndarray, threshold: float,
                       texts: list[str]) -> dict:
    """How faithful a decoder's written replies are on the covered questions the app answers
    (confidence at or above ``threshold``), beside the verbatim baseline (the best entry's own
    answer, supported by that entry by construction). See ``FAITHFULNESS``."""
    from lmforge.apps.support.writer import GROUNDING_ENTRIES, grounded, released, sources_of, supported
    from lmforge.progress import status

    answered = [i for i in range(len(questions)) if targets[i].any() and final[i].max() >= threshold]
    rows = []
    for n, i in enumerate(answered, 1):
        order = np.argsort(-final[i], kind="stable")[:GROUNDING_ENTRIES]
        given = [entries[j] for j in order if final[i, j] >= threshold]
        written = generator.write(texts[i], given)
        sources = sources_of(texts[i], given)
        rows.append({"question": questions[i][0], "cited": [e.id for e in given], "reply": written,
                     "supported": supported(written, sources) if written else None,
                     "grounded": bool(written) and grounded(written, sources),
                     "sent": "".join(released([written or ""], sources)).strip(),
                     "cites_expected": any(targets[i, j] for j in order if final[i, j] >= threshold),
                     "verbatim_expected": bool(targets[i, order[0]])})
        if n % 10 == 0 or n == len(answered):
            status(f"written replies: {n}/{len(answered)}")
    written = [r for r in rows if r["reply"]]
    mean = lambda xs: float(np.mean(xs)) if xs else None  # noqa: E731
    return {"method": FAITHFULNESS, "n_answered": len(rows), "written_share": mean([bool(r["reply"]) for r in rows]),
            "supported_mean": mean([r["supported"] for r in written]),
            "grounded_share": mean([r["grounded"] for r in rows]),
            "sent_share": mean([bool(r["sent"]) for r in rows]),
            "cites_expected_share": mean([r["cites_expected"] for r in rows]),
            "verbatim_supported": 1.0, "verbatim_expected_share": mean([r["verbatim_expected"] for r in rows]),
            "replies": rows}


def evaluate_support(app_dir: str | Path, questions_file: str | Path, save: bool = True, folds: int = 5,
                     generate_run: str | Path | None = None) -> dict:
    """Each retrieval stage's top-1 and MRR@5 (dense, lexical, fused, and reranked when the app has
    a reranker), the weights and the handoff threshold fitted on the questions (saved to the app
    unless ``save`` is False), and the same figures with them fitted by ``folds``-fold
    cross-validation."""
    from lmforge.apps.support.assistant import Assistant

    assistant = Assistant(app_dir, generate_run=generate_run)
    entries = assistant.retriever.entries
    known = {e.id for e in entries}
    questions = read_questions(questions_file, known)
    column = {e.id: j for j, e in enumerate(entries)}
    targets = np.zeros((len(questions), len(entries)), dtype=bool)
    for i, (_, ids) in enumerate(questions):
        for id_ in ids or ():
            targets[i, column[id_]] = True
    texts = [assistant.mask(text) for text, _ in questions]
    dense, lexical = assistant.retriever.components(texts)
    reranker = assistant.retriever.reranker
    likelihood = likelihood_matrix(reranker, texts, entries, dense, lexical) if reranker is not None else None
    uncovered = ~targets.any(1)
    everything = np.ones(len(questions), dtype=bool)
    weight, rerank_weight, threshold = fit_fusion(dense, lexical, targets, everything, likelihood)
    final = final_scores(dense, lexical, likelihood, weight, rerank_weight)
    conf = final.max(1)
    top1, mrr5 = ranking_figures(final, targets)
    fused_weight = fit_fusion(dense, lexical, targets, everything)[0]

    def stage(scores) -> dict:  # no covered questions: no figures (None, not NaN: the JSON stays JSON)
        return dict(zip(("top1", "mrr5"), ranking_figures(scores, targets) if (~uncovered).any() else (None, None)))
    stages = {name: stage(scores)
              for name, scores in (("dense", dense), ("lexical", lexical), ("fused", dense + fused_weight * lexical))}
    stages["fused"]["lexical_weight"] = fused_weight
    if likelihood is not None:
        stages["reranked"] = {**stage(final), "lexical_weight": weight, "rerank_weight": rerank_weight}
    result = {"n_questions": len(questions), "n_covered": int((~uncovered).sum()), "n_uncovered": int(uncovered.sum()),
              "top1": top1 if (~uncovered).any() else None, "mrr5": mrr5 if (~uncovered).any() else None,
              "lexical_weight": weight, "rerank_weight": rerank_weight, "stages": stages}
    cv = cross_validate(dense, lexical, targets, folds, likelihood=likelihood)
    if (~uncovered).any():
        right = np.zeros(len(questions), dtype=bool)
        for test, w, mu, _ in cv:
            best = final_scores(dense, lexical, likelihood, w, mu).argmax(1)
            right[test] = targets[test, best[test]]
        result["top1_cv"] = float(right[~uncovered].mean())
    if threshold is not None:
        p, r, _ = handoff_scores(conf, uncovered, threshold)
        result.update(threshold=threshold, handoff_precision=p, handoff_recall=r)
        handed = np.zeros(len(questions), dtype=bool)
        for test, w, mu, t in cv:
            if t is not None:
                handed[test] = final_scores(dense, lexical, likelihood, w, mu)[test].max(1) < t
        tp = float(np.sum(handed & uncovered))
        result["handoff_precision_cv"] = tp / float(handed.sum()) if handed.sum() else 0.0
        result["handoff_recall_cv"] = tp / float(uncovered.sum())
        right_first = targets[np.arange(len(questions)), final.argmax(1)]
        result["covered_answered_correctly"] = float(((conf >= threshold) & right_first)[~uncovered].mean())
        if save:  # weights and threshold belong together: the confidence's scale depends on the weights
            assistant.store.set("threshold", threshold)
            assistant.store.set("lexical_weight", weight)
            assistant.store.set("rerank_weight", rerank_weight)
    else:
        result.update(threshold=assistant.threshold, handoff_precision=None, handoff_recall=None)
    if assistant.generator is not None:
        result["generation"] = generation_figures(assistant.generator, questions, entries, final, targets,
                                                  result["threshold"], texts)
    result["threshold_saved"] = bool(save and result.get("handoff_precision") is not None)
    order = np.argsort(-final, axis=1, kind="stable")[:, :3]
    result["questions"] = [{"question": text, "expected": sorted(ids) if ids else "none",
                            "top": [entries[j].id for j in order[i]], "confidence": round(float(conf[i]), 4)}
                           for i, (text, ids) in enumerate(questions)]
    assistant.store.close()
    return result
