"""lmforge prepare: clean a corpus, train a tokenizer, write token files."""

from __future__ import annotations

from dataclasses import dataclass

from lmforge.cli.common import print_json
from lmforge.cli.options import flag

HELP = "clean a corpus, train a tokenizer, write token files"


@dataclass
class Options:
    input: list[str] = flag(None, nargs="+", required=True, metavar="PATH",
                            help="files, directories, globs (.txt .md .py .jsonl .csv), or 'stdlib' for the "
                            "embedded corpus")
    out: str = flag(None, required=True, help="data directory to write")
    vocab_size: int = flag(4096)
    tokenizer: str = flag("bpe", choices=["bpe", "wordpiece"],
                          help="byte-level BPE (decoders) or WordPiece with [CLS] [SEP] [PAD] [MASK] [UNK] (encoders)")
    val_fraction: float = flag(0.05)
    seed: int = flag(1337)
    text_field: str = flag("text", help="JSONL field holding the text")
    text_column: str = flag("text", help="CSV column holding the text")
    json: bool = flag(False, help="print meta.json as JSON")


def run(o: Options) -> int:
    """Clean a corpus, train a BPE tokenizer and write token files."""
    from lmforge.data.prepare import prepare

    meta = prepare(o.input, o.out, vocab_size=o.vocab_size, val_fraction=o.val_fraction, seed=o.seed,
                   text_field=o.text_field, text_column=o.text_column, tokenizer=o.tokenizer)
    if o.json:
        print_json({**meta, "data_dir": str(o.out)})
    else:
        s = meta["splits"]
        print(f"prepared {o.out}: {meta['documents']:,} documents, {meta['bytes']:,} bytes -> "
              f"{meta['tokens']:,} tokens ({meta['bytes_per_token']} bytes/token); "
              f"train {s['train']['tokens']:,} / val {s['val']['tokens']:,} tokens; "
              f"{len(meta['skipped'])} skipped; vocabulary {meta['vocab_size']:,}")
    return 0
