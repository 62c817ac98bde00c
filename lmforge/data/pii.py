"""Personal data found and masked with typed placeholders (``<EMAIL>``, ``<PHONE>``, ``<CARD>``,
``<IBAN>``, ``<IP>``, ``<URL>``, or ``<NAME>`` of a user's own pattern): the one masking module,
used by ``prepare --scrub-pii`` on corpora and by the support app on customer messages.

What counts, chosen to avoid false positives on ordinary text (numbers, dates, versions, times):

- ``card``: 13-19 digits (single spaces, dashes or dots between them) that pass the Luhn check;
- ``iban``: a country code, two check digits and 11-30 letters/digits (spaces allowed in groups
  of four) that pass the ISO 13616 mod-97 check;
- ``phone``: 7-15 digits written as a phone number is — a leading ``+``, or spaces, dashes or
  parentheses between groups of two digits or more, or dots in the 3.3.4 shape; never a date
  (``2026-11-23``), a bare run of digits (an order number, a timestamp) or a list of one-digit
  numbers;
- ``email``: ``name@domain.tld``, the name and domain in any script; ``url``: ``http(s)://`` or
  ``www.`` up to the next space;
- ``ip``: a dotted IPv4 address not part of a longer dotted number or after ``v`` (a version), or
  an IPv6 address that ``ipaddress`` accepts with three groups at least (not a slice ``a[::2]``).
"""

from __future__ import annotations

import ipaddress
import re
from collections import Counter
from pathlib import Path

from lmforge.errors import UserError

KINDS = ("email", "phone", "card", "iban", "ip", "url")
URL = re.compile(r"\b(?:https?://|www\.)[^\s<>\"']+[^\s<>\"'.,;:!?)\]]")
EMAIL = re.compile(r"[\w.%+-]+@[\w-]+(?:\.[\w-]+)*\.[^\W\d_]{2,}")  # \w: local parts in any script
IBAN = re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]){11,30}\b")
IPV4 = re.compile(r"(?<![\w.])(?<![vV])(?:\d{1,3}\.){3}\d{1,3}(?![\w]|\.\d)")
IPV6 = re.compile(r"(?<![\w:])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![\w:])")
DATE = re.compile(r"\d{4}-\d{2}-\d{2}|\d{2}-\d{2}-\d{4}")  # ISO and day-month-year dates are not phones
# Dotted groups only in the shapes numbers are written in: 555.123.4567 (phone), 4111.1111.1111.1111
# (card) — never a dotted date (03.12.2026), a version or an address (IPs are masked first).
DOTTED = re.compile(r"(?<![\w.])(?:\d{3}\.\d{3}\.\d{4}|\d{4}(?:\.\d{4}){2,3}(?:\.\d{1,3})?)(?![\w]|\.\d)")
# Digits with optional single spaces or dashes (and parentheses) between them; the kind is decided below.
DIGITS = re.compile(r"(?<![\w+.])\+?\(?\d(?:[ -]?\(?\d\)?){6,22}(?![\w]|\.\d)")


def luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def iban_ok(text: str) -> bool:
    """The ISO 13616 check: the country and check digits moved to the end, letters as 10..35,
    the number mod 97 is 1."""
    s = text.replace(" ", "")
    s = s[4:] + s[:4]
    return int("".join(str(int(ch, 36)) for ch in s)) % 97 == 1


def placeholder(kind: str) -> str:
    return f"<{kind.upper()}>"


def parse_kinds(value: str, flag: str = "--mask") -> list[str]:
    """``email,phone,card`` (or ``all``, or ``none``) as a list; an unknown kind is an error."""
    v = value.strip().lower()
    if v == "none":
        return []
    if v == "all":
        return list(KINDS)
    kinds = [k.strip() for k in v.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in KINDS]
    if unknown or not kinds:
        raise UserError(f"{flag}: unknown kind(s) {', '.join(unknown) or repr(value)}; choose from "
                        f"{', '.join(KINDS)}, all or none")
    return kinds


def read_patterns(path: str | Path) -> dict[str, re.Pattern]:
    """A user's own patterns, one ``NAME=REGEX`` per line (``#`` comments): each match becomes ``<NAME>``."""
    from lmforge.data.labeled import read_utf8

    patterns = {}
    for n, line in enumerate(read_utf8(Path(path), "patterns file").splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        name, sep, regex = line.partition("=")
        name = name.strip()
        if not sep or not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", name) or not regex.strip():
            raise UserError(f"{path}:{n}: expected NAME=REGEX (a name of letters, digits and _)")
        try:
            patterns[name] = re.compile(regex.strip())
        except re.error as e:
            raise UserError(f"{path}:{n}: bad regular expression for {name}: {e}") from None
    return patterns


class Scrubber:
    """Masks the enabled ``kinds`` (and ``extra`` patterns) in text; ``counts`` adds up what it masked."""

    def __init__(self, kinds=KINDS, extra: dict[str, re.Pattern] | None = None):
        self.kinds, self.extra = tuple(kinds), dict(extra or {})
        self.counts: Counter = Counter()

    def _sub(self, pattern: re.Pattern, kind: str, text: str, keep=None) -> str:
        def one(m: re.Match) -> str:
            if keep is not None and keep(m.group(0)):
                return m.group(0)
            self.counts[kind] += 1
            return placeholder(kind)
        return pattern.sub(one, text)

    def __call__(self, text: str) -> str:
        k = self.kinds
        for name, pattern in self.extra.items():  # the user's own first: they know their data best
            text = self._sub(pattern, name, text)
        if "url" in k:
            text = self._sub(URL, "url", text)
        if "email" in k:
            text = self._sub(EMAIL, "email", text)
        if "iban" in k:
            text = self._sub(IBAN, "iban", text, keep=lambda s: not iban_ok(s))
        if "ip" in k:
            text = self._sub(IPV4, "ip", text, keep=lambda s: any(int(p) > 255 for p in s.split(".")))
            text = self._sub(IPV6, "ip", text, keep=lambda s: not _is_ipv6(s))
        if "card" in k or "phone" in k:
            text = DOTTED.sub(self._digits, text)
            text = DIGITS.sub(self._digits, text)
        return text

    def _digits(self, m: re.Match) -> str:
        raw = m.group(0)
        d = re.sub(r"\D", "", raw)
        if "card" in self.kinds and 13 <= len(d) <= 19 and luhn_ok(d):
            self.counts["card"] += 1
            return placeholder("card")
        if DATE.fullmatch(raw.strip()):
            return raw
        groups = [g for g in re.split(r"[ ().+-]+", raw) if g]
        # Written as a phone number: a leading + or separated groups, none of one digit but a
        # leading country code ("1 2 3 4 5 6 7" is a list of numbers).
        phone_like = (raw.startswith("+") or len(groups) > 1) and all(len(g) > 1 for g in groups[1:])
        if "phone" in self.kinds and 7 <= len(d) <= 15 and phone_like:
            self.counts["phone"] += 1
            return placeholder("phone")
        return raw


def _is_ipv6(s: str) -> bool:
    try:
        # Three groups at least: "::2" is a Python slice more often than an address.
        return isinstance(ipaddress.ip_address(s), ipaddress.IPv6Address) and sum(1 for g in s.split(":") if g) >= 3
    except ValueError:
        return False


def mask(text: str, kinds=KINDS) -> str:
    """``text`` with each enabled kind of personal data replaced by its placeholder."""
    return Scrubber(kinds)(text)


def scrub_labeled(path: str | Path, out: str | Path, scrubber: Scrubber, label_column: str = "label",
                  overwrite: bool = False) -> dict:
    """A copy of a labelled ``.csv``/``.jsonl`` file (``classify``'s data) at ``out``, in the same
    format, with personal data masked in every string field but ``label_column`` (labels are
    categories, not text). Written atomically; the source is never replaced. Returns the counts."""
    import csv
    import io
    import json

    from lmforge.data.labeled import read_rows
    from lmforge.fsutil import write_text

    path, out = Path(path), Path(out)
    if out.suffix.lower() != path.suffix.lower():
        raise UserError(f"--out {out}: the copy keeps {path.name}'s format; give a {path.suffix} path")
    if out.exists() and (out.resolve() == path.resolve() or not overwrite):
        raise UserError(f"--out {out} exists; choose another path" + ("" if out.resolve() == path.resolve()
                                                                     else " or pass --overwrite"))
    columns, rows = read_rows(path)
    masked = [{k: scrubber(v) if isinstance(v, str) and k != label_column else v for k, v in row.items()}
              for row in rows]
    if path.suffix.lower() == ".csv":
        buf = io.StringIO(newline="")
        writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(masked)
        text = buf.getvalue()
    else:
        text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in masked)
    write_text(out, text)
    return {"input": str(path), "out": str(out), "rows": len(rows), "columns": columns,
            "label_column": label_column if label_column in columns else None,
            "masked": dict(sorted(scrubber.counts.items()))}
