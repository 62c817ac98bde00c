"""Real FAQs from this machine's documentation, as lmforge support FAQ files, for the retrieval
benchmark (`bench/support_bench.py`): gitfaq(7) (Git's manual page), XZ Utils' faq.txt and
lsof's 00FAQ. Ids are `git-N` / `xz-N` / `lsof-N` in the order of the questions in the source,
which the hand-written paraphrase files (`bench/support/*_questions.jsonl`) refer to.

    python bench/support_faqs.py OUT_DIR   ->  OUT_DIR/{gitfaq,xzfaq,lsoffaq}.jsonl
"""

from __future__ import annotations

import gzip
import json
import re
import subprocess
import sys
from pathlib import Path

XZ_FAQ = Path("/usr/share/doc/xz-utils/faq.txt.gz")
LSOF_FAQ = Path("/usr/share/doc/lsof/00FAQ.gz")


def gitfaq() -> list[dict]:
    """Questions are the man page's indented lines ending in '?'; the answer is what follows, up
    to the next question or section heading."""
    text = subprocess.run(["man", "-P", "cat", "gitfaq"], capture_output=True, text=True, check=True,
                          env={"MANWIDTH": "2000", "PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}).stdout
    text = re.sub(r".\x08", "", text)  # overstrike bold
    rows, current, category = [], None, ""
    for line in text.splitlines():
        if re.match(r"^[A-Z][A-Z ]+$", line):  # a section heading: CONFIGURATION, CREDENTIALS, ...
            category, current = line.strip().title(), None
            if category in ("Git", "See Also", "Name", "Synopsis", "Description"):
                category = ""
            continue
        if re.match(r"^ {7}\S.*\?\s*$", line) and category:
            current = {"id": f"git-{len(rows) + 1}", "question": line.strip(), "answer": [], "category": category}
            rows.append(current)
        elif current is not None and line.strip():
            current["answer"].append(line.strip())
        elif current is not None:
            current["answer"].append("")
    for r in rows:
        r["answer"] = re.sub(r"\n{3,}", "\n\n", "\n".join(r["answer"])).strip()
    return rows


def xzfaq() -> list[dict]:
    text = gzip.decompress(XZ_FAQ.read_bytes()).decode("utf-8")
    rows = []
    for block in re.split(r"\n(?=Q:  )", text)[1:]:
        q, _, a = block.partition("\nA:  ")
        question = " ".join(q[3:].split())
        answer = re.sub(r"\n    ", "\n", "\n" + a).strip()
        rows.append({"id": f"xz-{len(rows) + 1}", "question": question, "answer": answer})
    return rows


def lsoffaq() -> list[dict]:
    """Numbered headings (``3.2.1<TAB>Why ...?``, perhaps wrapped onto a tab-indented line) after the
    table of contents; the entries are the headings that are questions."""
    text = gzip.decompress(LSOF_FAQ.read_bytes()).decode("latin-1")
    body = text[text.index("1.0\tGeneral Concepts", text.index("1.0\tGeneral Concepts") + 1):]
    rows, current, lines = [], None, body.splitlines()
    i = 0
    while i < len(lines):
        m = re.match(r"^(\d+(?:\.\d+)+)\s+(\S.*)$", lines[i])
        if m:
            title = m.group(2).strip()
            if not title.endswith("?") and i + 1 < len(lines) and re.match(r"^\t\S.*\?\s*$", lines[i + 1]):
                title, i = f"{title} {lines[i + 1].strip()}", i + 1
            current = ({"id": f"lsof-{len(rows) + 1}", "question": " ".join(title.split()), "answer": []}
                       if title.endswith("?") else None)
            if current is not None:
                rows.append(current)
        elif current is not None:
            current["answer"].append(lines[i].strip())
        i += 1
    for r in rows:
        r["answer"] = re.sub(r"\n{3,}", "\n\n", "\n".join(r["answer"])).strip()
    return [r for r in rows if r["answer"]]


def main(out: str) -> None:
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, rows in (("gitfaq", gitfaq()), ("xzfaq", xzfaq()), ("lsoffaq", lsoffaq())):
        (out_dir / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        print(f"{name}: {len(rows)} entries -> {out_dir / (name + '.jsonl')}")


if __name__ == "__main__":
    main(sys.argv[1])
