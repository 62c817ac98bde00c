"""lm-evaluation-harness against `lmforge serve`: the harness scores a run's validation split through
the server's OpenAI-style completions (echo + logprobs) and tokenizer endpoints, to compare with
`lmforge eval`'s bits per byte, and runs a next-line multiple-choice task built from the same files.

    python bench/lm_eval_check.py RUN_DIR DATA_DIR [--lm-eval PATH/TO/lm_eval] [--port 8766]

The harness is not a dependency of lmforge (it is not in requirements.txt); install it anywhere,
e.g. `python3 -m venv /tmp/h && /tmp/h/bin/pip install "lm_eval[api]"` (it needs no torch for
API models), and pass its `lm_eval` executable. Everything runs offline: the tasks read local JSONL.
Results: bench/RESULTS.md section 20.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lmforge.data.tokenizer import load_tokenizer  # noqa: E402
from lmforge.data.tokens import TokenFile, load_meta  # noqa: E402
from lmforge.serve.common import start_server  # noqa: E402

BPB_TASK = """task: lmforge_val_bpb
dataset_path: json
dataset_kwargs:
  data_files:
    test: {docs}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
"""

MC_TASK = """task: lmforge_next_line_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {items}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def validation_documents(run_dir: Path, data_dir: Path) -> list[str]:
    """The validation split's documents as text (split at the end-of-text token)."""
    tok = load_tokenizer(run_dir / "tokenizer.json")
    meta = load_meta(data_dir)
    ids = TokenFile(data_dir / "val.bin", meta["dtype"]).data.tolist()
    docs, current = [], []
    for t in ids + [meta["eot_id"]]:
        if t == meta["eot_id"]:
            if current:
                docs.append(tok.decode(current))
            current = []
        else:
            current.append(t)
    return docs


def next_line_items(docs: list[str], per_doc: int = 12, seed: int = 0) -> list[dict]:
    """Three lines of context; the true next line among three lines drawn from other places."""
    rng = random.Random(seed)
    pool = [ln for d in docs for ln in d.split("\n") if len(ln.strip()) > 20]
    items = []
    for doc in docs:
        lines = doc.split("\n")
        for _ in range(per_doc):
            i = rng.randrange(3, max(4, len(lines)))
            if i >= len(lines) or len(lines[i].strip()) <= 20:
                continue
            choices = rng.sample([p for p in pool if p != lines[i]], 3) + [lines[i]]
            rng.shuffle(choices)
            items.append({"context": "\n".join(lines[i - 3:i])[-400:] + "\n", "choices": choices,
                          "label": choices.index(lines[i])})
    return items


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("data_dir", type=Path)
    ap.add_argument("--lm-eval", default="lm_eval", help="the harness's executable")
    ap.add_argument("--concurrent", type=int, default=4)
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="lmforge-lm-eval-"))
    docs = validation_documents(args.run_dir, args.data_dir)
    (work / "val_docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    items = next_line_items(docs)
    (work / "mc.jsonl").write_text("".join(json.dumps(x) + "\n" for x in items), encoding="utf-8")
    tasks = work / "tasks"
    tasks.mkdir()
    (tasks / "bpb.yaml").write_text(BPB_TASK.format(docs=work / "val_docs.jsonl"), encoding="utf-8")
    (tasks / "mc.yaml").write_text(MC_TASK.format(items=work / "mc.jsonl"), encoding="utf-8")
    print(f"{len(docs)} validation documents ({sum(len(d.encode()) for d in docs):,} bytes), "
          f"{len(items)} multiple-choice items; tasks in {tasks}", flush=True)

    proc, base = start_server(["serve", str(args.run_dir)])
    try:
        block = httpx.get(base + "/v1/models").json()["data"][0]["max_model_len"]
        # One generated token after each prompt: prompts may use the context less one position.
        model_args = (f"model={args.run_dir.resolve().name},base_url={base}/v1/completions,"
                      f"max_length={block - 1},num_concurrent={args.concurrent},tokenized_requests=True")
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OPENAI_API_KEY": "EMPTY",
               "TOKENIZERS_PARALLELISM": "false"}
        out = work / "results"
        r = subprocess.run([args.lm_eval, "--model", "local-completions", "--model_args", model_args,
                            "--tasks", "lmforge_val_bpb,lmforge_next_line_mc", "--include_path", str(tasks),
                            "--output_path", str(out)], env=env, capture_output=True, text=True)
        table = [ln for ln in r.stdout.splitlines() if ln.startswith("|")]
        print("\n".join(table) if table else r.stdout[-3000:] + r.stderr[-3000:])
        return r.returncode
    finally:
        proc.terminate()
        proc.wait(timeout=10)


if __name__ == "__main__":
    sys.exit(main())
