"""Fine-tuning a classifier on labelled text: any lmforge encoder ([CLS] pooling) or decoder (last
real token), a run directory or a Hugging Face directory, with a fresh classification head.

Class imbalance: ``class_weights="auto"`` weighs the loss by inverse class frequency;
``oversample`` draws batches with a balanced sampler. Validation runs after every epoch (or every
``eval_every`` steps); the best checkpoint by the early-stopping metric is kept and training stops
after ``patience`` evaluations without improvement. With no validation (``val_fraction=0``) the
planned epochs run and the last weights are kept.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lmforge import config as cfgmod
from lmforge.data.labeled import Examples, label_names, read_examples, stratified_split
from lmforge.data.tokenizer import encode_batch
from lmforge.errors import UserError
from lmforge.evaluate.classify import classification_metrics, plot_classification
from lmforge.fsutil import atomic_dir, write_json, write_text
from lmforge.models.bert import Bert
from lmforge.models.gpt import GPT
from lmforge.progress import progress, status
from lmforge.train.checkpoint import MODEL_FILE, load_model_state, save_model
from lmforge.train.optim import build_optimizer, lr_at, set_lr
from lmforge.train.trainer import TimeBudget, autocast_for, resolve_device

EARLY_STOP_METRICS = ("macro_f1", "accuracy", "weighted_f1", "roc_auc", "loss")


def load_base(init: str | Path):
    """(arch, model, tokenizer) from a run directory or a Hugging Face directory."""
    from lmforge.models.hf import _load_hf_model, _read_hf_tokenizer
    from lmforge.runs import load_run

    init = Path(init)
    if (init / "config.yaml").is_file():
        run = load_run(init, device="cpu")
        return run.config.arch, run.model, run.tokenizer
    if (init / "config.json").is_file():
        hf_config = json.loads((init / "config.json").read_text(encoding="utf-8"))
        arch, model, _ = _load_hf_model(init, hf_config)
        return arch, model, _read_hf_tokenizer(init)
    raise UserError(f"--init {init}: not a run directory (config.yaml) or a Hugging Face directory (config.json)")


def with_head(arch: str, base, num_labels: int, seed: int):
    """A copy of ``base`` with a freshly initialised classification head of ``num_labels``."""
    torch.manual_seed(seed)
    if arch == "bert":
        cfg = dataclasses.replace(base.config, num_labels=num_labels, mlm_head=False)
        model = Bert(cfg)
        encoder = {k: v for k, v in base.state_dict().items() if k.startswith("bert.")}
    else:
        cfg = dataclasses.replace(base.config, num_labels=num_labels)
        model = GPT(cfg)
        encoder = {k: v for k, v in base.state_dict().items() if not k.startswith("score.")}
    missing, unexpected = model.load_state_dict(encoder, strict=False)
    missing = [k for k in missing if not k.startswith(("classifier.", "score.", "lm_head."))]
    if missing or unexpected:
        raise UserError(f"--init does not fit the classifier: missing {missing}, unexpected {unexpected}")
    return model


@torch.no_grad()
def predict_probs(model, tokenizer, texts: list[str], max_length: int, device, batch_size: int = 64) -> np.ndarray:
    """Class probabilities (N, K) for ``texts``, in their order. Batches are cut from the texts
    sorted by length, so each pads to similar lengths (less than half the compute of random
    batches on docstrings: a batch pads to its longest text)."""
    model.eval()
    order = np.argsort([len(t) for t in texts], kind="stable")
    out = []
    for i in range(0, len(texts), batch_size):
        ids, mask = encode_batch(tokenizer, [texts[j] for j in order[i:i + batch_size]], max_length)
        out.append(model.classify(ids.to(device), mask.to(device)).float().softmax(-1).cpu().numpy())
    in_order = np.concatenate(out)
    probs = np.empty_like(in_order)
    probs[order] = in_order
    return probs


def evaluate_examples(model, tokenizer, ex: Examples, names: list[str], max_length: int, device) -> dict:
    index = {n: i for i, n in enumerate(names)}
    unseen = sorted(set(ex.labels) - set(index))
    if unseen:
        raise UserError(f"labels never seen in training: {', '.join(unseen[:10])}")
    y = np.array([index[label] for label in ex.labels])
    probs = predict_probs(model, tokenizer, ex.texts, max_length, device)
    m = classification_metrics(y, probs, names)
    m["loss"] = float(-np.log(np.clip(probs[np.arange(len(y)), y], 1e-12, None)).mean())
    return m, y, probs


def train_classifier(init, data, out, *, val=None, val_fraction=0.15, test=None, text_column="text",
                     label_column="label", class_weights=None, oversample=False, early_stop="macro_f1", patience=3,
                     epochs=3, max_length=128, eval_every=0, overrides=None, max_seconds=None) -> dict:
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"run directory {out} is not empty; choose another --out")
    if early_stop not in EARLY_STOP_METRICS:
        raise UserError(f"--early-stop must be one of {', '.join(EARLY_STOP_METRICS)}")
    if class_weights not in (None, "auto", "none"):
        raise UserError("--class-weights takes 'auto' (inverse class frequency) or 'none'")
    train_ex = read_examples(data, text_column, label_column)
    names = label_names(train_ex.labels)
    if len(names) < 2:
        raise UserError(f"{data}: only one class ({names[0]!r}); a classifier needs at least two")
    if val is not None:
        val_ex = read_examples(val, text_column, label_column)
    elif not 0.0 <= val_fraction < 0.5:
        raise UserError(f"--val-fraction must be in [0, 0.5), got {val_fraction}")
    elif val_fraction > 0:
        train_ex, val_ex = stratified_split(train_ex, val_fraction, seed=0)
    else:  # no validation: the planned epochs run and the last weights are kept
        val_ex = None
    test_ex = read_examples(test, text_column, label_column) if test is not None else None
    for part, ex in (("validation", val_ex), ("test", test_ex)):
        unseen = sorted(set(ex.labels) - set(names)) if ex is not None else []
        if unseen:
            raise UserError(f"{part} labels never seen in training: {', '.join(unseen[:10])}")

    arch, base, tokenizer = load_base(init)
    cfg = cfgmod.RunConfig(arch=arch, model=base.config)
    # Fine-tuning defaults (a --set overrides them): lr 5e-5, batch 16, warm-up 10%.
    cfg.train.lr, cfg.train.batch_size, cfg.train.max_steps = 5e-5, 16, None
    cfgmod.apply_dict(cfg, cfgmod.parse_overrides(overrides or []), "--set")
    t = cfg.train
    model = with_head(arch, base, len(names), t.seed)
    cfg.model = model.config
    max_length = min(max_length, model.config.block_size)
    device = resolve_device(t.device)
    model.to(device)
    index = {n: i for i, n in enumerate(names)}
    y_train = torch.tensor([index[label] for label in train_ex.labels])
    ids, mask = encode_batch(tokenizer, train_ex.texts, max_length)
    counts = torch.bincount(y_train, minlength=len(names)).float()
    steps_per_epoch = math.ceil(len(train_ex) / t.batch_size)
    max_steps = t.max_steps or epochs * steps_per_epoch
    t.max_steps, t.warmup_steps = max_steps, min(t.warmup_steps, max(1, max_steps // 10))
    eval_every = eval_every or steps_per_epoch
    loss_weight = (counts.sum() / (len(names) * counts.clamp(min=1))).to(device) if class_weights == "auto" else None
    optimizer = build_optimizer(model, t.lr, t.weight_decay, (t.beta1, t.beta2), device.type, t.optimizer,
                               t.muon_lr, t.layer_lr_decay)
    ctx = autocast_for(device, t.dtype)
    gen = torch.Generator().manual_seed(t.seed)
    sample_w = (1.0 / counts)[y_train] if oversample else None

    lengths = mask.sum(1)

    def batches():
        """Epochs of shuffled (or class-balanced) indices, grouped by length: each run of 50 batches
        is sorted by length before it is cut, and the batches are then shuffled, so a batch pads
        to similar lengths (the same examples per epoch, about half the compute of padding every
        batch to ``max_length`` on short texts). A last partial batch is dropped."""
        B = min(t.batch_size, len(y_train))
        while True:
            order = (torch.multinomial(sample_w, len(y_train), replacement=True, generator=gen) if oversample
                     else torch.randperm(len(y_train), generator=gen))
            order = torch.cat([mega[torch.argsort(lengths[mega], descending=True, stable=True)]
                               for mega in order.split(50 * B)])
            cut = [order[s:s + B] for s in range(0, len(order) - B + 1, B)]
            for k in torch.randperm(len(cut), generator=gen).tolist():
                yield cut[k]

    with atomic_dir(out) as tmp:
        status(f"classifier: {arch} from {init}, {model.num_params():,} params, {len(names)} classes, "
               f"{len(train_ex):,} train / {len(val_ex) if val_ex is not None else 0:,} validation examples, "
               f"{max_steps} steps")
        best, best_step, bad_evals, history = None, 0, 0, []
        t0 = time.perf_counter()
        # With a time budget the schedule (warm-up excepted) is shortened to end with it, so the
        # learning rate still decays to its floor when the planned epochs do not fit.
        budget = TimeBudget(max_seconds, t0, cap=max_steps) if max_seconds is not None else None
        # Validation passes (forward only, about a third of a training step per batch) that the
        # first timed steps do not include.
        eval_share = (len(val_ex) / (3 * t.batch_size)) / eval_every if val_ex is not None else 0.0
        bar = progress(total=max_steps, desc="fine-tuning", unit="step")
        stream = batches()
        step, reason = 0, "max_steps"
        model.train()
        while step < max_steps:
            if max_seconds is not None and time.perf_counter() - t0 >= max_seconds:
                reason = "max_seconds"
                break
            b = next(stream)
            lr = lr_at(step, t.lr, t.warmup_steps, max_steps, t.min_lr_ratio)
            set_lr(optimizer, lr)
            width = int(lengths[b].max())  # padding past the longest text in the batch changes nothing
            with ctx:
                logits = model.classify(ids[b, :width].to(device), mask[b, :width].to(device))
            loss = F.cross_entropy(logits.float(), y_train[b].to(device), weight=loss_weight,
                                   label_smoothing=t.label_smoothing)
            loss.backward()
            if t.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            bar.update(1)
            if budget is not None and budget.active:
                planned = budget.plan(step, time.perf_counter(), first_factor=1 + eval_share)
                if planned is not None and planned != max_steps:
                    max_steps = t.max_steps = max(planned, step)
                    bar.reset(total=max_steps)
                    bar.update(step)
                    status(f"planned {max_steps} steps to fit {max_seconds:.0f} s "
                           f"({budget.per_step * 1000:.0f} ms/step)")
            if val_ex is not None and (step % eval_every == 0 or step == max_steps):
                m, _, _ = evaluate_examples(model, tokenizer, val_ex, names, max_length, device)
                model.train()
                record = {"step": step, "train_loss": loss.item(), "val_loss": m["loss"], "val_accuracy": m["accuracy"],
                          "val_macro_f1": m["macro_f1"]}
                history.append(record)
                score = -m["loss"] if early_stop == "loss" else (m[early_stop] if m[early_stop] is not None else -1)
                bar.set_postfix({"val_" + early_stop: f"{m[early_stop]:.4f}" if m[early_stop] is not None else "n/a"})
                if best is None or score > best:
                    best, best_step, bad_evals = score, step, 0
                    save_model(model, tmp / MODEL_FILE, metadata={"format": f"lmforge-{arch}", "step": str(step)})
                else:
                    bad_evals += 1
                    if bad_evals >= patience:
                        reason = "early_stop"
                        break
        bar.close()
        if best is None:  # no validation, or stopped by the clock before the first evaluation
            save_model(model, tmp / MODEL_FILE, metadata={"format": f"lmforge-{arch}", "step": str(step)})
            best_step = step
        model.load_saved_state(load_model_state(tmp / MODEL_FILE))  # the best checkpoint
        cfgmod.save(cfg, tmp / "config.yaml")
        tokenizer.save(str(tmp / "tokenizer.json"))
        write_json(tmp / "labels.json", names)
        write_text(tmp / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in history))
        summary = {"run_dir": str(out), "arch": arch, "labels": names, "steps": step, "best_step": best_step,
                   "stopped_by": reason, "early_stop": early_stop, "params": model.num_params(),
                   "train_examples": len(train_ex), "val_examples": len(val_ex) if val_ex is not None else 0,
                   "seconds": round(time.perf_counter() - t0, 2)}
        summary["validation"] = None
        if val_ex is not None:
            val_m = write_classification_report(tmp, model, tokenizer, val_ex, names, max_length, device,
                                                "validation")
            summary["validation"] = {k: val_m[k] for k in ("accuracy", "macro_f1", "weighted_f1", "roc_auc")}
        if test_ex is not None:
            test_m = write_classification_report(tmp, model, tokenizer, test_ex, names, max_length, device, "test")
            summary["test"] = {k: test_m[k] for k in ("accuracy", "macro_f1", "weighted_f1", "roc_auc")}
        write_json(tmp / "train_summary.json", summary)
    return summary


def write_classification_report(run_dir: Path, model, tokenizer, ex: Examples, names, max_length, device,
                                split: str, source: str | None = None) -> dict:
    """Metrics on ``ex``, ``eval.json`` (or ``eval_<split>.json``), ``report.md``, the plots, and
    ``predictions_<split>.jsonl`` (each example's text, label, predicted label and probabilities)."""
    m, y, probs = evaluate_examples(model, tokenizer, ex, names, max_length, device)
    write_text(run_dir / f"predictions_{split}.jsonl", "".join(
        json.dumps({"text": t, "label": label, "predicted": names[int(p.argmax())],
                    "probabilities": {n: round(float(x), 6) for n, x in zip(names, p)}}) + "\n"
        for t, label, p in zip(ex.texts, ex.labels, probs)))
    majority = max(m["per_class"].values(), key=lambda c: c["support"])["support"] / max(m["n"], 1)
    m["majority_baseline_accuracy"] = majority
    m["split"], m["data"] = split, source
    plots = plot_classification(y, probs, names, run_dir / "plots")
    write_json(run_dir / ("eval.json" if split in ("validation", "eval") else f"eval_{split}.json"), m)
    lines = [f"# Classification report ({split}{', ' + source if source else ''})", "",
             f"{m['n']} examples, {len(names)} classes. The largest class holds {majority:.4f} of them "
             "(the best accuracy a constant prediction could reach here).", "",
             "| metric | value |", "|---|---:|"]
    for k in ("accuracy", "macro_f1", "weighted_f1", "macro_precision", "macro_recall", "roc_auc", "loss"):
        lines.append(f"| {k} | {m[k]:.4f} |" if m[k] is not None else f"| {k} | n/a |")
    lines += ["", "| class | precision | recall | F1 | support |", "|---|---:|---:|---:|---:|"]
    for name, c in m["per_class"].items():
        lines.append(f"| {name} | {c['precision']:.4f} | {c['recall']:.4f} | {c['f1']:.4f} | {c['support']} |")
    lines += ["", "Confusion matrix (rows: true, columns: predicted): `plots/confusion.png`; ROC: `plots/roc.png`; "
              f"precision-recall: `plots/pr.png`. Every example's prediction: `predictions_{split}.jsonl`.", ""]
    write_text(run_dir / "report.md", "\n".join(lines))
    m["plots"] = plots
    return m
