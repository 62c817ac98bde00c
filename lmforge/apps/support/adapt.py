"""Adapting the encoder to an FAQ at ``support init``: a general sentence encoder has never seen
the product's words, so the FAQ's own text teaches them (``train --task embed``, in-batch
negatives, within a time budget on the CPU).

The pairs of an entry (all of one group, so they are never each other's negatives):

- question → answer, and question → question + answer (what the index embeds);
- each of up to ``SENTENCES`` sentences of the answer → question + answer (the "inverse cloze
  task" of Lee et al., 2019: a sentence stands in for a customer's question about it).

Adaptation must earn its place: a seeded ``HELD_OUT`` share of the entries is held out, an
encoder is fine-tuned on the pairs of the others, and the held-out entries' questions rank every
entry's answer (question ↔ answer: no entry's question is in the candidates, so nothing is found
by copying). Only when that MRR beats the un-adapted encoder's is the encoder fine-tuned again on
all entries and kept; otherwise the un-adapted one stays, and the report says why.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np

from lmforge.progress import status

HELD_OUT = 0.2
SENTENCES = 3
MIN_ENTRIES = 8  # fewer: too few to hold any out and learn from the rest
EPOCHS = 3
LR = 5e-5
ADAPTED = "encoder-adapted"  # the app directory's adapted encoder run


def faq_digest(entries) -> str:
    """Changes when any entry changes: an adapted encoder belongs to one FAQ."""
    return hashlib.sha256(json.dumps(sorted((e.id, e.digest) for e in entries)).encode()).hexdigest()[:16]


def sentences(text: str) -> list[str]:
    return [s.strip() for s in re.split(r"(?<=[.!?])\s+|\n+", text) if len(s.split()) >= 4]


def faq_pairs(entries) -> list[dict]:
    rows = []
    for e in entries:
        both = f"{e.question}\n{e.answer}"
        rows += [{"query": e.question, "positive": e.answer, "group": e.id},
                 {"query": e.question, "positive": both, "group": e.id}]
        rows += [{"query": s, "positive": both, "group": e.id} for s in sentences(e.answer)[:SENTENCES]]
    return rows


def question_to_answer_mrr(embed, entries, held: list[int]) -> float:
    """MRR of each held-out entry's question ranking every entry's answer (its own the target)."""
    answers = embed([e.answer for e in entries])
    questions = embed([entries[i].question for i in held])
    sim = questions @ answers.T
    own = sim[np.arange(len(held)), held]
    rank = 1 + (sim > own[:, None]).sum(1)
    return float(np.mean(1.0 / rank))


def _fine_tune(rows: list[dict], init: Path, out: Path, seconds: float, tmp: Path) -> dict:
    from lmforge import config as cfgmod
    from lmforge.train.trainer import train

    data = tmp / f"pairs-{out.name}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    cfg = cfgmod.build_config(task="embed", values={
        "task": dict(init=str(init), val_fraction=0.0, epochs=EPOCHS),
        "data": dict(path=str(data)),
        "train": dict(lr=LR, max_seconds=max(seconds, 1.0), log_interval=5)})
    return train(cfg, run_dir=out)


def adapt_encoder(entries, base: Path, app_dir: Path, seconds: float, seed: int = 0) -> dict:
    """Fine-tune ``base`` on the FAQ within about ``seconds``; install it as ``app_dir/ADAPTED``
    when it beats ``base`` on the held-out entries. Returns the report (``adapted``: kept or not)."""
    from lmforge.apps.support.retrieval import load_encoder

    report = {"adapted": False, "entries": len(entries), "seconds_budget": seconds}
    if len(entries) < MIN_ENTRIES:
        return {**report, "reason": f"fewer than {MIN_ENTRIES} entries: nothing to hold out"}
    rng = np.random.default_rng(seed)
    held = sorted(rng.permutation(len(entries))[:max(2, round(HELD_OUT * len(entries)))].tolist())
    held_ids = {entries[i].id for i in held}
    rows = faq_pairs(entries)
    for stale in app_dir.glob(".adapt-*"):  # what a killed init left behind
        shutil.rmtree(stale, ignore_errors=True)
    with tempfile.TemporaryDirectory(dir=app_dir, prefix=".adapt-") as tmp:
        tmp = Path(tmp)
        status(f"adapting the encoder to the FAQ: fine-tuning on {len(entries) - len(held)} entries, "
               f"checking on {len(held)} held out (up to {seconds / 2:.0f} s)")
        trial = _fine_tune([r for r in rows if r["group"] not in held_ids], base, tmp / "trial", seconds / 2, tmp)
        before = question_to_answer_mrr(load_encoder(base), entries, held)
        after = question_to_answer_mrr(load_encoder(tmp / "trial"), entries, held)
        report.update(held_out=len(held), held_out_mrr_before=before, held_out_mrr_after=after,
                      trial_steps=trial["steps"])
        if after <= before:
            status(f"adaptation did not help on the held-out entries (question -> answer MRR {before:.3f} -> "
                   f"{after:.3f}): keeping the un-adapted encoder")
            return {**report, "reason": "no gain on the held-out entries"}
        status(f"adaptation helped on the held-out entries (question -> answer MRR {before:.3f} -> {after:.3f}): "
               f"fine-tuning on all {len(entries)} entries (up to {seconds / 2:.0f} s)")
        final = _fine_tune(rows, base, tmp / "final", seconds / 2, tmp)
        if (app_dir / ADAPTED).exists():  # the previous FAQ's: moved aside, removed with the temp directory
            (app_dir / ADAPTED).rename(tmp / "previous")
        (tmp / "final").rename(app_dir / ADAPTED)
    return {**report, "adapted": True, "pairs": len(rows), "steps": final["steps"]}
