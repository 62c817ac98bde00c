"""Shared fixtures: a deterministic synthetic corpus, a prepared data directory, and a CLI runner."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

# Under `pytest -n 2` (make test) each worker gets one core: two torch processes each spinning two
# intra-op threads on two cores slow each other down more than they gain. Set before torch is
# imported, and inherited by the CLI subprocesses the tests start.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")

WORDS = ("the model reads text and learns which token comes next . a tokenizer splits words into "
         "pieces ; training lowers the loss while validation checks that it generalises . "
         "café naïve Straße 東京 数据 λ → ✓").split()


def synthetic_text(seed: int, n_lines: int = 60) -> str:
    """Deterministic text with some structure (repeated phrases, code-like lines, Unicode)."""
    rng = random.Random(seed)
    lines = []
    for i in range(n_lines):
        if i % 7 == 0:
            lines.append(f"def step_{rng.randint(0, 30)}(x):\n    return x * {rng.randint(1, 9)}")
        else:
            lines.append(" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 14))))
    return "\n".join(lines) + "\n"


def make_corpus(root: Path, n_files: int = 24) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n_files):
        sub = root / ("docs" if i % 2 else "notes")
        sub.mkdir(exist_ok=True)
        (sub / f"file_{i:02d}.txt").write_text(synthetic_text(i), encoding="utf-8")
    return root


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> Path:
    return make_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory, corpus_dir) -> Path:
    from lmforge.data.prepare import prepare

    out = tmp_path_factory.mktemp("data") / "tiny"
    prepare([str(corpus_dir)], out, vocab_size=512, val_fraction=0.2, seed=0)
    return out


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 300,
            input: str | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``python -m lmforge ARGS`` as a user would (``input`` on stdin, ``env`` added to the
    environment); returns the completed process."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "lmforge", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=timeout, input=input)


def cli_here(capsys, *args: str):
    """``lmforge ARGS`` in this process (a CLI start costs ~2 s of imports): the exit code and what
    it printed, as ``run_cli`` returns them. A traceback is an exception here, so it fails the test."""
    from types import SimpleNamespace

    from lmforge.cli import main

    capsys.readouterr()
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return SimpleNamespace(returncode=code, stdout=out.out, stderr=out.err)


def interrupt_training(args: list[str], run: Path, lines: int = 5, timeout: float = 60):
    """Start ``lmforge train ARGS`` (its run directory ``run``), send Ctrl-C once ``metrics.jsonl``
    has ``lines`` lines (polled with a deadline), and return (exit code, stderr)."""
    proc = subprocess.Popen([sys.executable, "-m", "lmforge", "train", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + timeout
    metrics = run / "metrics.jsonl"
    while time.time() < deadline:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= lines:
            break
        time.sleep(0.05)
    else:
        proc.kill()
        pytest.fail("training did not start")
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=timeout)
    return proc.returncode, err


@pytest.fixture
def cli():
    return run_cli


# A text classifier whose answer rests on one word (explain's and compress's tests).
FILLER = "please help me with my the a need about this today thanks order item".split()
KEYWORDS = {"yes": "great", "no": "awful"}


def write_keyword_examples(path, n, seed):
    """Texts whose label is decided by one word among six fillers (no such word: "neither")."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            label = rng.choice([*KEYWORDS, "neither"])
            words = rng.sample(FILLER, 6) + ([KEYWORDS[label]] if label in KEYWORDS else [])
            rng.shuffle(words)
            f.write(json.dumps({"text": " ".join(words), "label": label}) + "\n")
    return path


@pytest.fixture(scope="session")
def keyword_classifier(tmp_path_factory):
    """A tiny BERT fine-tuned until its answer rests on the keyword alone."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    transformers = pytest.importorskip("transformers")
    import torch

    from lmforge import config as cfgmod
    from lmforge.interop.hf_dir import import_hf
    from lmforge.train.trainer import train

    root = tmp_path_factory.mktemp("keyword")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + sorted(set(FILLER) | set(KEYWORDS.values()))
    torch.manual_seed(0)
    hf = transformers.BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                 intermediate_size=64, max_position_embeddings=64, architectures=["BertModel"])
    transformers.BertModel(hf).save_pretrained(root / "hf")
    (root / "hf" / "vocab.txt").write_text("\n".join(vocab) + "\n")
    import_hf(root / "hf", root / "base")
    cfg = cfgmod.build_config(task="classify", values={
        "task": {"init": str(root / "base"), "epochs": 12},
        "data": {"path": str(write_keyword_examples(root / "train.jsonl", 300, 0)),
                 "val": str(write_keyword_examples(root / "val.jsonl", 60, 1))},
        "train": {"lr": 1e-3, "early_stop": "loss"}})
    train(cfg, run_dir=root / "run")
    return root / "run"


@pytest.fixture(scope="session")
def digits_mlp(tmp_path_factory):
    """(data dir, run dir): an MLP image classifier trained two epochs on scikit-learn's digits."""
    from lmforge.cli import main

    root = tmp_path_factory.mktemp("digits")
    assert main(["prepare", "--kind", "images", "--input", "digits", "--out", str(root / "data")]) == 0
    assert main(["train", "--task", "image-classify", "--data", str(root / "data"), "--out", str(root / "mlp"),
                 "--model", "mlp", "--epochs", "2"]) == 0
    return root / "data", root / "mlp"
