"""The one spine: every task trains in the one loop (exact --stop-at/--resume, Ctrl-C checkpoints,
DDP, metrics.jsonl and TensorBoard), and lmforge/ has no import cycles."""

import ast
import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from lmforge import config as cfgmod
from tests.conftest import interrupt_training, cli_here, run_cli
from tests.test_classify import data, tiny_bert  # noqa: F401  (fixtures)
from tests.test_distributed import torchrun

LMFORGE = Path(__file__).resolve().parent.parent / "lmforge"


def step_losses(run) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


def classify(tiny_bert, train, out, *args):  # noqa: F811
    # The interface the checks use, word for word.
    return run_cli("train", "--task", "classify", "--init", str(tiny_bert), "--data", str(train),
                   "--max-length", "64", *args, "--out", str(out))


def test_classifier_stopped_and_resumed_logs_bitwise_the_uninterrupted_losses(tiny_bert, data, tmp_path, capsys):  # noqa: F811
    def run_cli(*args, **kw):  # in this process: each CLI start costs ~2 s of imports
        return cli_here(capsys, *args)

    train, _, _ = data
    full, part = tmp_path / "full", tmp_path / "part"
    r = classify(tiny_bert, train, full, "--max-steps", "10", "--set", "model.dropout=0.2")
    assert r.returncode == 0, r.stderr
    assert cfgmod.load(full / "config.yaml").model.dropout == 0.2  # dropout on: the RNG state matters too
    r = classify(tiny_bert, train, part, "--max-steps", "10", "--stop-at", "5", "--set", "model.dropout=0.2")
    assert r.returncode == 0, r.stderr
    assert [s for s, _ in step_losses(part)] == [1, 2, 3, 4, 5]
    r = classify(tiny_bert, train, part, "--max-steps", "10", "--resume")
    assert r.returncode == 0, r.stderr
    want = step_losses(full)
    assert [s for s, _ in want] == list(range(1, 11))  # one record per step
    assert step_losses(part) == want  # exact float equality: same batches, dropout masks, moments
    a, b = load_file(full / "model.safetensors"), load_file(part / "model.safetensors")
    assert all((a[k] == b[k]).all() for k in a)  # and the same kept weights
    summary = json.loads((part / "train_summary.json").read_text())
    assert summary["steps"] == 10 and summary["stopped_by"] in ("max_steps", "early_stop")
    assert (part / "labels.json").is_file() and (part / "report.md").is_file()


def test_a_finished_run_that_kept_its_best_weights_resumes_from_its_last_ones(tiny_bert, data, tmp_path):  # noqa: F811
    """keep_best: model.safetensors holds the best weights; the last ones travel in the trainer
    state, so extending the schedule continues exactly where training stopped."""
    train, val, _ = data
    run = tmp_path / "run"
    common = ["--val", str(val), "--early-stop", "loss", "--patience", "0", "--set", "train.eval_interval=2",
              "--set", "train.lr=1e-1"]  # a rate so high that the loss gets worse: the best is early
    r = classify(tiny_bert, train, run, "--max-steps", "12", *common, "--json")
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    state = json.loads((run / "trainer_state.json").read_text())
    assert state["step"] == 12 and state["model_step"] == s["best_step"]
    if s["best_step"] == 12:
        pytest.skip("the last step was the best here: nothing to tell apart")
    assert not (run / "best.safetensors").exists()
    r = classify(tiny_bert, train, run, "--max-steps", "14", "--resume", *common[:6], "--json")
    assert r.returncode == 0, r.stderr
    assert [st for st, _ in step_losses(run)][-2:] == [13, 14]


def test_ctrl_c_during_classification_leaves_a_resumable_checkpoint(tiny_bert, data, tmp_path):  # noqa: F811
    train, _, _ = data
    run = tmp_path / "run"
    code, err = interrupt_training(["--task", "classify", "--init", str(tiny_bert), "--data", str(train),
                                    "--max-steps", "100000", "--out", str(run)], run)
    assert code == 130, err
    assert "Traceback" not in err and "checkpoint saved" in err
    step = json.loads((run / "trainer_state.json").read_text())["step"]
    assert 5 <= step < 100000
    r = run_cli("train", "--out", str(run), "--resume", "--max-steps", str(step + 3), "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["step"] == step + 3
    assert [s for s, _ in step_losses(run)][-3:] == [step + 1, step + 2, step + 3]


def test_classifier_under_two_process_ddp_equals_one_process_with_double_accumulation(tiny_bert, data, tmp_path):  # noqa: F811
    train, _, _ = data
    # Without dropout: each process draws its own masks, so with dropout the two runs differ by design.
    common = ["--task", "classify", "--init", str(tiny_bert), "--data", str(train), "--max-steps", "6",
              "--val-fraction", "0", "--set", "train.lr=2e-3", "--set", "model.dropout=0.0", "--json"]
    one = run_cli("train", *common, "--set", "train.grad_accum=2", "--out", str(tmp_path / "one"))
    assert one.returncode == 0, one.stderr
    two = torchrun("train", *common, "--out", str(tmp_path / "two"))
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = json.loads(one.stdout), json.loads(two.stdout)
    assert b["processes"] == 2 and a["examples_seen"] == b["examples_seen"] == 6 * 2 * 16
    wa, wb = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    assert sorted(wa) == sorted(wb)
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-5
    la, lb = step_losses(tmp_path / "one"), step_losses(tmp_path / "two")
    assert [s for s, _ in la] == [s for s, _ in lb] == list(range(1, 7))  # written once, by process 0
    assert [x for _, x in lb] == pytest.approx([x for _, x in la], abs=1e-5)


def test_tensorboard_event_files_hold_the_logged_losses(data_dir, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    r = run_cli("train", "--data", str(data_dir), "--out", str(run), "--preset", "debug", "--max-steps", "6",
                "--set", "train.tensorboard=true", "--set", "train.eval_interval=3")
    assert r.returncode == 0, r.stderr
    events = list(run.glob("events.out.tfevents.*"))
    assert events
    acc = EventAccumulator(str(run))
    acc.Reload()
    logged = step_losses(run)
    got = [(e.step, e.value) for e in acc.Scalars("train/loss")]
    assert [s for s, _ in got] == [s for s, _ in logged]
    assert [v for _, v in got] == pytest.approx([v for _, v in logged], rel=1e-6)  # stored as float32
    val = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if "val_loss" in x]
    assert [e.step for e in acc.Scalars("val/loss")] == [v["step"] for v in val]


def _module_imports(path: Path, name: str) -> set[str]:
    """The lmforge modules ``name`` imports when it is imported (top-level statements only:
    imports inside functions run when called, which is how verbs stay lazy)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in tree.body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.dump(node.test):
            continue
        for sub in ast.walk(node) if isinstance(node, (ast.If, ast.Try)) else [node]:
            if isinstance(sub, ast.Import):
                out |= {a.name for a in sub.names if a.name.startswith("lmforge")}
            elif isinstance(sub, ast.ImportFrom):
                base = sub.module or ""
                if sub.level:
                    parts = package.split(".")[: len(package.split(".")) - sub.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                if base.startswith("lmforge"):
                    out.add(base)
                    out |= {f"{base}.{a.name}" for a in sub.names}
    return out


def test_no_import_cycles_inside_lmforge():
    modules = {}
    for path in LMFORGE.rglob("*.py"):
        rel = path.relative_to(LMFORGE.parent).with_suffix("")
        name = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        modules[name] = path
    graph = {}
    for name, path in modules.items():
        deps = set()
        for dep in _module_imports(path, name):
            while dep and dep not in modules:  # `from pkg import name`: name may be a function
                dep = dep.rpartition(".")[0]
            # Importing a.b.c imports a and a.b first.
            parts = dep.split(".")
            deps |= {".".join(parts[:i]) for i in range(1, len(parts) + 1)} & set(modules)
        graph[name] = deps - {name}
    cycles, state = [], {}

    def visit(node, stack):
        state[node] = "open"
        for dep in sorted(graph[node]):
            if state.get(dep) == "open":
                cycles.append(stack[stack.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, stack + [dep])
        state[node] = "done"
    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    # A package's __init__ importing its own submodules is how a package is built, not a cycle.
    real = [c for c in cycles if not all(m.startswith(c[0] + ".") or m == c[0] for m in c[1:])]
    assert not real, "import cycles: " + "; ".join(" -> ".join(c) for c in real)


def test_every_model_family_is_one_row_and_every_task_one_row():
    from lmforge.models import MODELS
    from lmforge.tasks import TASKS

    for name, spec in MODELS.items():
        for attr in ("blocks", "embeddings", "state_dict_for_save", "load_saved_state") + (
                ("classification_config",) if spec.model.classifier_head else ()):  # a GAN is no classifier
            assert callable(getattr(spec.model, attr, None)), (name, attr)
        assert isinstance(spec.model.can_generate, bool) and isinstance(spec.model.can_embed, bool)
    for name, task in TASKS.items():
        assert task.name == name and task.Options().name == name
        # Every task reports its loss, but a GAN (it has no validation loss: its Fréchet distance).
        assert "loss" in task.METRICS or name == "gan"
        assert set(task.LOWER_IS_BETTER) <= set(task.METRICS)
    # No module outside the model table picks behaviour by family name.
    offenders = [str(p.relative_to(LMFORGE)) for p in LMFORGE.rglob("*.py")
                 if p.parent.name != "models" and ('arch == "bert"' in p.read_text() or 'arch == "gpt"' in p.read_text())]
    assert offenders == [], offenders
