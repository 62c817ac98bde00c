"""What several verbs share: printing results, reading input texts, the shared flag helps."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from lmforge.cli.options import flag
from lmforge.errors import UserError

DECODE_COMPILE_HELP = ("fuse the decode step with torch.compile: on the CPU about twice the tokens/s at batch 1, "
                       "after ~10-20 s of compiling per batch size (default off)")
INPUT_HELP = "a .csv/.jsonl file (--text-column) or a text file, one text per line"


def print_json(obj) -> None:
    print(json.dumps(obj, indent=2))


def emit(as_json: bool, obj: dict, text) -> int:
    """The command's result: ``obj`` as JSON with ``--json``, else ``text(obj)``; exit code 0."""
    print(json.dumps(obj, indent=2) if as_json else text(obj))
    return 0


@dataclass
class TextInputOptions:
    """The flags of verbs that read texts to score (predict, embed)."""

    run_dir: str = flag(positional=True)
    text: list[str] | None = flag(append=True, help="a text (repeatable)")
    input: str | None = flag(help=INPUT_HELP)
    text_column: str | None = flag(help="--input's text column (default: text, or a classifier run's own)")

    def texts(self, default_column: str = "text") -> list[str]:
        return input_texts(self.text, self.input, self.text_column or default_column)


def input_texts(texts: list[str] | None, input_file: str | None, text_column: str) -> list[str]:
    """Texts from repeated --text and from --input: a .csv/.jsonl file (its --text-column) or a
    plain UTF-8 file with one text per line."""
    out = list(texts or [])
    if input_file:
        from lmforge.data.labeled import read_examples

        path = Path(input_file)
        if not path.is_file():
            raise UserError(f"input file not found: {path}")
        if path.suffix.lower() in (".csv", ".jsonl"):
            out += read_examples(path, text_column, None).texts
        else:
            try:
                out += [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
            except UnicodeDecodeError:
                raise UserError(f"{path} is not UTF-8 text") from None
    if not out:
        raise UserError("give at least one --text (or --input FILE)")
    return out


def check_port(port: int, host: str | None = None) -> None:
    """A port in range and, given the ``host`` to bind, free: a server refuses a busy port with one
    error line before it prints its banner or creates anything."""
    import socket

    if not 0 < port < 65536:
        raise UserError(f"--port must be in 1..65535, got {port}")
    if host is None:
        return
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise UserError(f"--host {host}: {e.strerror}") from None
    family, _, _, _, address = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: only a listener blocks
        try:
            probe.bind(address)
        except OSError as e:
            raise UserError(f"cannot listen on {host}:{port}: {e.strerror} (another server is using the port? "
                            f"choose another with --port)") from None


@dataclass
class AccessOptions:
    """The flags both servers share: keys with roles, the audit log, TLS."""

    keys: str | None = flag(metavar="FILE", group="access", help="API keys with roles and limits (stored hashed; "
                            "write with `lmforge keys add`)")
    audit_log: str | None = flag(metavar="FILE", group="access", help="append one JSON line per request (key, "
                                 "endpoint, status, tokens, latency)")
    audit_text: bool = flag(False, group="access", help="also log each request's text, masked")
    ssl_certfile: str | None = flag(metavar="PEM", group="access", help="serve HTTPS with this certificate")
    ssl_keyfile: str | None = flag(metavar="PEM", group="access", help="the certificate's private key")


def access_settings(o: AccessOptions) -> dict:
    """``keys``, ``audit_log``, ``audit_text`` and ``ssl`` for a server, checked: a bad keys file,
    a certificate without its key (or missing), an audit log that cannot be opened: one line."""
    from lmforge.serve.access import read_keys

    if (o.ssl_certfile is None) != (o.ssl_keyfile is None):
        raise UserError("give --ssl-certfile and --ssl-keyfile together")
    for f in (o.ssl_certfile, o.ssl_keyfile):
        if f is not None and not Path(f).is_file():
            raise UserError(f"no such file: {f}")
    if o.audit_text and not o.audit_log:
        raise UserError("--audit-text needs --audit-log FILE")
    if o.audit_log is not None:
        try:
            with open(o.audit_log, "a", encoding="utf-8"):
                pass
        except OSError as e:
            raise UserError(f"--audit-log {o.audit_log}: {e.strerror}") from None
    ssl = {"ssl_certfile": o.ssl_certfile, "ssl_keyfile": o.ssl_keyfile} if o.ssl_certfile else None
    return {"keys": read_keys(o.keys) if o.keys else None, "audit_log": o.audit_log, "audit_text": o.audit_text,
            "ssl": ssl}
