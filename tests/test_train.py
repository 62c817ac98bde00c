"""Training: exact resume, golden loss curve, pickle-free checkpoints, Ctrl-C, time budgets."""

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from lmforge import config as cfgmod
from lmforge.train.trainer import train
from tests.conftest import interrupt_training, cli_here, run_cli

GOLDEN = Path(__file__).parent / "golden" / "debug_loss.json"


def losses(run_dir) -> list[tuple[int, float]]:
    rows = [json.loads(l) for l in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


def debug_cfg(*overrides):
    return cfgmod.build_config("debug", overrides=list(overrides))


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_resume_reproduces_uninterrupted_losses_bitwise(tmp_path, data_dir, optimizer):
    # Dropout on, so the restored RNG state matters as well as optimizer state and data position.
    # Muon: two optimizers (Muon on the hidden matrices, AdamW on the rest) saved and restored as one.
    sets = ("train.max_steps=24", "model.dropout=0.1", f"train.optimizer={optimizer}")
    full = train(debug_cfg(*sets), data_dir, tmp_path / "full")
    train(debug_cfg(*sets), data_dir, tmp_path / "part", stop_at=10)
    assert losses(tmp_path / "part")[-1][0] == 10
    saved = cfgmod.load(tmp_path / "part" / "config.yaml")
    resumed = train(saved, data_dir, tmp_path / "part", resume=True)
    assert resumed["step"] == full["step"] == 24
    assert losses(tmp_path / "part") == losses(tmp_path / "full")  # exact float equality


def test_a_kill_anywhere_in_a_checkpoint_leaves_a_run_that_resumes_exactly(tmp_path, data_dir, capsys):
    """kill -9 (a fault-injection hook that ends the process at once) at the chosen points of the
    checkpoint writer: before its commit (the previous checkpoint stays whole), between its file
    moves (the committed checkpoint is finished at the next start), and before the first
    checkpoint of all (a new start replaces it; --resume says so). Only the killed runs are
    subprocesses; the rest run here."""
    from lmforge.cli import main

    sets = ["--set", "train.checkpoint_interval=2", "--set", "model.dropout=0.1"]
    args = ["train", "--data", str(data_dir), "--preset", "debug", "--max-steps", "6", *sets]
    full = tmp_path / "full"
    assert main([*args, "--out", str(full)]) == 0
    for point, resumed_at in (("checkpoint-staged:4", 2), ("checkpoint-moved-trainer_state.safetensors:4", 4)):
        run = tmp_path / point.split(":")[0]
        killed = run_cli(*args, "--out", str(run), env={"LMFORGE_FAULT": point})
        assert killed.returncode == 137, killed.stderr
        assert list(run.glob(".checkpoint-*")), "the kill came inside the checkpoint writer"
        capsys.readouterr()
        assert main(["train", "--out", str(run), "--resume", "--data", str(data_dir)]) == 0
        assert f"resuming {run} at step {resumed_at}" in capsys.readouterr().err
        assert losses(run) == losses(full)  # exact, and no step logged twice
        assert not [p.name for p in run.iterdir() if p.name.startswith(".")]  # nothing half-written left
    first = tmp_path / "first"
    assert run_cli(*args, "--out", str(first), env={"LMFORGE_FAULT": "checkpoint-staged:2"}).returncode == 137
    capsys.readouterr()
    assert main(["train", "--out", str(first), "--resume", "--data", str(data_dir)]) == 2
    assert "without --resume to start it again" in capsys.readouterr().err
    assert main([*args, "--out", str(first)]) == 0 and "starting it again" in capsys.readouterr().err
    assert losses(first) == losses(full)


def test_golden_debug_loss_curve(tmp_path, data_dir):
    """A refactor that changes the math (model, init, data order, optimizer, schedule) fails here.

    Regenerate deliberately with: LMFORGE_REGEN_GOLDEN=1 pytest tests/test_train.py -k golden
    """
    train(debug_cfg("train.max_steps=30"), data_dir, tmp_path / "run")
    got = losses(tmp_path / "run")
    if os.environ.get("LMFORGE_REGEN_GOLDEN"):
        GOLDEN.write_text(json.dumps({"preset": "debug", "max_steps": 30, "losses": got}, indent=1) + "\n")
    want = json.loads(GOLDEN.read_text())["losses"]
    assert [s for s, _ in got] == [s for s, _ in want]
    # Bitwise on the machine that wrote it; the tolerance only absorbs other CPUs' kernels.
    for (step, a), (_, b) in zip(got, want):
        assert abs(a - b) <= 1e-5 * max(1.0, abs(b)), (step, a, b)
    assert got[-1][1] < got[0][1] - 0.5  # and it is a learning curve


def test_checkpoint_holds_no_pickled_objects(tmp_path, data_dir):
    run = tmp_path / "run"
    train(debug_cfg("train.max_steps=3"), data_dir, run)
    names = sorted(p.name for p in run.iterdir())
    assert names == ["chat_template.json", "config.yaml", "metrics.jsonl", "model.safetensors", "plots", "tokenizer.json",
                     "trainer_state.json", "trainer_state.safetensors"]
    for f in ("model.safetensors", "trainer_state.safetensors"):
        with safe_open(str(run / f), framework="pt") as st:
            assert st.metadata()["step"] == "3"
            keys = list(st.keys())
        assert keys
        assert b"\x80\x04" not in (run / f).read_bytes()[:8]  # not a pickle protocol header
    state = json.loads((run / "trainer_state.json").read_text())
    assert state["step"] == 3 and state["tokens_seen"] == 3 * 4 * 64
    assert any(k.startswith("optim.") and k.endswith(".exp_avg") for k in keys)
    assert "rng.torch" in keys
    assert (run / "plots" / "loss.png").read_bytes()[:4] == b"\x89PNG"


def test_time_budget_plans_the_schedule(tmp_path, data_dir, monkeypatch):
    import io
    import re
    import sys

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    cfg = debug_cfg("train.max_steps=null", "train.max_seconds=3", "train.warmup_steps=10")
    summary = train(cfg, data_dir, tmp_path / "run")
    monkeypatch.undo()
    # On a terminal: one bar whose count never goes back as the plan is revised, and the re-plan
    # messages on lines of their own above it (tqdm clears the bar first).
    segments = re.split(r"[\r\n]", terminal.getvalue())
    counts = [int(m.group(1)) for seg in segments if (m := re.search(r"training:.*?\| *(\d+)/\d+", seg))]
    assert counts and counts == sorted(counts) and counts[-1] == summary["step"]
    assert any(seg.startswith("[lmforge] planned") for seg in segments)
    assert not [seg for seg in segments if "training:" in seg and "[lmforge]" in seg]
    saved = cfgmod.load(tmp_path / "run" / "config.yaml")
    assert saved.train.max_steps is not None and saved.train.max_steps > 8
    assert summary["stopped_by"] in ("max_steps", "max_seconds")
    assert summary["seconds"] < 3 + 5  # the budget plus the final evaluation and checkpoint


def test_progress_off_a_terminal_is_plain_lines(tmp_path, data_dir):
    r = run_cli("train", "--data", str(data_dir), "--out", str(tmp_path / "run"), "--preset", "debug",
                "--max-steps", "4", env={"LMFORGE_PROGRESS_SECONDS": "0"})
    assert r.returncode == 0, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.startswith("[lmforge] training: ")]
    assert [line.split()[2] for line in lines[:4]] == ["1/4", "2/4", "3/4", "4/4"], r.stderr
    assert "step/s" in lines[0] and "\r" not in r.stderr  # no bar drawing in a log


def test_time_budget_plans_from_timed_steps_and_follows_a_change_of_speed():
    from lmforge.train.trainer import CALIBRATION_STEPS, WARM_STEPS, TimeBudget

    budget, now, plans, times = TimeBudget(seconds=10.0, t0=0.0), 0.0, {}, {}
    step = 0
    while now < 10.0 and budget.active:
        now += 0.1 if now < 3.0 else 0.2  # the machine halves its speed at 3 s
        step += 1
        planned = budget.plan(step, now)
        if planned is not None:
            plans[step] = planned
            times[step] = now
    first = WARM_STEPS + CALIBRATION_STEPS
    assert list(plans)[0] == first and plans[first] == first + int(0.98 * (10.0 - 1.0) / 0.1)
    # Revised at 20% of the budget (same speed: same end), then after the slow-down: fewer steps,
    # each plan ending with the budget at the speed measured since the previous one.
    assert plans[20] == plans[first]
    later = [(s, p) for s, p in plans.items() if s > 20]
    assert len(later) == 3 and all(p < plans[first] for _, p in later)
    s, p = later[-1]
    assert times[s] >= 8.0 and 9.5 < times[s] + (p - s) * 0.2 <= 10.0  # ends with the budget, not past it
    assert not budget.active
    capped = TimeBudget(seconds=10.0, t0=0.0, cap=50)
    assert [capped.plan(k, 0.1 * k) for k in range(1, first + 1)][-1] == 50  # never past the cap


def test_ctrl_c_saves_a_checkpoint_and_exits_cleanly(tmp_path, data_dir):
    run = tmp_path / "run"
    code, err = interrupt_training(["--data", str(data_dir), "--out", str(run), "--preset", "debug",
                                    "--max-steps", "100000"], run)
    assert code == 130, err
    assert "Traceback" not in err
    assert "checkpoint saved" in err
    state = json.loads((run / "trainer_state.json").read_text())
    assert 5 <= state["step"] < 100000


def test_accumulation_and_bf16_autocast_paths_train(tmp_path, data_dir):
    """The CUDA defaults (bf16 autocast) and gradient accumulation, exercised on the CPU."""
    s = train(debug_cfg("train.max_steps=12", "train.grad_accum=2", "train.dtype=bfloat16"), data_dir,
              tmp_path / "run")
    assert s["tokens_seen"] == 12 * 2 * 4 * 64
    got = losses(tmp_path / "run")
    assert all(l == l and l < 10 for _, l in got)  # finite
    assert got[-1][1] < got[0][1]


def test_micro_optimizer_settings_learn_faster_than_adamw(tmp_path, data_dir):
    """The choice behind `micro` (Muon on hidden matrices, AdamW 1e-2 on the rest; bench/RESULTS.md
    section 6), on the debug model, 100 steps: lower validation loss than AdamW at the old `micro`
    rate, and than the same run with the hidden matrices all but frozen (Muon's rate 1e-9), so
    Muon's own updates must help: a no-op or wrong-signed Muon step loses the second race."""
    micro = cfgmod.PRESETS["micro"]["train"]
    base = [f"train.optimizer={micro['optimizer']}", f"train.lr={micro['lr']}"]
    sets = {"micro": [*base, f"train.muon_lr={micro['muon_lr']}"],
            "hidden_frozen": [*base, "train.muon_lr=1e-9"],
            "adamw": ["train.optimizer=adamw", "train.lr=2e-3"]}
    val = {name: train(debug_cfg("train.max_steps=100", *s), data_dir, tmp_path / name)["val_loss"]
           for name, s in sets.items()}
    assert val["micro"] < val["hidden_frozen"] - 0.05 and val["micro"] < val["adamw"] - 0.1, val


def test_continued_pretraining_starts_from_the_given_run(tmp_path, data_dir, corpus_dir, capsys):
    """`train --task lm --init RUN`: the first step's loss is the run's own loss on that batch; data
    tokenized with another tokenizer is refused, `prepare --tokenizer RUN` makes fitting data."""
    def run_cli(*args, **kw):  # in this process: each CLI start costs ~2 s of imports
        return cli_here(capsys, *args)

    from lmforge.data.tokens import TokenFile
    from lmforge.runs import load_run

    base = tmp_path / "base"
    assert run_cli("train", "--data", str(data_dir), "--preset", "debug", "--max-steps", "10",
                   "--out", str(base)).returncode == 0
    other = tmp_path / "other"
    assert run_cli("prepare", "--input", str(corpus_dir), "--out", str(other), "--vocab-size", "300").returncode == 0
    r = run_cli("train", "--task", "lm", "--init", str(base), "--data", str(other), "--max-steps", "2",
                "--out", str(tmp_path / "refused"))
    assert r.returncode == 2 and "another tokenizer" in r.stderr and f"--tokenizer {base}" in r.stderr, r.stderr
    same = tmp_path / "same"
    r = run_cli("prepare", "--input", str(corpus_dir), "--out", str(same), "--tokenizer", str(base))
    assert r.returncode == 0, r.stderr
    cont = tmp_path / "cont"
    r = run_cli("train", "--task", "lm", "--init", str(base), "--data", str(same), "--max-steps", "2",
                "--set", "train.log_interval=1", "--out", str(cont))
    assert r.returncode == 0, r.stderr
    first = json.loads((cont / "metrics.jsonl").read_text().splitlines()[0])
    run, cfg = load_run(base, device="cpu"), load_run(cont, device="cpu").config
    x, y = TokenFile(same / "train.bin", "uint16").random_batch(cfg.train.batch_size, cfg.model.block_size,
                                                               cfg.train.seed, 0, 0, 0)  # the first step's batch
    with torch.no_grad():
        expected = run.model(x, y)[1].item()
    assert first["step"] == 1 and abs(first["loss"] - expected) < 1e-5
    assert cfg.model == run.config.model  # the given run's own shape
