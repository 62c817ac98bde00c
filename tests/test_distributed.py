"""Data-parallel training under torchrun, on CPU (gloo): two processes with grad_accum 1 train
what one process with grad_accum 2 trains — the same batches, losses and (to float summation
order) weights — with DDP or with FSDP (sharded, stopped and resumed), and write the run
directory once."""

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


COMMON = ["--preset", "debug", "--max-steps", "8", "--set", "train.eval_interval=4", "--json"]


@pytest.fixture(scope="module")
def single(data_dir, tmp_path_factory):
    """The reference: one process, two micro-batches per step."""
    out = tmp_path_factory.mktemp("single") / "run"
    r = run_cli("train", "--data", str(data_dir), "--out", str(out), "--set", "train.grad_accum=2", *COMMON)
    assert r.returncode == 0, r.stderr
    return out, json.loads(r.stdout)


def max_difference(a, b, name="model.safetensors"):
    wa, wb = load_file(a / name), load_file(b / name)
    assert sorted(wa) == sorted(wb)
    return max((wa[k].float() - wb[k].float()).abs().max().item() for k in wa)


def test_two_processes_equal_one_process_with_double_accumulation(data_dir, single, tmp_path):
    (one, a) = single
    two = torchrun("train", "--data", str(data_dir), "--out", str(tmp_path / "two"), *COMMON)
    assert two.returncode == 0, two.stderr[-3000:]
    b = json.loads(two.stdout)  # one summary: process 0 speaks for both
    assert b["processes"] == 2 and a["processes"] == 1
    assert b["tokens_seen"] == a["tokens_seen"] and b["val_loss"] == pytest.approx(a["val_loss"], abs=1e-5)
    assert max_difference(one, tmp_path / "two") < 1e-4
    la = [json.loads(x) for x in (one / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(x) for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lb] == [r["step"] for r in la]  # written once, not once per process
    for ra, rb in zip(la, lb):
        key = "loss" if "loss" in ra else "val_loss"
        assert rb[key] == pytest.approx(ra[key], abs=1e-4)
    # The checkpoint resumes in a single process (--max-steps past the end: a longer schedule).
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


def test_fsdp_shards_and_resumes_to_the_same_weights(data_dir, single, tmp_path):
    """train.fsdp=true: sharded parameters, gradients and optimizer moments; stopped half-way and
    resumed (the optimizer state gathered to one file and scattered back), it ends where one
    process with double accumulation ends."""
    (one, a) = single
    run = tmp_path / "fsdp"
    first = torchrun("train", "--data", str(data_dir), "--out", str(run), *COMMON, "--set", "train.fsdp=true",
                     "--stop-at", "4")
    assert first.returncode == 0, first.stderr[-3000:]
    assert json.loads(first.stdout)["step"] == 4
    rest = torchrun("train", "--out", str(run), "--resume", "--json")
    assert rest.returncode == 0, rest.stderr[-3000:]
    b = json.loads(rest.stdout)
    assert b["step"] == 8 and b["val_loss"] == pytest.approx(a["val_loss"], abs=1e-5)
    assert max_difference(one, run) < 1e-4
    assert max_difference(one, run, "trainer_state.safetensors") < 1e-4  # the same Adam moments


def test_muon_under_ddp_equals_one_process_with_double_accumulation(data_dir, tmp_path):
    # Muon orthogonalises each matrix's update: every process must do so on the all-reduced gradient.
    muon = ["--set", "train.optimizer=muon", "--set", "train.muon_lr=5e-3"]
    r = run_cli("train", "--data", str(data_dir), "--out", str(tmp_path / "one"), "--set", "train.grad_accum=2",
                *muon, *COMMON)
    assert r.returncode == 0, r.stderr
    two = torchrun("train", "--data", str(data_dir), "--out", str(tmp_path / "two"), *muon, *COMMON)
    assert two.returncode == 0, two.stderr[-3000:]
    assert json.loads(two.stdout)["val_loss"] == pytest.approx(json.loads(r.stdout)["val_loss"], abs=1e-5)
    assert max_difference(tmp_path / "one", tmp_path / "two") < 1e-4
