"""lmforge compress: a smaller, faster copy of a run (int8 weights, pruned MLP neurons), and a
report of what it cost."""

from __future__ import annotations

import copy
import dataclasses
import datetime
import shutil
from dataclasses import dataclass
from pathlib import Path

from lmforge.cli.common import print_json
from lmforge.cli.options import flag
from lmforge.errors import UserError

HELP = "quantise (int8) and/or prune a run into a new run directory, with a size/speed/quality report"
# The recovery fine-tune: windows of at most this many tokens, batches of at most this many, and
# at most this learning rate (a pretrained model's own rate, lowered, or this one).
RECOVER_WINDOW, RECOVER_BATCH, RECOVER_LR = 256, 8, 1e-4
INT8_MAX_ERROR = 0.1  # measured on SmolLM2-135M: bench/RESULTS.md §28


@dataclass
class Options:
    run_dir: str = flag(positional=True)
    out: str = flag(required=True, help="the compressed run directory (new or empty)")
    quantize: str | None = flag(choices=("int8",), help="int8: every Linear layer's weights as int8, one scale per "
                                "output channel, run by PyTorch's dynamic int8 kernels (CPU)")
    prune: float | None = flag(metavar="FRACTION", help="remove this fraction of every block's MLP neurons "
                               "(gpt, llama, bert), rebuilding the layers at the smaller width")
    prune_heads: float | None = flag(metavar="FRACTION", help="remove this fraction of every block's attention "
                                     "heads (llama; with grouped-query attention, of each group's query heads), "
                                     "rebuilding the projections at the smaller width")
    recover_seconds: float | None = flag(help="after pruning a language-model or classifier run: fine-tune it this "
                                         "many seconds on its own training data")
    data: str | None = flag(help="decoders: a prepared data directory (its val.bin) for the quality figures "
                            "and the recovery (default: the run's own)")
    int8_max_error: float = flag(INT8_MAX_ERROR, help="int8: a Linear layer whose relative output error on the "
                                 "run's validation inputs (int8 vs float) is above this stays float (default "
                                 f"{INT8_MAX_ERROR}; a large value makes every layer int8)")
    tolerance: float | None = flag(help="the quality loss tolerated before the verdict says so (default: 0.01 "
                                   "accuracy, 0.05 bits per byte)")
    batch_size: int = flag(16, help="batch N of the throughput figure")
    json: bool = flag(False)


def _write_run(src, dst: Path, model, cfg, quantized: bool) -> None:
    """A run directory in ``dst``: ``src``'s own files (tokenizer, labels, chat template), the
    compressed config and weights."""
    from lmforge import config as cfgmod
    from lmforge.compress.quantize import int8_state
    from lmforge.runs import RunDir
    from lmforge.train.checkpoint import save_model

    for name in (RunDir.TOKENIZER, RunDir.LABELS, RunDir.CHAT_TEMPLATE):
        if (src / name).is_file() and not (dst / name).is_file():
            shutil.copy2(src / name, dst / name)
    state = int8_state(model) if quantized else model.state_dict_for_save()
    save_model(model, dst / RunDir.MODEL, metadata={"format": "lmforge"}, state=state)
    cfgmod.save(cfg, dst / RunDir.CONFIG)


def _recover(pruned_dir: Path, out: Path, data: str, seconds: float, original_cfg, pruned_cfg) -> dict:
    """A short fine-tune of the pruned model (in ``pruned_dir``) on ``data`` into ``out``: a
    language model continued from it (``--init``), a classifier trained from its weights at its
    own settings (a third of its rate, no warm-up, the best validation weights kept)."""
    from lmforge import config as cfgmod
    from lmforge.train.checkpoint import load_model_state
    from lmforge.train.trainer import train

    t, m = original_cfg.train, original_cfg.model
    if original_cfg.task.name == "lm":
        cfg = cfgmod.build_config(task="lm", values={
            "task": {"init": str(pruned_dir), "seq_len": min(m.block_size, RECOVER_WINDOW)}, "data": {"path": data},
            "train": {"max_seconds": seconds, "max_steps": None, "lr": min(t.lr * 0.3, RECOVER_LR),
                      "batch_size": min(t.batch_size, RECOVER_BATCH), "warmup_steps": 0, "seed": t.seed}})
        summary = train(cfg, run_dir=out)
    else:  # a classifier: its head kept (a text one starts from the pruned run itself, --init)
        task = {"init": str(pruned_dir)} if hasattr(pruned_cfg.task, "init") else {}
        cfg = cfgmod.replace(pruned_cfg, data={"path": data}, task=task, train={
            "max_seconds": seconds, "max_steps": None, "lr": t.lr * 0.3, "warmup_steps": 0, "keep_best": True,
            "eval_interval": None, "tensorboard": False})
        summary = train(cfg, run_dir=out, start=load_model_state(pruned_dir / "model.safetensors"))
    return {"steps": summary.get("step") or summary.get("steps"), "seconds": seconds, "data": data}


def _compress(o: Options, src, model, cfg, w, tmp: Path, recover_data: str | None):
    """Prune (and recover), then quantise, ``model`` into the run directory ``tmp``; returns the
    compressed model, its config and what each step did."""
    import torch

    from lmforge import config as cfgmod
    from lmforge.compress import prune as prunemod
    from lmforge.compress import report
    from lmforge.compress.quantize import int8_errors, quantize_int8
    from lmforge.progress import status
    from lmforge.runs import RunDir, load_run

    steps = {"what": [], "prune": None, "int8": None}
    if o.prune is not None:
        status(f"pruning {o.prune:.0%} of the {w.units_name} of {o.run_dir}")
        with torch.inference_mode():
            model, info = prunemod.prune(model, o.prune, w.calibrate)
        cfg = dataclasses.replace(cfgmod.replace(cfg, compress={"prune": o.prune}), model=model.config)
        before, after = info["widths"]
        steps["what"].append(f"pruned {o.prune:.0%} of the {w.units_name} (widths {report.widths_text(before)} -> "
                             f"{report.widths_text(after)})")
        steps["prune"] = info
    if o.prune_heads is not None:
        status(f"pruning {o.prune_heads:.0%} of the attention heads of {o.run_dir}")
        with torch.inference_mode():
            model, heads = prunemod.prune_heads(model, o.prune_heads, w.calibrate)
        cfg = dataclasses.replace(cfgmod.replace(cfg, compress={"prune_heads": o.prune_heads}), model=model.config)
        steps["what"].append(f"pruned {o.prune_heads:.0%} of the attention heads ({heads['widths'][0][0]} -> "
                             f"{heads['widths'][1][0]} per block)")
        steps["prune_heads"] = heads
    if steps["prune"] or steps.get("prune_heads"):
        info = steps["prune"] or steps["prune_heads"]
        if recover_data is not None:
            staged = tmp.parent / f".{tmp.name}.pruned"
            staged.mkdir()
            try:
                _write_run(src.path, staged, model, cfg, quantized=False)
                info["recovery"] = _recover(staged, tmp, recover_data, o.recover_seconds, src.load_config(), cfg)
            finally:
                shutil.rmtree(staged, ignore_errors=True)
            model = load_run(tmp, device="cpu").model
            saved = RunDir(tmp).load_config()
            task = dataclasses.replace(saved.task, init=None) if hasattr(saved.task, "init") else saved.task
            cfg = dataclasses.replace(cfg, train=saved.train, task=task)
            steps["what"].append(f"recovered by {o.recover_seconds:g} s of fine-tuning")
    if o.quantize:
        errors = int8_errors(model, w.calibrate) if w.calibrate is not None else {}
        keep = sorted(n for n, e in errors.items() if e > o.int8_max_error)
        quantize_int8(model, keep)
        cfg = cfgmod.replace(cfg, compress={"quantize": o.quantize, "float_layers": keep})
        steps["int8"] = {"layers": len(errors) or None, "kept_float": keep, "max_error": o.int8_max_error,
                         "worst": sorted(errors.items(), key=lambda kv: -kv[1])[:5]}
        steps["what"].append("int8 weights (dynamic quantisation of the Linear layers" +
                             (f"; {len(keep)} of {len(errors)} kept float: int8 error above {o.int8_max_error:g}"
                              if keep else "") + ")")
    _write_run(src.path, tmp, model, cfg, quantized=bool(o.quantize))
    if o.quantize:  # the recovery's optimizer state belongs to float weights: no resume from int8
        for name in (RunDir.STATE_JSON, RunDir.STATE_TENSORS):
            (tmp / name).unlink(missing_ok=True)
    return model, cfg, steps


def run(o: Options) -> int:
    """Write a compressed copy of RUN_DIR to --out (int8 weights with --quantize, fewer MLP neurons
    with --prune, optionally recovered by a short fine-tune) that eval, predict, generate and serve
    load like any run, and compress_report.md/.json in it: both runs' size on disk, memory, latency
    at batch 1, throughput at batch N and validation quality side by side, with a verdict."""
    import torch

    from lmforge import config as cfgmod
    from lmforge.compress import prune as prunemod
    from lmforge.compress import report
    from lmforge.evaluate.report import cpu_name
    from lmforge.fsutil import atomic_dir, write_json
    from lmforge.progress import status
    from lmforge.runs import RunDir, load_run

    src = RunDir(o.run_dir)
    src.require()
    cfg = src.load_config()
    if not o.quantize and o.prune is None and o.prune_heads is None:
        raise UserError("give --quantize int8, --prune FRACTION and/or --prune-heads FRACTION")
    if cfg.compress.quantize:
        raise UserError(f"{o.run_dir} is already quantised ({cfg.compress.quantize}); compress its source run "
                        f"{cfg.compress.source or ''}".rstrip())
    if cfg.finetune.lora.r:
        raise UserError(f"{o.run_dir} holds LoRA adapters: merge them first (lmforge merge-lora)")
    if o.recover_seconds is not None and ((o.prune is None and o.prune_heads is None)
                                          or cfg.task.name not in ("lm", "image-classify", "classify")):
        raise UserError("--recover-seconds fine-tunes a pruned language-model run or classifier (--task lm, "
                        "image-classify, classify) on its training data")
    if o.recover_seconds is not None and not o.recover_seconds > 0:
        raise UserError(f"--recover-seconds must be positive, got {o.recover_seconds}")
    if not 1 <= o.batch_size <= report.MAX_BATCH:
        raise UserError(f"--batch-size must be in 1..{report.MAX_BATCH}, got {o.batch_size}")
    out = Path(o.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out {out} exists and is not empty; choose a new directory")
    torch.manual_seed(0)
    original = load_run(o.run_dir, device="cpu")
    w = report.workload_for(original, o.data)
    model = copy.deepcopy(original.model)  # the original stays as it is: it is measured beside the result
    new_cfg = cfgmod.replace(cfg, compress={"source": str(src.path.resolve())})
    if o.prune is not None:  # a bad fraction or an unprunable family fails before any work
        widths = ([model.mlp_neurons()[0][1].in_features] if hasattr(model, "mlp_neurons") else
                  [width for width, _ in model.prunable_layers()] if hasattr(model, "prunable_layers") else None)
        if widths is None:
            raise UserError(f"--prune thins transformers (MLP neurons), CNNs (channels) and MLPs (units); "
                            f"{o.run_dir} is a {cfg.arch} run")
        for width in widths:
            prunemod.kept_width(width, o.prune)
    if o.prune_heads is not None:
        if not hasattr(model, "attention_layers"):
            raise UserError(f"--prune-heads removes attention heads of Llama-family decoders; {o.run_dir} is a "
                            f"{cfg.arch} run")
        attn = model.attention_layers()[0]
        prunemod.kept_heads(attn.n_head, attn.n_kv_head, o.prune_heads)
    recover_data = None
    if o.recover_seconds is not None:
        recover_data = o.data or src.data_path()
        if not recover_data:
            raise UserError("--recover-seconds needs the run's training data: give --data DIR")
    with atomic_dir(out) as tmp:
        model, new_cfg, steps = _compress(o, src, model, new_cfg, w, tmp, recover_data)
        status("measuring the original and the compressed run (size, memory, latency, throughput, quality)")
        compressed = load_run(tmp, device="cpu")
        threads = torch.get_num_threads()
        figures = {}
        for name, r in (("original", original), ("compressed", compressed)):
            figures[name] = report.measure(r, w, o.batch_size)
            figures[name]["peak_memory_mb"] = report.peak_memory_mb(r.path, o.batch_size, o.data)
        what = "; ".join(steps["what"])
        result = {"source": str(o.run_dir), "out": str(out), "what": what[:1].upper() + what[1:],
                  "date": datetime.date.today().isoformat(), "device": f"{cpu_name()}, {threads} threads",
                  "kind": w.kind, **figures, "prune": steps["prune"], "prune_heads": steps.get("prune_heads"),
                  "int8": steps["int8"],
                  "verdict": report.verdict(figures["original"], figures["compressed"], w, o.tolerance)}
        (tmp / RunDir.COMPRESS_REPORT).write_text(report.markdown(result), encoding="utf-8")
        write_json(tmp / RunDir.COMPRESS_REPORT_JSON, result)
    if o.json:
        print_json(result)
        return 0
    o_, c_ = result["original"], result["compressed"]
    print(f"compressed {o.run_dir} -> {out}: {result['what']}")
    print(f"size {o_['size_mb']:.2f} -> {c_['size_mb']:.2f} MiB; batch-1 latency {o_['latency_ms']:.2f} -> "
          f"{c_['latency_ms']:.2f} ms")
    print(result["verdict"]["line"])
    print(f"report: {out / RunDir.COMPRESS_REPORT}")
    return 0
