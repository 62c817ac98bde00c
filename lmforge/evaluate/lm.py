"""Language-model metrics on held-out tokens: loss, perplexity, bits per byte, and the lzma baseline.

Bits per byte = total loss in bits / UTF-8 bytes of the predicted text. It is comparable across
tokenizers and with a compressor: ``lzma_bpb`` is what ``lzma`` (preset 9 | extreme) needs for
exactly the same bytes, an honest non-neural baseline a model should beat.
"""

from __future__ import annotations

import copy
import lzma
import math
from contextlib import nullcontext

import torch

from lmforge.data.tokenizer import eot_id, token_bytes
from lmforge.data.tokens import TokenFile
from lmforge.errors import UserError
from lmforge.progress import progress


def lzma_bits_per_byte(data: bytes) -> float:
    """Compressed size in bits per input byte with the strongest lzma setting."""
    if not data:
        return float("nan")
    return 8 * len(_xz(data)) / len(data)


def _xz(data: bytes) -> bytes:
    return lzma.compress(data, preset=9 | lzma.PRESET_EXTREME)


@torch.no_grad()
def evaluate_lm(model, tokenizer, tokens: TokenFile, batch_size: int = 8, max_tokens: int | None = None,
                autocast=None, stride: int | None = None) -> dict:
    """Score every token of ``tokens`` once, in windows of the model's context that start every
    ``stride`` tokens (default: the context length, i.e. consecutive windows; a smaller stride
    gives every token at least ``block_size - stride`` tokens of context, at more cost).

    Returns ``val_loss`` (nats/token), ``val_ppl``, ``val_bpb``, ``lzma_bpb``, ``val_tokens`` and
    ``val_bytes``. Document separators count as tokens (they must be predicted) but have no bytes.

    ``lzma_bpb`` compresses the whole scored text as one stream, so lzma may copy from any earlier
    document; ``lzma_doc_bpb`` compresses each document on its own, which is closer to what a model
    with a context window of ``block_size`` tokens can use. Both are reported; ``lzma_bpb`` is
    the bar.
    """
    model.eval()
    device = next(model.parameters()).device
    T = model.config.block_size
    stride = stride or T
    table = token_bytes(tokenizer)
    total_nats, n_tokens = 0.0, 0
    text = bytearray()
    doc_ends: list[int] = []  # offsets in ``text`` where a document ends
    eot = eot_id(tokenizer)
    n_target = min(len(tokens) - 1, max_tokens or len(tokens))
    with progress(total=n_target, desc="evaluating", unit="tok", unit_scale=True) as bar:
        for x, y in tokens.sequential_batches(batch_size, T, max_tokens, stride):
            valid = y[y >= 0]
            with autocast or nullcontext():
                # The chunked loss path: logits are made 256 rows at a time, never all at once.
                _, loss = model(x.to(device), y.to(device), loss_chunk=256)
            total_nats += loss.item() * valid.numel()  # mean over scored targets -> sum
            n_tokens += valid.numel()
            for i in valid.tolist():
                if i == eot:
                    doc_ends.append(len(text))
                else:
                    text += table[i]
            bar.update(valid.numel())
    val_loss = total_nats / n_tokens
    n_bytes = len(text)
    bounds = [0] + doc_ends + ([n_bytes] if not doc_ends or doc_ends[-1] != n_bytes else [])
    doc_bits = sum(8 * len(_xz(bytes(text[a:b]))) for a, b in zip(bounds, bounds[1:]) if b > a)
    return {
        "val_loss": val_loss,
        "val_ppl": math.exp(val_loss),
        "val_bpb": total_nats / math.log(2) / n_bytes,
        "lzma_bpb": lzma_bits_per_byte(bytes(text)),
        "lzma_doc_bpb": doc_bits / n_bytes,
        "val_tokens": n_tokens,
        "val_bytes": n_bytes,
        "context": T,
        "stride": stride,
    }


# Adam (betas 0.9, 0.99) at 1e-4, chosen by measurement (bench/RESULTS.md section 8): the only rate
# tried that helped on every model and corpus. SGD's good rate depends on the model (0.1 helped
# two `micro` runs and hurt `debug`; 0.03 wrecked the quickstart's run); Adam at 3e-4 hurt the quickstart's.
DYNAMIC_LR = 1e-4
DYNAMIC_BETAS = (0.9, 0.99)


def dynamic_evaluate_lm(model, tokenizer, tokens: TokenFile, lr: float = DYNAMIC_LR,
                        max_tokens: int | None = None, autocast=None) -> dict:
    """Dynamic evaluation (Krause et al., 2018): score consecutive windows of the validation
    stream in order and, after scoring each window, take one Adam step on it, so the model adapts
    to the text as it reads it -- as lzma does. Every token is scored before the model has trained
    on it, so the total is still a code length a decoder could reproduce, comparable with
    ``lzma_bpb``. The run's model is not changed (a copy adapts).

    Returns ``dynamic_val_loss`` (nats/token), ``dynamic_val_bpb`` and ``dynamic_lr``, over the
    same tokens and bytes as :func:`evaluate_lm` with its default stride.
    """
    if not lr > 0:
        raise UserError(f"the dynamic-evaluation learning rate must be positive, got {lr}")
    device = next(model.parameters()).device
    model = copy.deepcopy(model)
    model.eval()  # no dropout: the static model's function, only the weights move
    opt = torch.optim.Adam(model.parameters(), lr=lr, betas=DYNAMIC_BETAS)
    size = [len(b) for b in token_bytes(tokenizer)]
    eot = eot_id(tokenizer)
    total_nats, n_tokens, n_bytes = 0.0, 0, 0
    n_target = min(len(tokens) - 1, max_tokens or len(tokens))
    with progress(total=n_target, desc="dynamic evaluation", unit="tok", unit_scale=True) as bar:
        for x, y in tokens.sequential_batches(1, model.config.block_size, max_tokens):
            valid = y[y >= 0].tolist()
            with autocast or nullcontext():
                _, loss = model(x.to(device), y.to(device), loss_chunk=256)
            total_nats += loss.item() * len(valid)
            n_tokens += len(valid)
            n_bytes += sum(size[i] for i in valid if i != eot)
            loss.backward()  # only after the window's tokens have been scored
            opt.step()
            opt.zero_grad(set_to_none=True)
            bar.update(len(valid))
    return {"dynamic_val_loss": total_nats / n_tokens, "dynamic_val_bpb": total_nats / math.log(2) / n_bytes,
            "dynamic_lr": lr}
