"""Text classification: fine-tune any lmforge encoder ([CLS] pooling) or decoder (last real
token), from a run directory or a Hugging Face directory, with a fresh classification head, on a
labelled ``.csv``/``.jsonl`` file — in the one training loop, so it resumes exactly, checkpoints on
Ctrl-C, accumulates gradients, runs under DDP and logs every step to ``metrics.jsonl``.

Batches: each epoch's examples are shuffled (or, with ``oversample``, drawn class-balanced) by a
generator seeded from (seed, epoch); each run of 50 batches is sorted by length before it is cut
and the batches are then shuffled, so a batch pads to similar lengths (about half the compute of
padding every batch to ``max_length`` on short texts); a last partial batch is dropped. Micro-batch
``g = step * micro_per_step + micro`` is batch ``g mod batches_per_epoch`` of epoch
``g // batches_per_epoch``: a pure function of the step, as resuming needs.

Class imbalance: ``class_weights: auto`` weighs the loss by inverse class frequency;
``oversample`` draws batches with a balanced sampler. Validation runs once per epoch (or every
``train.eval_interval`` steps); the loop's hooks keep the best checkpoint by ``train.early_stop``
and stop after ``train.patience`` evaluations without improvement. Without validation
(``val_fraction: 0``) the planned epochs run and the last weights are kept.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lmforge import config as cfgmod
from lmforge.data.labeled import Examples, label_names, read_examples, stratified_split
from lmforge.data.tokenizer import encode_batch, load_tokenizer
from lmforge.errors import UserError
from lmforge.evaluate.classify import classification_metrics, split_summary, write_report
from lmforge.fsutil import write_json
from lmforge.models import MODELS, build_model
from lmforge.progress import status
from lmforge.tasks.finetune import FineTuneTask, bundled_encoder, load_base

EARLY_STOP_METRICS = ("macro_f1", "accuracy", "weighted_f1", "roc_auc", "loss")
MEGA_BATCHES = 50  # batches sorted by length together


@dataclass
class ClassifyOptions:
    name: str = "classify"
    init: str | None = None  # run directory or Hugging Face directory to fine-tune
    text_column: str = "text"
    label_column: str = "label"
    val_fraction: float = 0.15  # without data.val: the stratified share of data.path held out
    class_weights: str | None = None  # auto (inverse class frequency in the loss) | none
    oversample: bool = False  # class-balanced sampling of training examples
    epochs: int = 3  # the schedule's length when train.max_steps is not given
    max_length: int = 128  # tokens per text (longer texts are truncated)
    # The target puts 1 - label_smoothing on the true class and spreads the rest evenly over all
    # classes (F.cross_entropy's label_smoothing).
    label_smoothing: float = 0.0
    # The class names in the head's order; None: the training data's (sorted). A federation gives
    # every client its own, so that a client missing a class still builds the same head.
    labels: list[str] | None = None


def with_head(base: torch.nn.Module, config, seed: int) -> torch.nn.Module:
    """A model of ``config`` (``classification_config`` of ``base``'s, perhaps with settings
    changed) with a freshly initialised classification head: every weight the new model shares with
    ``base`` is copied, but for the head itself."""
    torch.manual_seed(seed)
    model = type(base)(config)
    head = base.classifier_head
    theirs = base.state_dict()
    ours = model.state_dict()
    shared = {k: v for k, v in theirs.items() if k in ours and not k.startswith(head)}
    model.load_state_dict(shared, strict=False)
    missing = [k for k in ours if k not in shared and not k.startswith(head)]
    if missing:
        raise UserError(f"--init does not fit the classifier: missing {missing}")
    return model


@torch.no_grad()
def predict_probs(model, tokenizer, texts: list[str], max_length: int, device, batch_size: int = 64) -> np.ndarray:
    """Class probabilities (N, K) for ``texts``, in their order. Batches are cut from the texts
    sorted by length, so each pads to similar lengths (less than half the compute of random
    batches on docstrings: a batch pads to its longest text)."""
    model.eval()
    if not texts:
        return np.zeros((0, model.config.num_labels), dtype=np.float32)
    order = np.argsort([len(t) for t in texts], kind="stable")
    out = []
    for i in range(0, len(texts), batch_size):
        ids, mask = encode_batch(tokenizer, [texts[j] for j in order[i:i + batch_size]], max_length)
        out.append(model.classify(ids.to(device), mask.to(device)).float().softmax(-1).cpu().numpy())
    in_order = np.concatenate(out)
    probs = np.empty_like(in_order)
    probs[order] = in_order
    return probs


def label_ids(ex: Examples, names: list[str]) -> np.ndarray:
    """``ex``'s labels as class ids; a label the run never saw is a one-line error."""
    index = {n: i for i, n in enumerate(names)}
    unseen = sorted(set(ex.labels) - set(index))
    if unseen:
        raise UserError(f"labels never seen in training: {', '.join(unseen[:10])}")
    return np.array([index[label] for label in ex.labels])


def evaluate_examples(model, tokenizer, ex: Examples, names: list[str], max_length: int, device) -> dict:
    """The classification metrics (and the loss) of ``model`` on ``ex``."""
    return classification_metrics(label_ids(ex, names), predict_probs(model, tokenizer, ex.texts, max_length, device),
                                  names)


def fit_baseline(train_ex: Examples, names: list[str]):
    """The TF-IDF + logistic regression baseline fitted on the training examples (or None)."""
    from lmforge.evaluate.baselines import fit_text_baseline

    status(f"fitting the TF-IDF + logistic regression baseline on {len(train_ex):,} training texts")
    return fit_text_baseline(train_ex.texts, label_ids(train_ex, names), len(names))


def write_classification_report(run_dir: Path, model, tokenizer, ex: Examples, names, max_length, device,
                                split: str, source: str | None = None, baseline=None, verdict: dict | None = None,
                                out_dir: Path | None = None) -> dict:
    """Metrics of ``model`` on ``ex`` with the report, plots and per-text predictions, beside the
    ``baseline`` (:func:`lmforge.evaluate.classify.write_report`)."""
    y = label_ids(ex, names)
    probs = predict_probs(model, tokenizer, ex.texts, max_length, device)
    return write_report(run_dir, y, probs, names, split, source, [{"text": t} for t in ex.texts],
                        baseline=baseline.on(ex.texts) if baseline is not None else None, verdict=verdict,
                        out_dir=out_dir)


def split_examples(cfg) -> tuple[Examples, Examples | None]:
    """A classifier config's training and validation examples: ``data.val``, else the stratified
    ``task.val_fraction`` of ``data.path`` (seed 0), else none."""
    o, d = cfg.task, cfg.data
    train_ex = read_examples(d.path, o.text_column, o.label_column)
    if d.val is not None:
        return train_ex, read_examples(d.val, o.text_column, o.label_column)
    if o.val_fraction <= 0:  # no validation: the planned epochs run and the last weights are kept
        return train_ex, None
    train_ex, val_ex = stratified_split(train_ex, o.val_fraction, seed=0)
    if not len(val_ex):  # too few examples of every class to hold any out
        status(f"{d.path}: too few examples to hold out {o.val_fraction:.0%} for validation; "
               "training on all of them without validation")
        return train_ex, None
    return train_ex, val_ex


class ClassifyTask(FineTuneTask):
    name = "classify"
    ARCHS = ("bert", "gpt", "llama")  # the family of --init
    Options = ClassifyOptions
    METRICS = EARLY_STOP_METRICS
    # Fine-tuning defaults (flags, the config file and --set override them): lr 5e-5, batch 16,
    # the schedule from the epochs, one evaluation per epoch, every step logged, the best
    # checkpoint by validation macro F1, three evaluations of patience.
    DEFAULTS = {"train": dict(lr=5e-5, batch_size=16, max_steps=None, eval_interval=None, log_interval=1,
                              early_stop="macro_f1", patience=3, keep_best=True)}
    method = "classify"
    DATA = "FILE (.csv or .jsonl)"

    default_init = staticmethod(bundled_encoder)  # without --init: all-MiniLM-L6-v2

    @classmethod
    def validate_options(cls, cfg) -> None:
        super().validate_options(cfg)
        o = cfg.task
        if o.class_weights not in (None, "auto", "none"):
            raise UserError("--class-weights takes 'auto' (inverse class frequency) or 'none'")
        if not 0.0 <= o.label_smoothing < 1.0:
            raise UserError(f"task.label_smoothing must be in [0, 1), got {o.label_smoothing}")

    def __init__(self, cfg, run=None):
        super().__init__(cfg, run)
        o, d = cfg.task, cfg.data
        if not self.resume and o.init == self.default_init():
            status(f"no --init given: fine-tuning the bundled all-MiniLM-L6-v2 encoder ({o.init})")
        train_ex, val_ex = split_examples(cfg)
        self.names = list(o.labels) if o.labels else label_names(train_ex.labels)
        unknown = sorted(set(train_ex.labels) - set(self.names))
        if unknown:
            raise UserError(f"{d.path}: labels not in task.labels: {', '.join(unknown[:10])}")
        if len(self.names) < 2:
            raise UserError(f"{d.path}: only one class ({self.names[0]!r}); a classifier needs at least two")
        test_ex = read_examples(d.test, o.text_column, o.label_column) if d.test is not None else None
        for part, ex in (("validation", val_ex), ("test", test_ex)):
            unseen = sorted(set(ex.labels) - set(self.names)) if ex is not None else []
            if unseen:
                raise UserError(f"{part} labels never seen in training: {', '.join(unseen[:10])}")
        self.train_ex, self.val_ex, self.test_ex = train_ex, val_ex, test_ex
        if self.resume:  # the model is the checkpoint's; the tokenizer is the run's own
            self.base, self.tokenizer = None, None
        else:
            self.base, self.tokenizer = load_base(o.init)

    def resolve(self, cfg, world):
        if self.resume:  # the saved config is resolved already
            self.plan_epochs(cfg, world, len(self.train_ex))
            return cfg
        abspath = lambda p: str(Path(p).resolve()) if p is not None else None  # noqa: E731
        model_cfg = MODELS[cfg.arch].model.classification_config(cfg.model, len(self.names))
        max_length = min(cfg.task.max_length, model_cfg.block_size)
        cfg = cfgmod.replace(cfg, task={"max_length": max_length},
                             data={k: abspath(getattr(cfg.data, k)) for k in ("path", "val", "test")})
        cfg = dataclasses.replace(cfg, model=model_cfg)
        self.plan_epochs(cfg, world, len(self.train_ex))
        return self.epoch_schedule(cfg)

    def build_model(self, cfg):
        if self.resume:
            return build_model(cfg.arch, cfg.model)
        return with_head(self.base, cfg.model, cfg.train.seed)

    def write_files(self, run, model) -> None:
        self.tokenizer.save(str(run.tokenizer))
        write_json(run.labels, self.names)

    def to(self, device):
        super().to(device)
        if self.tokenizer is None:
            self.tokenizer = load_tokenizer(self.run.tokenizer)
        o = self.cfg.task
        index = {n: i for i, n in enumerate(self.names)}
        self.y = torch.tensor([index[label] for label in self.train_ex.labels])
        self.ids, self.mask = encode_batch(self.tokenizer, self.train_ex.texts, o.max_length)
        self.lengths = self.mask.sum(1)
        counts = torch.bincount(self.y, minlength=len(self.names)).float()
        self.loss_weight = ((counts.sum() / (len(self.names) * counts.clamp(min=1))).to(device)
                            if o.class_weights == "auto" else None)
        self.sample_weight = (1.0 / counts)[self.y] if o.oversample else None

    def eval_cost(self, cfg) -> float:
        if self.val_ex is None:
            return 0.0
        return len(self.val_ex) / (3 * self.B * cfg.train.grad_accum)  # forward only: ~1/3 of a step

    def epoch_order(self, gen):
        """Shuffled (or class-balanced) examples, each run of ``MEGA_BATCHES`` batches sorted by length."""
        n, B = len(self.y), self.B
        order = (torch.multinomial(self.sample_weight, n, replacement=True, generator=gen)
                 if self.sample_weight is not None else torch.randperm(n, generator=gen))
        return torch.cat([mega[torch.argsort(self.lengths[mega], descending=True, stable=True)]
                          for mega in order.split(MEGA_BATCHES * B)])

    def batch(self, step, micro):
        b = self.batch_indices(step, micro)
        width = int(self.lengths[b].max())  # padding past the longest text in the batch changes nothing
        return self.ids[b, :width], self.mask[b, :width], self.y[b]

    def loss(self, call, model, batch):
        ids, mask, y = batch
        logits = call(ids, mask)
        return F.cross_entropy(logits.float(), y, weight=self.loss_weight,
                               label_smoothing=self.cfg.task.label_smoothing)

    def evaluate(self, model, ctx):
        if self.val_ex is None:
            return {}
        m = evaluate_examples(model, self.tokenizer, self.val_ex, self.names, self.cfg.task.max_length,
                                    self.device)
        model.train()
        return {f"val_{k}": m[k] for k in EARLY_STOP_METRICS}

    def finish(self, run, model, ctx):
        out = {"arch": self.cfg.arch, "labels": self.names, "train_examples": len(self.train_ex),
               "val_examples": len(self.val_ex) if self.val_ex is not None else 0, "validation": None}
        baseline = fit_baseline(self.train_ex, self.names)
        verdict = self.training_verdict(run)
        if verdict is not None:
            out["still_improving"] = verdict["still_improving"]
        for split, ex in (("validation", self.val_ex), ("test", self.test_ex)):
            if ex is not None:
                m = write_classification_report(run.path, model, self.tokenizer, ex, self.names,
                                                self.cfg.task.max_length, self.device, split, baseline=baseline,
                                                verdict=verdict)
                out[split] = split_summary(m)
        model.train()
        return out
