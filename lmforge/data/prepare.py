"""``lmforge prepare``: documents -> cleaned, de-duplicated, split by unit -> BPE tokenizer ->
``train.bin`` / ``val.bin`` token files (numpy memmaps) + ``tokenizer.json`` + ``meta.json`` +
``data_report.md``.

The output directory is built beside the target and renamed into place only when complete. An
existing one is replaced only with ``overwrite`` and only when it holds nothing but files prepare
writes: no command deletes what it did not create.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from lmforge.data.corpus import (STDLIB_CORPUS_VERSION, Document, ReadReport, clean, python_version,
                                  read_documents)
from lmforge.data.tokenizer import BERT_SPECIALS, load_tokenizer, separator_id, train_bpe, train_wordpiece
from lmforge.errors import UserError
from lmforge.fsutil import check_output_dir, replace_dir, write_json, write_text
from lmforge.progress import progress, status

ENCODE_CHUNK = 512  # documents per encode_batch call
FILES = {"tokenizer.json", "train.bin", "val.bin", "meta.json", "data_report.md"}  # all prepare writes


def _dedup_and_clean(docs, stats: dict, scrub=None) -> list[Document]:
    """Cleaned documents (``scrub``: then personal data masked), empty ones and exact duplicates dropped."""
    seen: set[bytes] = set()
    out = []
    for d in docs:
        text = clean(d.text)  # normalised first: what is scrubbed is what the tokenizer will see
        if scrub is not None:
            text = scrub(text)
        if not text.strip():
            stats["empty_skipped"] += 1
            continue
        digest = hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()
        if digest in seen:
            stats["duplicates_dropped"] += 1
            continue
        seen.add(digest)
        out.append(Document(text, d.source, d.unit))
    return out


def split_by_unit(docs: list[Document], val_fraction: float, seed: int) -> tuple[list[Document], list[Document], str]:
    """Seeded split in which all documents of one unit land on the same side.

    Units are shuffled with ``seed`` and moved to validation until it holds ``val_fraction`` of the
    bytes. With a single unit (one text file), its tail is cut off at a line boundary instead.
    """
    units: dict[str, list[Document]] = {}
    for d in docs:
        units.setdefault(d.unit, []).append(d)
    if len(units) == 1:
        text = "\n".join(d.text for d in docs)
        cut = int(len(text) * (1 - val_fraction))
        nl = text.rfind("\n", 0, cut)
        cut = nl + 1 if nl > 0 else cut
        head, tail = text[:cut], text[cut:]
        if not head.strip() or not tail.strip():
            raise UserError("corpus is too small to split into train and validation text")
        src = docs[0].source
        return [Document(head, src, "head")], [Document(tail, src, "tail")], "tail of the single document"
    names = sorted(units)
    order = np.random.default_rng(seed).permutation(len(names))
    total = sum(len(d.text.encode("utf-8")) for d in docs)
    val_names, val_bytes = set(), 0
    for i in order:
        if val_bytes >= val_fraction * total and val_names:
            break
        if len(val_names) == len(names) - 1:
            break  # keep at least one unit for training
        val_names.add(names[i])
        val_bytes += sum(len(d.text.encode("utf-8")) for d in units[names[i]])
    train = [d for d in docs if d.unit not in val_names]
    val = [d for d in docs if d.unit in val_names]
    return train, val, "by unit (file, record or topic)"


def _write_tokens(tok, docs: list[Document], path: Path, dtype, eot: int, desc: str) -> int:
    """Encode documents in chunks and append ids (each document followed by EOT) to ``path``."""
    n = 0
    with open(path, "wb") as f, progress(total=len(docs), desc=desc, unit="doc") as bar:
        for i in range(0, len(docs), ENCODE_CHUNK):
            chunk = docs[i:i + ENCODE_CHUNK]
            ids: list[int] = []
            for enc in tok.encode_batch([d.text for d in chunk], add_special_tokens=False):
                ids.extend(enc.ids)
                ids.append(eot)
            np.asarray(ids, dtype=dtype).tofile(f)
            n += len(ids)
            bar.update(len(chunk))
    return n


def prepare(inputs: list[str], out_dir: str | Path, vocab_size: int = 4096, val_fraction: float = 0.05,
            seed: int = 1337, text_field: str = "text", text_column: str = "text",
            tokenizer: str = "bpe", overwrite: bool = False, scrub_pii: list[str] | None = None,
            pii_patterns: str | Path | None = None) -> dict:
    """Build a data directory from ``inputs``; returns the contents of ``meta.json``.

    ``scrub_pii`` (kinds of :mod:`lmforge.data.pii`) and ``pii_patterns`` (a file of ``NAME=REGEX``
    lines) mask personal data in every document before anything else sees it (the tokenizer
    included); the counts per kind go into ``meta.json`` and ``data_report.md``."""
    if not inputs:
        raise UserError("no --input given")
    if not 0.0 < val_fraction < 0.5:
        raise UserError(f"--val-fraction must be in (0, 0.5), got {val_fraction}")
    given = None  # an existing tokenizer (a file or a run directory's): continued training needs the run's own
    if tokenizer not in ("bpe", "wordpiece"):
        given = Path(tokenizer) / "tokenizer.json" if Path(tokenizer).is_dir() else Path(tokenizer)
        if not given.is_file():
            raise UserError(f"--tokenizer takes bpe, wordpiece, or a tokenizer.json or run directory to reuse; "
                            f"no such file: {given}")
    if vocab_size < 257 or vocab_size > 2**20:
        raise UserError(f"--vocab-size must be between 257 and {2**20}, got {vocab_size}")
    out_dir = Path(out_dir)
    check_output_dir(out_dir, FILES, overwrite)
    t0 = time.time()
    scrub = None
    if scrub_pii or pii_patterns:
        from lmforge.data.pii import Scrubber, read_patterns

        scrub = Scrubber(scrub_pii or [], read_patterns(pii_patterns) if pii_patterns else None)

    report = ReadReport()
    stats = {"empty_skipped": 0, "duplicates_dropped": 0}
    status(f"reading {', '.join(inputs)}")
    raw = list(read_documents(inputs, text_field=text_field, text_column=text_column, report=report))
    docs = _dedup_and_clean(raw, stats, scrub)
    if not docs:
        reasons = "; ".join(f"{s['path']}: {s['reason']}" for s in report.skipped[:3])
        raise UserError(f"no usable documents in {', '.join(inputs)}"
                        + (f" (skipped: {reasons})" if reasons else " (all empty)"))
    train_docs, val_docs, split_unit = split_by_unit(docs, val_fraction, seed)

    if given is not None:
        tok = load_tokenizer(given)
        tokenizer = "wordpiece" if type(tok.model).__name__ == "WordPiece" else "bpe"
        status(f"using the tokenizer of {given} ({tok.get_vocab_size():,} tokens)")
    else:
        kind = "byte-level BPE" if tokenizer == "bpe" else "WordPiece"
        status(f"training a {kind} tokenizer (vocab {vocab_size}) on {len(train_docs)} documents")
        train = train_bpe if tokenizer == "bpe" else train_wordpiece
        tok = train((d.text for d in train_docs), vocab_size)
    eot = separator_id(tok)
    dtype = np.uint16 if tok.get_vocab_size() <= 2**16 else np.uint32

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        tok.save(str(tmp / "tokenizer.json"))
        splits = {}
        for name, part in (("train", train_docs), ("val", val_docs)):
            n_tokens = _write_tokens(tok, part, tmp / f"{name}.bin", dtype, eot, f"tokenizing {name}")
            n_bytes = sum(len(d.text.encode("utf-8")) for d in part)
            splits[name] = {"documents": len(part), "units": len({d.unit for d in part}),
                            "bytes": n_bytes, "tokens": n_tokens,
                            "bytes_per_token": round(n_bytes / max(n_tokens, 1), 4)}
        total_bytes = sum(s["bytes"] for s in splits.values())
        total_tokens = sum(s["tokens"] for s in splits.values())
        meta = {
            "inputs": inputs, "python": python_version(),
            "stdlib_corpus_version": STDLIB_CORPUS_VERSION if "stdlib" in inputs else None,
            "seed": seed, "val_fraction": val_fraction, "split_unit": split_unit,
            "tokenizer": tokenizer, "tokenizer_from": str(given.resolve()) if given else None,
            "vocab_size": tok.get_vocab_size(), "eot_id": eot,
            "special_ids": {t: tok.token_to_id(t) for t in BERT_SPECIALS if tok.token_to_id(t) is not None},
            "dtype": np.dtype(dtype).name,
            "documents": len(docs), "bytes": total_bytes, "tokens": total_tokens,
            "bytes_per_token": round(total_bytes / total_tokens, 4),
            "files_read": report.files_read, "empty_skipped": stats["empty_skipped"],
            "duplicates_dropped": stats["duplicates_dropped"], "skipped": report.skipped,
            "splits": splits, "seconds": round(time.time() - t0, 2),
            "pii": None if scrub is None else {"kinds": list(scrub.kinds), "patterns": sorted(scrub.extra),
                                               "masked": dict(sorted(scrub.counts.items()))},
        }
        write_json(tmp / "meta.json", meta)
        write_text(tmp / "data_report.md", data_report(meta))
        replace_dir(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return meta


def data_report(meta: dict) -> str:
    """Markdown summary of a prepared data directory."""
    lines = [
        "# Data report", "",
        f"- inputs: {', '.join(meta['inputs'])}",
        f"- documents: {meta['documents']:,} from {meta['files_read']:,} files read "
        f"({meta['duplicates_dropped']} exact duplicates dropped, {meta['empty_skipped']} empty skipped)",
        f"- bytes: {meta['bytes']:,}; tokens: {meta['tokens']:,}; bytes per token: {meta['bytes_per_token']}",
        f"- tokenizer: {'WordPiece' if meta.get('tokenizer') == 'wordpiece' else 'byte-level BPE'}, "
        f"vocabulary {meta['vocab_size']:,}, stored as {meta['dtype']}",
        f"- split: {meta['split_unit']}, seed {meta['seed']}, validation fraction {meta['val_fraction']}",
        "", "| split | documents | units | bytes | tokens | bytes/token |", "|---|---:|---:|---:|---:|---:|",
    ]
    for name, s in meta["splits"].items():
        lines.append(f"| {name} | {s['documents']:,} | {s['units']:,} | {s['bytes']:,} | {s['tokens']:,} "
                     f"| {s['bytes_per_token']} |")
    pii = meta.get("pii")
    if pii:
        kinds = pii["kinds"] + pii["patterns"]
        lines += ["", "## Personal data masked", "",
                  f"Kinds scrubbed before tokenizing: {', '.join(kinds)} (`lmforge/data/pii.py`).", "",
                  "| kind | masked |", "|---|---:|"] + [f"| {k} | {pii['masked'].get(k, 0):,} |" for k in kinds]
    if meta["skipped"]:
        lines += ["", "## Skipped", ""] + [f"- `{s['path']}`: {s['reason']}" for s in meta["skipped"]]
    return "\n".join(lines) + "\n"
