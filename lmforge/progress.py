"""Progress bars and status lines, on stderr so that ``--json`` output on stdout stays clean.

On a terminal: one tqdm bar per job, whose total may change in place (``bar.total = n;
bar.refresh()``), with status lines printed above it. Elsewhere (a log file, a pipe, CI): a plain
line every ``$LMFORGE_PROGRESS_SECONDS`` (default 30) seconds, and one at the end of a job that
printed any, so a long job is never silent and a log stays readable.
"""

from __future__ import annotations

import os
import sys
import time

from tqdm import tqdm

DEFAULT_LINE_SECONDS = 30.0


def line_seconds() -> float:
    try:
        return max(0.0, float(os.environ.get("LMFORGE_PROGRESS_SECONDS", DEFAULT_LINE_SECONDS)))
    except ValueError:
        return DEFAULT_LINE_SECONDS


def _short(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}" if seconds >= 60 else f"{seconds} s"


class Lines:
    """A progress bar's figures as plain lines (what ``progress`` gives when stderr is not a
    terminal): the same calls as the tqdm bar the code uses (``update``, ``set_postfix``,
    ``total``, ``refresh``, ``reset``, ``close``, iteration, ``with``)."""

    disable = True  # no bar is drawn: callers that print their own lines without a bar do so

    def __init__(self, iterable=None, total=None, initial: int = 0, desc: str = "", unit: str = "it",
                 file=None, **_):
        self.iterable, self.desc, self.unit, self.file = iterable, desc, unit, file or sys.stderr
        self.total = total if total is not None or iterable is None else (
            len(iterable) if hasattr(iterable, "__len__") else None)
        self.n = self.initial = initial
        self.postfix = ""
        self.interval = line_seconds()
        self.start = self.last = time.perf_counter()
        self.printed = self.closed = False

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update(1)
        self.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def set_postfix(self, postfix=None, refresh: bool = True, **kwargs) -> None:
        items = {**(postfix or {}), **kwargs}
        self.postfix = ", ".join(f"{k} {v}" for k, v in items.items())

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.perf_counter()
        if not self.closed and now - self.last >= self.interval:
            self.last = now
            self._line(now)

    def refresh(self) -> None:
        pass  # a changed total shows in the next line

    def reset(self, total=None) -> None:
        self.n = 0
        if total is not None:
            self.total = total

    def _line(self, now: float) -> None:
        elapsed = now - self.start
        done = self.n - self.initial
        rate = done / elapsed if elapsed > 0 else 0.0
        text = f"{self.n:,}/{self.total:,} {self.unit}" if self.total else f"{self.n:,} {self.unit}"
        if self.total:
            text += f" ({100 * self.n / self.total:.0f}%)"
        text += f", {rate:,.3g} {self.unit}/s, {_short(elapsed)} elapsed"
        if self.total and rate > 0 and self.n < self.total:
            text += f", ~{_short((self.total - self.n) / rate)} left"
        if self.postfix:
            text += f"; {self.postfix}"
        print(f"[lmforge] {self.desc}: {text}" if self.desc else f"[lmforge] {text}", file=self.file, flush=True)
        self.printed = True

    def close(self) -> None:
        if self.printed and not self.closed:  # a job that reported along the way also reports its end
            self._line(time.perf_counter())
        self.closed = True


def progress(**kwargs):
    """A tqdm bar on stderr when it is a terminal, else :class:`Lines`; ``disable=True`` shows
    nothing at all (other processes of a distributed run)."""
    kwargs.setdefault("file", sys.stderr)
    kwargs.setdefault("dynamic_ncols", True)
    kwargs.setdefault("mininterval", 0.5)
    if kwargs.get("disable") is True:
        return tqdm(**kwargs)
    kwargs.pop("disable", None)
    isatty = getattr(kwargs["file"], "isatty", None)
    if not (isatty and isatty()):
        return Lines(**kwargs)
    return tqdm(**kwargs)


def status(message: str) -> None:
    """One line of what is happening now (above the progress bar, if one is drawn)."""
    tqdm.write(f"[lmforge] {message}", file=sys.stderr)
    sys.stderr.flush()
