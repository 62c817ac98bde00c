"""Byte-level BPE tokenizer trained with Hugging Face ``tokenizers``.

Byte-level means every string round-trips exactly: any Unicode text is first mapped to its UTF-8
bytes, so there is no unknown token. ``<|endoftext|>`` separates documents, as in GPT-2.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from lmforge.errors import UserError

EOT = "<|endoftext|>"
SPECIAL_TOKENS = [EOT]
BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]  # ids 0..4 in a trained WordPiece


def train_bpe(texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> Tokenizer:
    """Train a byte-level BPE tokenizer on ``texts`` (an iterator is fine; it is streamed)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def train_wordpiece(texts: Iterable[str], vocab_size: int, lowercase: bool = False) -> Tokenizer:
    """Train a BERT-style WordPiece tokenizer (BERT's normaliser and pre-tokeniser, cased by
    default); encoding adds ``[CLS] ... [SEP]``."""
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=lowercase)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=BERT_SPECIALS, show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    return tok


def separator_id(tok: Tokenizer) -> int:
    """The token placed between documents: ``<|endoftext|>`` (BPE) or ``[SEP]`` (WordPiece)."""
    for name in (EOT, "[SEP]"):
        i = tok.token_to_id(name)
        if i is not None:
            return i
    raise UserError(f"tokenizer has neither {EOT} nor [SEP]")


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load ``tokenizer.json``, with a one-line error if it is missing or unreadable."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"tokenizer not found: {path}")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception on malformed files
        raise UserError(f"cannot load tokenizer {path}: {e}") from None


def neutral_id(tok: Tokenizer) -> int:
    """The token that stands for "no token" (an attribution's baseline): [PAD], else
    <|endoftext|>, else id 0."""
    for name in ("[PAD]", EOT):
        i = tok.token_to_id(name)
        if i is not None:
            return i
    return 0


def token_label(tok: Tokenizer, i: int) -> str:
    """One token as a person reads it: its decoded text (byte-level pieces such as 'Ġthe' become
    ' the'), whitespace made visible; special tokens by name."""
    text = tok.decode([i], skip_special_tokens=False) or tok.id_to_token(i) or f"<{i}>"
    return text.replace(" ", "␣").replace("\n", "↵").replace("\t", "⇥")


def encode_truncated(tok: Tokenizer, text: str, max_len: int):
    """One text's ``tokenizers.Encoding`` (ids, tokens, offsets, special-token mask): special tokens
    added, truncated to ``max_len`` as :func:`encode_batch` truncates it."""
    tok.enable_truncation(max_length=max_len)
    try:
        return tok.encode(text)
    finally:
        tok.no_truncation()


def encode_batch(tok: Tokenizer, texts: list[str], max_len: int):
    """Token ids and attention masks, (B, T) int64 each: special tokens added, each text truncated
    to ``max_len``, padded on the right with the tokenizer's [PAD] (else id 0)."""
    import torch

    pad = "[PAD]" if tok.token_to_id("[PAD]") is not None else None
    tok.enable_truncation(max_length=max_len)
    tok.enable_padding(pad_id=tok.token_to_id(pad) if pad else 0, pad_token=pad or "[PAD]")
    try:
        encs = tok.encode_batch(texts)
    finally:
        tok.no_padding()
        tok.no_truncation()
    ids = torch.tensor([e.ids for e in encs], dtype=torch.long)
    mask = torch.tensor([e.attention_mask for e in encs], dtype=torch.long)
    return ids, mask


def eot_id(tok: Tokenizer) -> int:
    i = tok.token_to_id(EOT)
    if i is None:
        raise UserError(f"tokenizer has no {EOT} token")
    return i


def _byte_decoder() -> dict[str, int]:
    """Inverse of the byte-level alphabet: printable character -> the byte it stands for.

    Bytes that are printable Latin-1 map to themselves; the rest are shifted to 256 + n.
    """
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def token_bytes(tok: Tokenizer) -> list[bytes]:
    """The exact bytes each token id stands for (empty for special tokens), for bits-per-byte."""
    specials = {tok.token_to_id(s) for s in SPECIAL_TOKENS}
    out = [b""] * tok.get_vocab_size()
    if json.loads(tok.to_str())["model"].get("byte_fallback"):  # SentencePiece: "▁" is a space, <0x0A> a byte
        specials |= {i for i, t in tok.get_added_tokens_decoder().items() if t.special}
        for token, i in tok.get_vocab().items():
            if i not in specials:
                byte = re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", token)
                out[i] = bytes([int(byte.group(1), 16)]) if byte else token.replace("\u2581", " ").encode()
        return out
    table = _byte_decoder()
    for token, i in tok.get_vocab().items():
        if i not in specials:
            out[i] = bytes(table[c] for c in token)
    return out
