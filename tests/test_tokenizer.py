"""Byte-level BPE: exact round trips on arbitrary Unicode, and exact byte accounting per token."""

import random
import unicodedata

from lmforge.data.tokenizer import EOT, eot_id, token_bytes, train_bpe
from tests.conftest import synthetic_text


def _random_unicode(rng: random.Random, n: int) -> str:
    pools = [(0x20, 0x7E), (0xA0, 0x24F), (0x370, 0x3FF), (0x400, 0x4FF), (0x4E00, 0x4FFF),
             (0x1F300, 0x1F64F), (0x0300, 0x036F), (0x0, 0x1F)]
    out = []
    for _ in range(n):
        lo, hi = rng.choice(pools)
        ch = chr(rng.randint(lo, hi))
        if 0xD800 <= ord(ch) <= 0xDFFF:
            continue
        out.append(ch)
    return "".join(out)


def test_round_trip_arbitrary_unicode():
    tok = train_bpe([synthetic_text(i) for i in range(10)], vocab_size=400)
    rng = random.Random(0)
    samples = [_random_unicode(rng, rng.randint(0, 200)) for _ in range(200)]
    samples += ["", " ", "\n\n\t", "e\u0301", unicodedata.normalize("NFD", "Straße café"), "👩‍👩‍👧", "\x00\x7f"]
    table = token_bytes(tok)
    for s in samples:
        ids = tok.encode(s, add_special_tokens=False).ids
        assert tok.decode(ids) == s
        assert sum(len(table[i]) for i in ids) == len(s.encode("utf-8"))
        assert b"".join(table[i] for i in ids) == s.encode("utf-8")


def test_end_of_text_is_one_special_token_with_no_bytes():
    tok = train_bpe(["hello world"] * 3, vocab_size=300)
    ids = tok.encode(f"a{EOT}b", add_special_tokens=False).ids
    assert eot_id(tok) in ids
    assert token_bytes(tok)[eot_id(tok)] == b""
