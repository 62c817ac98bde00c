"""The LSTM language model: PyTorch's LSTM as the reference for its cell, its state as a cache
(prefill of right-padded prompts, decode steps, the continuous batcher), and the LM task's spine
(train, exact resume, eval's bits per byte beside lzma, generate)."""

import json

import pytest
import torch

from tests.conftest import run_cli
from lmforge import config as cfgmod
from lmforge.models.lstm import LSTM, LSTMConfig
from lmforge.generate import ContinuousBatcher, SamplingParams, generate_ids
from lmforge.train.trainer import train


def tiny_lstm(seed=0, **kw) -> LSTM:
    torch.manual_seed(seed)
    model = LSTM(LSTMConfig(vocab_size=61, n_layer=2, n_embd=16, n_hidden=24, block_size=32, **kw)).eval()
    with torch.no_grad():  # a peaked distribution: greedy choices far from ties
        model.wte.weight.mul_(30)
    return model


def test_the_state_continues_the_sequence_as_one_forward_pass_does():
    model = tiny_lstm()
    idx = torch.randint(0, 61, (3, 12))
    full, _ = model(idx)
    # PyTorch's multi-layer LSTM with the same weights is the reference for the stacked layers.
    ref = torch.nn.LSTM(16, 24, batch_first=True)
    ref.load_state_dict(model.layers[0].state_dict())
    top = torch.nn.LSTM(24, 16, batch_first=True)
    top.load_state_dict(model.layers[1].state_dict())
    ref_logits = model.lm_head(top(ref(model.wte(idx))[0])[0])
    torch.testing.assert_close(full, ref_logits)

    cache = model.new_cache(3)
    pieces = [model(idx[:, :5], cache=cache)[0]]
    for t in range(5, 12):  # one-token steps go through the cell's equations, not nn.LSTM
        pieces.append(model(idx[:, t:t + 1], cache=cache, input_pos=torch.tensor([t]))[0])
    torch.testing.assert_close(torch.cat(pieces, 1), full)

    lengths = torch.tensor([12, 7, 2])
    padded = idx.clone()
    for i, n in enumerate(lengths):
        padded[i, n:] = 0
    state = model.new_cache(3)
    logits = model.prefill(padded, lengths, state)
    for i, n in enumerate(lengths.tolist()):
        alone = model.new_cache(1)
        torch.testing.assert_close(logits[i], model(idx[i:i + 1, :n], cache=alone)[0][0, -1])
        torch.testing.assert_close(state.h[1][i], alone.h[1][0])  # padding never entered the state


def test_gradients_reach_every_weight_and_the_head_is_tied():
    model = tiny_lstm().train()
    assert model.lm_head.weight is model.wte.weight
    idx = torch.randint(0, 61, (2, 10))
    model(idx, idx, loss_chunk=4)[1].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    saved = model.state_dict_for_save()
    assert "lm_head.weight" not in saved
    other = tiny_lstm(seed=1)
    other.load_saved_state(saved)
    assert other.lm_head.weight is other.wte.weight
    torch.testing.assert_close(other(idx)[0], model.eval()(idx)[0])
    untied = LSTM(LSTMConfig(vocab_size=61, n_layer=1, n_embd=8, n_hidden=12, tie_embeddings=False))
    assert untied.lm_head.weight.shape == (61, 12)


def test_the_batcher_decodes_lstms_as_each_sequence_alone():
    model = tiny_lstm(2)
    prompts = [[1, 2, 3, 4, 5], [7], [9, 8, 7], [3, 3, 3, 3, 3, 3, 3, 3]]

    def alone(prompt, n):
        return [int(t[0]) for t in generate_ids(model, torch.tensor([prompt]), n, temperature=0.0)]

    batcher = ContinuousBatcher(model, max_batch=4)
    results = [list(it) for it in [batcher.submit(p, SamplingParams(max_tokens=12, temperature=0.0)) for p in prompts]]
    assert results == [alone(p, 12) for p in prompts]
    assert batcher.max_rows_seen == 4 and len(set(map(tuple, results))) > 1


def test_an_lstm_trains_resumes_and_is_evaluated_beside_lzma(tmp_path, data_dir):
    cfg = cfgmod.build_config("lstm-debug", overrides=["train.max_steps=10", "train.eval_interval=5"])
    whole, part = tmp_path / "whole", tmp_path / "part"
    summary = train(cfg, data_dir, whole)
    train(cfg, data_dir, part, stop_at=5)
    train(cfg, data_dir, part, resume=True)

    def losses(run):
        return [(m["step"], m["loss"]) for m in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
                if "loss" in m]
    assert losses(part) == losses(whole) and len(losses(whole)) == 10
    assert summary["val_loss"] < losses(whole)[0][1]  # it learned something in 10 steps

    r = run_cli("eval", str(whole), "--json")
    assert r.returncode == 0, r.stderr
    metrics = json.loads(r.stdout)
    assert metrics["val_bpb"] > 0 and metrics["lzma_bpb"] > 0
    assert "lstm: 2 layers" in (whole / "report.md").read_text()
    r = run_cli("generate", str(whole), "--prompt", "def", "--max-new-tokens", "8", "--temperature", "0")
    assert r.returncode == 0 and r.stdout.startswith("def"), r.stderr


@pytest.mark.parametrize("bad, message", [("model.n_hidden=0", "model.n_hidden"),
                                          ("model.init=xavier", "model.init")])
def test_bad_lstm_config_is_refused_with_the_key(bad, message):
    from lmforge.errors import UserError

    with pytest.raises(UserError, match=message):
        cfgmod.build_config("lstm-debug", overrides=[bad])
