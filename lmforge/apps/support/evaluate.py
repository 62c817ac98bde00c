"""``lmforge support eval``: retrieval accuracy and the handoff threshold, on labelled questions.

Questions are JSONL ``{"question": ..., "faq_id": ID | [IDS] | "none"}``. On the covered ones:
top-1 accuracy and MRR@5 of the ranking. On all of them: handoff is "confidence below the
threshold", and the questions the FAQ does not cover ("none") are the ones that should be handed
off; the threshold that maximises the F1 of that decision (the balance of handoff precision and
recall) is chosen and saved to the app. Because that threshold is fitted on these same questions,
the report also gives precision and recall with the threshold fitted by 5-fold cross-validation,
an honest estimate for new questions.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

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


def evaluate_support(app_dir: str | Path, questions_file: str | Path, save: bool = True, folds: int = 5) -> dict:
    from lmforge.apps.support.assistant import Assistant

    assistant = Assistant(app_dir)
    known = {e.id for e in assistant.retriever.entries}
    questions = read_questions(questions_file, known)
    conf, uncovered, reciprocal, top1, rows = [], [], [], [], []
    for text, ids in questions:
        hits = assistant.retriever.search(assistant.mask(text), k=5)
        ranked = [h.entry.id for h in hits]
        conf.append(hits[0].score if hits else 0.0)
        uncovered.append(ids is None)
        if ids is not None:
            rank = next((r for r, i in enumerate(ranked, 1) if i in ids), None)
            reciprocal.append(1 / rank if rank else 0.0)
            top1.append(rank == 1)
        rows.append({"question": text, "expected": sorted(ids) if ids else "none", "top": ranked[:3],
                     "confidence": round(conf[-1], 4)})
    conf, uncovered = np.array(conf), np.array(uncovered)
    result = {"n_questions": len(questions), "n_covered": int((~uncovered).sum()), "n_uncovered": int(uncovered.sum()),
              "top1": float(np.mean(top1)) if top1 else None, "mrr5": float(np.mean(reciprocal)) if reciprocal else None}
    if uncovered.any() and (~uncovered).any():
        threshold = best_threshold(conf, uncovered)
        p, r, _ = handoff_scores(conf, uncovered, threshold)
        result.update(threshold=threshold, handoff_precision=p, handoff_recall=r)
        # Cross-validated: each fold's decisions use a threshold fitted on the other folds.
        order = np.random.default_rng(0).permutation(len(conf))
        handed = np.zeros(len(conf), dtype=bool)
        for k in range(folds):
            test = order[k::folds]
            train = np.setdiff1d(order, test)
            if uncovered[train].any() and (~uncovered[train]).any():
                handed[test] = conf[test] < best_threshold(conf[train], uncovered[train])
        tp = float(np.sum(handed & uncovered))
        result["handoff_precision_cv"] = tp / float(handed.sum()) if handed.sum() else 0.0
        result["handoff_recall_cv"] = tp / float(uncovered.sum())
        answered_right = [bool(c >= threshold) and ok for c, ok in zip(conf[~uncovered], top1)]
        result["covered_answered_correctly"] = float(np.mean(answered_right))
        if save:
            assistant.store.set("threshold", threshold)
    else:
        result.update(threshold=assistant.threshold, handoff_precision=None, handoff_recall=None)
    result["threshold_saved"] = bool(save and result.get("handoff_precision") is not None)
    result["questions"] = rows
    assistant.store.close()
    return result
