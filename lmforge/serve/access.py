"""Who may call an lmforge server, how often, and the record of what they did.

Keys (``--keys FILE``, shared by ``lmforge serve`` and ``lmforge support serve``) are stored
hashed: ``{"keys": [{"name", "sha256", "role", "requests_per_minute", "tokens_per_minute"}]}``,
written by ``lmforge keys add``. A presented key is hashed and compared with every entry in
constant time. Roles: ``user`` reaches the API (completions, embeddings, a customer's
conversation), ``admin`` also what operates the server (``/metrics``; the support app's agent
pages). Past a key's limits in the last 60 seconds a request is answered 429.

The audit log (``--audit-log FILE``) gets one JSON line per request, appended when its response
has ended: time, key name and role, method, endpoint, status, token counts, latency — and the
request's text only with ``--audit-text``, masked (:mod:`lmforge.data.pii`).
"""

from __future__ import annotations

import collections
import contextvars
import hashlib
import hmac
import json
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from lmforge.errors import UserError

ROLES = ("user", "admin")
WINDOW = 60.0  # seconds the rate limits count over
_FIELDS = {"name", "sha256", "role", "requests_per_minute", "tokens_per_minute"}

# The tokens of the request being served: set per request by the app's outermost middleware,
# added to by the endpoints (Metrics.count_tokens), read by the audit log and the token limits.
request_usage: contextvars.ContextVar[dict | None] = contextvars.ContextVar("lmforge_request_usage", default=None)


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class Key:
    name: str
    role: str
    sha256: str
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None


def read_keys(path: str | Path) -> list[Key]:
    """The keys of a keys file; anything malformed (a duplicate key or name, an unknown role or
    field, a limit that is not a positive integer) is one error line."""
    path = Path(path)
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))["keys"]
        if not isinstance(entries, list):
            raise TypeError
    except FileNotFoundError:
        raise UserError(f"keys file not found: {path}") from None
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise UserError(f"{path}: not a keys file (JSON {{\"keys\": [...]}}; write one with `lmforge keys add`)") \
            from None
    keys, names, digests = [], set(), set()
    for k, e in enumerate(entries):
        where = f"{path}: key {k}"
        unknown = set(e) - _FIELDS if isinstance(e, dict) else set()
        if not isinstance(e, dict) or unknown or not {"name", "sha256"} <= set(e):
            raise UserError(f"{where}: needs 'name' and 'sha256', may have 'role', 'requests_per_minute' and "
                            f"'tokens_per_minute'" + (f"; unknown: {', '.join(sorted(unknown))}" if unknown else ""))
        role = e.get("role", "user")
        if role not in ROLES:
            raise UserError(f"{where}: role must be one of {', '.join(ROLES)}, got {role!r}")
        for limit in ("requests_per_minute", "tokens_per_minute"):
            v = e.get(limit)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v <= 0):
                raise UserError(f"{where}: {limit} must be a positive integer, got {v!r}")
        sha = str(e["sha256"]).lower()
        if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
            raise UserError(f"{where}: sha256 must be 64 hex digits (the key's SHA-256)")
        if sha in digests:
            raise UserError(f"{where}: the same key is listed twice")
        if e["name"] in names:
            raise UserError(f"{where}: the name {e['name']!r} is used twice")
        digests.add(sha)
        names.add(e["name"])
        keys.append(Key(str(e["name"]), role, sha, e.get("requests_per_minute"), e.get("tokens_per_minute")))
    return keys


def add_key(path: str | Path, name: str, role: str = "user", requests_per_minute: int | None = None,
            tokens_per_minute: int | None = None) -> str:
    """A new random key for ``name``, its hash added to the keys file (made if absent, written
    atomically); the key itself is returned and stored nowhere."""
    from lmforge.fsutil import atomic_path

    path = Path(path)
    keys = read_keys(path) if path.exists() else []
    if role not in ROLES:
        raise UserError(f"--role must be one of {', '.join(ROLES)}")
    if any(k.name == name for k in keys):
        raise UserError(f"{path} already has a key named {name!r}")
    key = "lmf-" + secrets.token_urlsafe(24)
    entries = [{k: v for k, v in vars(x).items() if v is not None} for x in keys]
    entries.append({k: v for k, v in {"name": name, "sha256": digest(key), "role": role,
                                      "requests_per_minute": requests_per_minute,
                                      "tokens_per_minute": tokens_per_minute}.items() if v is not None})
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps({"keys": entries}, indent=2) + "\n", encoding="utf-8")
    return key


class Access:
    """The keys an app accepts, their limits, and its audit log."""

    def __init__(self, keys: list[Key], audit_log: str | Path | None = None, audit_text: bool = False):
        self.keys = keys
        self.audit_path = Path(audit_log) if audit_log else None
        self.audit_text = audit_text
        self.lock = threading.Lock()
        self.requests: dict[str, collections.deque] = collections.defaultdict(collections.deque)  # name -> times
        self.tokens: dict[str, collections.deque] = collections.defaultdict(collections.deque)  # (time, n)
        self.audit_file = open(self.audit_path, "a", encoding="utf-8") if self.audit_path else None

    def check(self, request, admin: bool = False, page_param: str | None = None, open_: bool = False,
              what: str = "API key"):
        """None to let ``request`` through (its key, if any, in ``request.state.key``), or the 401/403
        refusing it. ``admin``: the endpoint needs an admin key; ``open_``: no key is needed;
        ``page_param``: a page may take the key in its address once (``?page_param=KEY``)."""
        from lmforge.serve.common import error_body, request_key, unauthorized

        presented = request_key(request, page_param)
        key = self.identify(presented) if presented else None
        if key is None:
            return None if open_ else unauthorized(f"invalid or missing {what}")
        if admin and key.role != "admin":
            from fastapi.responses import JSONResponse

            return JSONResponse(error_body(f"key {key.name!r} has the role {key.role}; this endpoint needs admin",
                                           "permission_error", code="insufficient_role"), status_code=403)
        request.state.key = key
        return None

    def identify(self, presented: str) -> Key | None:
        """The key presented, or None; every entry is compared (in constant time each)."""
        h, found = digest(presented), None
        for k in self.keys:
            if hmac.compare_digest(h, k.sha256):
                found = k
        return found

    def over_limit(self, key: Key) -> str | None:
        """Why ``key`` may not make another request now (None: it may); counts the request."""
        now = time.monotonic()
        with self.lock:
            times, used = self.requests[key.name], self.tokens[key.name]
            while times and now - times[0] > WINDOW:
                times.popleft()
            while used and now - used[0][0] > WINDOW:
                used.popleft()
            if key.requests_per_minute is not None and len(times) >= key.requests_per_minute:
                return f"key {key.name!r} made {len(times)} requests in the last minute (its limit)"
            spent = sum(n for _, n in used)
            if key.tokens_per_minute is not None and spent >= key.tokens_per_minute:
                return f"key {key.name!r} used {spent} tokens in the last minute (limit {key.tokens_per_minute})"
            times.append(now)
        return None

    def record(self, key: Key | None, tokens: int) -> None:
        if key is not None and tokens:
            with self.lock:
                self.tokens[key.name].append((time.monotonic(), tokens))

    def audit(self, entry: dict, body: bytes | None = None) -> None:
        if self.audit_file is None:
            return
        if self.audit_text and body:
            text = request_text(body)
            if text:
                from lmforge.data.pii import mask

                entry["text"] = mask(text)[:4000]
        line = json.dumps(entry, ensure_ascii=False) + "\n"
        with self.lock:  # one write per line: lines of concurrent requests never interleave
            self.audit_file.write(line)
            self.audit_file.flush()


def request_text(body: bytes) -> str:
    """The text a request carries (prompt, messages, input, a support message), joined."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return ""
    out = []

    def walk(value, key=None):
        if isinstance(value, str) and key in ("prompt", "content", "input", "text", "answer"):
            out.append(value)
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(v, k)
        elif isinstance(value, list):
            for v in value:
                walk(v, key)
    walk(data)
    return "\n".join(out)
