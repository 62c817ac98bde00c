"""lmforge train: train or resume a model on a task (lm, mlm, classify, image-classify, sft, dpo, gan, embed) in the one
training loop."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from lmforge.cli.common import print_json
from lmforge.cli.options import config_values, flag
from lmforge.errors import UserError

HELP = "train or resume a model on a task (lm, mlm, classify, image-classify, sft, dpo, gan, embed)"
CLASSIFY = "fine-tuning (--task classify; --init, --val, --val-fraction, --epochs, --max-length also sft and dpo)"


@dataclass
class Options:
    data: str | None = flag(config="data.path", help="lm/mlm: data directory from `lmforge prepare`; classify: a "
                            "labelled .csv/.jsonl; image-classify: a `prepare --kind images` directory (recorded "
                            "in the run: --resume needs no --data)")
    out: str = flag(None, required=True, help="run directory")
    preset: str | None = flag(help="debug, nano, micro, gpt2-124m; encoders: bert-debug, bert-mini, bert-base; "
                              "images: keras-mnist, keras-cifar, cnn-small, resnet-small, mlp")
    model: str | None = flag(help="model family (gpt, llama, bert, cnn, mlp; default: the preset's or the task's)")
    config: str | None = flag(help="YAML file with task:, model:, data: and train: sections")
    set: list[str] | None = flag(append=True, metavar="KEY=VALUE", help="override, e.g. train.lr=3e-4 (repeatable)")
    max_steps: int | None = flag(config="train.max_steps", help="length of the schedule in optimizer steps")
    max_seconds: float | None = flag(config="train.max_seconds",
                                     help="time budget; without --max-steps the schedule is planned to fit it")
    stop_at: int | None = flag(help="stop this invocation at this step (checkpointed; --resume continues)")
    resume: bool = flag(False, help="continue from the run directory's checkpoint")
    json: bool = flag(False)
    task: str | None = flag(choices=["lm", "mlm", "classify", "image-classify", "sft", "dpo", "gan", "embed"],
                            help="lm: next-token (GPT, the default); mlm: masked-token (BERT presets); classify: "
                            "fine-tune a text classifier; image-classify: a CNN or MLP on images; sft: instruction-"
                            "tune a decoder (--init) on conversations (JSONL); dpo: preference-tune it on "
                            "prompt/chosen/rejected pairs (JSONL); gan: a DCGAN on images; embed: fine-tune "
                            "sentence embeddings (an encoder, --init) on query/positive pairs (.csv/.jsonl)")
    early_stop: str | None = flag(config="train.early_stop", help="validation metric that picks the best "
                                  "checkpoint and stops early (classify: macro_f1 (default), accuracy, weighted_f1, "
                                  "roc_auc, loss)")
    patience: int | None = flag(config="train.patience",
                                help="evaluations without improvement before stopping (classify: 3)")
    init: str | None = flag(config="task.init", group=CLASSIFY, help="run directory or Hugging Face directory to "
                            "fine-tune (classify: default the bundled all-MiniLM-L6-v2)")
    val: str | None = flag(config="data.val", group=CLASSIFY,
                           help="validation file (default: a stratified --val-fraction of --data)")
    val_fraction: float | None = flag(config="task.val_fraction", group=CLASSIFY,
                                      help="without --val: the share of --data held out, stratified, to pick the "
                                      "best checkpoint (default 0.15; 0: no validation; every epoch runs and the "
                                      "last weights are kept)")
    test: str | None = flag(config="data.test", group=CLASSIFY, help="test file, evaluated once with the best "
                            "checkpoint")
    text_column: str | None = flag(config="task.text_column", group=CLASSIFY, help="default: text")
    label_column: str | None = flag(config="task.label_column", group=CLASSIFY, help="default: label")
    class_weights: str | None = flag(config="task.class_weights", group=CLASSIFY, choices=["auto", "none"],
                                     help="auto: inverse class frequency in the loss")
    oversample: bool = flag(False, config="task.oversample", group=CLASSIFY,
                            help="class-balanced sampling of training examples")
    epochs: int | None = flag(config="task.epochs", group=CLASSIFY,
                              help="the schedule's length without --max-steps (default 3)")
    max_length: int | None = flag(config="task.max_length", group=CLASSIFY,
                                  help="tokens per text (longer texts are truncated; default 128)")


PATH_KEYS = {("data", "path"), ("data", "val"), ("data", "test"), ("task", "init")}


def build_config(o: Options):
    """The run's config: a fresh one from preset, file and flags, or the saved one on --resume
    (which task and data flags may repeat but not change)."""
    from lmforge import config as cfgmod
    from lmforge.runs import RunDir

    values = config_values(o)
    if o.max_seconds is not None and o.max_steps is None and not o.resume:
        values["train"]["max_steps"] = None  # plan the schedule to fit the budget
    if not o.resume:
        return cfgmod.build_config(o.preset, o.config, o.set, task=o.task, values=values, arch=o.model)
    run = RunDir(o.out)
    if not run.is_run():
        raise UserError(f"--resume: no checkpoint in {o.out}")
    if o.preset or o.config or (o.model and o.model != run.load_config().arch):
        raise UserError("--resume continues the saved config; --preset/--config/--model cannot change it")
    cfg = run.load_config()
    if o.task and o.task != cfg.task.name:
        raise UserError(f"--resume: {o.out} is a {cfg.task.name} run, not --task {o.task}")
    if cfg.data.path is None:  # a run from before configs recorded their data: its trainer state has it
        cfg = cfgmod.replace(cfg, data={"path": values.get("data", {}).get("path") or run.data_path()})
    for section in ("task", "data"):  # what is learned from what cannot change; repeating it is fine
        for key, given in values.pop(section, {}).items():
            saved = getattr(getattr(cfg, section), key)
            if (section, key) in PATH_KEYS:
                given, saved = str(Path(given).resolve()), saved and str(Path(saved).resolve())
            elif key == "max_length":
                given = min(given, cfg.model.block_size)
            if given != saved:
                raise UserError(f"--resume continues the saved config: {section}.{key} is {saved!r}, not {given!r}")
    patch = cfgmod.parse_overrides(o.set or [])
    if "model" in patch or "finetune" in patch:
        raise UserError("--resume cannot change model.* or finetune.* settings")
    for section, kv in values.items():
        patch.setdefault(section, {}).update(kv)
    if patch:
        cfgmod.apply_dict(cfg, patch, "--set")
        cfgmod.validate(cfg)
    return cfg


def print_classifier_summary(s: dict) -> None:
    v = s["validation"]
    print(f"{'trained' if s['arch'] in ('cnn', 'mlp') else 'fine-tuned'} {s['run_dir']}: {s['arch']} classifier, {len(s['labels'])} classes, "
          + (f"best step {s['best_step']}/{s['steps']} ({s['stopped_by']}); validation accuracy "
             f"{v['accuracy']:.4f}, macro F1 {v['macro_f1']:.4f}" if v else
             f"{s['steps']} steps ({s['stopped_by']}), no validation: last weights kept")
          + (f"; test macro F1 {s['test']['macro_f1']:.4f}" if "test" in s else ""))
    if (Path(s["run_dir"]) / "report.md").is_file():  # no validation and no --test: nothing to report on
        print(f"report: {Path(s['run_dir']) / 'report.md'}")


def _already_complete(o: Options, cfg) -> bool:
    """Say so (and do nothing) when --resume meets a run that reached the end of its schedule."""

    from lmforge.runs import RunDir

    step = (RunDir(o.out).trainer_state() or {}).get("step")
    if step is None or cfg.train.max_steps is None or step < cfg.train.max_steps:
        return False
    if o.json:
        print_json({"run_dir": o.out, "step": step, "max_steps": cfg.train.max_steps, "stopped_by": "complete"})
    else:
        print(f"{o.out} is already complete (step {step}/{cfg.train.max_steps}): nothing to resume; "
              "give a larger --max-steps with --resume to train on, or start a new run")
    return True


def run(o: Options) -> int:
    """Train (or --resume) a model on a task: lm (next-token, GPT presets) or mlm (masked-token,
    BERT presets) on a prepared data directory, or classify: fine-tune a classifier from --init on
    a labelled CSV/JSONL file. Every task runs in the same loop: --stop-at/--resume are exact,
    Ctrl-C checkpoints, gradient accumulation, torchrun DDP/FSDP, metrics.jsonl (and TensorBoard
    with --set train.tensorboard=true)."""
    from lmforge.train.trainer import train

    cfg = build_config(o)
    if o.resume and _already_complete(o, cfg):
        return 0
    summary = train(cfg, run_dir=o.out, resume=o.resume, stop_at=o.stop_at)
    if summary.get("rank", 0) != 0:  # under torchrun, process 0 speaks for all
        return 130 if summary["stopped_by"] == "interrupted" else 0
    if o.json:
        print_json(summary)
    elif cfg.task.name in ("classify", "image-classify") and summary["stopped_by"] not in ("stop_at", "interrupted"):
        print_classifier_summary(summary)
    else:
        from lmforge.tasks import TASKS

        # The loss, or the task's first validation figure when it has no validation loss (a GAN's).
        key = next((f"val_{m}" for m in ("loss",) + TASKS[cfg.task.name].METRICS
                    if summary.get(f"val_{m}") is not None), "val_loss")
        val = f"{summary[key]:.4f}" if summary.get(key) is not None else "n/a"
        unit = "tokens" if "tokens_seen" in summary else "examples"
        print(f"trained {summary['run_dir']}: step {summary['step']}/{summary['max_steps']} "
              f"({summary['stopped_by']}), {key} {val}, {summary[unit + '_seen']:,} {unit}, "
              f"{summary[unit + '_per_second']:,.0f} {unit}/s, {summary['params']:,} params")
    if summary["stopped_by"] == "interrupted":
        print(f"interrupted at step {summary['step']}: checkpoint saved; continue with "
              f"`lmforge train --out {o.out} --resume`", file=sys.stderr)
        return 130
    return 0
