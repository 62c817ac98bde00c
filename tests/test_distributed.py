"""Data-parallel training under torchrun, on CPU (gloo): two processes with grad_accum 1 train
what one process with grad_accum 2 trains — the same batches, losses and (to float summation
order) weights — and write the run directory once."""

import json
import os
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from tests.conftest import run_cli


def torchrun(*args, timeout=300):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "lmforge", *args], capture_output=True, text=True, env=env, timeout=timeout)


def test_two_processes_equal_one_process_with_double_accumulation(data_dir, tmp_path):
    common = ["--data", str(data_dir), "--preset", "debug", "--max-steps", "8", "--set", "train.eval_interval=4",
              "--json"]
    one = run_cli("train", "--out", str(tmp_path / "one"), "--set", "train.grad_accum=2", *common)
    assert one.returncode == 0, one.stderr
    two = torchrun("train", "--out", str(tmp_path / "two"), *common)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = json.loads(one.stdout), json.loads(two.stdout)  # one summary: process 0 speaks for both
    assert b["processes"] == 2 and a["processes"] == 1
    assert b["tokens_seen"] == a["tokens_seen"] and b["val_loss"] == pytest.approx(a["val_loss"], abs=1e-5)
    wa, wb = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-4
    la = [json.loads(x) for x in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(x) for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lb] == [r["step"] for r in la]  # written once, not once per process
    for ra, rb in zip(la, lb):
        key = "loss" if "loss" in ra else "val_loss"
        assert rb[key] == pytest.approx(ra[key], abs=1e-4)
    # The checkpoint resumes in a single process.
    r = run_cli("train", "--out", str(tmp_path / "two"), "--resume", "--max-steps", "10", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["step"] == 10


def test_a_time_budget_stops_every_process_at_the_same_step(data_dir, tmp_path):
    """The budget and the planned schedule come from process 0's clock; a disagreement would hang."""
    r = torchrun("train", "--data", str(data_dir), "--out", str(tmp_path / "run"), "--preset", "debug",
                 "--max-seconds", "6", "--set", "train.eval_interval=0", "--json", timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout)
    assert out["processes"] == 2 and out["stopped_by"] in ("max_steps", "max_seconds") and out["step"] > 0
