"""Evaluating a run directory: metrics on validation text, samples, ``eval.json`` and ``report.md``.

Shared by ``lmforge eval`` and ``lmforge quickstart``.
"""

from __future__ import annotations

from pathlib import Path

from lmforge import config as cfgmod
from lmforge.data.tokenizer import eot_id
from lmforge.data.tokens import TokenFile, load_meta
from lmforge.errors import UserError
from lmforge.evaluate.lm import DYNAMIC_LR, dynamic_evaluate_lm, evaluate_lm
from lmforge.evaluate.report import plot_loss, write_report
from lmforge.fsutil import write_json
from lmforge.generate import SamplingParams, stream_text
from lmforge.runs import load_run
from lmforge.device import autocast_for


PROMPT_TOKENS = 12  # of a validation document, to continue in a report's samples


def validation_prompts(val: TokenFile, n: int, eot: int | None, length: int = PROMPT_TOKENS) -> list[list[int]]:
    """``n`` prompts from the validation tokens, so that a report's samples continue text of the
    user's own kind: the first ``length`` tokens of documents spread evenly over the split
    (a document starts the split or follows an end-of-text token), else of evenly spaced windows."""
    import numpy as np

    data = val.data
    if n <= 0 or len(data) <= length:
        return []
    starts = np.r_[0, np.flatnonzero(np.asarray(data) == eot) + 1] if eot is not None else np.zeros(0, dtype=int)
    starts = starts[starts + length <= len(data)]
    if len(starts) < n:  # few documents: evenly spaced windows instead
        starts = np.linspace(0, len(data) - length, n).astype(int)
    picked = starts[np.linspace(0, len(starts) - 1, n).round().astype(int)]
    prompts = []
    for s in picked:
        ids = [int(t) for t in data[s:s + length]]
        prompts.append(ids[:ids.index(eot)] if eot in ids else ids)  # a short document: its whole text
    return [p for p in prompts if p]


def evaluate_run(run_dir, data_dir=None, batch_size: int = 8, max_tokens: int | None = None,
                 samples: int = 3, sample_tokens: int = 80, stride: int | None = None,
                 dynamic: bool = False, dynamic_lr: float | None = None, prompts: list[str] | None = None) -> dict:
    """Score a run on validation text, sample from it, write ``eval.json`` and ``report.md``.
    The samples continue ``prompts``, or the openings of ``samples`` validation documents.
    With ``dynamic``, also the dynamic-evaluation figures (:func:`dynamic_evaluate_lm`)."""
    if dynamic_lr is not None and not dynamic_lr > 0:
        raise UserError(f"--dynamic-lr must be positive, got {dynamic_lr}")
    run = load_run(run_dir)
    try:
        state = run.dir.trainer_state() or {"step": 0, "tokens_seen": 0}
    except UserError:  # the weights are what is evaluated; the report then lacks the step count
        state = {"step": 0, "tokens_seen": 0}
    data_dir = data_dir or run.dir.data_path()
    if data_dir is None:
        raise UserError("--data is required: this run does not record its data directory")
    meta = load_meta(data_dir)
    if (Path(data_dir) / "tokenizer.json").read_bytes() != (Path(run_dir) / "tokenizer.json").read_bytes():
        raise UserError(f"{data_dir} was tokenized with a different tokenizer than the run {run_dir}; "
                        f"prepare the text with the run's tokenizer first")
    val = TokenFile(Path(data_dir) / "val.bin", meta["dtype"])
    autocast = autocast_for(run.device, run.config.train.dtype)
    metrics = evaluate_lm(run.model, run.tokenizer, val, batch_size=batch_size, max_tokens=max_tokens,
                          autocast=autocast, stride=stride)
    if dynamic:
        lr = DYNAMIC_LR if dynamic_lr is None else dynamic_lr
        metrics |= dynamic_evaluate_lm(run.model, run.tokenizer, val, lr, max_tokens, autocast)
    metrics["data_dir"] = str(data_dir)
    texts = []
    eot = eot_id(run.tokenizer)
    prompt_ids = ([run.tokenizer.encode(p, add_special_tokens=False).ids for p in prompts] if prompts
                  else validation_prompts(val, samples, eot))
    for i, ids in enumerate(prompt_ids):
        text = "".join(stream_text(run.model, run.tokenizer, "", SamplingParams(
            max_tokens=sample_tokens, temperature=0.8, top_k=200, seed=1000 + i, eos_id=eot), prompt_ids=ids))
        texts.append((prompts[i] if prompts else run.tokenizer.decode(ids), text))
    write_json(Path(run_dir) / "eval.json", metrics)
    plot_loss(run_dir)
    write_report(run_dir, metrics=metrics, params=run.model.num_params(), data_meta=meta, train_state=state,
                 config=cfgmod.to_dict(run.config), samples=texts)
    metrics["samples"] = [p + t for p, t in texts]
    metrics["sample_prompts"] = [p for p, _ in texts]
    return metrics
