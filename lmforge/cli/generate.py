"""lmforge generate: stream a continuation of a prompt, or sample a GAN run's images into a grid."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from lmforge.cli.common import DECODE_COMPILE_HELP
from lmforge.cli.options import flag
from lmforge.errors import UserError

HELP = "stream a continuation of a prompt (a GAN run: a grid of sampled images)"


@dataclass
class Options:
    run_dir: str = flag(positional=True)
    prompt: str | None = flag(help="the text to continue (text generators)")
    max_new_tokens: int = flag(200)
    temperature: float = flag(0.8, help="0 for greedy")
    top_k: int | None = flag()
    top_p: float | None = flag()
    seed: int | None = flag()
    stop: list[str] | None = flag(append=True, metavar="STR", help="stop before this string (repeatable)")
    compile: bool = flag(False, help=DECODE_COMPILE_HELP)
    n: int = flag(64, help="GAN runs: images to sample")
    out: str | None = flag(help="GAN runs: the PNG grid of the samples to write")


def sample_images(o: Options, loaded) -> int:
    """A GAN run: ``--n`` samples (from ``--seed``) as a PNG grid at ``--out``."""
    import torch

    from lmforge.tasks.gan import sample_grid

    if not o.out:
        raise UserError(f"{o.run_dir} is a GAN run: give --out GRID.png (and --n, --seed) to sample images")
    if not 1 <= o.n <= 4096:
        raise UserError(f"--n must be in 1..4096, got {o.n}")
    gen = torch.Generator().manual_seed(o.seed if o.seed is not None else 0)
    sample_grid(loaded.model, loaded.model.noise(o.n, gen), Path(o.out), f"{o.n} samples of {o.run_dir}"
                + (f" (seed {o.seed})" if o.seed is not None else ""))
    print(f"wrote {o.n} samples to {o.out}")
    return 0


def run(o: Options) -> int:
    """Stream a continuation of --prompt to stdout."""
    from lmforge.data.tokenizer import eot_id
    from lmforge.generate import SamplingParams, stream_text
    from lmforge.runs import load_run

    if o.max_new_tokens <= 0:
        raise UserError("--max-new-tokens must be positive")
    if not o.temperature >= 0:  # also NaN
        raise UserError("--temperature must be >= 0 (0 is greedy)")
    if o.seed is not None and not -(2**63) <= o.seed < 2**63:
        raise UserError("--seed must fit in 64 bits")
    if o.top_p is not None and not 0 < o.top_p <= 1:
        raise UserError("--top-p must be in (0, 1]")
    loaded = load_run(o.run_dir)
    if getattr(loaded.model, "can_sample_images", False):
        return sample_images(o, loaded)
    if o.prompt is None:
        raise UserError("--prompt is required (the text to continue)")
    if not loaded.model.can_generate or getattr(loaded.model.config, "num_labels", 0):
        kind = loaded.config.task.name
        verbs = "predict, eval and serve (/v1/classify)" if "classify" in kind else "embed, eval and serve"
        raise UserError(f"{o.run_dir} is a {kind} run ({loaded.config.arch}), not a text generator: "
                        f"it is served by {verbs}")
    sys.stdout.write(o.prompt)
    for piece in stream_text(loaded.model, loaded.tokenizer, o.prompt, SamplingParams(
            max_tokens=o.max_new_tokens, temperature=o.temperature, top_k=o.top_k, top_p=o.top_p, seed=o.seed,
            eos_id=eot_id(loaded.tokenizer), stop=tuple(o.stop or ())), compile=o.compile):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0
