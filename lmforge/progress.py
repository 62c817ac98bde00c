"""Progress bars and status lines, on stderr so that ``--json`` output on stdout stays clean."""

from __future__ import annotations

import sys

from tqdm import tqdm


def progress(**kwargs) -> tqdm:
    """A tqdm bar on stderr; hidden when stderr is not a terminal (logs stay readable)."""
    kwargs.setdefault("file", sys.stderr)
    kwargs.setdefault("dynamic_ncols", True)
    kwargs.setdefault("mininterval", 0.5)
    kwargs.setdefault("disable", None)  # tqdm: None disables on non-TTY output
    return tqdm(**kwargs)


def status(message: str) -> None:
    """One line of what is happening now."""
    print(f"[lmforge] {message}", file=sys.stderr, flush=True)
