"""Reading an FAQ: CSV or JSONL rows with a question and an answer (optional id and category), or
Markdown with ``## question`` headings followed by the answer (``# heading`` sets the category).

Bad files fail whole, before anything is written: missing columns, empty questions or answers and
duplicate ids each give one clear error naming the rows. Real FAQs repeat questions (the same
question under two ids, pasted twice): ``on_duplicate`` says what to do — ``first`` (the default)
keeps the first and reports the others, ``merge`` keeps the first entry with the distinct answers
of all joined, ``error`` refuses the file. Questions are the same when they are after case,
spacing and trailing punctuation are ignored.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

from lmforge.data.labeled import csv_rows, jsonl_objects, read_utf8
from lmforge.errors import UserError


@dataclass(frozen=True)
class FaqEntry:
    id: str
    question: str
    answer: str
    category: str = ""

    @property
    def digest(self) -> str:
        """Changes when the entry's content changes (re-running init re-embeds only those)."""
        return hashlib.sha256(json.dumps([self.question, self.answer, self.category]).encode()).hexdigest()[:16]


ON_DUPLICATE = ("first", "merge", "error")


@dataclass
class Faq:
    entries: list[FaqEntry]
    # One per repeated question: {"question", "kept": id, "dropped": [ids], "lines": [entry numbers]}.
    duplicates: list[dict] = field(default_factory=list)


def _slug(text: str) -> str:
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode().lower()
    return re.sub(r"[^a-z0-9]+", "-", text).strip("-")[:60] or "entry"


def _normal(question: str) -> str:
    return " ".join(question.casefold().split()).rstrip("?!. ")


def _rows_markdown(text: str) -> list[dict]:
    rows, category, current = [], "", None
    for line in text.splitlines():
        if line.startswith("## "):
            current = {"question": line[3:].strip(), "answer": [], "category": category, "line": len(rows) + 1}
            rows.append(current)
        elif line.startswith("# "):
            category, current = line[2:].strip(), None
        elif current is not None:
            current["answer"].append(line)
    for r in rows:
        r["answer"] = "\n".join(r["answer"]).strip()
    return rows


def _rows_table(path: Path, text: str, columns: dict[str, str]) -> list[dict]:
    if path.suffix.lower() == ".csv":
        header, rows = csv_rows(path, text)
    else:
        rows = [obj for _, obj in jsonl_objects(path, text)]
        header = sorted({k for r in rows for k in r})
    missing = [columns[k] for k in ("question", "answer") if columns[k] not in header]
    if missing:
        raise UserError(f"{path}: missing column(s) {', '.join(repr(m) for m in missing)} "
                        f"(found {', '.join(header) or 'none'}; see --question-column/--answer-column)")
    out = []
    for n, r in enumerate(rows, 1):
        out.append({"question": str(r.get(columns["question"]) or "").strip(),
                    "answer": str(r.get(columns["answer"]) or "").strip(),
                    "id": str(r.get(columns["id"]) or "").strip(),
                    "category": str(r.get(columns["category"]) or "").strip(), "line": n})
    return out


def read_faq(path: str | Path, question_column: str = "question", answer_column: str = "answer",
             id_column: str = "id", category_column: str = "category", on_duplicate: str = "first") -> Faq:
    """The entries of an FAQ file (.csv, .jsonl or .md), validated, with repeated questions
    handled as ``on_duplicate`` says."""
    path = Path(path)
    if on_duplicate not in ON_DUPLICATE:
        raise UserError(f"--on-duplicate takes {', '.join(ON_DUPLICATE)}; got {on_duplicate!r}")
    if path.suffix.lower() not in (".csv", ".jsonl", ".md"):
        raise UserError(f"{path}: an FAQ is a .csv, .jsonl or .md file")
    text = read_utf8(path, "FAQ file")
    columns = {"question": question_column, "answer": answer_column, "id": id_column, "category": category_column}
    rows = _rows_markdown(text) if path.suffix.lower() == ".md" else _rows_table(path, text, columns)
    if not rows:
        raise UserError(f"{path}: no FAQ entries" + (" (expected '## question' headings)" if path.suffix == ".md" else ""))
    problems = []
    empty_q = [r["line"] for r in rows if not r["question"]]
    empty_a = [r["line"] for r in rows if not r["answer"]]
    if empty_q:
        problems.append(f"empty question in entr{'y' if len(empty_q) == 1 else 'ies'} {', '.join(map(str, empty_q[:10]))}")
    if empty_a:
        problems.append(f"empty answer in entr{'y' if len(empty_a) == 1 else 'ies'} {', '.join(map(str, empty_a[:10]))}")
    ids: dict[str, int] = {}
    entries = []
    for r in rows:
        id_ = r.get("id") or _slug(r["question"])
        if r.get("id") and id_ in ids:
            problems.append(f"duplicate id {id_!r} (entries {ids[id_]} and {r['line']})")
        base, k = id_, 2
        while id_ in ids:  # generated ids: make unique
            id_, k = f"{base}-{k}", k + 1
        ids[id_] = r["line"]
        entries.append(FaqEntry(id_, r["question"], r["answer"], r.get("category", "")))
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        groups.setdefault(_normal(r["question"]), []).append(i)
    repeated = [g for key, g in groups.items() if key and len(g) > 1]
    if on_duplicate == "error":
        problems += [f"duplicate question {rows[g[0]]['question']!r} (entries {', '.join(str(rows[i]['line']) for i in g)}"
                     "; --on-duplicate first|merge keeps one)" for g in repeated]
    if problems:
        raise UserError(f"{path}: " + "; ".join(problems[:5]) + (f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""))
    duplicates, drop = [], set()
    for g in repeated:
        first = entries[g[0]]
        if on_duplicate == "merge":
            answers = list(dict.fromkeys(entries[i].answer for i in g))  # distinct, in order
            entries[g[0]] = FaqEntry(first.id, first.question, "\n\n".join(answers), first.category)
        drop.update(g[1:])
        duplicates.append({"question": first.question, "kept": first.id, "dropped": [entries[i].id for i in g[1:]],
                           "lines": [rows[i]["line"] for i in g]})
    return Faq([e for i, e in enumerate(entries) if i not in drop], duplicates)
