"""lmforge keys: API keys for `lmforge serve` and `lmforge support serve` (--keys FILE)."""

from __future__ import annotations

from dataclasses import dataclass

from lmforge.cli.common import emit
from lmforge.cli.options import flag

HELP = "API keys with roles and rate limits for the servers (--keys FILE)"


@dataclass
class AddOptions:
    file: str = flag(positional=True, help="the keys file (made if absent)")
    name: str = flag(None, required=True, help="who holds the key (in the audit log)")
    role: str = flag("user", choices=("user", "admin"), help="admin also reaches /metrics and the agent pages")
    requests_per_minute: int | None = flag(help="at most this many requests in any 60 seconds")
    tokens_per_minute: int | None = flag(help="at most this many prompt + generated tokens in any 60 seconds")
    json: bool = flag(False)


@dataclass
class ListOptions:
    file: str = flag(positional=True)
    json: bool = flag(False)


def run_add(o: AddOptions) -> int:
    """Make a new random key for NAME and add its SHA-256 to FILE; the key is printed once and
    stored nowhere."""
    from lmforge.errors import UserError
    from lmforge.serve.access import add_key

    for limit in ("requests_per_minute", "tokens_per_minute"):
        if getattr(o, limit) is not None and getattr(o, limit) <= 0:
            raise UserError(f"--{limit.replace('_', '-')} must be positive")
    key = add_key(o.file, o.name, o.role, o.requests_per_minute, o.tokens_per_minute)
    return emit(o.json, {"name": o.name, "role": o.role, "key": key, "file": o.file},
                lambda info: f"{info['key']}\n(the key of {info['name']!r}, role {info['role']}: keep it; "
                             f"{info['file']} holds only its hash)")


def run_list(o: ListOptions) -> int:
    """The names, roles and limits of FILE's keys (never the keys)."""
    from lmforge.serve.access import read_keys

    keys = [{"name": k.name, "role": k.role, "requests_per_minute": k.requests_per_minute,
             "tokens_per_minute": k.tokens_per_minute} for k in read_keys(o.file)]
    return emit(o.json, {"keys": keys}, lambda info: "\n".join(
        f"{k['name']}: {k['role']}" + "".join(f", {k[x]} {x.replace('_', ' ')}" for x in
                                              ("requests_per_minute", "tokens_per_minute") if k[x])
        for k in info["keys"]) or "no keys")


ACTIONS = {"add": (AddOptions, run_add, "add a new key to a keys file"),
           "list": (ListOptions, run_list, "the keys' names, roles and limits")}
