"""Labelled text for classification: CSV or JSONL rows with a text column and a label column.

Labels may be strings or integers; they are kept as strings (their display names) and mapped to
ids in sorted order, which is saved with the run (``labels.json``). Without a separate
validation file, a seeded split stratified by label keeps every class's share in both parts.
"""

from __future__ import annotations

import csv
import json
import random
from dataclasses import dataclass
from pathlib import Path

from lmforge.errors import UserError


@dataclass
class Examples:
    texts: list[str]
    labels: list[str]  # display names

    def __len__(self) -> int:
        return len(self.texts)


def read_utf8(path: Path, what: str = "data file") -> str:
    """The text of ``path`` (a BOM dropped); a missing file or bad encoding is a UserError."""
    if not path.is_file():
        raise UserError(f"{what} not found: {path}")
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text (byte {e.start})") from None


def csv_dict_reader(text: str) -> csv.DictReader:
    """A ``csv.DictReader`` over ``text`` whose fields may be as long as documents are (the csv
    module's default limit is 131,072 characters) and may hold quoted newlines."""
    import io

    csv.field_size_limit(2**31 - 1)
    return csv.DictReader(io.StringIO(text, newline=""))


def csv_rows(path: Path, text: str) -> tuple[list[str], list[dict]]:
    """(header, rows) of CSV ``text`` read from ``path``; a malformed file is a one-line error."""
    reader = csv_dict_reader(text)
    try:
        rows = list(reader)
        return list(reader.fieldnames or []), rows
    except csv.Error as e:
        raise UserError(f"{path}:{reader.line_num}: not valid CSV ({e})") from None


def jsonl_objects(path: Path, text: str) -> list[tuple[int, dict]]:
    """(line number, object) for each non-blank line of JSON-lines ``text`` read from ``path``."""
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            except RecursionError:
                raise UserError(f"{path}:{n}: JSON nested too deeply") from None
            if not isinstance(row, dict):
                raise UserError(f"{path}:{n}: expected a JSON object per line")
            rows.append((n, row))
    return rows


def read_rows(path: str | Path, what: str = "a .csv or .jsonl file") -> tuple[list[str], list[dict]]:
    """(columns, rows) of a ``.csv`` or ``.jsonl`` file; no rows, another suffix, a missing file or
    bad encoding is a UserError (``what`` says what was expected)."""
    path = Path(path)
    raw = read_utf8(path)
    if path.suffix.lower() == ".csv":
        columns, rows = csv_rows(path, raw)
    elif path.suffix.lower() in (".jsonl", ".json"):
        rows = [row for _, row in jsonl_objects(path, raw)]
        columns = sorted({k for r in rows for k in r})
    else:
        raise UserError(f"{path}: expected {what}")
    if not rows:
        raise UserError(f"{path}: no rows")
    return columns, rows


def read_examples(path: str | Path, text_column: str = "text", label_column: str | None = "label") -> Examples:
    """Rows of a ``.csv`` or ``.jsonl`` file; ``label_column`` None reads texts only."""
    path = Path(path)
    columns, rows = read_rows(path)
    for col in (text_column, label_column):
        if col is not None and col not in columns:
            raise UserError(f"{path}: no column {col!r} (columns: {', '.join(map(str, columns))})")
    texts, labels = [], []
    for n, row in enumerate(rows, 1):
        text = row.get(text_column)
        if not isinstance(text, str) or not text.strip():
            raise UserError(f"{path}: row {n} has an empty or missing {text_column!r}")
        texts.append(text)
        if label_column is not None:
            label = row.get(label_column)
            if label is None or str(label).strip() == "":
                raise UserError(f"{path}: row {n} has no {label_column!r}")
            labels.append(str(label).strip())
    return Examples(texts, labels)


def label_names(labels: list[str]) -> list[str]:
    """Sorted class names (numerically when every label is an integer)."""
    names = set(labels)
    if all(n.lstrip("-").isdigit() for n in names):
        return sorted(names, key=int)
    return sorted(names)


def stratified_split(ex: Examples, fraction: float, seed: int) -> tuple[Examples, Examples]:
    """(train, held-out): ``fraction`` of each class held out (at least one where it has two or more)."""
    rng = random.Random(seed)
    by_class: dict[str, list[int]] = {}
    for i, label in enumerate(ex.labels):
        by_class.setdefault(label, []).append(i)
    held: list[int] = []
    for label in sorted(by_class):
        idx = by_class[label]
        rng.shuffle(idx)
        k = round(len(idx) * fraction) if len(idx) > 1 else 0
        held += idx[:max(k, 1) if len(idx) > 1 else 0]
    held_set = set(held)
    keep = [i for i in range(len(ex)) if i not in held_set]
    pick = lambda ids: Examples([ex.texts[i] for i in ids], [ex.labels[i] for i in ids])  # noqa: E731
    return pick(keep), pick(sorted(held))
