"""lmforge explain: why a run answers as it does, with how far each explanation is to be trusted."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lmforge.cli.common import TextInputOptions, print_json
from lmforge.cli.options import flag
from lmforge.errors import UserError
from lmforge.explain import METHODS

HELP = "attributions of a classifier's or decoder's answers to its input, with faithfulness figures"


@dataclass
class Options(TextInputOptions):
    image: list[str] | None = flag(nargs="+", metavar="FILE", help="image files (image classifier runs)")
    examples: int | None = flag(help="explain this many examples of the run's validation data (classifiers)")
    label: str | None = flag(help="the class to explain (default: the predicted one)")
    answer: str | None = flag(help="decoders: the answer whose log-likelihood to explain (default: the model's "
                                   "greedy continuation of --max-new-tokens tokens)")
    max_new_tokens: int = flag(16, help="decoders: tokens of the greedy answer")
    method: list[str] | None = flag(nargs="+", choices=METHODS, help="attribution methods (default: all: "
                                    "Integrated Gradients, occlusion, KernelSHAP)")
    attention: bool = flag(False, help="decoders: also draw each layer's attention heads (attention/*.png)")
    max_length: int | None = flag(help="tokens per text (default: the run's)")
    out: str | None = flag(help="output directory (default: RUN_DIR/explain)")
    json: bool = flag(False)


def _validation_inputs(o: Options, run) -> list:
    """The first --examples inputs of the run's validation data: texts, or (uint8 image, name) pairs."""
    if run.config.task.name == "image-classify":
        from lmforge.data.images import ImageData

        x, y = ImageData.open(run.config.data.path).split("val")
        return [(x[i], f"validation image {i} ({run.labels[int(y[i])]})") for i in range(min(o.examples, len(x)))]
    from lmforge.tasks.classify import split_examples

    _, val = split_examples(run.config)
    if val is None:
        raise UserError(f"{o.run_dir} was trained without validation data: give --text or --input")
    return val.texts[:o.examples]


def _subjects(o: Options, run, kind: str) -> list:
    from lmforge.data.images import load_image_file
    from lmforge.explain import subjects

    if kind == "image-classifier":
        if o.text or o.input:
            raise UserError(f"{o.run_dir} classifies images: give --image FILE... or --examples N")
        m = run.config.model
        pairs = [(load_image_file(f, [m.height, m.width, m.in_channels]), f) for f in o.image or []]
        if o.examples:
            pairs += _validation_inputs(o, run)
        if not pairs:
            raise UserError("give --image FILE... or --examples N")
        return [subjects.image_classifier(run, px, o.label, name) for px, name in pairs]
    if o.image:
        raise UserError(f"{o.run_dir} is not an image classifier run; --image does not apply")
    texts = o.texts(getattr(run.config.task, "text_column", "text")) if (o.text or o.input or not o.examples) else []
    if kind == "text-classifier":
        if o.examples:
            texts += _validation_inputs(o, run)
        return [subjects.text_classifier(run, t, o.label, o.max_length) for t in texts]
    if o.examples:
        raise UserError("--examples applies to classifier runs; give a decoder --text PROMPT")
    if o.label:
        raise UserError("--label applies to classifier runs; a decoder's --answer is what is explained")
    return [subjects.decoder_answer(run, t, o.answer, o.max_new_tokens) for t in texts]


def run(o: Options) -> int:
    """Attribute a classifier's prediction (text: to its tokens; images: to its pixels) or a
    decoder's answer (to the prompt's tokens) with Integrated Gradients, occlusion and KernelSHAP
    (Captum), and measure each method's faithfulness against random order by deletion and
    insertion curves. Writes explanation.json, report.md, plots/ and explanation.html (text) to
    --out (default RUN_DIR/explain)."""
    from lmforge.explain.run import check_out, explain_subjects, write_explanation
    from lmforge.models import MODELS
    from lmforge.runs import RunDir, answer_kind, load_run

    rd = RunDir(o.run_dir)
    rd.require()
    cfg = rd.load_config()
    kind = answer_kind(cfg.task.name, getattr(MODELS[cfg.arch].model, "can_generate", False))
    if kind is None:
        raise UserError(f"explain has no method for a {cfg.task.name} run ({cfg.arch}): it explains text and image "
                        "classifiers and decoders")
    if o.examples is not None and o.examples < 1:
        raise UserError(f"--examples must be at least 1, got {o.examples}")
    if o.attention and kind != "decoder":
        raise UserError("--attention draws a decoder's attention; this is a " + kind + " run")
    out = Path(o.out) if o.out else rd / RunDir.EXPLAIN
    check_out(out)
    loaded = load_run(o.run_dir, device="cpu")
    subjects = _subjects(o, loaded, kind)
    methods = list(dict.fromkeys(o.method or METHODS))
    features = ("tokens" if kind != "image-classifier"
                else f"patches of {subjects[0].meta['patch']}x{subjects[0].meta['patch']} pixels")
    attention = None
    if o.attention:  # first: a model without attention (an LSTM) is refused before the slow part
        from lmforge.data.tokenizer import token_label
        from lmforge.explain.attention import attention_weights

        attention = [(attention_weights(loaded.model, s.inputs),
                      [token_label(loaded.tokenizer, int(i)) for i in s.inputs[0]]) for s in subjects]
    result = explain_subjects(subjects, methods, kind, str(o.run_dir), features)
    result = write_explanation(result, out, subjects, attention)
    if o.json:
        print_json({k: v for k, v in result.items() if k != "items"} |
                   {"items": [{k: v for k, v in it.items() if k != "maps"} for it in result["items"]]})
        return 0
    for it in result["items"]:
        top = sorted(zip(it["tokens"], it["attributions"][methods[0]]), key=lambda t: -t[1])[:5]
        print(f"{it['explained']} = {it['score']:.4f}  top ({methods[0]}): "
              + ", ".join(f"{n!r} {v:+.3f}" for n, v in top))
    for m, v in result["faithfulness"].items():
        print(f"{m:<10} comprehensiveness {v['comprehensiveness']:.4f}  sufficiency {v['sufficiency']:.4f}")
    print(result["verdict"])
    print(f"report: {out / 'report.md'}")
    return 0
