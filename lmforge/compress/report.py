"""The regression report of ``lmforge compress``: the original run and the compressed one side by
side, measured in the same process on the same inputs — size on disk, weights in memory, peak
resident memory of a process that loads the run and runs one batch, latency at batch 1,
throughput at batch N, and the task's quality metric on the run's own validation data.

A workload is what one task's model is timed on: a text classifier classifies validation texts,
an image classifier validation images, a decoder runs a forward over token windows (prefill) and
decodes greedily at batch 1. The quality metric is accuracy and macro F1 (classifiers) or bits per
byte of validation text (decoders); ``verdict`` compares its change with the tolerance.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from lmforge.errors import UserError

REPEATS = 5  # timed repetitions of each measurement at least (the median is reported), after one warm-up
MIN_TIMED = 0.5  # seconds of timed repetitions at least (fast models repeat more)
MAX_EXAMPLES = 1000  # validation examples a classifier's quality is measured on
MAX_TOKENS = 16384  # validation tokens a decoder's bits per byte is measured on
DECODE_TOKENS = 32
MAX_BATCH = 64  # the largest batch N of the throughput figure
# The tolerated quality loss per metric (absolute): accuracy points, bits per byte.
TOLERANCE = {"accuracy": 0.01, "val_bpb": 0.05}


@dataclass
class Workload:
    """What a model is timed and scored on. ``batch(model, n)`` runs one batch of ``n`` inputs;
    ``quality(model)`` returns the task's metrics; ``unit`` names what the batch counts."""

    kind: str
    batch: Callable[[torch.nn.Module, int], None]
    quality: Callable[[torch.nn.Module], dict] | None
    unit: str
    primary: str  # the quality metric the verdict reads
    higher_is_better: bool
    decode: Callable[[torch.nn.Module], float] | None = None  # tokens/s of greedy decoding at batch 1
    calibrate: Callable[[torch.nn.Module], None] | None = None  # inputs for pruning's importance scores
    per_input: int = 1  # units per batch item (a decoder's item is a window of tokens)
    units_name: str = "MLP neurons"  # what --prune removes from this kind of model


def text_classifier_workload(run) -> Workload:
    from lmforge.data.tokenizer import encode_batch
    from lmforge.tasks.classify import evaluate_examples, split_examples

    cfg = run.config
    _, val = split_examples(cfg)
    if val is None:
        raise UserError(f"{run.path} has no validation data to measure quality on (it was trained without any)")
    val.texts, val.labels = val.texts[:MAX_EXAMPLES], val.labels[:MAX_EXAMPLES]
    length = min(cfg.task.max_length, run.model.config.block_size)
    texts = (val.texts * (MAX_BATCH // len(val.texts) + 1))[:MAX_BATCH]

    def batch(model, n):
        ids, mask = encode_batch(run.tokenizer, texts[:n], length)
        model.classify(ids, mask)

    def calibrate(model):
        for i in range(0, min(len(val.texts), 256), 32):
            ids, mask = encode_batch(run.tokenizer, val.texts[i:i + 32], length)
            model.classify(ids, mask)

    def quality(model):
        m = evaluate_examples(model, run.tokenizer, val, run.labels, length, torch.device("cpu"))
        return {k: m[k] for k in ("accuracy", "macro_f1")} | {"n": len(val)}

    return Workload("text-classifier", batch, quality, "texts", "accuracy", True, calibrate=calibrate)


def image_classifier_workload(run) -> Workload:
    from lmforge.data.images import ImageData
    from lmforge.evaluate.classify import classification_metrics
    from lmforge.models.vision import pixels_to_input
    from lmforge.tasks.images import predict_images

    x, y = ImageData.open(run.config.data.path).split("val")
    x, y = np.array(x[:MAX_EXAMPLES]), y[:MAX_EXAMPLES]
    pixels = pixels_to_input(torch.from_numpy(np.resize(x, (MAX_BATCH, *x.shape[1:]))))

    def batch(model, n):
        model.classify(pixels[:n])

    def quality(model):
        m = classification_metrics(y, predict_images(model, x, torch.device("cpu")), run.labels)
        return {k: m[k] for k in ("accuracy", "macro_f1")} | {"n": len(y)}

    def calibrate(model):
        model.eval()
        model.classify(pixels_to_input(torch.from_numpy(x[:256])))

    units = "hidden units" if run.config.arch == "mlp" else "convolution channels"
    return Workload("image-classifier", batch, quality, "images", "accuracy", True, calibrate=calibrate,
                    units_name=units)


def decoder_workload(run, data_dir: str | None) -> Workload:
    from lmforge.data.tokens import TokenFile, load_meta
    from lmforge.evaluate.lm import evaluate_lm
    from lmforge.generate import generate_ids

    T = min(128, run.model.config.block_size)
    tokens = None
    data_dir = data_dir or run.dir.data_path()
    if data_dir and (Path(data_dir) / "val.bin").is_file():
        if (Path(data_dir) / "tokenizer.json").read_bytes() != run.dir.tokenizer.read_bytes():
            raise UserError(f"{data_dir} was tokenized with another tokenizer than {run.path}'s; prepare it with "
                            f"`lmforge prepare --tokenizer {run.path} ...`")
        tokens = TokenFile(Path(data_dir) / "val.bin", load_meta(data_dir)["dtype"])
    g = torch.Generator().manual_seed(0)
    if tokens is not None and len(tokens) > 2 * T:
        starts = torch.randint(0, len(tokens) - T, (MAX_BATCH,), generator=g)
        windows = torch.stack([torch.from_numpy(np.array(tokens.data[s:s + T], dtype=np.int64)) for s in starts])
    else:
        windows = torch.randint(0, run.model.config.vocab_size, (MAX_BATCH, T), generator=g)

    def batch(model, n):
        model(windows[:n], last_only=True)

    def decode(model):
        t = time.perf_counter()
        for _ in generate_ids(model, windows[:1, :16], DECODE_TOKENS, temperature=0.0):
            pass
        return DECODE_TOKENS / (time.perf_counter() - t)

    def calibrate(model):
        model(windows[:8])

    quality = None
    if tokens is not None:
        def quality(model):
            m = evaluate_lm(model, run.tokenizer, tokens, max_tokens=MAX_TOKENS)
            return {k: m[k] for k in ("val_bpb", "val_loss", "val_tokens")}

    return Workload("decoder", batch, quality, "tokens", "val_bpb", False, decode=decode, calibrate=calibrate,
                    per_input=T)


def workload_for(run, data_dir: str | None = None) -> Workload:
    from lmforge.runs import answer_kind

    kind = answer_kind(run.config.task.name, run.model.can_generate)
    if kind == "text-classifier":
        return text_classifier_workload(run)
    if kind == "image-classifier":
        return image_classifier_workload(run)
    if kind == "decoder":
        return decoder_workload(run, data_dir)
    raise UserError(f"compress measures classifier and decoder runs; {run.path} is a {run.config.task.name} run")


def _median_seconds(fn: Callable[[], None]) -> float:
    """The median time of ``fn`` after a warm-up: at least ``REPEATS`` calls, and more (up to 200)
    until they add up to ``MIN_TIMED`` seconds, so sub-millisecond models are not timed on noise."""
    fn()  # warm-up (first-call allocation, kernel selection)
    times: list[float] = []
    while len(times) < REPEATS or (sum(times) < MIN_TIMED and len(times) < 200):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


@torch.inference_mode()
def measure(run, w: Workload, batch_n: int) -> dict:
    """Every figure of one run (see the module docstring); the run's model on the CPU."""
    from lmforge.compress.quantize import weights_bytes

    model = run.model
    lat = _median_seconds(lambda: w.batch(model, 1))
    big = _median_seconds(lambda: w.batch(model, batch_n))
    out = {"size_mb": run.dir.model.stat().st_size / 2**20, "weights_mb": weights_bytes(model) / 2**20,
           "latency_ms": 1000 * lat, f"throughput_{w.unit}_per_s": batch_n * w.per_input / big, "batch": batch_n,
           "per_input": w.per_input}
    if w.decode is not None:
        w.decode(model)  # warm-up
        out["decode_tokens_per_s"] = statistics.median(w.decode(model) for _ in range(3))
    out["quality"] = w.quality(model) if w.quality is not None else None
    return out


def own_peak_mb() -> float:
    """This process's peak resident memory (MiB). Linux's ``VmHWM`` is the high-water mark of this
    program alone; ``ru_maxrss`` would also count the parent's peak before the exec."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_memory_mb(run_dir: Path, batch_n: int, data_dir: str | None) -> float | None:
    """Peak resident memory (MiB) of a fresh process that loads the run and runs one batch."""
    code = ("import sys, torch; from lmforge.runs import load_run; "
            "from lmforge.compress.report import workload_for, own_peak_mb; "
            "r = load_run(sys.argv[1], device='cpu'); w = workload_for(r, sys.argv[3] or None); "
            "torch.inference_mode().__enter__(); w.batch(r.model, int(sys.argv[2])); print(own_peak_mb())")
    p = subprocess.run([sys.executable, "-c", code, str(run_dir), str(batch_n), data_dir or ""],
                       capture_output=True, text=True, timeout=600)
    try:
        return float(p.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return None


def verdict(original: dict, compressed: dict, w: Workload, tolerance: float | None) -> dict:
    """The quality change of the primary metric and whether it stays within the tolerance."""
    if original["quality"] is None or compressed["quality"] is None:
        return {"metric": None, "change": None, "tolerance": None, "within": None,
                "line": "quality not measured: this run has no validation data (give --data)"}
    a, b = original["quality"][w.primary], compressed["quality"][w.primary]
    change = b - a
    loss = -change if w.higher_is_better else change
    tol = TOLERANCE[w.primary] if tolerance is None else tolerance
    within = loss <= tol
    speed = original["latency_ms"] / compressed["latency_ms"]
    size = compressed["size_mb"] / original["size_mb"]
    line = (f"{w.primary} {a:.4f} -> {b:.4f} ({change:+.4f}; tolerance {tol:g}): "
            + ("within tolerance" if within else "QUALITY DROPPED MORE THAN THE TOLERANCE")
            + f"; {speed:.2f}x the batch-1 speed at {size:.0%} of the size on disk")
    return {"metric": w.primary, "change": change, "tolerance": tol, "within": within, "line": line}


def markdown(result: dict) -> str:
    o, c = result["original"], result["compressed"]
    rows = [("size on disk (MiB)", "size_mb"), ("weights in memory (MiB)", "weights_mb"),
            ("peak memory, load + one batch (MiB)", "peak_memory_mb"),
            ("latency, batch 1" + (f" of {o['per_input']} tokens" if o.get("per_input", 1) > 1 else "") + " (ms)",
             "latency_ms")]
    rows += [(f"throughput, batch {o['batch']} ({k.split('_')[1]}/s)", k) for k in o if k.startswith("throughput_")]
    if "decode_tokens_per_s" in o:
        rows.append(("greedy decoding, batch 1 (tokens/s)", "decode_tokens_per_s"))
    lines = [f"# Compression report: {result['source']} -> {result['out']}", "",
             f"{result['what']}. Measured {result['date']} on {result['device']}, both runs in the same "
             f"process on the same inputs (the median of at least {REPEATS} timed repetitions, and at least "
             f"{MIN_TIMED:g} s of them, after a warm-up).", "",
             "| | original | compressed | change |", "|---|---:|---:|---:|"]
    for name, key in rows:
        a, b = o.get(key), c.get(key)
        if a is None or b is None:
            continue
        lines.append(f"| {name} | {a:,.2f} | {b:,.2f} | {b / a:.2f}x |")
    if o["quality"] is not None and c["quality"] is not None:
        for k, a in o["quality"].items():
            if k in ("n", "val_tokens"):
                continue
            lines.append(f"| {k} (validation) | {a:.4f} | {c['quality'][k]:.4f} | {c['quality'][k] - a:+.4f} |")
    lines += ["", f"**{result['verdict']['line']}**", ""]
    if result.get("int8") and result["int8"]["layers"]:
        q = result["int8"]
        worst = ", ".join(f"{n} {e:.3f}" for n, e in q["worst"][:3])
        lines += [f"int8: {q['layers'] - len(q['kept_float'])} of {q['layers']} Linear layers int8; "
                  f"{len(q['kept_float'])} kept float, their output error on validation inputs above "
                  f"{q['max_error']:g} (the largest: {worst}).", ""]
    for key, what in (("prune", "widths"), ("prune_heads", "attention heads per block")):
        p = result.get(key)
        if not p:
            continue
        before, after = p["widths"]
        lines += [f"Pruning: {what} {widths_text(before)} -> {widths_text(after)} "
                  f"(importance from {p['importance']}); parameters {p['params'][0]:,} -> {p['params'][1]:,}."]
        if p.get("recovery"):
            r = p["recovery"]
            lines += [f"Recovery fine-tune: {r['steps']} steps in {r['seconds']:.0f} s on {r['data']}."]
        lines.append("")
    return "\n".join(lines) + "\n"


def widths_text(widths: list[int]) -> str:
    """Layer widths as read: one number when every layer has it, else each."""
    return str(widths[0]) if len(set(widths)) == 1 else "/".join(map(str, widths))
