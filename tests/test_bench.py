"""`lmforge bench`: same-run comparison with HF transformers; figures are computed, not asserted fast."""

import json

import pytest

from tests.conftest import run_cli

TINY = ["--set", "model.n_layer=1", "--set", "model.n_head=2", "--set", "model.n_embd=32",
        "--set", "model.block_size=64", "--set", "model.vocab_size=256", "--rounds", "2"]


def test_bench_train_reports_both_implementations_and_their_ratio():
    pytest.importorskip("transformers")
    r = run_cli("bench", "train", *TINY, "--steps", "2", "--batch-size", "2", "--device", "cpu", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["benchmark"] == "train" and out["device"] == "cpu" and out["torch"]
    assert out["settings"]["n_layer"] == 1 and out["settings"]["batch_size"] == 2
    ours, ref = out["results"]["lmforge"], out["results"]["hf-transformers"]
    for res in (ours, ref):
        assert res["rounds"] == 2 and res["median_step_ms"] > 0
        assert res["tokens_per_second"] == pytest.approx(2 * 64 / (res["median_step_ms"] / 1000), rel=1e-3)
    assert out["ratio"] == pytest.approx(ours["tokens_per_second"] / ref["tokens_per_second"], abs=1e-3)


def test_bench_train_measures_cpu_peak_memory_and_what_saves_it():
    # Peak memory on the CPU comes from the profiler's allocation events (no allocator statistics
    # there). Full logits (B*T x V floats, and their gradient) must show up against the chunked
    # loss, and activation checkpointing must keep less than storing every block's activations.
    shape = ["--set", "model.n_layer=4", "--set", "model.n_head=2", "--set", "model.n_embd=32",
             "--set", "model.block_size=64", "--set", "model.vocab_size=4096", "--rounds", "1",
             "--steps", "1", "--batch-size", "4", "--device", "cpu", "--no-reference", "--json"]
    peaks = {}
    for name, extra in {"chunked": ["--set", "train.loss_chunk=64"], "full": ["--set", "train.loss_chunk=0"],
                        "checkpointed": ["--set", "train.loss_chunk=64",
                                         "--set", "train.activation_checkpointing=true"]}.items():
        r = run_cli("bench", "train", *shape, *extra)
        assert r.returncode == 0, r.stderr
        assert "profiler" not in r.stderr.lower()  # its C++ log lines are silenced
        peaks[name] = json.loads(r.stdout)["results"]["lmforge"]["peak_memory_gb"] * 1e9
    params = 4 * (12 * 32 * 32 + 13 * 32) + 4096 * 32 + 64 * 32 + 2 * 32  # weights; AdamW keeps 2 more copies
    logits = 4 * 64 * 4096 * 4  # bytes of the full logits
    for peak in peaks.values():
        assert peak > 3 * params * 4  # weights, two AdamW moments and gradients are counted
    assert peaks["full"] - peaks["chunked"] > logits  # the logits and more (their gradient) are gone
    assert peaks["checkpointed"] < peaks["chunked"]


def test_bench_generate_checks_greedy_tokens_against_the_reference():
    pytest.importorskip("transformers")
    r = run_cli("bench", "generate", *TINY, "--batch-size", "2", "--prompt-tokens", "8",
                "--new-tokens", "16", "--device", "cpu", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["greedy_match"] is True and out["greedy_first_mismatch"] is None
    assert out["settings"]["new_tokens"] == 16 and out["settings"]["reference_cache"] == "static"
    assert set(out["results"]) == {"lmforge", "hf-transformers"}


def test_bench_without_reference_and_text_output():
    r = run_cli("bench", "generate", *TINY, "--prompt-tokens", "4", "--new-tokens", "8", "--device", "cpu",
                "--no-reference")
    assert r.returncode == 0, r.stderr
    assert "lmforge" in r.stdout and "hf-transformers" not in r.stdout
    assert "--no-reference" in r.stdout  # says why the reference is missing


@pytest.mark.parametrize("args", [["train", "--batch-size", "0"], ["generate", "--new-tokens", "100"],
                                  ["train", "--set", "model.nope=1"]])
def test_bench_bad_input_is_one_line_and_exit_2(args):
    r = run_cli("bench", *args[:1], *TINY, *args[1:], "--device", "cpu")
    assert r.returncode == 2
    assert r.stderr.strip().startswith("lmforge: error:") and len(r.stderr.strip().splitlines()) == 1
