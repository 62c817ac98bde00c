"""Classification metrics and plots: accuracy; precision, recall and F1 (macro, weighted, per
class); one-vs-rest ROC-AUC (macro); the confusion matrix; ROC, precision-recall and confusion
plots. Computed here with numpy; the tests check every figure against scikit-learn.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def _div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a / b with 0 where b == 0 (scikit-learn's zero_division=0)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    return np.divide(a, b, out=np.zeros_like(a), where=b != 0)


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """(n_classes, n_classes) counts; row = true class, column = predicted class."""
    cm = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(cm, (y_true, y_pred), 1)
    return cm


def roc_curve(y: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """False- and true-positive rates at every distinct threshold (binary ``y``), from (0, 0)."""
    order = np.argsort(-score, kind="mergesort")
    y, score = y[order], score[order]
    last = np.r_[np.nonzero(np.diff(score))[0], len(y) - 1]  # last index of each distinct score
    tps = np.cumsum(y)[last]
    fps = (last + 1) - tps
    return np.r_[0.0, _div(fps, fps[-1])], np.r_[0.0, _div(tps, tps[-1])]


def roc_auc(y: np.ndarray, score: np.ndarray) -> float:
    fpr, tpr = roc_curve(y, score)
    return float(np.trapezoid(tpr, fpr))


def pr_curve(y: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Precision and recall at every distinct threshold (binary ``y``)."""
    order = np.argsort(-score, kind="mergesort")
    y, score = y[order], score[order]
    last = np.r_[np.nonzero(np.diff(score))[0], len(y) - 1]
    tps = np.cumsum(y)[last]
    return _div(tps, last + 1), _div(tps, tps[-1])


def classification_metrics(y_true, probs, labels: list[str]) -> dict:
    """Every figure for predictions ``argmax(probs)`` against integer ``y_true``.

    ``probs`` (N, K) are class probabilities. ROC-AUC is one-vs-rest, averaged over the classes
    present in ``y_true`` with both outcomes (None if there are none).
    """
    y_true, probs = np.asarray(y_true), np.asarray(probs, dtype=float)
    K = len(labels)
    y_pred = probs.argmax(axis=1)
    cm = confusion_matrix(y_true, y_pred, K)
    tp = np.diag(cm)
    support, predicted = cm.sum(axis=1), cm.sum(axis=0)
    precision, recall = _div(tp, predicted), _div(tp, support)
    f1 = _div(2 * precision * recall, precision + recall)
    weights = support / max(support.sum(), 1)
    aucs = [roc_auc((y_true == k).astype(int), probs[:, k]) for k in range(K) if 0 < support[k] < len(y_true)]
    p_true = probs[np.arange(len(y_true)), y_true] if len(y_true) else np.ones(0)
    per_class = {labels[k]: {"precision": float(precision[k]), "recall": float(recall[k]), "f1": float(f1[k]),
                             "support": int(support[k])} for k in range(K)}
    return {
        "n": int(len(y_true)), "n_examples": int(len(y_true)), "accuracy": float(tp.sum() / max(len(y_true), 1)),
        "macro_precision": float(precision.mean()), "macro_recall": float(recall.mean()),
        "macro_f1": float(f1.mean()),
        "weighted_precision": float((precision * weights).sum()), "weighted_recall": float((recall * weights).sum()),
        "weighted_f1": float((f1 * weights).sum()),
        "roc_auc": float(np.mean(aucs)) if aucs else None,
        "loss": float(-np.log(np.clip(p_true, 1e-12, None)).mean()) if len(y_true) else None,  # mean NLL, nats
        "per_class": per_class, "confusion_matrix": cm.tolist(), "labels": list(labels),
    }


def paired_comparison(y_true, pred_a, pred_b, n_boot: int = 2000, seed: int = 0) -> dict:
    """Is classifier A more accurate than B on the same examples, beyond chance? The accuracy
    difference A - B, its 95% interval from a paired bootstrap over examples, and the exact
    McNemar test (two-sided binomial test on the examples exactly one of them gets right)."""
    from scipy.stats import binomtest

    a = np.asarray(pred_a) == np.asarray(y_true)
    b = np.asarray(pred_b) == np.asarray(y_true)
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, len(a), size=(n_boot, len(a)))
    diffs = a[rows].mean(1) - b[rows].mean(1)
    lo, hi = np.percentile(diffs, [2.5, 97.5])
    p = binomtest(only_a, only_a + only_b, 0.5).pvalue if only_a + only_b else 1.0
    return {"accuracy_difference": float(a.mean() - b.mean()), "ci95": [float(lo), float(hi)],
            "mcnemar_p": float(p), "only_a_correct": only_a, "only_b_correct": only_b}


def plot_classification(y_true, probs, labels: list[str], plots_dir: str | Path, prefix: str = "") -> list[str]:
    """Write ``<prefix>confusion.png``, ``<prefix>roc.png`` and ``<prefix>pr.png``; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lmforge.fsutil import atomic_path

    y_true, probs = np.asarray(y_true), np.asarray(probs, dtype=float)
    plots_dir = Path(plots_dir)
    plots_dir.mkdir(parents=True, exist_ok=True)
    cm = confusion_matrix(y_true, probs.argmax(axis=1), len(labels))
    written = []

    def save(fig, name):
        path = plots_dir / (prefix + name)
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
        plt.close(fig)
        written.append(str(path))

    fig, ax = plt.subplots(figsize=(1.2 + 0.6 * len(labels), 1.0 + 0.6 * len(labels)))
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    for i in range(len(labels)):
        for j in range(len(labels)):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center",
                    color="white" if cm[i, j] > cm.max() / 2 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("confusion matrix")
    save(fig, "confusion.png")

    for name, curve, xlabel, ylabel in (("roc.png", roc_curve, "false positive rate", "true positive rate"),
                                        ("pr.png", pr_curve, "recall", "precision")):
        fig, ax = plt.subplots(figsize=(5, 4))
        for k, label in enumerate(labels):
            y = (y_true == k).astype(int)
            if 0 < y.sum() < len(y):
                a, b = curve(y, probs[:, k])
                xs, ys = (a, b) if name == "roc.png" else (b, a)
                ax.plot(xs, ys, label=label)
        if name == "roc.png":
            ax.plot([0, 1], [0, 1], color="grey", linestyle=":")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(("ROC" if name == "roc.png" else "precision-recall") + " (one vs rest)")
        ax.legend(fontsize=7)
        save(fig, name)
    return written


REPORT_METRICS = ("accuracy", "macro_f1", "weighted_f1", "macro_precision", "macro_recall", "roc_auc", "loss")


def training_verdict(run_dir: str | Path, metric: str | None, lower: bool) -> dict | None:
    """Did the run stop while its validation ``metric`` was still improving? From the evaluations
    in ``metrics.jsonl`` (the last row per step, as a resumed run logs some steps twice):
    ``{"metric", "evaluations", "best_step", "last_step", "still_improving"}``, None without any."""
    from lmforge.evaluate.report import read_metrics

    key = f"val_{metric}"
    by_step = {r["step"]: r[key] for r in read_metrics(run_dir) if isinstance(r.get(key), (int, float))}
    if not metric or not by_step:
        return None
    steps = sorted(by_step)
    # On a tie the earlier evaluation is the best one (a plateau is not an improvement).
    best = min(steps, key=lambda s: (by_step[s], s)) if lower else max(steps, key=lambda s: (by_step[s], -s))
    return {"metric": metric, "evaluations": len(steps), "best_step": best, "last_step": steps[-1],
            "still_improving": best == steps[-1]}


def verdict_line(v: dict) -> str | None:
    """What ``training_verdict`` means for the user, or None when training had levelled off."""
    if not v["still_improving"]:
        return None
    if v["evaluations"] == 1:
        return (f"one validation only (step {v['last_step']}): nothing shows the training had converged; train "
                "longer, or evaluate more often (train.eval_interval), to see")
    return (f"still improving: the best validation {v['metric']} came at the last of {v['evaluations']} evaluations "
            f"(step {v['last_step']}); train longer (more epochs or a larger time budget)")


def split_summary(m: dict) -> dict:
    """The headline figures of one split's metrics (with the baseline's), for a training summary."""
    out = {k: m[k] for k in ("accuracy", "macro_f1", "weighted_f1", "roc_auc")}
    if "baseline" in m:
        out["baseline"] = {k: m["baseline"][k] for k in ("method", "accuracy", "macro_f1")}
    return out


def write_report(run_dir: str | Path, y, probs, names: list[str], split: str, source: str | None = None,
                 inputs: list[dict] | None = None, what: str = "examples", baseline: dict | None = None,
                 verdict: dict | None = None, out_dir: str | Path | None = None) -> dict:
    """Every figure of ``probs`` against ``y`` on ``split``, with ``predictions_<split>.jsonl``
    (each example's ``inputs`` row — its text, its index — with label, prediction and
    probabilities). A run's own validation split writes ``eval.json``, ``report.md`` and
    ``plots/``; another split of its data ``eval_<split>.json``, ``report_<split>.md`` and
    ``plots/<split>_*.png``; with ``out_dir`` (an evaluation of other data) the plain names go
    there. ``baseline`` (``Baseline.on``) is scored beside the model with the paired comparison;
    ``verdict`` (``training_verdict``) says whether training stopped while still improving."""
    from lmforge.fsutil import write_json, write_text
    from lmforge.runs import RunDir

    own = out_dir is None
    out = Path(run_dir) if own else Path(out_dir)
    plain = not own or split == "validation"
    y, probs = np.asarray(y), np.asarray(probs)
    m = classification_metrics(y, probs, names)
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / f"predictions_{split}.jsonl", "".join(
        json.dumps({**(inputs[i] if inputs else {"index": i}), "label": names[int(y[i])],
                    "predicted": names[int(p.argmax())],
                    "probabilities": {n: round(float(x), 6) for n, x in zip(names, p)}}) + "\n"
        for i, p in enumerate(probs)))
    majority = max(m["per_class"].values(), key=lambda c: c["support"])["support"] / max(m["n"], 1)
    m["majority_baseline_accuracy"] = majority
    m["split"], m["data"] = split, source
    if baseline is not None:
        b = classification_metrics(y, baseline["probs"], names)
        m["baseline"] = {"method": baseline["method"], "name": baseline["name"], "fitted_on": baseline["fitted_on"],
                         **{k: b[k] for k in REPORT_METRICS},
                         "model_versus_baseline": paired_comparison(y, probs.argmax(1), baseline["probs"].argmax(1))}
    if verdict is not None:
        m["training"] = verdict
    prefix = "" if plain else f"{split}_"
    plots = plot_classification(y, probs, names, out / RunDir.PLOTS, prefix)
    write_json(out / (RunDir.EVAL if plain else f"eval_{split}.json"), m)
    names_md = {k: f"`plots/{prefix}{k}.png`" for k in ("confusion", "roc", "pr")}
    lines = [f"# Classification report ({split}{', ' + source if source else ''})", "",
             f"{m['n']} {what}, {len(names)} classes. The largest class holds {majority:.4f} of them "
             "(the best accuracy a constant prediction could reach here).", ""]
    if verdict is not None and verdict_line(verdict):
        lines += [f"**{verdict_line(verdict)}.**", ""]
    columns = ["model"] + (["baseline"] if baseline is not None else [])
    lines += ["| metric | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    for k in REPORT_METRICS:
        cells = [m[k]] + ([m["baseline"][k]] if baseline is not None else [])
        lines.append(f"| {k} | " + " | ".join(f"{c:.4f}" if isinstance(c, float) else "n/a" if c is None else str(c)
                                              for c in cells) + " |")
    if baseline is not None:
        c = m["baseline"]["model_versus_baseline"]
        lo, hi = c["ci95"]
        verdict_text = ("better than" if lo > 0 else "worse than" if hi < 0 else "not distinguishable from")
        lines += ["", f"Baseline: {baseline['name']} (scikit-learn), fitted on {baseline['fitted_on']:,} of the "
                  f"training {what}. The model is {verdict_text} it here: accuracy difference "
                  f"{c['accuracy_difference']:+.4f} (95% interval {lo:+.4f} to {hi:+.4f}, paired bootstrap; "
                  f"McNemar p = {c['mcnemar_p']:.3g})."]
    lines += ["", "| class | precision | recall | F1 | support |", "|---|---:|---:|---:|---:|"]
    for name, c in m["per_class"].items():
        lines.append(f"| {name} | {c['precision']:.4f} | {c['recall']:.4f} | {c['f1']:.4f} | {c['support']} |")
    lines += ["", f"Confusion matrix (rows: true, columns: predicted): {names_md['confusion']}; ROC: "
              f"{names_md['roc']}; precision-recall: {names_md['pr']}. Every prediction: `predictions_{split}.jsonl`.",
              ""]
    write_text(out / (RunDir.REPORT if plain else f"report_{split}.md"), "\n".join(lines))
    m["plots"] = plots
    return m
