"""Atomic file output: write to a temporary sibling, then rename over the target.

A crash or Ctrl-C mid-write therefore leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path in the same directory; on success rename it onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text(path: str | Path, text: str) -> None:
    """Atomically write UTF-8 text."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | Path, obj) -> None:
    """Atomically write pretty-printed JSON."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces ``path`` (which must be missing
    or empty), on any error it is removed: no half-written output directory is ever visible."""
    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise ValueError(f"{path} exists and is not an empty directory")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp made it private; the result is an ordinary directory
        if path.exists():
            path.rmdir()
        tmp.rename(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check_output_dir(path: str | Path, owned: set[str], overwrite: bool, what: str = "--out") -> None:
    """Refuse an output directory that a command would clobber: it must be missing or empty, or —
    with ``overwrite`` — hold nothing but files the command itself writes (names in ``owned``), so
    that replacing it never deletes anything lmforge did not create."""
    from lmforge.errors import UserError

    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{what} exists and is not a directory: {path}")
    entries = sorted(p.name for p in path.iterdir()) if path.is_dir() else []
    if not entries:
        return
    foreign = [n for n in entries if n not in owned]
    if foreign:
        raise UserError(f"{what} {path} is not empty and holds files lmforge did not write there "
                        f"({', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}); choose another {what}")
    if not overwrite:
        raise UserError(f"{what} {path} already holds prepared data; add --overwrite to replace it")


def replace_dir(tmp: str | Path, path: str | Path) -> None:
    """Move the complete directory ``tmp`` to ``path``; an existing ``path`` (checked by
    :func:`check_output_dir`) is moved aside first and removed only once the new one is in place."""
    tmp, path = Path(tmp), Path(path)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp made it private; the result is an ordinary directory
    old = None
    if path.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old.", dir=path.parent))
        os.replace(path, old / path.name)
    os.replace(tmp, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
