"""lmforge eval: a run's figures on its validation data, with report.md and plots."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lmforge.cli.common import print_json
from lmforge.cli.options import flag
from lmforge.errors import UserError

HELP = "validation loss, perplexity, bits/byte vs lzma; report.md"


@dataclass
class Options:
    run_dir: str = flag(positional=True)
    data: str | None = flag(help="data directory (default: the one the run was trained on)")
    batch_size: int = flag(8)
    max_tokens: int | None = flag(help="score at most this many validation tokens")
    stride: int | None = flag(help="tokens between window starts (default: the context length, i.e. consecutive "
                              "windows; smaller gives each token more context at more cost)")
    samples: int = flag(3, help="samples in report.md, each continuing the opening of a validation document")
    prompt: list[str] | None = flag(append=True, metavar="TEXT", help="continue this text in report.md instead "
                                    "(repeatable)")
    dynamic: bool = flag(False, help="also dynamic evaluation: one Adam step on each window after scoring it, so "
                         "the model adapts to the text as lzma does (dynamic_val_bpb)")
    dynamic_lr: float | None = flag(help="Adam learning rate for --dynamic (default 1e-4)")
    text_column: str | None = flag(help="classifier runs: text column of --data (default: the run's)")
    label_column: str | None = flag(help="classifier runs: label column of --data (default: the run's)")
    max_length: int | None = flag(help="classifier runs: tokens per text (default: the run's)")
    task: str | None = flag(choices=["sft"], help="sft: the mean loss over the assistant tokens of the "
                            "conversations in --data (JSONL), for any decoder run")
    split: str = flag("test", choices=["test", "val", "train"],
                      help="image classifier runs: the split of the data directory to evaluate")
    canaries: str | None = flag(metavar="FILE", help="text generators: the exposure of each planted secret, one "
                                "line per canary with the secret in braces ('the code is {839201}'); Carlini et al.")
    candidates: int = flag(1000, help="--canaries: random secrets each canary is ranked among")
    json: bool = flag(False)


def evaluation_dir(run, data: str | Path) -> Path:
    """Where an evaluation of ``data`` (not one of the run's own splits) goes:
    ``evaluations/<file or folder name>/`` beside the training's figures, which it leaves alone."""
    from lmforge.runs import RunDir

    return run.path / RunDir.EVALUATIONS / (Path(data).stem or "data")


def eval_classifier(o: Options, run) -> int:
    from lmforge.data.labeled import read_examples
    from lmforge.tasks.classify import fit_baseline, write_classification_report

    if not o.data:
        raise UserError("a classifier is evaluated on a labelled file: --data FILE (.csv or .jsonl)")
    t = run.config.task
    text_column, label_column = o.text_column or t.text_column, o.label_column or t.label_column
    ex = read_examples(o.data, text_column, label_column)
    baseline = None
    if run.config.data.path and Path(run.config.data.path).is_file():  # refitted on the run's training file
        baseline = fit_baseline(read_examples(run.config.data.path, t.text_column, t.label_column), run.labels)
    out = evaluation_dir(run, o.data)
    m = write_classification_report(run.path, run.model, run.tokenizer, ex, run.labels, o.max_length or t.max_length,
                                    run.device, Path(o.data).stem, source=str(o.data), baseline=baseline,
                                    out_dir=out)
    m["report"] = str(out / "report.md")
    if o.json:
        print_json(m)
    else:
        print(f"accuracy {m['accuracy']:.4f}  macro F1 {m['macro_f1']:.4f}  weighted F1 {m['weighted_f1']:.4f}  "
              f"ROC-AUC {m['roc_auc']:.4f}  ({m['n']} examples; largest class {m['majority_baseline_accuracy']:.4f})"
              if m["roc_auc"] is not None else f"accuracy {m['accuracy']:.4f}  macro F1 {m['macro_f1']:.4f}")
        if "baseline" in m:
            print(f"baseline ({m['baseline']['name']}): accuracy {m['baseline']['accuracy']:.4f}  macro F1 "
                  f"{m['baseline']['macro_f1']:.4f}")
        print(f"report: {m['report']} (plots/confusion.png, plots/roc.png, plots/pr.png)")
    return 0


def eval_sft(o: Options, run) -> int:
    """A decoder on conversations: the mean loss over their assistant tokens (what SFT lowers)."""
    from lmforge.tasks.sft import conversations_loss, read_conversations

    if not run.model.can_generate or getattr(run.model.config, "num_labels", 0):
        raise UserError(f"{o.run_dir} is not a decoder run; --task sft evaluates GPT or Llama runs")
    if not o.data:
        raise UserError("--task sft evaluates conversations: --data FILE.jsonl")
    m = conversations_loss(run, read_conversations(o.data), o.batch_size)
    length, loss, tokens, cut = m.pop("length"), m["val_loss"], m["assistant_tokens"], m["cut_conversations"]
    m |= {"data": str(o.data), "run_dir": str(o.run_dir)}
    if o.json:
        print_json(m)
    else:
        print(f"val_loss {loss:.4f} over {tokens:,} assistant tokens of {m['conversations']} conversations"
              + (f" ({cut} cut at {length} tokens)" if cut else ""))
    return 0


def eval_images(o: Options, run) -> int:
    """An image classifier on a split (default: test) of its data directory, or of --data (whose
    figures go to ``evaluations/<name>/``)."""
    from lmforge.data.images import ImageData
    from lmforge.evaluate.baselines import fit_pixel_baseline
    from lmforge.tasks.images import write_image_report

    own = run.config.data.path
    data = ImageData.open(o.data or own)
    shape = [run.config.model.height, run.config.model.width, run.config.model.in_channels]
    if data.meta["shape"] != shape or data.names != run.labels:
        raise UserError(f"{data.path} holds {data.meta['shape']} images of classes {data.names[:5]}; the run was "
                        f"trained on {shape} images of {run.labels[:5]}")
    other = o.data is not None and not (own and Path(o.data).resolve() == Path(own).resolve())
    training = ImageData.open(own) if own and Path(own).is_dir() else None
    baseline = fit_pixel_baseline(*training.split("train"), len(run.labels)) if training is not None else None
    out = evaluation_dir(run, o.data) if other else None
    m = write_image_report(run.path, run.model, data, o.split, run.device, baseline, out_dir=out)
    report = (out / "report.md") if out else run.path / ("report.md" if o.split == "val" else f"report_{o.split}.md")
    m.update(run_dir=str(o.run_dir), report=str(report))
    if o.json:
        print_json(m)
    else:
        print(f"accuracy {m['accuracy']:.4f}  macro F1 {m['macro_f1']:.4f}  weighted F1 {m['weighted_f1']:.4f}  "
              f"({m['n_examples']} {o.split} images; largest class {m['majority_baseline_accuracy']:.4f})")
        if "baseline" in m:
            print(f"baseline ({m['baseline']['name']}): accuracy {m['baseline']['accuracy']:.4f}")
        print(f"report: {report} (plots: confusion, ROC, precision-recall, mistakes_{o.split}.png)")
    return 0


def eval_gan(o: Options, run) -> int:
    """A generator's quality figures (``evaluate/gan.py``) on its data directory (or --data), with a
    grid of samples."""
    from lmforge import config as cfgmod
    from lmforge.device import autocast_for
    from lmforge.tasks.gan import GANTask
    from lmforge.train.distributed import World

    cfg = cfgmod.replace(run.config, data={"path": o.data}) if o.data else run.config
    task = GANTask(cfg, run)  # reads and checks the images and the feature classifier
    task.plan_epochs(cfg, World(), len(task.x))
    task.to(run.device)
    m = task.finish(run, run.model, autocast_for(run.device, "auto"))
    m.update(run_dir=str(o.run_dir), data=str(cfg.data.path))
    if o.json:
        print_json(m)
    else:
        print(f"Fréchet distance {m['fid']:.3f} (held-out real images: {m['fid_real']:.3f}), label entropy "
              f"{m['label_entropy']:.3f} bits (real {m['label_entropy_real']:.3f}), class entropy "
              f"{m['class_entropy']:.3f} bits (real {m['class_entropy_real']:.3f}); {m['scored_images']} images")
        print(f"samples: {m['samples']}")
    return 0


def eval_canaries(o: Options, run) -> int:
    """The exposure of planted secrets (``evaluate/canaries.py``)."""
    from lmforge.evaluate.canaries import exposure, read_canaries

    if not run.model.can_generate or getattr(run.model.config, "num_labels", 0):
        raise UserError(f"{o.run_dir} is a {run.config.task.name} run; --canaries measures text generators")
    m = exposure(run.model, run.tokenizer, read_canaries(o.canaries), o.candidates)
    m.update(run_dir=str(o.run_dir), canaries_file=str(o.canaries))
    if o.json:
        print_json(m)
    else:
        for r in m["canaries"]:
            print(f"exposure {r['exposure']:.2f} of at most {r['max_exposure']:.2f} bits (rank {r['rank']} of "
                  f"{r['candidates'] + 1}): {r['canary']}")
        print(f"mean exposure {m['mean_exposure']:.2f} bits over {len(m['canaries'])} canaries")
    return 0


def eval_mlm(o: Options, run) -> int:
    """Masked-token loss and accuracy of an encoder run on its data directory's validation split."""
    from lmforge import config as cfgmod
    from lmforge.device import autocast_for
    from lmforge.tasks.mlm import MLMTask

    data = o.data or run.dir.data_path()
    if data is None:
        raise UserError(f"{o.run_dir} was not trained here; give --data DATA_DIR (WordPiece)")
    task = MLMTask(cfgmod.replace(run.config, data={"path": str(data)}))
    task.to(run.device)
    m = task.evaluate(run.model, autocast_for(run.device, "auto"), batches=50)
    m.update(run_dir=str(o.run_dir), data=str(data))
    if o.json:
        print_json(m)
    else:
        print(f"masked-token loss {m['val_loss']:.4f}  accuracy {m['val_mlm_accuracy']:.4f}  "
              f"(50 validation batches of {data})")
    return 0


def run(o: Options) -> int:
    """Validation loss, perplexity, bits per byte and the lzma baseline; writes report.md. For a
    classifier run: accuracy, precision/recall/F1, ROC-AUC, confusion matrix and plots on --data
    (an image classifier: on its data directory's test split, with a grid of the most confident
    mistakes); for a GAN: the Fréchet distance of its samples in a classifier's features beside
    the real-vs-real figure, and label entropies; for an encoder: masked-token loss and accuracy; with --task sft (and for an
    instruction-tuned run): the loss over the assistant tokens of --data's conversations."""
    from lmforge.runs import RunDir, load_run

    if o.batch_size <= 0 or any(v is not None and v <= 0 for v in (o.max_tokens, o.stride)):
        raise UserError("--batch-size, --max-tokens and --stride must be positive")
    if o.dynamic_lr is not None and not o.dynamic_lr > 0:  # flags are checked before anything is loaded
        raise UserError(f"--dynamic-lr must be positive, got {o.dynamic_lr}")
    kind = RunDir(o.run_dir).kind()
    if o.canaries:
        return eval_canaries(o, load_run(o.run_dir))
    if o.task == "sft" or kind == "sft":
        return eval_sft(o, load_run(o.run_dir))
    verbs = {"classify": eval_classifier, "mlm": eval_mlm, "image-classify": eval_images, "gan": eval_gan}
    if kind in verbs:
        return verbs[kind](o, load_run(o.run_dir))
    from lmforge.evaluate.run import evaluate_run

    if o.samples < 0 or o.samples > 20:
        raise UserError(f"--samples must be in 0..20, got {o.samples}")
    m = evaluate_run(o.run_dir, o.data, o.batch_size, o.max_tokens, samples=o.samples, stride=o.stride,
                     dynamic=o.dynamic or o.dynamic_lr is not None, dynamic_lr=o.dynamic_lr, prompts=o.prompt)
    if o.json:
        print_json(m)
    else:
        verdict = "beats" if m["val_bpb"] < m["lzma_bpb"] else "does not beat"
        print(f"val_loss {m['val_loss']:.4f}  val_ppl {m['val_ppl']:.2f}  val_bpb {m['val_bpb']:.4f}  "
              f"lzma_bpb {m['lzma_bpb']:.4f}  ({m['val_tokens']:,} tokens, {m['val_bytes']:,} bytes; "
              f"the model {verdict} lzma)")
        if "dynamic_val_bpb" in m:
            print(f"dynamic evaluation (adapting as it reads, like lzma): val_bpb {m['dynamic_val_bpb']:.4f}")
        print(f"report: {Path(o.run_dir) / 'report.md'}")
    return 0
