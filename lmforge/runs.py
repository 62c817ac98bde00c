"""The run directory: every file name of its contract, what kind of run it is, and loading it.

A run directory is enough to evaluate, generate, serve, explain, compress, export or resume::

    config.yaml                   fully resolved config (task, model, data, train sections)
    model.safetensors             the run's weights (with keep_best: the best-scoring ones)
    tokenizer.json                the tokenizer (Hugging Face tokenizers format; text runs)
    labels.json                   class names, in id order (classifiers)
    chat_template.json            the chat template (generators)
    trainer_state.json            step, counters, hook state, optimizer groups (plain JSON)
    trainer_state.safetensors     optimizer moments and RNG states (tensors)
    best.safetensors              while training with keep_best: the best weights so far
    metrics.jsonl                 one JSON object per logged step or evaluation
    events.out.tfevents.*         the same scalars for TensorBoard (train.tensorboard)
    eval.json, report.md, plots/  evaluation figures on the validation split, the report and its plots
    eval_test.json, report_test.md the same on the test split (plots/test_*.png)
    predictions_<split>.jsonl     every example's label, prediction and probabilities (classifiers)
    evaluations/<name>/           `lmforge eval --data` of other data, named after it: the same files
    train_summary.json            what the training call returned (fine-tuning runs)
    explain/                      `lmforge explain`'s default output (explanation.json, report.md, plots/, ...)
    compress_report.md, .json     a compressed run (`lmforge compress`): it beside its source run

Nothing else in lmforge spells these names.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from lmforge.errors import UserError


class RunDir:
    """Paths of one run directory (nothing is read or created until asked)."""

    CONFIG = "config.yaml"
    MODEL = "model.safetensors"
    TOKENIZER = "tokenizer.json"
    LABELS = "labels.json"
    CHAT_TEMPLATE = "chat_template.json"
    STATE_JSON = "trainer_state.json"
    STATE_TENSORS = "trainer_state.safetensors"
    BEST = "best.safetensors"
    METRICS = "metrics.jsonl"
    EVAL = "eval.json"
    REPORT = "report.md"
    PLOTS = "plots"
    EVALUATIONS = "evaluations"
    SUMMARY = "train_summary.json"
    EXPLAIN = "explain"
    COMPRESS_REPORT, COMPRESS_REPORT_JSON = "compress_report.md", "compress_report.json"

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    def __str__(self) -> str:
        return str(self.path)

    @property
    def config(self) -> Path:
        return self.path / self.CONFIG

    @property
    def model(self) -> Path:
        return self.path / self.MODEL

    @property
    def tokenizer(self) -> Path:
        return self.path / self.TOKENIZER

    @property
    def labels(self) -> Path:
        return self.path / self.LABELS

    @property
    def metrics(self) -> Path:
        return self.path / self.METRICS

    @property
    def plots(self) -> Path:
        return self.path / self.PLOTS

    def is_run(self) -> bool:
        return self.config.is_file()

    def is_empty(self) -> bool:
        return not self.path.exists() or not any(self.path.iterdir())

    def has_checkpoint(self) -> bool:
        return all((self.path / f).is_file() for f in (self.MODEL, self.STATE_TENSORS, self.STATE_JSON))

    # What the trainer writes before the first checkpoint: a directory holding only these (and
    # TensorBoard event files) is a start a kill stopped, which a new start may replace.
    START_FILES = (CONFIG, TOKENIZER, LABELS, CHAT_TEMPLATE, METRICS)

    def is_aborted_start(self) -> bool:
        """A run directory whose training was stopped (a kill) before its first checkpoint."""
        if not self.is_run():
            return False
        names = [p.name for p in self.path.iterdir()]
        return all(n in self.START_FILES or n.startswith("events.out.tfevents.") or n.endswith(".tmp")
                   for n in names)

    def require(self) -> None:
        """Raise a one-line error unless this is a run directory with weights."""
        if not self.is_run():
            raise UserError(f"not a run directory (no {self.CONFIG}): {self.path}")
        if not self.model.is_file():
            raise UserError(f"run directory has no trained weights ({self.MODEL}): {self.path}")

    def load_config(self):
        from lmforge import config as cfgmod

        if not self.is_run():
            raise UserError(f"not a run directory (no {self.CONFIG}): {self.path}")
        return cfgmod.load(self.config)

    def kind(self) -> str:
        """What the run is: its task's name (lm, mlm, classify, image-classify, ...)."""
        return self.load_config().task.name

    def trainer_state(self) -> dict | None:
        """``trainer_state.json`` (None when there is none); a damaged one is a one-line error."""
        path = self.path / self.STATE_JSON
        if not path.is_file():
            return None
        try:
            state = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError):
            state = None
        if not isinstance(state, dict) or not isinstance(state.get("step"), int):
            raise UserError(f"{path}: damaged (not the trainer's state); the run cannot be resumed from it")
        return state

    def label_names(self) -> list[str] | None:
        return json.loads(self.labels.read_text(encoding="utf-8")) if self.labels.is_file() else None

    def data_path(self) -> str | None:
        """The data the run was trained on (its config's ``data.path``; older runs: the trainer state)."""
        cfg = self.load_config()
        if cfg.data.path:
            return cfg.data.path
        return (self.trainer_state() or {}).get("data_dir")


def answer_kind(task: str, can_generate: bool) -> str | None:
    """What a run answers, for the stages that treat every family alike (explain, compress,
    export): ``text-classifier``, ``image-classifier``, ``decoder`` (a generator of text), or None."""
    if task == "classify":
        return "text-classifier"
    if task == "image-classify":
        return "image-classifier"
    return "decoder" if can_generate else None


@dataclass
class Run:
    """A loaded run: its directory, config, model (eval mode), tokenizer (None for image runs),
    labels and device."""

    path: Path
    config: object
    model: torch.nn.Module
    tokenizer: object
    device: torch.device
    labels: list[str] | None = None

    @property
    def dir(self) -> RunDir:
        return RunDir(self.path)


def load_run(run_dir: str | Path, device: str = "auto") -> Run:
    """Rebuild the trained model from ``run_dir`` in eval mode."""
    from lmforge.data.tokenizer import load_tokenizer
    from lmforge.device import resolve_device
    from lmforge.models import build_model
    from lmforge.train.checkpoint import load_into, load_model_state

    rd = RunDir(run_dir)
    rd.require()
    cfg = rd.load_config()
    dev = resolve_device(device)
    from lmforge.models.lora import apply_lora

    model = build_model(cfg.arch, cfg.model)
    apply_lora(model, cfg.finetune.lora)  # a LoRA run's weights: adapters, laid over its base's
    if cfg.compress.quantize:  # int8 layers (lmforge compress) run on the CPU's int8 kernels
        from lmforge.compress.quantize import load_int8_state, quantize_int8

        if dev.type != "cpu":
            from lmforge.progress import status

            status(f"{rd.path} holds int8 weights for the CPU's kernels: loading it on the CPU, not {dev}")
            dev = torch.device("cpu")
        quantize_int8(model, cfg.compress.float_layers)
        load_into(model, load_model_state(rd.model), rd.model, load=lambda s: load_int8_state(model, s))
    else:
        from lmforge.train.adapters import full_state, weights_metadata

        load_into(model, full_state(model, load_model_state(rd.model), weights_metadata(rd.model), rd.path), rd.model)
    model.to(dev).eval()
    tokenizer = load_tokenizer(rd.tokenizer) if rd.tokenizer.is_file() or cfg.task.name not in ("image-classify", "gan") else None
    return Run(rd.path, cfg, model, tokenizer, dev, rd.label_names())
