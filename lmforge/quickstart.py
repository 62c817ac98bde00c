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
               vocab_size: int = 8192) -> dict:
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
