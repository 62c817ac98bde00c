"""lmforge embed: sentence embeddings from an encoder run."""

from __future__ import annotations

import json
from dataclasses import dataclass

from lmforge.cli.common import TextInputOptions
from lmforge.cli.options import flag
from lmforge.errors import UserError

HELP = "sentence embeddings from an encoder run"


@dataclass
class Options(TextInputOptions):
    batch_size: int = flag(32)
    json: bool = flag(False, help='print {"embeddings": [[...], ...]}')


def run(o: Options) -> int:
    """Sentence embeddings from an encoder run: mean of the last hidden states, L2-normalised."""
    from lmforge.embed import embed_texts
    from lmforge.runs import load_run

    texts = o.texts()
    loaded = load_run(o.run_dir)
    if not loaded.model.can_embed:
        raise UserError(f"embed needs an encoder run (arch bert); {o.run_dir} is a {loaded.config.arch} run")
    vectors = embed_texts(loaded.model, loaded.tokenizer, texts, batch_size=o.batch_size).tolist()
    if o.json:
        print(json.dumps({"model": str(o.run_dir), "dim": len(vectors[0]), "embeddings": vectors}))
    else:
        for text, v in zip(texts, vectors):
            head = ", ".join(f"{x:+.4f}" for x in v[:6])
            print(f"{text[:40]!r:<44} [{head}, ...] ({len(v)} dims)")
    return 0
