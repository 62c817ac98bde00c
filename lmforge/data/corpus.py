"""Reading a corpus: files, directories, globs, JSONL/CSV records, or the embedded stdlib corpus.

Every document carries the *unit* it belongs to for the train/validation split: the source file
for plain files (so no validation file is ever seen in training), the record for JSONL/CSV (whose
records are independent documents), and the topic for ``pydoc_data`` topics.
"""

from __future__ import annotations

import csv
import glob
import json
import sys
import sysconfig
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from lmforge.errors import UserError

TEXT_SUFFIXES = {".txt", ".md", ".py"}
RECORD_SUFFIXES = {".jsonl", ".csv"}
SUFFIXES = TEXT_SUFFIXES | RECORD_SUFFIXES
# Test suites are excluded from the embedded corpus: they are large, repetitive and mostly data.
_STDLIB_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
# pydoc_data/topics.py is the source form of the topics added one by one as documents; reading it
# too would put the same text on both sides of the split.
_STDLIB_SKIP_FILES = {"pydoc_data/topics.py"}
STDLIB_CORPUS_VERSION = 2  # bump when the embedded corpus's contents change


@dataclass
class Document:
    text: str
    source: str  # where it came from, for reports
    unit: str  # split unit: documents with the same unit always land in the same split


@dataclass
class ReadReport:
    files_read: int = 0
    skipped: list[dict] = field(default_factory=list)  # {"path": ..., "reason": ...}

    def skip(self, path: str, reason: str) -> None:
        self.skipped.append({"path": path, "reason": reason})


def clean(text: str) -> str:
    """Unicode NFC; drop control characters except newline and tab (``\\r\\n`` becomes ``\\n``)."""
    text = unicodedata.normalize("NFC", text)
    if text.isascii() and text.isprintable():
        return text
    return "".join(ch for ch in text if ch in "\n\t" or unicodedata.category(ch) != "Cc")


def stdlib_root() -> Path:
    """The standard library directory of the running interpreter (the base one inside a venv)."""
    return Path(sysconfig.get_paths()["stdlib"])


def _stdlib_documents(report: ReadReport) -> Iterator[Document]:
    root = stdlib_root()
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if _STDLIB_SKIP_DIRS.intersection(rel.parts[:-1]) or rel.as_posix() in _STDLIB_SKIP_FILES:
            continue
        yield from _read_text_file(path, report, name=f"stdlib/{rel.as_posix()}")
    import pydoc_data.topics

    for name, text in sorted(pydoc_data.topics.topics.items()):
        yield Document(text, f"pydoc_data.topics:{name}", f"pydoc_data.topics:{name}")


def _decode(path: Path, report: ReadReport, name: str) -> str | None:
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        report.skip(name, f"not valid UTF-8 (byte {e.start})")
        return None
    report.files_read += 1
    return text.removeprefix("\ufeff")


def _read_text_file(path: Path, report: ReadReport, name: str) -> Iterator[Document]:
    text = _decode(path, report, name)
    if text is not None:
        yield Document(text, name, name)


def _read_jsonl(path: Path, report: ReadReport, text_field: str) -> Iterator[Document]:
    text = _decode(path, report, str(path))
    if text is None:
        return
    bad = 0
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except (json.JSONDecodeError, RecursionError):
            bad += 1
            continue
        value = obj.get(text_field) if isinstance(obj, dict) else None
        if not isinstance(value, str):
            bad += 1
            continue
        yield Document(value, f"{path}:{lineno}", f"{path}:{lineno}")
    if bad:
        report.skip(str(path), f"{bad} line(s) not JSON objects with a string {text_field!r} field")


def _read_csv(path: Path, report: ReadReport, text_column: str) -> Iterator[Document]:
    text = _decode(path, report, str(path))
    if text is None:
        return
    from lmforge.data.labeled import csv_dict_reader

    reader = csv_dict_reader(text)
    try:
        if reader.fieldnames is None or text_column not in reader.fieldnames:
            report.skip(str(path), f"no {text_column!r} column (columns: {reader.fieldnames})")
            return
        for i, row in enumerate(reader, 1):
            value = row.get(text_column)
            if value:
                yield Document(value, f"{path}:{i}", f"{path}:{i}")
    except csv.Error as e:
        report.skip(str(path), f"not valid CSV at line {reader.line_num} ({e})")


def _expand(inputs: list[str], report: ReadReport) -> list[Path]:
    """Files named directly, found under directories (recursively) or matched by globs."""
    files: list[Path] = []
    for item in inputs:
        p = Path(item)
        if any(ch in item for ch in "*?["):
            matches = sorted(Path(m) for m in glob.glob(item, recursive=True))
            if not matches:
                raise UserError(f"no files match {item!r}")
            candidates = [m for m in matches if m.is_file()]
        elif p.is_dir():
            candidates = sorted(x for x in p.rglob("*") if x.is_file())
        elif p.is_file():
            candidates = [p]
        else:
            raise UserError(f"input not found: {item}")
        for c in candidates:
            if c.suffix.lower() in SUFFIXES:
                files.append(c)
            elif p.is_file():  # named explicitly: say why it is not used
                report.skip(str(c), f"unsupported file type {c.suffix or '(none)'!r}; "
                                    f"use {', '.join(sorted(SUFFIXES))}")
    return files


def read_documents(inputs: list[str], text_field: str = "text", text_column: str = "text",
                   report: ReadReport | None = None) -> Iterator[Document]:
    """Yield raw documents from ``inputs``; ``"stdlib"`` means the embedded corpus."""
    report = report if report is not None else ReadReport()
    for item in inputs:
        if item == "stdlib":
            yield from _stdlib_documents(report)
            continue
        for path in _expand([item], report):
            suffix = path.suffix.lower()
            if suffix == ".jsonl":
                yield from _read_jsonl(path, report, text_field)
            elif suffix == ".csv":
                yield from _read_csv(path, report, text_column)
            else:
                yield from _read_text_file(path, report, str(path))


def python_version() -> str:
    return ".".join(map(str, sys.version_info[:3]))
