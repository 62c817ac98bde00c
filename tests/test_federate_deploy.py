"""Flower's deployment runtime as a site would run it: a SuperLink and two SuperNodes as separate
processes, client-side DP-SGD and its epsilon (the simulation: tests/test_federate.py)."""

import json

import pytest

from tests.conftest import run_cli

pytest.importorskip("flwr")


def test_deployment_runtime_superlink_and_two_supernodes(digits_mlp, tmp_path):
    """Flower's deployment runtime as separate processes on 127.0.0.1: a SuperLink, two SuperNodes
    each holding its own part of digits (``data-path``), two rounds of DP-SGD clients."""
    import os
    import socket
    import subprocess
    import sys
    import time
    from pathlib import Path

    from lmforge.federate.partition import federation

    data, _ = digits_mlp
    fed = federation([str(data)], 2, "iid", 0)
    sites = [fed.write_client(i, tmp_path / f"site{i}") for i in range(2)]

    def free_port() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    io_port, fleet, control = free_port(), free_port(), free_port()
    procs = [subprocess.Popen([str(bin_dir / "flower-superlink"), "--insecure", "--serverappio-api-address",
                               f"127.0.0.1:{io_port}", "--fleet-api-address", f"127.0.0.1:{fleet}",
                               "--control-api-address", f"127.0.0.1:{control}", "--database",
                               ":flwr-in-memory:"], env={**env, "FLWR_HOME": str(tmp_path / "link")},
                              cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)]
    try:
        deadline = time.time() + 60
        while time.time() < deadline:  # the Fleet API accepts connections
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", fleet)) == 0:
                    break
            time.sleep(0.2)
        for i, site in enumerate(sites):
            procs.append(subprocess.Popen(
                [str(bin_dir / "flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{fleet}",
                 "--clientappio-api-address", f"127.0.0.1:{free_port()}", "--node-config",
                 f"data-path='{site}' partition-id={i}"], env={**env, "FLWR_HOME": str(tmp_path / f"node{i}")},
                cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT))
        out = tmp_path / "fed"
        r = run_cli("federate", "--superlink", f"127.0.0.1:{control}", "--data", str(data), "--clients", "2",
                    "--rounds", "2", "--model", "mlp", "--out", str(out), "--set", "train.dp.epsilon=8",
                    "--set", "train.batch_size=128", "--json", env=env, timeout=400)
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads(r.stdout)
    assert s["rounds"] == 2 and s["partition"] == "by-node" and not s["failed_rounds"]
    rounds = [row for row in s["per_round"] if row["round"]]
    assert [row["clients"] for row in rounds] == [2, 2]
    assert rounds[-1]["val_accuracy"] > s["per_round"][0]["val_accuracy"]
    assert 0 < rounds[0]["dp_epsilon"] < rounds[1]["dp_epsilon"] == pytest.approx(8.0, abs=0.05)
    assert (out / "model.safetensors").is_file() and (out / "federated.json").is_file()
    assert not (out / ".flower").exists()
