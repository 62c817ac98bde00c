"""Masking personal data in customer messages before they are stored or logged: e-mail
addresses, phone numbers and payment card numbers (13-19 digits passing the Luhn check)."""

from __future__ import annotations

import re

KINDS = ("email", "phone", "card")
EMAIL = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}")
# Digits with optional single spaces or dashes between them; which kind they are is decided below.
DATE = re.compile(r"\d{4}-\d{2}-\d{2}|\d{2}-\d{2}-\d{4}")  # ISO and day-month-year dates are not phones
DIGITS = re.compile(r"(?<![\w+])\+?\(?\d(?:[ -]?\(?\d\)?){6,22}(?!\w)")


def luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def mask(text: str, kinds: tuple[str, ...] | list[str] = KINDS) -> str:
    """``text`` with each enabled kind of personal data replaced by ``[EMAIL]``, ``[PHONE]`` or ``[CARD]``."""
    if "email" in kinds:
        text = EMAIL.sub("[EMAIL]", text)

    def digits(m: re.Match) -> str:
        raw = m.group(0)
        d = re.sub(r"\D", "", raw)
        if "card" in kinds and 13 <= len(d) <= 19 and luhn_ok(d):
            return "[CARD]"
        if DATE.fullmatch(raw.strip()):
            return raw
        if "phone" in kinds and 7 <= len(d) <= 15 and (raw.startswith("+") or re.search(r"[ ()-]", raw) or len(d) >= 9):
            return "[PHONE]"
        return raw
    return DIGITS.sub(digits, text)


def parse_kinds(value: str) -> list[str]:
    """``--mask email,phone,card`` (or ``none``) as a list; unknown kinds are an error."""
    from lmforge.errors import UserError

    if value.strip().lower() == "none":
        return []
    kinds = [k.strip().lower() for k in value.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise UserError(f"--mask: unknown kind(s) {', '.join(unknown)}; choose from {', '.join(KINDS)} or none")
    return kinds
