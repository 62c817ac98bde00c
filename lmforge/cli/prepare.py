"""lmforge prepare: text (clean a corpus, train a tokenizer, write token files) or labelled images
(one uint8 array per split, labels, normalisation statistics, a report and an example grid)."""

from __future__ import annotations

from dataclasses import dataclass

from lmforge.cli.common import print_json
from lmforge.cli.options import flag
from lmforge.errors import UserError

HELP = "clean a corpus and train a tokenizer, or prepare labelled images (--kind images)"
IMAGES = "images (--kind images)"


@dataclass
class Options:
    input: list[str] = flag(None, nargs="+", required=True, metavar="PATH",
                            help="text: files, directories, globs (.txt .md .py .jsonl .csv), or 'stdlib' for the "
                            "embedded corpus; images: a folder of class folders, a folder of MNIST IDX files, a "
                            ".csv of pixels, an .npz, or 'digits' / 'mnist5k' (embedded)")
    out: str = flag(None, required=True, help="data directory to write")
    kind: str = flag("text", choices=["text", "images", "labeled"], help="what the input holds: a corpus, "
                     "labelled images, or a labelled .csv/.jsonl file (classify's data: --out is then a masked "
                     "copy of it, with --scrub-pii)")
    overwrite: bool = flag(False, help="replace an existing data directory that prepare wrote")
    vocab_size: int = flag(4096)
    tokenizer: str = flag("bpe", help="bpe: train a byte-level BPE (decoders); wordpiece: train WordPiece with [CLS] "
                          "[SEP] [PAD] [MASK] [UNK] (encoders); or a tokenizer.json or run directory to reuse "
                          "(continued training with --init needs the run's own)")
    val_fraction: float | None = flag(help="share held out for validation (text: 0.05; images: 0.1 of the "
                                      "training split, stratified)")
    seed: int = flag(1337)
    scrub_pii: str | None = flag(metavar="KINDS", help="text: mask personal data before tokenizing, with typed "
                                 "placeholders (<EMAIL> ...): all, or a comma-separated list of email, phone, card, "
                                 "iban, ip, url; counts per kind in data_report.md")
    pii_patterns: str | None = flag(metavar="FILE", help="text: your own patterns to mask too, one NAME=REGEX per "
                                    "line (each match becomes <NAME>)")
    text_field: str = flag("text", help="JSONL field holding the text")
    text_column: str = flag("text", help="CSV column holding the text")
    test_fraction: float = flag(0.2, group=IMAGES, help="share of each class held out for testing when the input "
                                "has no test split")
    image_size: str | None = flag(group=IMAGES, metavar="HxW", help="resize every image to this size (needed when "
                                  "their sizes differ)")
    label_column: str = flag("label", group=IMAGES, help="CSV label column (headerless CSV: first, last or a "
                             "column number; --kind labeled: the column left unmasked)")
    json: bool = flag(False, help="print meta.json as JSON")


def run(o: Options) -> int:
    """Prepare a data directory: a tokenized corpus, or (--kind images) labelled images."""
    if o.kind == "images":
        if o.scrub_pii or o.pii_patterns:
            raise UserError("--scrub-pii and --pii-patterns apply to text (images carry no text to scrub)")
        return run_images(o)
    if o.kind == "labeled":
        return run_labeled(o)
    from lmforge.data.pii import parse_kinds
    from lmforge.data.prepare import prepare

    meta = prepare(o.input, o.out, vocab_size=o.vocab_size,
                   val_fraction=0.05 if o.val_fraction is None else o.val_fraction, seed=o.seed,
                   text_field=o.text_field, text_column=o.text_column, tokenizer=o.tokenizer, overwrite=o.overwrite,
                   scrub_pii=parse_kinds(o.scrub_pii, "--scrub-pii") if o.scrub_pii else None,
                   pii_patterns=o.pii_patterns)
    if o.json:
        print_json({**meta, "data_dir": str(o.out)})
    else:
        s = meta["splits"]
        print(f"prepared {o.out}: {meta['documents']:,} documents, {meta['bytes']:,} bytes -> "
              f"{meta['tokens']:,} tokens ({meta['bytes_per_token']} bytes/token); "
              f"train {s['train']['tokens']:,} / val {s['val']['tokens']:,} tokens; "
              f"{len(meta['skipped'])} skipped; vocabulary {meta['vocab_size']:,}"
              + (f"; personal data masked: {sum(meta['pii']['masked'].values()):,}" if meta["pii"] else ""))
    return 0


def run_labeled(o: Options) -> int:
    """A masked copy of a labelled file: every text field but the label scrubbed."""
    from lmforge.data.pii import Scrubber, parse_kinds, read_patterns, scrub_labeled

    if not (o.scrub_pii or o.pii_patterns):
        raise UserError("--kind labeled writes a masked copy of the file: give --scrub-pii (and/or --pii-patterns)")
    if len(o.input) != 1:
        raise UserError("--kind labeled takes one --input file (.csv or .jsonl)")
    scrubber = Scrubber(parse_kinds(o.scrub_pii, "--scrub-pii") if o.scrub_pii else [],
                        read_patterns(o.pii_patterns) if o.pii_patterns else None)
    result = scrub_labeled(o.input[0], o.out, scrubber, o.label_column, o.overwrite)
    if o.json:
        print_json(result)
    else:
        masked = ", ".join(f"{k} {v:,}" for k, v in result["masked"].items()) or "nothing found"
        print(f"wrote {o.out}: {result['rows']:,} rows, personal data masked: {masked}")
    return 0


def run_images(o: Options) -> int:
    from lmforge.data.images import prepare_images

    meta = prepare_images(o.input, o.out, val_fraction=0.1 if o.val_fraction is None else o.val_fraction,
                          test_fraction=o.test_fraction, seed=o.seed, image_size=o.image_size,
                          label_column=o.label_column, overwrite=o.overwrite)
    if o.json:
        print_json({**meta, "data_dir": str(o.out)})
    else:
        s, (h, w, c) = meta["splits"], meta["shape"]
        skipped = sum(meta["skipped"].values())
        print(f"prepared {o.out}: {h}x{w}x{c} images, {len(meta['classes'])} classes; train "
              f"{s['train']['images']:,} / val {s['val']['images']:,} / test {s['test']['images']:,}"
              f"{f'; {skipped} files skipped (data_report.md says why)' if skipped else ''}")
    return 0
