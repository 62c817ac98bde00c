"""The CLI as a user runs it: prepare -> train -> eval -> generate on a tiny corpus."""

import json

from tests.conftest import cli_here


def test_prepare_train_eval_generate(tmp_path, corpus_dir, capsys):
    def run_cli(*args, **kw):  # in this process: each CLI start costs ~2 s of imports
        return cli_here(capsys, *args)

    data, run = tmp_path / "data", tmp_path / "run"
    r = run_cli("prepare", "--input", str(corpus_dir), "--out", str(data), "--vocab-size", "400", "--json")
    assert r.returncode == 0, r.stderr
    meta = json.loads(r.stdout)
    assert meta["vocab_size"] == 400 and meta["splits"]["val"]["tokens"] > 0

    r = run_cli("train", "--data", str(data), "--out", str(run), "--preset", "debug", "--max-steps", "60", "--json")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["step"] == 60 and summary["tokens_seen"] == 60 * 4 * 64
    cfg = (run / "config.yaml").read_text()
    assert "vocab_size: 448" in cfg  # 400 padded to a multiple of 64

    r = run_cli("eval", str(run), "--json")
    assert r.returncode == 0, r.stderr
    m = json.loads(r.stdout)
    for key in ("val_loss", "val_ppl", "val_bpb", "lzma_bpb", "val_tokens", "val_bytes"):
        assert key in m
    assert m["val_loss"] < 5.0  # well below uniform (ln 448 = 6.1) after 60 steps
    report = (run / "report.md").read_text()
    assert "lzma" in report and "## Samples" in report and f"{m['val_bpb']:.4f}" in report
    assert (run / "plots" / "loss.png").stat().st_size > 1000
    # The samples continue openings of validation documents, not prompts fixed in the code.
    import numpy as np
    from tokenizers import Tokenizer

    val = Tokenizer.from_file(str(data / "tokenizer.json")).decode(
        np.fromfile(data / "val.bin", dtype=json.loads((data / "meta.json").read_text())["dtype"]).tolist())
    assert len(m["sample_prompts"]) == 3 and all(p and p in val for p in m["sample_prompts"])
    assert len(set(m["sample_prompts"])) == 3

    r = run_cli("eval", str(run), "--dynamic-lr", "1e-3", "--prompt", "the model", "--samples", "1", "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["val_bpb"] == m["val_bpb"] and d["dynamic_lr"] == 1e-3
    assert d["dynamic_val_bpb"] < d["val_bpb"]  # adapting to the validation text as it is read pays
    assert f"{d['dynamic_val_bpb']:.4f}" in (run / "report.md").read_text()
    assert d["sample_prompts"] == ["the model"] and "Prompt `'the model'`" in (run / "report.md").read_text()

    r = run_cli("generate", str(run), "--prompt", "the model", "--max-new-tokens", "30", "--seed", "3")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("the model") and len(r.stdout) > len("the model") + 5
    again = run_cli("generate", str(run), "--prompt", "the model", "--max-new-tokens", "30", "--seed", "3")
    assert again.stdout == r.stdout  # seeded sampling is reproducible
    # (the compiled decode step samples the same text: tests/test_model.py, once for the suite)

    r = run_cli("generate", str(run), "--prompt", "the", "--temperature", "0", "--max-new-tokens", "40",
                "--stop", " ")
    assert r.returncode == 0 and " " not in r.stdout[len("the"):].rstrip("\n")
