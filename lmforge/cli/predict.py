"""lmforge predict: labels and class probabilities from a classifier run."""

from __future__ import annotations

from dataclasses import dataclass

from lmforge.cli.common import TextInputOptions, print_json
from lmforge.cli.options import flag
from lmforge.errors import UserError

HELP = "labels and probabilities from a classifier run (texts or images)"


@dataclass
class Options(TextInputOptions):
    image: list[str] | None = flag(nargs="+", metavar="FILE", help="image files (image classifier runs; converted "
                                   "and resized to the run's input)")
    max_length: int | None = flag(help="tokens per text (default: the run's)")
    json: bool = flag(False)


def predict_images(o: Options, loaded) -> int:
    import numpy as np

    from lmforge.data.images import load_image_file
    from lmforge.tasks.images import predict_images as probabilities

    m, names = loaded.config.model, loaded.labels
    x = np.stack([load_image_file(f, [m.height, m.width, m.in_channels]) for f in o.image])
    rows = [{"image": f, "label": names[int(p.argmax())], "probabilities": {n: float(v) for n, v in zip(names, p)}}
            for f, p in zip(o.image, probabilities(loaded.model, x, loaded.device))]
    print_rows(o, rows, "image")
    return 0


def print_rows(o: Options, rows: list[dict], key: str) -> None:
    if o.json:
        print_json({"predictions": rows})
        return
    for r in rows:
        top = ", ".join(f"{n} {x:.3f}" for n, x in sorted(r["probabilities"].items(), key=lambda kv: -kv[1])[:3])
        print(f"{r['label']}\t{top}\t{r[key][:60]!r}")


def run(o: Options) -> int:
    """Label and class probabilities for each --text (or each line of --input) from a classifier
    run, or for each --image from an image classifier run."""
    from lmforge.runs import RunDir, load_run
    from lmforge.tasks.classify import predict_probs

    if RunDir(o.run_dir).kind() == "image-classify":
        if not o.image or o.text or o.input:
            raise UserError(f"{o.run_dir} classifies images: give --image FILE...")
        return predict_images(o, load_run(o.run_dir))
    if o.image:
        raise UserError(f"{o.run_dir} is not an image classifier run; --image does not apply")
    cfg = RunDir(o.run_dir).load_config()
    if cfg.task.name != "classify":
        raise UserError(f"{o.run_dir} is not a classifier run (train one with --task classify)")
    texts = o.texts(cfg.task.text_column)
    loaded = load_run(o.run_dir)
    names = loaded.labels
    probs = predict_probs(loaded.model, loaded.tokenizer, texts,
                          min(o.max_length or cfg.task.max_length, loaded.model.config.block_size), loaded.device)
    rows = [{"text": t, "label": names[int(p.argmax())],
             "probabilities": {n: float(x) for n, x in zip(names, p)}} for t, p in zip(texts, probs)]
    print_rows(o, rows, "text")
    return 0
