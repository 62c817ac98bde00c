"""lmforge serve: an OpenAI-compatible HTTP API over a run directory."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

from lmforge.cli.common import DECODE_COMPILE_HELP, AccessOptions, access_settings, check_port
from lmforge.cli.options import flag
from lmforge.errors import UserError

HELP = "OpenAI-compatible HTTP API over a run directory"


@dataclass
class Options(AccessOptions):
    run_dir: str = flag(positional=True)
    host: str = flag("127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    port: int = flag(8000)
    api_key: str | None = flag(help="require 'Authorization: Bearer KEY' on every endpoint but /health "
                               "(default: $LMFORGE_API_KEY)")
    max_tokens_cap: int = flag(1024, help="largest max_tokens a request may ask for")
    max_concurrency: int = flag(16, help="requests in flight at once; more are answered 429 (not queued)")
    max_batch: int = flag(16, help="sequences decoded together (continuous batching); more wait for a free slot")
    compile: bool = flag(False, help=DECODE_COMPILE_HELP + "; all batch sizes are compiled before the server answers")
    allowed_host: list[str] | None = flag(append=True, metavar="NAME", help="also answer requests whose Host is "
                                          "NAME (bound to 127.0.0.1, only loopback names are answered otherwise)")
    max_context: int | None = flag(help="longest prompt + answer, in tokens (default: the model's context, at most "
                                   "2048; the KV cache holds max-batch sequences of this length)")


def run(o: Options) -> int:
    """Serve a run directory behind an OpenAI-compatible HTTP API."""
    from lmforge.serve.app import serve

    key = o.api_key or os.environ.get("LMFORGE_API_KEY") or None
    check_port(o.port, o.host)
    access = access_settings(o)
    if o.max_tokens_cap <= 0:
        raise UserError("--max-tokens-cap must be positive")
    if o.max_concurrency <= 0 or o.max_batch <= 0 or (o.max_context is not None and o.max_context < 2):
        raise UserError("--max-concurrency and --max-batch must be positive, --max-context at least 2")
    scheme = "https" if access["ssl"] else "http"
    print(f"lmforge serve: {o.run_dir} on {scheme}://{o.host}:{o.port}/ (chat page; API under /v1) "
          f"({'API key required' if key or access['keys'] else 'no API key'})", file=sys.stderr, flush=True)
    serve(o.run_dir, o.host, o.port, key, o.max_tokens_cap, o.max_concurrency, o.max_batch, o.compile, o.max_context,
          o.allowed_host, **access)
    return 0
