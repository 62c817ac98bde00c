"""`lmforge serve` as a user runs it: a subprocess on a free port, polled on /health, driven by
the official `openai` client and by raw HTTP for malformed requests."""

import json
import os
import socket
import subprocess
import sys
import time

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from tests.conftest import run_cli  # noqa: E402

KEY = "test-key-123"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(run, *extra):
    """`lmforge serve` on a free port; returns (process, base URL) once /health answers 200."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "lmforge", "serve", str(run), "--port", str(port),
                             "--api-key", KEY, *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(base + "/health", timeout=1).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("server did not come up: " + proc.stderr.read().decode()[-2000:])
        time.sleep(0.2)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, data_dir):
    run = tmp_path_factory.mktemp("serve") / "run"
    r = run_cli("train", "--data", str(data_dir), "--out", str(run), "--preset", "debug", "--max-steps", "30")
    assert r.returncode == 0, r.stderr
    return run


@pytest.fixture(scope="module")
def server(trained_run):
    proc, base = start_server(trained_run, "--max-tokens-cap", "64")
    yield base, trained_run.name
    proc.terminate()
    proc.wait(timeout=10)


def client(base):
    return openai.OpenAI(base_url=base + "/v1", api_key=KEY, max_retries=0)


def test_models_and_completions_with_the_openai_client(server):
    base, name = server
    c = client(base)
    assert [m.id for m in c.models.list().data] == [name]
    out = c.completions.create(model=name, prompt="the model", max_tokens=12, temperature=0)
    assert out.choices[0].finish_reason in ("stop", "length")
    assert out.usage.prompt_tokens > 0 and 0 < out.usage.completion_tokens <= 12
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens
    again = c.completions.create(model=name, prompt="the model", max_tokens=12, temperature=0)
    assert again.choices[0].text == out.choices[0].text  # greedy is deterministic


def test_streaming_equals_non_streaming_and_ends_with_done(server):
    base, name = server
    c = client(base)
    whole = c.completions.create(model=name, prompt="a tokenizer", max_tokens=16, temperature=0).choices[0].text
    pieces = [ch.choices[0].text for ch in c.completions.create(model=name, prompt="a tokenizer", max_tokens=16,
                                                                 temperature=0, stream=True)]
    assert "".join(pieces) == whole
    with httpx.stream("POST", base + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                      json={"model": name, "prompt": "x", "max_tokens": 4, "stream": True}) as r:
        lines = [ln for ln in r.iter_lines() if ln]
    assert lines[-1] == "data: [DONE]" and all(ln.startswith("data: ") for ln in lines)


def test_chat_seed_n_and_stop(server):
    base, name = server
    c = client(base)
    msgs = [{"role": "user", "content": "what does the model read?"}]
    a = c.chat.completions.create(model=name, messages=msgs, max_tokens=20, temperature=1.0, seed=7, n=2)
    b = c.chat.completions.create(model=name, messages=msgs, max_tokens=20, temperature=1.0, seed=7, n=2)
    assert [ch.message.content for ch in a.choices] == [ch.message.content for ch in b.choices]
    assert len(a.choices) == 2 and a.choices[0].message.role == "assistant"
    streamed = "".join(ch.choices[0].delta.content or "" for ch in c.chat.completions.create(
        model=name, messages=msgs, max_tokens=20, temperature=1.0, seed=7, stream=True))
    assert streamed == a.choices[0].message.content
    full = c.completions.create(model=name, prompt="the", max_tokens=30, temperature=0).choices[0].text
    if len(full) > 3:
        stop = full[2:4]
        cut = c.completions.create(model=name, prompt="the", max_tokens=30, temperature=0, stop=[stop])
        assert cut.choices[0].text == full[:full.index(stop)] and cut.choices[0].finish_reason == "stop"


def test_auth_and_bad_requests_get_openai_style_errors(server):
    base, name = server
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=base + "/v1", api_key="wrong", max_retries=0).models.list()
    assert httpx.get(base + "/health").status_code == 200  # /health needs no key
    h = {"Authorization": f"Bearer {KEY}"}
    cases = [({"model": name, "prompt": "x", "max_tokens": 10_000}, 400),
             ({"model": name, "prompt": "x", "temperature": -1}, 400),
             ({"model": "nope", "prompt": "x"}, 400),
             ({"model": name, "prompt": "word " * 500}, 400),  # longer than the context
             ({"model": name, "prompt": 5}, 400)]
    for body, status in cases:
        r = httpx.post(base + "/v1/completions", headers=h, json=body)
        assert r.status_code == status, (body, r.text)
        assert set(r.json()["error"]) >= {"message", "type"}
    r = httpx.post(base + "/v1/completions", headers={**h, "Content-Type": "application/json"},
                   content=b'{"model": "x", "prompt": "\xff\xfe')
    assert r.status_code == 400 and "error" in r.json()
    r = httpx.post(base + "/v1/completions", headers={**h, "Content-Type": "application/json"},
                   content=b"x" * 10_000_000)
    assert r.status_code == 413
    ok = client(base).completions.create(model=name, prompt="still serving", max_tokens=3)
    assert ok.choices  # the server kept serving


def test_requests_past_max_concurrency_get_429_and_the_rest_complete(trained_run):
    import threading

    proc, base = start_server(trained_run, "--max-concurrency", "1", "--max-tokens-cap", "64")
    try:
        barrier, statuses = threading.Barrier(8), []

        def one():
            barrier.wait()
            r = httpx.post(base + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=30,
                           json={"model": trained_run.name, "prompt": "the", "max_tokens": 64, "temperature": 0})
            statuses.append((r.status_code, r.json()))

        threads = [threading.Thread(target=one) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        codes = sorted(code for code, _ in statuses)
        assert 200 in codes and 429 in codes and set(codes) <= {200, 429}
        assert all(body["error"]["code"] == "rate_limit_exceeded" for code, body in statuses if code == 429)
        assert all(body["usage"]["completion_tokens"] > 0 for code, body in statuses if code == 200)
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_metrics_count_requests_tokens_and_latency(server):
    base, name = server
    before = httpx.get(base + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    out = client(base).completions.create(model=name, prompt="the model", max_tokens=5, temperature=0)
    text = httpx.get(base + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text

    def value(body, metric):
        lines = [ln for ln in body.splitlines() if ln.startswith(metric + " ") or ln.startswith(metric + "{")]
        return sum(float(ln.rsplit(" ", 1)[1]) for ln in lines)
    assert value(text, "lmforge_generated_tokens_total") - value(before, "lmforge_generated_tokens_total") \
        == out.usage.completion_tokens
    assert value(text, "lmforge_prompt_tokens_total") - value(before, "lmforge_prompt_tokens_total") \
        == out.usage.prompt_tokens
    assert 'lmforge_requests_total{endpoint="/v1/completions",status="200"}' in text
    assert "lmforge_request_seconds_bucket" in text and "lmforge_requests_in_flight" in text
    assert httpx.get(base + "/metrics").status_code == 401  # the key is required here too


def test_refused_requests_are_counted(server):
    base, _ = server
    httpx.get(base + "/v1/models", headers={"Authorization": "Bearer wrong"})
    text = httpx.get(base + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    assert 'lmforge_requests_total{endpoint="/v1/models",status="401"}' in text


def test_an_encoder_run_answers_400_saying_it_cannot_generate(tmp_path):
    """In-process (FastAPI's test client): an endpoint the loaded model cannot serve is a 400."""
    from fastapi.testclient import TestClient

    from lmforge import config as cfgmod
    from lmforge.data.tokenizer import train_bpe
    from lmforge.models.bert import Bert, BertConfig
    from lmforge.serve.app import Engine, create_app
    from lmforge.train.checkpoint import save_model

    run = tmp_path / "enc"
    run.mkdir()
    tok = train_bpe(["some text to learn from"] * 5, 300)
    cfg = cfgmod.RunConfig(arch="bert", model=BertConfig(vocab_size=300, block_size=32, n_layer=1, n_head=2, n_embd=16))
    cfgmod.save(cfg, run / "config.yaml")
    tok.save(str(run / "tokenizer.json"))
    save_model(Bert(cfg.model), run / "model.safetensors")
    app = create_app(Engine(run))
    r = TestClient(app).post("/v1/completions", json={"model": "enc", "prompt": "hi"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "unsupported_model"
    assert "encoder" in r.json()["error"]["message"]
