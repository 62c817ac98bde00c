"""Bits per byte and the lzma baseline, checked by recomputing them independently."""

import copy
import json
import lzma
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lmforge.data.tokenizer import load_tokenizer
from lmforge.data.tokens import TokenFile
from lmforge.evaluate.lm import dynamic_evaluate_lm, evaluate_lm
from lmforge.models.gpt import GPT, GPTConfig


@pytest.fixture
def setup(data_dir):
    """An untrained 16-token-context model, the tokenizer, the validation file and its ids."""
    meta = json.loads((data_dir / "meta.json").read_text())
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=512, block_size=16, n_layer=1, n_head=2, n_embd=16)).eval()
    ids = torch.from_numpy(np.fromfile(data_dir / "val.bin", dtype=meta["dtype"]).astype(np.int64))
    return model, load_tokenizer(data_dir / "tokenizer.json"), TokenFile(data_dir / "val.bin", meta["dtype"]), ids


def test_metrics_match_an_independent_computation(setup):
    model, tok, val, ids = setup
    m = evaluate_lm(model, tok, val, batch_size=3, stride=16)

    # Reference: score each 16-token window separately, one sequence at a time.
    nats, n = 0.0, 0
    with torch.no_grad():
        for s in range(0, len(ids) - 1, 16):
            x = ids[s:s + 16]
            y = ids[s + 1:s + 17]
            x = x[:len(y)]
            logits, _ = model(x[None])
            nats += F.cross_entropy(logits[0], y, reduction="sum").item()
            n += len(y)
    text = tok.decode(ids[1:].tolist(), skip_special_tokens=True).encode("utf-8")
    assert m["val_tokens"] == n == len(ids) - 1
    assert m["val_bytes"] == len(text)
    assert math.isclose(m["val_loss"], nats / n, rel_tol=1e-5)
    assert math.isclose(m["val_ppl"], math.exp(nats / n), rel_tol=1e-5)
    assert math.isclose(m["val_bpb"], nats / math.log(2) / len(text), rel_tol=1e-5)
    assert m["lzma_bpb"] == 8 * len(lzma.compress(text, preset=9 | lzma.PRESET_EXTREME)) / len(text)
    docs = tok.decode(ids[1:].tolist(), skip_special_tokens=False).split("<|endoftext|>")
    doc_bits = sum(8 * len(lzma.compress(d.encode(), preset=9 | lzma.PRESET_EXTREME)) for d in docs if d)
    assert m["lzma_doc_bpb"] == doc_bits / len(text)
    # An untrained model is close to uniform over the vocabulary.
    assert abs(m["val_loss"] - math.log(512)) < 0.3


def test_strided_windows_score_each_token_once_with_more_context(setup):
    model, tok, val, ids = setup
    m = evaluate_lm(model, tok, val, batch_size=5, stride=4)
    # Reference: target k (1-based index into ids) is predicted from ids[start:k] where start is the
    # window start that first reaches it: 0 while k <= 16, else the first multiple of 4 with start+16 >= k.
    nats = 0.0
    with torch.no_grad():
        for k in range(1, len(ids)):
            start = 0 if k <= 16 else -(-(k - 16) // 4) * 4
            logits, _ = model(ids[start:k][None])
            nats -= torch.log_softmax(logits[0, -1], -1)[ids[k]].item()
            if k > 400:
                break
    m_short = evaluate_lm(model, tok, val, batch_size=5, stride=4, max_tokens=401)
    assert m_short["val_tokens"] == 401
    assert math.isclose(m_short["val_loss"], nats / 401, rel_tol=1e-5)
    assert m["val_tokens"] == len(ids) - 1 and m["stride"] == 4
    assert m["val_bytes"] == evaluate_lm(model, tok, val, stride=16)["val_bytes"]


def test_dynamic_evaluation_scores_each_window_before_learning_from_it(setup):
    model, tok, val, ids = setup
    before = copy.deepcopy(model.state_dict())
    m = dynamic_evaluate_lm(model, tok, val, lr=3e-3)

    # Reference: consecutive 16-token windows in order; score a window, then one Adam step on it.
    ref = copy.deepcopy(model)
    opt = torch.optim.Adam(ref.parameters(), lr=3e-3, betas=(0.9, 0.99))
    nats = 0.0
    for s in range(0, len(ids) - 1, 16):
        y = ids[s + 1:s + 17]
        logits, _ = ref(ids[s:s + len(y)][None])
        loss = F.cross_entropy(logits[0], y)
        nats += loss.item() * len(y)
        loss.backward()
        opt.step()
        opt.zero_grad()
    static = evaluate_lm(model, tok, val)
    assert math.isclose(m["dynamic_val_loss"], nats / (len(ids) - 1), rel_tol=1e-4)
    assert math.isclose(m["dynamic_val_bpb"], nats / math.log(2) / static["val_bytes"], rel_tol=1e-4)
    assert m["dynamic_val_loss"] < static["val_loss"] - 0.5  # an untrained model learns a lot as it reads
    for k, v in model.state_dict().items():  # the caller's model is left as it was
        assert torch.equal(v, before[k]), k
