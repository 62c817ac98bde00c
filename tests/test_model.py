"""GPT model: causality, KV cache equivalence, learning, and a state-dict round trip."""

import torch
import torch.nn.functional as F

from lmforge.generate import MatVecLinear, generate_ids, sample_next
from lmforge.models.gpt import GPT, GPTConfig
from lmforge.models.init import SINUSOIDAL_RMS, previous_token_head, sinusoidal_positions
from lmforge.models.losses import linear_cross_entropy


def tiny(vocab=97, block=32, dropout=0.0) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=vocab, block_size=block, n_layer=2, n_head=2, n_embd=32,
                         dropout=dropout)).eval()


def test_sinusoidal_position_init():
    """``pos_init=sinusoidal`` starts the (learned) wpe at the sine/cosine table, scaled to
    ``SINUSOIDAL_RMS``; the default stays GPT-2's N(0, 0.02)."""
    table = sinusoidal_positions(64, 48, rms=0.5)
    assert table.shape == (64, 48)
    assert abs(table.pow(2).mean().sqrt().item() - 0.5) < 1e-6
    p = torch.arange(64, dtype=torch.float64)[:, None]
    freq = torch.exp(-torch.log(torch.tensor(10000.0, dtype=torch.float64)) * torch.arange(24) / 24)
    raw = torch.cat([(p * freq).sin(), (p * freq).cos()], dim=1)
    torch.testing.assert_close(table.double() / table.double()[0, 24], raw, rtol=1e-5, atol=1e-6)
    torch.manual_seed(0)
    shape = dict(vocab_size=97, block_size=32, n_layer=1, n_head=2, n_embd=32)
    model = GPT(GPTConfig(**shape, pos_init="sinusoidal"))
    torch.testing.assert_close(model.transformer.wpe.weight.data, sinusoidal_positions(32, 32, SINUSOIDAL_RMS))
    assert model.transformer.wpe.weight.requires_grad  # still learned
    default = GPT(GPTConfig(**shape))
    assert abs(default.transformer.wpe.weight.std().item() - 0.02) < 0.003


def test_previous_token_head_attends_one_position_back():
    """With ``prev_token_head`` the first layer's first head starts by attending from each position
    to the one before it (on random tokens: the sinusoidal positions dominate the input); the other
    head and the second layer keep GPT-2's random start."""
    wq, wk = previous_token_head(48, 16, scale=1.0)
    table = sinusoidal_positions(40, 48, rms=1.0)
    # On the table, the query at position i is the key at position i - 1.
    torch.testing.assert_close(table[1:] @ wq.T, table[:-1] @ wk.T, atol=1e-5, rtol=0)

    def attention_to_previous(model):
        x = torch.randint(0, 97, (1, 128))
        with torch.no_grad():
            block = model.transformer.h[0]
            a = block.ln_1(model.transformer.wte(x) + model.transformer.wpe(torch.arange(128)))
            q, k, _ = block.attn.c_attn(a).split(96, dim=2)
            hs = 96 // 3
            scores = (q[0, :, :hs] @ k[0, :, :hs].T) / hs ** 0.5
            probs = scores.masked_fill(torch.ones(128, 128).triu(1).bool(), float("-inf")).softmax(-1)
        return probs.diagonal(-1).mean().item()

    shape = dict(vocab_size=97, block_size=128, n_layer=2, n_head=3, n_embd=96, pos_init="sinusoidal")
    torch.manual_seed(0)
    headed = GPT(GPTConfig(**shape, prev_token_head=True))
    assert attention_to_previous(headed) > 0.8
    torch.manual_seed(0)
    plain = GPT(GPTConfig(**shape))
    assert attention_to_previous(plain) < 0.1
    changed = {name for name, p in headed.state_dict().items() if not torch.equal(p, plain.state_dict()[name])}
    assert changed == {"transformer.h.0.attn.c_attn.weight"}
    rows = torch.ones(3 * 96, dtype=torch.bool)
    rows[:32] = rows[96:128] = False  # the first head's queries and keys
    w1, w0 = headed.transformer.h[0].attn.c_attn.weight, plain.transformer.h[0].attn.c_attn.weight
    assert torch.equal(w1[rows], w0[rows]) and not torch.equal(w1[~rows], w0[~rows])


def test_changing_a_future_token_never_changes_earlier_logits():
    model = tiny()
    x = torch.randint(0, 97, (2, 20))
    logits, _ = model(x)
    for t in (0, 7, 19):
        y = x.clone()
        y[:, t] = (y[:, t] + 1) % 97
        logits2, _ = model(y)
        torch.testing.assert_close(logits2[:, :t], logits[:, :t], rtol=0, atol=0)
        assert not torch.allclose(logits2[:, t], logits[:, t])  # and the changed position does change


def test_kv_cache_matches_full_forward():
    model = tiny()
    x = torch.randint(0, 97, (3, 24))
    full, _ = model(x)
    cache = model.new_cache(3)
    parts = [model(x[:, :10], cache=cache)[0], model(x[:, 10:11], cache=cache)[0],
             model(x[:, 11:24], cache=cache)[0]]  # prefill, one token, then a chunk after a prefix
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-5, atol=1e-5)
    assert cache.pos == 24


def test_greedy_generation_identical_with_and_without_cache():
    model = tiny(block=64)
    prompt = torch.randint(0, 97, (2, 5))
    with_cache = torch.stack(list(generate_ids(model, prompt, 40, temperature=0)), dim=1)
    no_cache = torch.stack(list(generate_ids(model, prompt, 40, temperature=0, use_cache=False)), dim=1)
    assert torch.equal(with_cache, no_cache)


def test_generation_past_the_context_keeps_going():
    model = tiny(block=16)
    out = list(generate_ids(model, torch.zeros(1, 10, dtype=torch.long), 30, temperature=0))
    assert len(out) == 30


def test_sampling_filters_and_seeds():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0, 4.0]])
    assert int(sample_next(logits, temperature=0)) == 4
    g = torch.Generator().manual_seed(0)
    picks = {int(sample_next(logits, 1.0, top_k=2, generator=g)) for _ in range(200)}
    assert picks == {3, 4}
    # top_p=0.5: token 4 alone holds ~64% of the mass, so nothing else may be drawn.
    picks = {int(sample_next(logits, 1.0, top_p=0.5, generator=g)) for _ in range(200)}
    assert picks == {4}
    a = [int(sample_next(logits, 1.0, generator=torch.Generator().manual_seed(5))) for _ in range(3)]
    b = [int(sample_next(logits, 1.0, generator=torch.Generator().manual_seed(5))) for _ in range(3)]
    assert a == b


def test_tiny_model_overfits_a_short_text():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, block_size=32, n_layer=2, n_head=2, n_embd=64)).train()
    data = torch.randint(0, 64, (1, 33))
    x, y = data[:, :-1], data[:, 1:]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(150):
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05, loss.item()


def test_tied_head_and_saved_state_round_trip():
    model = tiny()
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    state = model.state_dict_for_save()
    assert "lm_head.weight" not in state and "transformer.h.0.attn.c_attn.weight" in state
    other = GPT(model.config)
    other.load_saved_state(state)
    x = torch.randint(0, 97, (1, 8))
    torch.testing.assert_close(other.eval()(x)[0], model(x)[0], rtol=0, atol=0)
    assert other.lm_head.weight.data_ptr() == other.transformer.wte.weight.data_ptr()


def test_fused_chunked_cross_entropy_matches_the_plain_loss_and_gradients():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=97, block_size=32, n_layer=2, n_head=2, n_embd=32)).train()
    x = torch.randint(0, 97, (3, 20))
    y = torch.randint(0, 97, (3, 20))
    y[0, :5] = -1  # ignored positions
    _, plain = model(x, y)
    plain.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    logits, fused = model(x, y, loss_chunk=7)  # chunks that do not divide the 60 rows
    fused.backward()
    assert logits is None
    torch.testing.assert_close(fused, plain, rtol=1e-6, atol=1e-6)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want[n], rtol=1e-5, atol=1e-6, msg=n)
    with torch.no_grad():  # evaluation path: chunked, no gradients kept
        _, ev = model(x, y, loss_chunk=7)
    torch.testing.assert_close(ev, plain.detach(), rtol=1e-6, atol=1e-6)


def test_fused_cross_entropy_is_exact_when_probabilities_underflow():
    # Logits 200+ apart: exp underflows to 0 for the target of some rows; the loss must stay finite
    # and equal to F.cross_entropy's (log-sum-exp taken from the largest logit).
    torch.manual_seed(0)
    h = (torch.randn(9, 8) * 30).requires_grad_()
    w = (torch.randn(50, 8) * 3).requires_grad_()
    t = torch.randint(0, 50, (9,))
    t[2] = -1
    plain = F.cross_entropy(h @ w.t(), t, ignore_index=-1)
    gh, gw = torch.autograd.grad(plain, (h, w))
    fused = linear_cross_entropy(h, w, t, chunk=4)
    fh, fw = torch.autograd.grad(fused, (h, w))
    assert plain.item() > 50 and torch.isfinite(fused)
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(fh, gh, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(fw, gw, rtol=1e-5, atol=1e-4)


def test_activation_checkpointing_gives_the_same_loss_and_gradients():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=97, block_size=32, n_layer=3, n_head=2, n_embd=32)).train()
    x, y = torch.randint(0, 97, (2, 24)), torch.randint(0, 97, (2, 24))
    _, plain = model(x, y)
    plain.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.activation_checkpointing = True
    _, ckpt = model(x, y, loss_chunk=5)
    ckpt.backward()
    torch.testing.assert_close(ckpt, plain, rtol=1e-6, atol=1e-6)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want[n], rtol=1e-5, atol=1e-6, msg=n)


def test_decode_step_positions_come_from_a_device_tensor():
    """The captured/compiled step passes its position as a tensor; the cache counter is left alone."""
    from lmforge.generate import DecodeStep

    model = tiny()
    x = torch.randint(0, 97, (2, 12))
    full, _ = model(x)
    cache = model.new_cache(2, 32)
    model(x[:, :8], cache=cache)
    step = DecodeStep(model, cache, cache.pos)
    for p in range(8, 12):
        logits = step(x[:, p], p)
        torch.testing.assert_close(logits, full[:, p], rtol=1e-5, atol=1e-5)
    assert cache.pos == 8


def test_compiled_decoding_equals_eager():
    """torch.compile'd decode step (with CPU weight freezing) gives the eager greedy tokens."""
    model = tiny(block=64)
    prompt = torch.randint(0, 97, (2, 5))
    eager = torch.stack(list(generate_ids(model, prompt, 20, temperature=0, use_cache=False)), dim=1)
    compiled = torch.stack(list(generate_ids(model, prompt, 20, temperature=0, compile=True)), dim=1)
    assert torch.equal(compiled, eager)


def test_matvec_linear_rewrites_few_row_linears_only():
    """The compiled CPU decode step's linear layers as multiply + sum: same logits for one row;
    with more rows than ``max_rows`` the BLAS path is left alone (bit-identical)."""
    model = tiny()
    x = torch.randint(0, 97, (1, 1))
    want, _ = model(x)
    with MatVecLinear():
        got, _ = model(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    calls = []

    class Spy(MatVecLinear):
        def applies(self, x):
            rewrite = super().applies(x)
            if rewrite:
                calls.append(x.shape)
            return rewrite

    with Spy(max_rows=4):
        model(torch.randint(0, 97, (1, 2)))  # 2 rows: rewritten
    assert len(calls) == 4 * len(model.transformer.h) + 1  # four linears per block + the head
    calls.clear()
    wide = torch.randint(0, 97, (2, 8))
    with Spy(max_rows=4):
        got, _ = model(wide)
    assert not calls and torch.equal(got, model(wide)[0])


def test_interleaved_generations_of_the_same_shape_do_not_share_a_cache():
    model = tiny(block=64)
    a, b = torch.randint(0, 97, (1, 6)), torch.randint(0, 97, (1, 6))
    want_a = torch.stack(list(generate_ids(model, a, 12, temperature=0)), dim=1)
    want_b = torch.stack(list(generate_ids(model, b, 12, temperature=0)), dim=1)
    ga, gb = generate_ids(model, a, 12, temperature=0), generate_ids(model, b, 12, temperature=0)
    got_a, got_b = [], []
    for _ in range(12):  # step both in turn, as two server requests would
        got_a.append(next(ga))
        got_b.append(next(gb))
    assert torch.equal(torch.stack(got_a, dim=1), want_a)
    assert torch.equal(torch.stack(got_b, dim=1), want_b)


class CountingTokenizer:
    """A tokenizer that counts how many ids it was asked to decode."""

    def __init__(self, tok):
        self.tok, self.decoded = tok, 0

    def decode(self, ids):
        self.decoded += len(ids)
        return self.tok.decode(ids)


def test_streamed_text_pieces_are_exact_never_split_a_character_and_cost_linear_decoding():
    from lmforge.data.tokenizer import train_bpe, train_wordpiece
    from lmforge.generate import text_pieces

    text = "Grüße aus Köln: 東京 → 😀 naïve café.\n" * 3 + "def f(x):\n    return x  # ok\n"
    for tok in (train_bpe([text] * 20, vocab_size=300, min_frequency=1),
                train_wordpiece([text] * 20, vocab_size=300)):
        ids = tok.encode(text).ids
        counting = CountingTokenizer(tok)
        pieces = list(text_pieces(iter(ids), counting))
        assert "".join(pieces) == tok.decode(ids)
        assert not any("\ufffd" in p for p in pieces)  # byte-level BPE splits 😀 and 東 over tokens
        # Stop strings: everything before the first one, nothing of it, even when it spans tokens.
        full = tok.decode(ids)
        for stop in (full[5:9], full[40:47]):
            got = text_pieces(iter(ids), tok, stop=[stop, "never occurs"])
            pieces, result = [], None
            try:
                while True:
                    pieces.append(next(got))
            except StopIteration as end:
                result = end.value
            assert "".join(pieces) == full[:full.index(stop)] and result["finish_reason"] == "stop"
    # Linear, not quadratic: 3,000 tokens decode each id a few times, not ~1,500 times on average.
    tok = train_bpe([text] * 20, vocab_size=300, min_frequency=1)
    ids = (tok.encode(text).ids * 100)[:3000]
    counting = CountingTokenizer(tok)
    assert "".join(text_pieces(iter(ids), counting)) == tok.decode(ids)
    assert counting.decoded < 10 * len(ids)
