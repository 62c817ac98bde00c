"""lmforge explain: Captum attributions (completeness), faithfulness curves against random order on a
model trained to depend on one token, the attention path, and the command on every run kind."""

import json
import os
import random

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from tests.conftest import FILLER, KEYWORDS, cli_here  # noqa: E402

pytest.importorskip("captum")

def test_integrated_gradients_are_complete(keyword_classifier):
    """IG's attributions sum to score(input) - score(baseline), for tokens and for pixels."""
    from lmforge.explain.attribution import attribute
    from lmforge.explain.subjects import image_classifier, text_classifier
    from lmforge.models.vision import MLP, MLPConfig
    from lmforge.runs import Run, load_run

    run = load_run(keyword_classifier, device="cpu")
    s = text_classifier(run, "please great help me with my order")
    a = attribute("ig", s)
    gap = float(s.scores(s.inputs)[0] - s.scores(s.baseline)[0])
    assert abs(gap) > 1e-3
    assert float(a.per_feature.sum()) == pytest.approx(gap, abs=1e-3 + 0.05 * abs(gap))
    assert a.delta < 1e-3 + 0.05 * abs(gap)

    torch.manual_seed(0)
    model = MLP(MLPConfig(height=8, width=8, in_channels=1, num_labels=3, hidden=[16])).eval()
    image_run = Run(keyword_classifier, None, model, None, torch.device("cpu"), ["a", "b", "c"])
    px = np.random.default_rng(0).integers(0, 256, (8, 8, 1), dtype=np.uint8)
    s = image_classifier(image_run, px)
    a = attribute("ig", s)
    gap = float(s.scores(s.inputs)[0] - s.scores(s.baseline)[0])
    assert float(a.per_feature.sum()) == pytest.approx(gap, abs=1e-3 + 0.01 * abs(gap))
    assert a.element_map.shape == (8, 8)


def test_deletion_drops_faster_than_random_on_a_model_that_reads_one_token(keyword_classifier, capsys, tmp_path):
    val = tmp_path / "texts.txt"
    rng = random.Random(5)
    texts = [" ".join(rng.sample(FILLER, 5) + [KEYWORDS[rng.choice(list(KEYWORDS))]]) for _ in range(6)]
    val.write_text("\n".join(texts) + "\n")
    out = tmp_path / "explained"
    r = cli_here(capsys, "explain", keyword_classifier, "--input", val, "--out", out, "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["kind"] == "text-classifier" and res["methods"] == ["ig", "occlusion", "shap"]
    f = res["faithfulness"]
    for m in ("ig", "occlusion", "shap"):
        assert f[m]["comprehensiveness"] > f["random"]["comprehensiveness"] + 0.1, (m, f)
        assert f[m]["sufficiency"] < f["random"]["sufficiency"] - 0.1, (m, f)
        for item in res["items"]:  # removing the first-ranked token alone takes much of the score away
            drop = lambda c: c["deletion"][0] - c["deletion"][1]  # noqa: E731
            assert drop(item["faithfulness"][m]) > max(0.3, 2 * drop(item["faithfulness"]["random"])), m
    for item in res["items"]:  # every method ranks the deciding word first
        keyword = next(w for w in KEYWORDS.values() if w in item["input"].split())
        for m in ("ig", "occlusion", "shap"):
            ranked = item["tokens"][int(np.argmax(item["attributions"][m]))]
            assert ranked == keyword, (m, item["input"], item["attributions"][m])
    assert res["verdict"].startswith("most faithful:")
    page = (out / "explanation.html").read_text()
    assert "great" in page and "rgba(214,39,40" in page  # the keyword coloured as support
    assert {"explanation.json", "explanation.html", "report.md", "plots"} <= {p.name for p in out.iterdir()}
    assert (out / "plots" / "faithfulness.png").stat().st_size > 1000
    assert "comprehensiveness" in (out / "report.md").read_text()


def test_attention_path_returns_softmax_weights_while_the_normal_path_keeps_sdpa(monkeypatch):
    import torch.nn.functional as F

    from lmforge.models import decoder
    from lmforge.models.gpt import GPT, GPTConfig
    from lmforge.models.llama import Llama, LlamaConfig

    calls = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(decoder.F, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or sdpa(*a, **k))
    torch.manual_seed(0)
    for model in (GPT(GPTConfig(vocab_size=40, n_layer=2, n_head=2, n_embd=16, block_size=16)),
                  Llama(LlamaConfig(vocab_size=40, n_layer=2, n_head=4, n_kv_head=2, n_embd=16, block_size=16))):
        model.eval()
        x = torch.randint(0, 40, (1, 9))
        calls.clear()
        plain = model(x)[0]
        assert len(calls) == 2  # one fused call per layer
        calls.clear()
        with decoder.recording_attention() as weights:
            recorded = model(x)[0]
        assert not calls and len(weights) == 2
        torch.testing.assert_close(recorded, plain, atol=1e-5, rtol=1e-5)
        # The first layer's weights computed directly from its own projections.
        q, k = _layer0_queries_keys(model, x)
        direct = ((q @ k.transpose(-2, -1)) / q.size(-1) ** 0.5).masked_fill(
            ~torch.ones(9, 9, dtype=torch.bool).tril(), float("-inf")).softmax(-1)
        torch.testing.assert_close(weights[0], direct, atol=1e-5, rtol=1e-5)
        assert torch.allclose(weights[0].sum(-1), torch.ones(1, direct.size(1), 9))


def _layer0_queries_keys(model, x):
    """(B, nh, T, hs) queries and keys of layer 0, computed from its weights (keys repeated per group)."""
    from lmforge.models.gpt import GPT
    from lmforge.models.llama import rotate

    T = x.size(1)
    if isinstance(model, GPT):
        t = model.transformer
        e = t.wte(x) + t.wpe(torch.arange(T))
        blk = t.h[0]
        qkv = blk.attn.c_attn(blk.ln_1(e))
        nh, C = model.config.n_head, model.config.n_embd
        q, k, _ = qkv.split(C, dim=2)
        shape = lambda z: z.view(1, T, nh, C // nh).transpose(1, 2)  # noqa: E731
        return shape(q), shape(k)
    m = model.model
    e = m.embed_tokens(x)
    layer = m.layers[0]
    h = layer.input_layernorm(e)
    c = model.config
    hs = c.n_embd // c.n_head
    q = layer.self_attn.q_proj(h).view(1, T, c.n_head, hs).transpose(1, 2)
    k = layer.self_attn.k_proj(h).view(1, T, c.n_kv_head, hs).transpose(1, 2)
    cos, sin = model.rope_cos[:T], model.rope_sin[:T]
    q, k = rotate(q, cos, sin), rotate(k, cos, sin)
    return q, k.repeat_interleave(c.n_head // c.n_kv_head, dim=1)


def test_image_and_decoder_runs_are_explained(capsys, tmp_path, data_dir, digits_mlp):
    _, img = digits_mlp
    out = tmp_path / "img-explained"
    r = cli_here(capsys, "explain", img, "--examples", "3", "--method", "ig", "occlusion", "--out", out, "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["kind"] == "image-classifier" and len(res["items"]) == 3 and res["features"] == "patches of 1x1 pixels"
    assert len(res["items"][0]["attributions"]["ig"]) == 64 and set(res["faithfulness"]) == {"ig", "occlusion", "random"}
    for m in ("ig", "occlusion"):  # on digits, pixels ranked by either method beat random order
        assert res["faithfulness"][m]["comprehensiveness"] > res["faithfulness"]["random"]["comprehensiveness"]
    assert (out / "plots" / "heatmaps.png").stat().st_size > 1000

    lm = tmp_path / "lm"
    r = cli_here(capsys, "train", "--data", data_dir, "--out", lm, "--preset", "debug", "--max-steps", "5")
    assert r.returncode == 0, r.stderr
    r = cli_here(capsys, "explain", lm, "--text", "def step_3(x):", "--max-new-tokens", "4", "--attention", "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    item = res["items"][0]
    assert res["kind"] == "decoder" and item["answer_tokens"] == 4 and item["explained"].startswith("log P(answer")
    assert "".join(item["tokens"]).replace("␣", " ") == "def step_3(x):"
    assert abs(sum(item["attributions"]["ig"]) - (item["score"] - item["faithfulness"]["ig"]["insertion"][0])) < \
        0.05 * abs(item["score"] - item["faithfulness"]["ig"]["insertion"][0]) + 1e-3  # complete on a decoder too
    layers = sorted(f for f in res["files"] if f.startswith("attention/"))
    assert len(layers) == 2 and all((lm / "explain" / f).stat().st_size > 1000 for f in layers)


def test_bad_inputs_get_one_line_and_leave_nothing_behind(keyword_classifier, capsys, tmp_path):
    base = keyword_classifier.parent / "base"  # the imported encoder: a masked LM, nothing to explain
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    cases = [
        (["explain", base, "--text", "hello"], "explain has no method for a mlm run"),
        (["explain", keyword_classifier, "--text", "great", "--attention"], "--attention draws a decoder"),
        (["explain", keyword_classifier, "--text", "great", "--label", "maybe"], "label 'maybe' is not a class"),
        (["explain", keyword_classifier, "--text", "great", "--out", foreign], "holds files lmforge did not write"),
        (["explain", keyword_classifier, "--image", tmp_path / "x.png"], "not an image classifier run"),
        (["explain", keyword_classifier, "--text", "great", "--examples", "0"], "--examples must be at least 1"),
        (["explain", tmp_path / "nowhere", "--text", "great"], "not a run directory"),
        (["explain", keyword_classifier], "give at least one --text"),
    ]
    for args, message in cases:
        r = cli_here(capsys, *args)
        assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, (args, r.stderr)
    assert not (keyword_classifier / "explain").exists() and not (base / "explain").exists()
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]


def test_explain_endpoint_on_a_classifier(keyword_classifier):
    from fastapi.testclient import TestClient

    from lmforge.serve.app import create_app
    from lmforge.serve.served import ServedRun

    engine = ServedRun(keyword_classifier)
    http = TestClient(create_app(engine, api_key="k"))
    h = {"Authorization": "Bearer k"}
    r = http.post("/v1/explain", headers=h, json={"model": engine.name, "input": "please awful order today",
                                                  "methods": ["ig", "shap"], "faithfulness": True})
    assert r.status_code == 200, r.text
    e = r.json()
    assert e["label"] == "no" and e["features"] == ["please", "awful", "order", "today"]
    assert int(np.argmax(e["attributions"]["ig"])) == 1 and int(np.argmax(e["attributions"]["shap"])) == 1
    assert e["faithfulness"]["ig"]["comprehensiveness"] > e["faithfulness"]["random"]["comprehensiveness"]
    assert not engine.run.model.token_embedding()._forward_hooks  # Captum's hook is gone
    for body, message in [({"input": "great", "label": "maybe"}, "not a class"),
                          ({"images": ["AAAA"]}, "give the text to explain"),
                          ({"messages": [{"role": "user", "content": "hi"}]}, "'messages' applies to generators")]:
        r = http.post("/v1/explain", headers=h, json={"model": engine.name, **body})
        assert r.status_code == 400 and message in r.json()["error"]["message"], (body, r.text)
