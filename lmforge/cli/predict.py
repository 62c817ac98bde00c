"""lmforge predict: labels and class probabilities from a classifier run."""

from __future__ import annotations

from dataclasses import dataclass

from lmforge.cli.common import TextInputOptions, print_json
from lmforge.cli.options import flag
from lmforge.errors import UserError

HELP = "labels and probabilities from a classifier run"


@dataclass
class Options(TextInputOptions):
    max_length: int = flag(128)
    json: bool = flag(False)


def run(o: Options) -> int:
    """Label and class probabilities for each --text (or each line of --input) from a classifier run."""
    from lmforge.runs import load_run
    from lmforge.tasks.classify import predict_probs

    texts = o.texts()
    loaded = load_run(o.run_dir)
    names = loaded.labels if loaded.config.task.name == "classify" else None
    if names is None:
        raise UserError(f"{o.run_dir} is not a classifier run (train one with --task classify)")
    probs = predict_probs(loaded.model, loaded.tokenizer, texts, min(o.max_length, loaded.model.config.block_size),
                          loaded.device)
    rows = [{"text": t, "label": names[int(p.argmax())],
             "probabilities": {n: float(x) for n, x in zip(names, p)}} for t, p in zip(texts, probs)]
    if o.json:
        print_json({"predictions": rows})
    else:
        for r in rows:
            top = ", ".join(f"{n} {x:.3f}" for n, x in sorted(r["probabilities"].items(), key=lambda kv: -kv[1])[:3])
            print(f"{r['label']}\t{top}\t{r['text'][:60]!r}")
    return 0
