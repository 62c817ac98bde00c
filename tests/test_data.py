"""prepare: reading, cleaning, de-duplication, split by file, token files and reports."""

import json

import numpy as np
import pytest

from lmforge.data.corpus import clean, read_documents
from lmforge.data.prepare import prepare
from lmforge.data.tokenizer import load_tokenizer
from lmforge.errors import UserError
from tests.conftest import make_corpus, synthetic_text


def test_clean_normalises_and_drops_control_characters():
    assert clean("e\u0301\r\nx\x00y\tz\x1b") == "\u00e9\nxy\tz"


def test_split_is_by_file_and_token_files_decode_to_the_split_text(data_dir, corpus_dir):
    meta = json.loads((data_dir / "meta.json").read_text())
    tok = load_tokenizer(data_dir / "tokenizer.json")
    files = {p.name: p.read_text() for p in corpus_dir.rglob("*.txt")}
    eot = meta["eot_id"]
    decoded = {}
    for split in ("train", "val"):
        ids = np.fromfile(data_dir / f"{split}.bin", dtype=meta["dtype"])
        assert len(ids) == meta["splits"][split]["tokens"]
        docs = tok.decode(ids.tolist(), skip_special_tokens=False).split("<|endoftext|>")
        assert docs[-1] == ""  # every document is followed by the separator
        decoded[split] = docs[:-1]
    assert meta["splits"]["val"]["documents"] >= 1 and meta["splits"]["train"]["documents"] >= 1
    # every document is one whole file, and no file appears on both sides
    assert sorted(decoded["train"] + decoded["val"]) == sorted(files.values())
    assert not set(decoded["train"]) & set(decoded["val"])
    assert meta["dtype"] == "uint16" and eot == 0
    assert (data_dir / "data_report.md").read_text().startswith("# Data report")


def test_split_is_deterministic_and_seeded(tmp_path, corpus_dir):
    a = prepare([str(corpus_dir)], tmp_path / "a", vocab_size=300, val_fraction=0.2, seed=1)
    b = prepare([str(corpus_dir)], tmp_path / "b", vocab_size=300, val_fraction=0.2, seed=1)
    c = prepare([str(corpus_dir)], tmp_path / "c", vocab_size=300, val_fraction=0.2, seed=2)
    assert (tmp_path / "a" / "val.bin").read_bytes() == (tmp_path / "b" / "val.bin").read_bytes()
    assert (tmp_path / "a" / "val.bin").read_bytes() != (tmp_path / "c" / "val.bin").read_bytes()
    assert a["splits"] == b["splits"]
    assert a["documents"] == c["documents"]  # another seed moves files between sides, loses none


def test_duplicates_empty_and_bad_encoding_are_reported(tmp_path):
    root = make_corpus(tmp_path / "in", n_files=6)
    (root / "copy.txt").write_text(synthetic_text(0), encoding="utf-8")  # exact duplicate of file_00
    (root / "blank.md").write_text("  \n\n", encoding="utf-8")
    (root / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    (root / "image.png").write_bytes(b"\x89PNG")  # found in a directory: ignored, not an error
    meta = prepare([str(root)], tmp_path / "out", vocab_size=300)
    assert meta["duplicates_dropped"] == 1
    assert meta["empty_skipped"] == 1
    assert meta["documents"] == 6
    reasons = {s["path"].split("/")[-1]: s["reason"] for s in meta["skipped"]}
    assert "not valid UTF-8" in reasons["latin1.txt"]
    assert "latin1.txt" in (tmp_path / "out" / "data_report.md").read_text()


def test_jsonl_csv_and_globs(tmp_path):
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"body": synthetic_text(i, 5)}) for i in range(4))
                                      + "\nnot json\n", encoding="utf-8")
    (tmp_path / "b.csv").write_text('content,other\n"hello, world",1\n"second row",2\n', encoding="utf-8")
    docs = list(read_documents([str(tmp_path / "*.jsonl"), str(tmp_path / "b.csv")], text_field="body",
                               text_column="content"))
    assert len(docs) == 6
    assert docs[4].text == "hello, world"
    assert len({d.unit for d in docs}) == 6  # records split independently


def test_single_file_is_split_by_its_tail(tmp_path):
    f = tmp_path / "one.txt"
    f.write_text(synthetic_text(3, 400), encoding="utf-8")
    meta = prepare([str(f)], tmp_path / "out", vocab_size=300, val_fraction=0.1)
    assert meta["split_unit"].startswith("tail")
    assert 0.05 < meta["splits"]["val"]["bytes"] / meta["bytes"] < 0.15


def test_stdlib_corpus_reads_real_sources_and_topics():
    docs = list(read_documents(["stdlib"]))
    names = [d.source for d in docs]
    assert "stdlib/json/decoder.py" in names
    assert any(n.startswith("pydoc_data.topics:") for n in names)
    assert "stdlib/pydoc_data/topics.py" not in names  # its text is already in the topics
    assert not any("/test/" in n or "/tests/" in n or "site-packages" in n for n in names)
    assert 5e6 < sum(len(d.text) for d in docs) < 40e6  # about 12 MB on CPython 3.11


def test_nothing_usable_is_an_error(tmp_path):
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(UserError, match="no usable documents"):
        prepare([str(tmp_path)], tmp_path / "out")
    assert not (tmp_path / "out").exists()
