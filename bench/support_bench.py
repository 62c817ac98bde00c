"""The support assistant's retrieval on real FAQs: plain all-MiniLM-L6-v2 against the app as
`support init` builds it (encoder adapted to the FAQ, fitted fusion), on the built-in FAQ and on
FAQs from this machine's documentation (`bench/support_faqs.py`) with hand-written paraphrased
and out-of-scope questions (`bench/support/*_questions.jsonl`).

    .venv/bin/python bench/support_bench.py [--adapt-seconds 300] [--out bench/results/support.json]

Each figure is `lmforge support eval --json`'s: top-1 by stage, cross-validated top-1 and handoff
F1 (weight and threshold fitted on the other folds). "plain" is the dense stage of the app built
with `--adapt-seconds 0`: MiniLM cosine (the better of question and question+answer).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LMFORGE = [sys.executable, "-m", "lmforge"]


def cli(*args: str) -> dict:
    r = subprocess.run(LMFORGE + list(args) + ["--json"], capture_output=True, text=True, cwd=ROOT)
    if r.returncode:
        raise SystemExit(f"lmforge {' '.join(args)} failed:\n{r.stderr[-2000:]}")
    return json.loads(r.stdout)


def f1(p: float, r: float) -> float:
    return 2 * p * r / (p + r) if p + r else 0.0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--adapt-seconds", type=float, default=300.0)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "support.json"))
    o = ap.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        subprocess.run([sys.executable, str(ROOT / "bench" / "support_faqs.py"), str(tmp)], check=True)
        faqs = {"built-in": (ROOT / "lmforge/apps/support/data/faq.jsonl", ROOT / "lmforge/apps/support/data/questions.jsonl"),
                "gitfaq": (tmp / "gitfaq.jsonl", ROOT / "bench/support/gitfaq_questions.jsonl"),
                "xzfaq": (tmp / "xzfaq.jsonl", ROOT / "bench/support/xzfaq_questions.jsonl")}
        for name, (faq, questions) in faqs.items():
            row = {}
            for label, seconds in (("plain", 0.0), ("adapted", o.adapt_seconds)):
                t0 = time.perf_counter()
                init = cli("support", "init", "--faq", str(faq), "--out", str(tmp / f"{name}-{label}"),
                           "--adapt-seconds", str(seconds))
                init_s = time.perf_counter() - t0
                ev = cli("support", "eval", str(tmp / f"{name}-{label}"), "--questions", str(questions), "--no-save")
                row[label] = {"init_seconds": round(init_s, 1), "adaptation": init["adaptation"],
                              "stages": ev["stages"], "top1": ev["top1"], "top1_cv": ev["top1_cv"],
                              "lexical_weight": ev["lexical_weight"],
                              "handoff_f1_cv": f1(ev["handoff_precision_cv"], ev["handoff_recall_cv"]),
                              "n_covered": ev["n_covered"], "n_uncovered": ev["n_uncovered"], "entries": init["entries"]}
                print(f"{name:9s} {label:8s} entries {init['entries']:3d}  dense {ev['stages']['dense']['top1']:.3f}  "
                      f"lexical {ev['stages']['lexical']['top1']:.3f}  fused {ev['top1']:.3f} (w {ev['lexical_weight']})  "
                      f"top-1 cv {ev['top1_cv']:.3f}  handoff F1 cv {row[label]['handoff_f1_cv']:.3f}  "
                      f"init {init_s:.0f} s  adapted: {init['adaptation']['adapted']}", flush=True)
            row["gain_top1_cv_over_plain_dense"] = row["adapted"]["top1_cv"] - row["plain"]["stages"]["dense"]["top1"]
            results[name] = row
    Path(o.out).parent.mkdir(parents=True, exist_ok=True)
    Path(o.out).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(json.dumps({k: round(v["gain_top1_cv_over_plain_dense"], 3) for k, v in results.items()}))


if __name__ == "__main__":
    main()
