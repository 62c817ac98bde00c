"""Federated text: a language model over the windows of a text (the partition deals each window
once), a text classifier over label-skewed shares of a labelled file — each an ordinary run at the
end. Its own file, so that the slow federations spread over the test workers."""

import json

import numpy as np
import pytest

from lmforge.errors import UserError
from tests.conftest import run_cli

pytest.importorskip("flwr")

from lmforge.federate.partition import federation  # noqa: E402


def test_token_partitions_deal_whole_windows_once_and_refuse_what_has_no_labels(data_dir, tmp_path):
    from lmforge.data.tokens import TokenFile, load_meta

    train = np.asarray(TokenFile(data_dir / "train.bin", load_meta(data_dir)["dtype"]).data)
    fed = federation([str(data_dir)], 3, "iid", 0, task="lm", window=31)
    windows = np.concatenate(fed.clients).reshape(-1, 32)
    n = (len(train) - 1) // 32
    assert len(windows) == n and abs(fed.sizes[0] - fed.sizes[2]) <= 32  # each window once, near-equal parts
    whole = {tuple(w) for w in train[:n * 32].reshape(n, 32)}
    assert {tuple(w) for w in windows} == whole
    client = fed.write_client(1, tmp_path / "c1")
    assert load_meta(client)["splits"]["train"]["tokens"] == fed.sizes[1]
    assert np.array_equal(np.fromfile(client / "train.bin", dtype=load_meta(data_dir)["dtype"]), fed.clients[1])
    with pytest.raises(UserError, match="token data has none"):
        federation([str(data_dir)], 3, "dirichlet:0.5", 0, task="lm", window=31)
    with pytest.raises(UserError, match="too few"):
        federation([str(data_dir)], 400, "iid", 0, task="lm", window=31)
    from lmforge import config as cfgmod

    labelled = tmp_path / "t.jsonl"
    labelled.write_text("".join(json.dumps({"text": f"t {i}", "label": "ab"[i % 2]}) + "\n" for i in range(40)))
    with pytest.raises(UserError, match="--superlink"):  # sites with files of their own join as SuperNodes
        federation([str(labelled)] * 2, None, "by-file", 0, task="classify",
                   options=cfgmod.build_config(task="classify").task)


def test_a_language_model_federated_over_two_clients_learns_and_is_an_ordinary_run(data_dir, tmp_path):
    """Two clients, each with half the text's windows, two rounds of FedAvg of a debug GPT: the
    global model's validation loss falls round by round, and eval and generate take the run."""
    fed = tmp_path / "fed"
    r = run_cli("federate", "--task", "lm", "--preset", "debug", "--data", str(data_dir), "--out", str(fed),
                "--clients", "2", "--rounds", "2", "--set", "train.batch_size=8", "--json", timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads(r.stdout)
    losses = [row["val_loss"] for row in s["per_round"]]
    assert losses[0] > losses[1] > losses[2] and losses[0] - losses[2] > 1.0, losses
    assert s["client_unit"] == "tokens" and s["val_accuracy"] is None and s["best_round"] == 2
    log = [json.loads(line) for line in (fed / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == [1, 2]  # the clients' training loss, each round
    assert [r["step"] for r in log if "val_loss" in r] == [0, 1, 2]
    r = run_cli("eval", str(fed), "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["val_bpb"] > 0, r.stderr
    r = run_cli("generate", str(fed), "--prompt", "The", "--max-new-tokens", "4")
    assert r.returncode == 0, r.stderr


def test_a_text_classifier_federated_over_label_skewed_clients(keyword_classifier, tmp_path):
    """Two clients with Dirichlet(1.0)-skewed shares of a labelled file fine-tune the same tiny BERT:
    every client's head has the federation's three classes (one client may lack one), the global
    model gets better than the untrained head, and predict takes the run."""
    root = keyword_classifier.parent
    fed = tmp_path / "fed"
    r = run_cli("federate", "--task", "classify", "--init", str(root / "base"), "--data", str(root / "train.jsonl"),
                "--out", str(fed), "--clients", "2", "--partition", "dirichlet:1.0", "--rounds", "3",
                "--local-epochs", "3", "--set", "train.lr=1e-3", "--json", timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads(r.stdout)
    accuracy = [row["val_accuracy"] for row in s["per_round"]]
    assert accuracy[-1] > accuracy[0] + 0.15, accuracy
    assert json.loads((fed / "labels.json").read_text()) == ["neither", "no", "yes"]
    assert sum(sum(c.values()) for c in s["client_classes"]) == sum(s["client_examples"])
    r = run_cli("predict", str(fed), "--text", "this is great please")
    assert r.returncode == 0 and r.stdout.split("\t")[0] in ("neither", "no", "yes"), r.stderr
