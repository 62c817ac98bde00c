"""Federated training on Flower: the partitions, FedProx's proximal term against its gradient, a
simulation of 3 clients on a non-IID split of digits against centralized training on the same
passes over the data (one client failing mid-round, tolerated and reported), bad input
refused before Flower starts, and the client mod that clips and noises each update. (Text and
language models: tests/test_federate_text.py.) (Flower's deployment runtime: tests/test_federate_deploy.py,
its own file so that the two slow end-to-end runs go to different test workers.)"""

import json

import numpy as np
import pytest
import torch

from lmforge.errors import UserError
from tests.conftest import cli_here, run_cli

pytest.importorskip("flwr")

from lmforge.federate.partition import MIN_EXAMPLES, federation, parse_scheme, split_clients  # noqa: E402

MARGIN = 0.04  # test accuracy the federation may lose against centralized training (bench/RESULTS.md §29)


def test_partitions_cover_the_data_once_and_dirichlet_skews_the_labels():
    y = np.repeat(np.arange(10), 60)
    for scheme, alpha in (("iid", None), ("dirichlet", 0.1), ("dirichlet", 100.0)):
        parts = split_clients(y, 5, scheme, alpha, seed=3)
        every = np.concatenate(parts)
        assert sorted(every.tolist()) == list(range(len(y)))  # each example held by exactly one client
        assert min(len(p) for p in parts) >= MIN_EXAMPLES
        assert [p.tolist() for p in parts] == [p.tolist() for p in split_clients(y, 5, scheme, alpha, seed=3)]
    iid = split_clients(y, 5, "iid", None, 3)
    assert max(len(p) for p in iid) - min(len(p) for p in iid) <= 1

    def label_entropy(parts):  # mean over clients of the entropy of their label distribution
        out = []
        for p in parts:
            q = np.bincount(y[p], minlength=10) / len(p)
            out.append(-(q[q > 0] * np.log(q[q > 0])).sum())
        return float(np.mean(out))

    skewed, near_iid = label_entropy(split_clients(y, 5, "dirichlet", 0.1, 3)), label_entropy(iid)
    assert skewed < near_iid - 0.5 and near_iid > np.log(10) - 0.05
    for bad in ("dirichlet:0", "dirichlet:x", "dirichlet", "shards"):
        with pytest.raises(UserError):
            parse_scheme(bad)
    with pytest.raises(UserError, match="cannot give"):
        split_clients(y[:20], 5, "iid", None, 0)


def test_by_file_needs_matching_clients(digits_mlp, tmp_path):
    data, _ = digits_mlp
    fed = federation([str(data), str(data)], None, "by-file", 0)
    assert fed.sizes == [ImageSplit(data), ImageSplit(data)]
    with pytest.raises(UserError, match="one --data directory per client"):
        federation([str(data)], None, "by-file", 0)
    with pytest.raises(UserError, match="splits one --data"):
        federation([str(data), str(data)], 2, "iid", 0)
    with pytest.raises(UserError, match="not --clients 3"):
        federation([str(data), str(data)], 3, "by-file", 0)


def ImageSplit(path) -> int:
    from lmforge.data.images import ImageData

    return ImageData.open(path).meta["splits"]["train"]["images"]


def test_proximal_term_gradient_is_mu_times_the_drift():
    from lmforge.federate.apps import proximal_term

    model = torch.nn.Linear(4, 3)
    anchor = {k: v.detach().clone() + 0.5 for k, v in model.state_dict().items()}
    penalty = proximal_term(0.2, anchor)(model)
    penalty.backward()
    for name, p in model.named_parameters():
        assert torch.allclose(p.grad, 0.2 * (p.detach() - anchor[name]))
    drift = sum((p.detach() - anchor[n]).pow(2).sum() for n, p in model.named_parameters())
    assert penalty.item() == pytest.approx(0.1 * drift.item())


def test_bad_input_is_refused_before_flower_starts(capsys, digits_mlp, tmp_path):
    data, _ = digits_mlp
    out = tmp_path / "fed"
    cases = [
        (["--clients", "0"], "--clients must be a positive number"),
        (["--clients", "3", "--partition", "dirichlet:0"], "positive ALPHA"),
        (["--clients", "3", "--rounds", "0"], "--rounds must be at least 1"),
        (["--clients", "3", "--strategy", "fedprox", "--set", "train.dp.epsilon=8"], "proximal term would escape"),
        (["--clients", "3", "--set", "train.dp.epsilon=-1"], "epsilon must be positive"),
        (["--clients", "3", "--set", "train.nonsense=1"], "nonsense"),
        (["--clients", "3", "--min-clients", "4"], "--min-clients must be between 1 and the 3"),
        (["--clients", "400"], "cannot give 400 clients"),
        (["--clients", "2", "--preset", "resnet-small", "--set", "train.dp.epsilon=8"], "BatchNorm"),
        (["--clients", "3", "--client-dp-epsilon", "0"], "--client-dp-epsilon must be positive"),
        (["--clients", "3", "--client-dp-epsilon", "1", "--client-dp-clip", "-1"], "--client-dp-clip must be positive"),
    ]
    for args, message in cases:
        r = cli_here(capsys, "federate", "--data", data, "--out", out, "--preset", "cnn-small", *args) \
            if "--preset" not in args else cli_here(capsys, "federate", "--data", data, "--out", out, *args)
        assert r.returncode == 2, (args, r.stderr)
        assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1, (args, r.stderr)
        assert not out.exists() and not list(tmp_path.glob(".fed*")), args


def test_noniid_simulation_tolerates_a_failed_client_and_nears_centralized(digits_mlp, tmp_path):
    """3 clients, Dirichlet(1.0) label skew, 5 rounds x 2 local epochs (10 passes over the data),
    client 2 down in round 3; against 10 centralized epochs of the same network."""
    data, _ = digits_mlp
    fed = tmp_path / "fed"
    r = run_cli("federate", "--data", str(data), "--out", str(fed), "--clients", "3", "--partition",
                "dirichlet:1.0", "--rounds", "5", "--local-epochs", "2", "--preset", "cnn-small", "--json",
                env={"LMFORGE_FEDERATE_FAIL": "2:3"}, timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads(r.stdout)
    assert s["clients"] == 3 and s["rounds"] == 5 and sum(s["client_examples"]) == ImageSplit(data)
    assert len({tuple(sorted(c)) for c in s["client_classes"]}) > 1 or \
        max(max(c.values()) / sum(c.values()) for c in s["client_classes"]) > 0.2  # the labels are skewed
    assert list(s["failed_rounds"]) == ["3"] and "client 2 failed in round 3" in s["failed_rounds"]["3"][0]
    rounds = {r["round"]: r for r in s["per_round"]}
    assert rounds[3]["clients"] == 2 and rounds[3]["clients_failed"] == 1 and rounds[2]["clients"] == 3
    assert rounds[5]["val_accuracy"] > rounds[0]["val_accuracy"] + 0.5

    central = tmp_path / "central"
    r = run_cli("train", "--task", "image-classify", "--data", str(data), "--out", str(central), "--preset",
                "cnn-small", "--epochs", "10", "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    c = json.loads(r.stdout)
    assert s["test"]["accuracy"] >= c["test"]["accuracy"] - MARGIN, (s["test"], c["test"])

    # An ordinary run: eval reproduces the federation's test figure, its log has a line per round.
    r = run_cli("eval", str(fed), "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout)["accuracy"] == pytest.approx(s["test"]["accuracy"])
    evals = [json.loads(line) for line in (fed / "metrics.jsonl").read_text().splitlines() if "val_loss" in line]
    assert [e["step"] for e in evals] == [0, 1, 2, 3, 4, 5]
    assert (fed / "plots" / "curves.png").is_file() and not (fed / ".clients").exists()



def test_client_dp_mod_clips_each_update_and_noises_it_before_it_leaves():
    """Flower's client mod chain with real messages: the reply's update (weights minus the round's
    global weights) is clipped to the L2 norm asked for, then N(0, (z * clip)^2) is added to every
    weight, seeded by (seed, round, client); counters pass; without the config, nothing changes."""
    from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

    from lmforge.federate.apps import client_dp_mod

    start = {"w": torch.zeros(4000), "b": torch.ones(3), "count": torch.tensor([3])}

    def message(**dp):
        config = {"server-round": 2}
        if dp:
            config["client-dp"] = json.dumps({"seed": 0, **dp})
        return Message(RecordDict({"arrays": ArrayRecord(start), "config": ConfigRecord(config)}), dst_node_id=1,
                       message_type="train")

    def train(msg, context):  # the client's training: +0.1 on every weight
        new = {"w": torch.full((4000,), 0.1), "b": torch.full((3,), 1.1), "count": torch.tensor([4])}
        return Message(RecordDict({"arrays": ArrayRecord(new), "metrics": MetricRecord({"client": 1})}), reply_to=msg)

    def reply(msg):
        out = client_dp_mod(msg, None, train)
        return out.content["arrays"].to_torch_state_dict(), out.content["metrics"]
    norm = 0.1 * (4003 ** 0.5)
    clipped, metrics = reply(message(clip=1.0, noise_multiplier=0.0))
    update = torch.cat([clipped["w"] - start["w"], clipped["b"] - start["b"]])
    assert update.norm().item() == pytest.approx(1.0, rel=1e-5) and metrics["update_norm"] == pytest.approx(norm)
    assert torch.allclose(update, torch.full_like(update, 0.1 / norm)) and clipped["count"].item() == 4
    noised, _ = reply(message(clip=0.5, noise_multiplier=2.0))
    assert (noised["w"] - 0.1 * 0.5 / norm).std().item() == pytest.approx(1.0, rel=0.05)  # z * clip
    again, _ = reply(message(clip=0.5, noise_multiplier=2.0))
    assert torch.equal(noised["w"], again["w"])
    plain, metrics = reply(message())
    assert torch.equal(plain["w"], torch.full((4000,), 0.1)) and "update_norm" not in metrics
