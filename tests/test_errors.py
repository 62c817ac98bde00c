"""Bad input: one clear error line on stderr, exit code 2, and no half-written output."""

import pytest

from lmforge import config as cfgmod
from lmforge.errors import UserError
from tests.conftest import run_cli


def assert_clean_failure(r, *needles):
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = [l for l in r.stderr.splitlines() if l.strip() and not l.startswith("[lmforge]")]
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("lmforge: error: ")
    for n in needles:
        assert n in lines[0], lines[0]
    assert "Traceback" not in r.stderr


def test_missing_input_path(tmp_path):
    r = run_cli("prepare", "--input", str(tmp_path / "nope"), "--out", str(tmp_path / "out"))
    assert_clean_failure(r, "input not found")
    assert not (tmp_path / "out").exists()


def test_empty_corpus(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "empty.txt").write_text("   \n")
    r = run_cli("prepare", "--input", str(tmp_path / "in"), "--out", str(tmp_path / "out"))
    assert_clean_failure(r, "no usable documents")
    assert not (tmp_path / "out").exists()


def test_only_non_utf8_files(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "latin1.txt").write_bytes("d\xe9j\xe0 vu".encode("latin-1"))
    r = run_cli("prepare", "--input", str(tmp_path / "in"), "--out", str(tmp_path / "out"))
    assert_clean_failure(r, "no usable documents", "not valid UTF-8")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("setting,needle", [
    ("train.not_a_key=1", "unknown config key 'train.not_a_key'"),
    ("model.n_layer=two", "expects int"),
    ("nosection=1", "section.key=value"),
    ("task.label_smoothing=0.1", "unknown config key 'task.label_smoothing'"),  # a classify option
])
def test_bad_set_overrides(tmp_path, data_dir, setting, needle):
    r = run_cli("train", "--data", str(data_dir), "--out", str(tmp_path / "run"), "--preset", "debug",
                "--set", setting)
    assert_clean_failure(r, needle)
    assert not (tmp_path / "run").exists()


def test_unknown_preset_and_missing_data(tmp_path, data_dir):
    assert_clean_failure(run_cli("train", "--data", str(data_dir), "--out", str(tmp_path / "r"),
                                 "--preset", "huge"), "unknown preset")
    assert_clean_failure(run_cli("train", "--data", str(tmp_path), "--out", str(tmp_path / "r"),
                                 "--preset", "debug"), "not a prepared data directory")
    assert not (tmp_path / "r").exists()


def test_resume_without_checkpoint(tmp_path, data_dir):
    r = run_cli("train", "--data", str(data_dir), "--out", str(tmp_path / "run"), "--resume")
    assert_clean_failure(r, "no checkpoint")
    assert not (tmp_path / "run").exists()


def test_eval_and_generate_on_a_non_run(tmp_path):
    assert_clean_failure(run_cli("eval", str(tmp_path)), "not a run directory")
    assert_clean_failure(run_cli("eval", str(tmp_path), "--dynamic-lr", "0"), "--dynamic-lr must be positive")
    assert_clean_failure(run_cli("generate", str(tmp_path), "--prompt", "x"), "not a run directory")


def test_context_too_long_for_the_data(tmp_path, data_dir):
    r = run_cli("train", "--data", str(data_dir), "--out", str(tmp_path / "run"), "--preset", "debug",
                "--set", "model.block_size=100000")
    assert_clean_failure(r, "too few for a context")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("args,needle", [
    (["--folds", "1"], "--folds must be at least 2"),
    (["--folds", "60"], "more folds than there are files"),
    (["--max-seconds", "30"], "--max-seconds must be more than 40"),
])
def test_classification_quickstart_bad_options(tmp_path, args, needle):
    out = tmp_path / "qc"
    assert_clean_failure(run_cli("quickstart", "--task", "classify", "--out", str(out), *args), needle)
    assert not out.exists()


@pytest.mark.parametrize("setting", ["train.lr=nan", "train.lr=inf", "train.beta2=1.5", "train.weight_decay=-1",
                                     "train.grad_clip=-1", "train.warmup_steps=-5", "train.checkpoint_interval=-1",
                                     "train.max_seconds=nan", "train.device=banana"])
def test_nonsense_training_values_are_one_error_line(setting, data_dir, tmp_path):
    """issue 22: these were accepted (lr=inf trained to NaN and exited 0) or ended in a traceback."""
    r = run_cli("train", "--data", str(data_dir), "--out", str(tmp_path / "run"), "--preset", "debug",
                "--max-steps", "2", "--set", setting)
    assert r.returncode == 2, (setting, r.stderr[-500:])
    assert r.stderr.strip().startswith("lmforge: error:") and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_a_diverging_loss_stops_training_with_an_error(data_dir, tmp_path):
    from lmforge.train.trainer import train

    cfg = cfgmod.build_config("debug", overrides=["train.lr=1e12", "train.grad_clip=0", "train.max_steps=30",
                                                  "train.warmup_steps=1", "train.log_interval=1"])
    with pytest.raises(UserError, match="training loss became"):
        train(cfg, data_dir, tmp_path / "run")
    r = run_cli("train", "--data", str(data_dir), "--out", str(tmp_path / "r2"), "--preset", "debug",
                "--stop-at", "-1")
    assert r.returncode == 2 and "--stop-at" in r.stderr


def test_a_server_on_a_busy_port_is_one_error_line_before_its_banner(tmp_path):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = str(busy.getsockname()[1])
        for args in (["serve", str(tmp_path / "run")], ["support", "serve", str(tmp_path / "app")]):
            r = run_cli(*args, "--port", port)
            assert r.returncode == 2, r.stderr
            assert r.stderr.startswith("lmforge: error: cannot listen on 127.0.0.1:" + port), r.stderr
            assert len(r.stderr.strip().splitlines()) == 1  # no banner, no fresh agent key


def test_resume_on_a_finished_run_says_it_is_complete(tmp_path, data_dir):
    run = tmp_path / "run"
    assert run_cli("train", "--data", str(data_dir), "--preset", "debug", "--max-steps", "2", "--out", str(run)) \
        .returncode == 0
    r = run_cli("train", "--data", str(data_dir), "--out", str(run), "--resume")
    assert r.returncode == 0 and "already complete (step 2/2)" in r.stdout, r.stdout + r.stderr


def test_generate_on_a_classifier_names_the_verbs_that_serve_it(tmp_path):
    from tests.test_serve import _tiny_encoder_run

    run = _tiny_encoder_run(tmp_path / "clf", num_labels=2)
    assert_clean_failure(run_cli("generate", str(run), "--prompt", "x"), "not a text generator")
    assert "predict" in run_cli("generate", str(run), "--prompt", "x").stderr


def test_damaged_run_directories_and_odd_flags_are_one_error_line(tmp_path, data_dir, capsys):
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    from lmforge.train.trainer import train

    good = tmp_path / "good"
    train(cfgmod.build_config("debug", overrides=["train.max_steps=2"]), data_dir, good)

    def damaged(name, file, write):
        run = tmp_path / name
        shutil.copytree(good, run)
        write(run / file)
        return run
    weights = load_file(str(good / "model.safetensors"))
    key = next(iter(weights))
    cases = [
        (damaged("truncated", "model.safetensors", lambda p: p.write_bytes(p.read_bytes()[:1000])),
         ["generate", "{run}", "--prompt", "a"], "damaged or not a safetensors file"),
        (damaged("random", "model.safetensors", lambda p: p.write_bytes(bytes(range(256)) * 20)),
         ["eval", "{run}"], "damaged or not a safetensors file"),
        (damaged("shape", "model.safetensors", lambda p: save_file({**weights, key: torch.zeros(3, 3)}, str(p))),
         ["generate", "{run}", "--prompt", "a"], "do not fit the model"),
        (damaged("emptycfg", "config.yaml", lambda p: p.write_text("")), ["generate", "{run}", "--prompt", "a"],
         "no model section"),
        (damaged("state", "trainer_state.json", lambda p: p.write_text("{")),
         ["train", "--out", "{run}", "--resume", "--data", str(data_dir)], "damaged"),
        (damaged("tensors", "trainer_state.safetensors", lambda p: p.write_bytes(b"\0" * 64)),
         ["train", "--out", "{run}", "--resume", "--data", str(data_dir), "--max-steps", "4"], "damaged"),
        (good, ["generate", "{run}", "--prompt", "a", "--temperature", "nan"], "--temperature"),
        (good, ["generate", "{run}", "--prompt", "a", "--seed", str(2 ** 70)], "64 bits"),
        (good, ["eval", "{run}", "--batch-size", "0"], "--batch-size"),
    ]
    from types import SimpleNamespace

    from lmforge.cli import main

    capsys.readouterr()
    for run, args, needle in cases:  # in this process (each CLI start costs ~2 s); a traceback fails the test
        code = main([a.format(run=run) for a in args])
        assert_clean_failure(SimpleNamespace(returncode=code, stderr=capsys.readouterr().err), needle)


def test_long_csv_fields_are_read_and_deep_json_is_one_error(tmp_path):
    from lmforge.data.labeled import read_examples

    long = "word " * 40_000  # past the csv module's default field limit of 131,072 characters
    (tmp_path / "long.csv").write_text(f'text,label\n"{long}",a\n"two\nlines",b\n')
    ex = read_examples(tmp_path / "long.csv")
    assert ex.texts == [long, "two\nlines"] and ex.labels == ["a", "b"]  # a quoted newline stays
    (tmp_path / "deep.jsonl").write_text('{"text": ' + "[" * 100_000 + "]" * 100_000 + ', "label": "x"}\n')
    with pytest.raises(UserError, match="nested too deeply"):
        read_examples(tmp_path / "deep.jsonl")
