"""lmforge export --format onnx: graphs checked against PyTorch with onnxruntime (outputs on other
shapes than the export's, greedy decoding through past keys/values), int8 graphs, bad inputs."""

import json

import numpy as np
import pytest

from tests.conftest import cli_here

ort = pytest.importorskip("onnxruntime")


def test_text_classifier_onnx_answers_as_pytorch_does(keyword_classifier, capsys, tmp_path):
    from lmforge.data.tokenizer import encode_batch, load_tokenizer
    from lmforge.interop.onnx import session

    out = tmp_path / "onnx"
    r = cli_here(capsys, "export", keyword_classifier, "--format", "onnx", "--out", out, "--quantize", "int8", "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["kind"] == "text-classifier" and res["inputs"] == ["input_ids", "attention_mask"]
    fp32, int8 = res["checks"]
    assert fp32["max_abs_diff"] < 1e-4 and int8["max_abs_diff"] < 0.2 and int8["size_mb"] < fp32["size_mb"]
    assert fp32["onnxruntime_ms"] > 0 and fp32["pytorch_ms"] > 0
    # Each graph's quality on the run's validation texts, beside PyTorch's: fp32 the same figures,
    # int8 measured (its accuracy is what the export report now says, not only its parity).
    assert fp32["quality"]["accuracy"] == pytest.approx(res["pytorch_quality"]["accuracy"], abs=0.01)
    assert set(int8["quality"]) == {"accuracy", "macro_f1", "n"}
    assert abs(int8["quality"]["accuracy"] - res["pytorch_quality"]["accuracy"]) <= 0.1
    assert {"model.onnx", "model.int8.onnx", "tokenizer.json", "labels.json", "export_report.json"} <= \
        {p.name for p in out.iterdir()}
    # What a user of the graph does: tokenize with the shipped tokenizer, run onnxruntime, read labels.
    labels = json.loads((out / "labels.json").read_text())
    ids, mask = encode_batch(load_tokenizer(out / "tokenizer.json"), ["please awful order", "great help me today"], 32)
    logits = session(out / "model.onnx").run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
    assert [labels[i] for i in logits.argmax(1)] == ["no", "yes"]


@pytest.mark.parametrize("preset", ["debug", "llama-debug"])
def test_decoder_onnx_decodes_greedily_with_past_keys_and_values(preset, capsys, tmp_path, data_dir):
    from lmforge.generate import generate_ids
    from lmforge.interop.onnx import greedy_onnx, session
    from lmforge.runs import load_run

    import torch

    run = tmp_path / "lm"
    assert cli_here(capsys, "train", "--data", data_dir, "--out", run, "--preset", preset, "--max-steps", "3").returncode == 0
    out = tmp_path / "onnx"
    r = cli_here(capsys, "export", run, "--format", "onnx", "--out", out, "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    check = res["checks"][0]
    assert res["kind"] == "decoder" and check["greedy_tokens_equal"] and check["max_abs_diff"] < 1e-4
    assert res["outputs"][0] == "logits" and "present_key_0" in res["outputs"]
    loaded = load_run(run, device="cpu")
    sess = session(out / "model.onnx")
    prompt = [5, 17, 3, 9, 2, 11, 40]  # a longer prompt than the export's own check
    ours = [int(t[0]) for t in generate_ids(loaded.model, torch.tensor([prompt]), 24, temperature=0.0)]
    assert greedy_onnx(sess, loaded.model, prompt, 24) == ours
    # Batched prefill through the graph equals the model's logits.
    ids = np.random.default_rng(0).integers(0, loaded.model.config.vocab_size, (2, 13))
    L, H, D = loaded.model.cache_shape()
    empty = {f"past_{kv}_{i}": np.zeros((2, H, 0, D), np.float32) for i in range(L) for kv in ("key", "value")}
    got = sess.run(["logits"], {"input_ids": ids, **empty})[0]
    with torch.no_grad():
        want = loaded.model(torch.from_numpy(ids))[0].numpy()
    assert np.abs(got - want).max() < 1e-4


def test_image_classifier_onnx_and_bad_inputs(keyword_classifier, digits_mlp, capsys, tmp_path, data_dir):
    _, img = digits_mlp
    lstm = tmp_path / "lstm"
    assert cli_here(capsys, "train", "--data", data_dir, "--out", lstm, "--preset", "lstm-debug",
                    "--max-steps", "1").returncode == 0
    r = cli_here(capsys, "export", img, "--format", "onnx", "--out", tmp_path / "img.onnx", "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["kind"] == "image-classifier" and res["inputs"] == ["pixels"] and res["checks"][0]["max_abs_diff"] < 1e-4
    assert res["checks"][0]["quality"]["accuracy"] == pytest.approx(res["pytorch_quality"]["accuracy"], abs=0.01)

    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("x")
    int8 = tmp_path / "int8"
    assert cli_here(capsys, "compress", keyword_classifier, "--out", int8, "--quantize", "int8").returncode == 0
    cases = [
        (["export", keyword_classifier.parent / "base", "--format", "onnx", "--out", tmp_path / "a"],
         "ONNX export covers text and image classifiers and transformer decoders"),
        (["export", img, "--format", "onnx", "--out", busy], "is not empty"),
        (["export", lstm, "--format", "onnx", "--out", tmp_path / "a"], "transformer decoders"),
        (["export", img, "--format", "hf", "--out", tmp_path / "b", "--quantize", "int8"], "--quantize applies to"),
        (["export", int8, "--format", "onnx", "--out", tmp_path / "c"], "holds int8 PyTorch weights"),
        (["export", tmp_path / "nowhere", "--format", "onnx", "--out", tmp_path / "d"], "not a run directory"),
    ]
    for args, message in cases:
        r = cli_here(capsys, *args)
        assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, (args, r.stderr)
    assert not any((tmp_path / n).exists() for n in "abcd") and [p.name for p in busy.iterdir()] == ["keep.txt"]


def test_container_context_serves_the_run_through_its_entry_command(keyword_classifier, capsys, tmp_path):
    """Docker is absent here: the context is checked by running its entry command as the image would."""
    import os
    import subprocess
    import sys

    import httpx

    from lmforge.serve.common import start_server

    ctx = tmp_path / "ctx"
    r = cli_here(capsys, "export", keyword_classifier, "--format", "container", "--out", ctx, "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    docker = (ctx / "Dockerfile").read_text()
    assert f'"torch=={res["torch"]}" --index-url https://download.pytorch.org/whl/cpu' in docker
    assert "HEALTHCHECK" in docker and 'CMD ["sh", "/app/serve.sh"]' in docker
    assert any(p.startswith("fastapi==") for p in (ctx / "requirements.txt").read_text().split())
    assert {"config.yaml", "model.safetensors", "tokenizer.json", "labels.json"} == {p.name for p in (ctx / "run").iterdir()}
    bare = {k: v for k, v in os.environ.items() if k != "LMFORGE_API_KEY"}
    refused = subprocess.run(["sh", str(ctx / "serve.sh")], env=bare, capture_output=True, text=True, timeout=30)
    assert refused.returncode != 0 and "LMFORGE_API_KEY" in refused.stderr  # never served without a key
    env = {"LMFORGE_API_KEY": "ctx-key", "LMFORGE_HOST": "127.0.0.1", "PYTHONPATH": str(ctx / "src"),
           "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"}  # `python`: one with the requirements
    proc, base = start_server([], env=env, command=["sh", str(ctx / "serve.sh")])
    try:
        body = {"model": "run", "input": ["please awful order"]}
        assert httpx.post(base + "/v1/classify", json=body).status_code == 401
        out = httpx.post(base + "/v1/classify", json=body, headers={"Authorization": "Bearer ctx-key"}, timeout=60)
        assert out.status_code == 200 and out.json()["data"][0]["label"] == "no"
        where = subprocess.run([sys.executable, "-P", "-c", "import lmforge; print(lmforge.__file__)"], env={**os.environ, **env},
                               capture_output=True, text=True).stdout
        assert where.startswith(str(ctx / "src"))  # the context's own source is what runs
    finally:
        proc.terminate()
        proc.wait(timeout=10)
