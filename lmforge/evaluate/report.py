"""Run reports: ``plots/loss.png`` from ``metrics.jsonl`` and ``report.md`` from the run's facts."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

from lmforge.fsutil import atomic_path, write_text


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The rows of ``metrics.jsonl``; a line a kill tore (not JSON) is skipped."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def plot_loss(run_dir: str | Path) -> Path | None:
    """Train and validation loss against tokens (or examples) seen -> ``plots/loss.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(run_dir)
    x = next((k for k in ("tokens", "examples") if rows and k in rows[0]), "step")  # the task's unit
    train = [(r[x], r["loss"]) for r in rows if "loss" in r]
    val = [(r[x], r["val_loss"]) for r in rows if "val_loss" in r]
    if not train and not val:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    if train:
        ax.plot(*zip(*train), label="train", lw=1.2, alpha=0.8)
    if val:
        ax.plot(*zip(*val), "o-", label="validation", lw=1.6, ms=4)
    ax.set_xlabel(f"{x} seen" if x != "step" else "step")
    ax.set_ylabel("loss (nats / token)" if x == "tokens" else "loss (nats)")
    ax.set_title(f"{Path(run_dir).name}: loss")
    ax.grid(alpha=0.3)
    ax.legend()
    return save_figure(fig, Path(run_dir) / "plots" / "loss.png")


def step_axes(*axes) -> None:
    """Axes plotted against the training step: labelled, gridded, with their legends."""
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend()


def save_figure(fig, path: Path, **savefig) -> Path:
    """Lay out ``fig``, write it to ``path`` as PNG atomically (its folder made) and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", **savefig)
    plt.close(fig)
    return path


def cpu_name() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def hardware() -> str:
    """CPU model and core count (and GPU, if any), for reports."""
    import torch

    desc = f"{cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"
    if torch.cuda.is_available():
        desc += f"; {torch.cuda.get_device_name()}"
    return desc


def describe_model(arch: str, m: dict) -> str:
    """One line of a token model's shape, e.g. ``gpt: 2 layers, 3 heads, width 192, context 256, ...``."""
    parts = [f"{m['n_layer']} layers"]
    if "n_head" in m:
        parts.append(f"{m['n_head']} heads")
    parts.append(f"width {m['n_embd']}")
    if "n_hidden" in m:  # recurrent: the window gradients flow through, not a context limit
        parts += [f"hidden {m['n_hidden']}", f"training window {m['block_size']}"]
    else:
        parts.append(f"context {m['block_size']}")
    return f"{arch}: " + ", ".join(parts + [f"vocabulary {m['vocab_size']:,}"])


def write_report(run_dir: str | Path, *, metrics: dict, params: int, data_meta: dict | None,
                 train_state: dict, config: dict, samples: list[tuple[str, str]]) -> Path:
    """Write ``report.md``: data, model, hardware, time, metrics beside the lzma baseline, samples."""
    run_dir = Path(run_dir)
    m, t = config["model"], config["train"]
    lines = [f"# Run report: {run_dir.name}", ""]
    if data_meta:
        val = data_meta["splits"]["val"]
        lines += ["## Data", "",
                  f"- inputs: {', '.join(data_meta['inputs'])} ({data_meta['documents']:,} documents, "
                  f"{data_meta['bytes']:,} bytes, {data_meta['tokens']:,} tokens)",
                  f"- tokenizer: byte-level BPE, vocabulary {data_meta['vocab_size']:,}, "
                  f"{data_meta['bytes_per_token']} bytes/token",
                  f"- validation: {val['documents']:,} documents ({val['bytes']:,} bytes), split "
                  f"{data_meta['split_unit']} — never seen in training", ""]
    lines += ["## Model and training", "",
              f"- {describe_model(config.get('arch', 'gpt'), m)}: {params:,} parameters",
              f"- {train_state['step']:,} steps of {t['batch_size']}×{t['grad_accum']} sequences, "
              f"{train_state['tokens_seen']:,} tokens seen, {train_state.get('train_seconds', 0):.0f} s of training",
              f"- hardware: {hardware()}", "",
              "## Validation metrics", "",
              "| metric | value |", "|---|---:|",
              f"| loss (nats/token) | {metrics['val_loss']:.4f} |",
              f"| perplexity | {metrics['val_ppl']:.2f} |",
              f"| bits per byte (model) | {metrics['val_bpb']:.4f} |",
              f"| bits per byte (lzma -9e, same text as one stream) | {metrics['lzma_bpb']:.4f} |",
              f"| bits per byte (lzma -9e, each document alone) | {metrics['lzma_doc_bpb']:.4f} |",
              *([f"| bits per byte (model adapting as it reads: dynamic evaluation, Adam lr "
                 f"{metrics['dynamic_lr']:g}) | {metrics['dynamic_val_bpb']:.4f} |"]
                if "dynamic_val_bpb" in metrics else []),
              f"| tokens / bytes scored | {metrics['val_tokens']:,} / {metrics['val_bytes']:,} |", "",
              ("The model compresses held-out text better than lzma." if metrics["val_bpb"] < metrics["lzma_bpb"]
               else "The model does **not** yet beat lzma on held-out text; train longer or larger."), "",
              "![loss](plots/loss.png)", ""]
    if samples:
        lines += ["## Samples", ""]
        for prompt, text in samples:
            lines += [f"Prompt `{prompt!r}`:", "", "```", prompt + text, "```", ""]
    path = run_dir / "report.md"
    write_text(path, "\n".join(lines))
    return path
