"""Continuous batching: sequences decoded together (and joining mid-way) sample exactly what each
samples alone, and a reader that stops early frees its slot."""

import threading

import torch

from lmforge.generate import ContinuousBatcher, SamplingParams, generate_ids
from lmforge.models.gpt import GPT, GPTConfig


def tiny_gpt(seed=0):
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=97, block_size=64, n_layer=2, n_head=2, n_embd=32)).eval()
    # Larger weights than the default init make the distribution peaked, so greedy choices are
    # far from ties and sampling is not uniform.
    with torch.no_grad():
        model.transformer.wte.weight.mul_(20)
    return model


def alone(model, prompt, n, temperature=0.0, top_p=None, seed=None):
    """The reference: no cache, the whole sequence through the model for every token."""
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    x = torch.tensor([prompt])
    return [int(t[0]) for t in generate_ids(model, x, n, temperature, None, top_p, gen, use_cache=False)]


def submit(batcher, prompt, n, **params):
    return batcher.submit(prompt, SamplingParams(max_tokens=n, **params))


PROMPTS = [[1, 2, 3], [5], [7, 8, 9, 10, 11, 12], [40, 41], [3, 3, 3, 3], [90, 1, 2], [60], [11, 22, 33]]


def test_concurrent_sequences_match_each_alone_greedy_and_seeded():
    model = tiny_gpt()
    batcher = ContinuousBatcher(model, max_batch=8)
    greedy = [submit(batcher, p, 20, temperature=0.0) for p in PROMPTS]
    sampled = [submit(batcher, p, 20, temperature=0.9, top_p=0.95, seed=100 + i) for i, p in enumerate(PROMPTS[:4])]
    results = [list(it) for it in greedy + sampled]  # all 12 queued before any is read
    for p, got in zip(PROMPTS, results[:8]):
        assert got == alone(model, p, 20)
    for i, (p, got) in enumerate(zip(PROMPTS[:4], results[8:])):
        assert got == alone(model, p, 20, 0.9, 0.95, seed=100 + i)
    assert batcher.max_rows_seen == 8  # they really shared steps (8 slots, 12 sequences)
    assert sorted(batcher.free) == list(range(8)) and not batcher.active


def test_compiled_batcher_samples_what_eager_decoding_does():
    # `lmforge serve --compile`: every batch size's step is compiled at start-up (on the CPU with
    # the matrix-vector products as fused reductions, rows at their own positions).
    model = tiny_gpt(2)
    batcher = ContinuousBatcher(model, max_batch=2, compile=True)
    assert all(hasattr(step.fn, "_torchdynamo_orig_callable") for step in batcher.steps.values())
    greedy = [submit(batcher, p, 16, temperature=0.0) for p in PROMPTS[:2]]
    sampled = [submit(batcher, p, 16, temperature=0.9, seed=7 + i) for i, p in enumerate(PROMPTS[2:4])]
    results = [list(it) for it in greedy + sampled]
    assert results[:2] == [alone(model, p, 16) for p in PROMPTS[:2]]
    assert results[2:] == [alone(model, p, 16, 0.9, seed=7 + i) for i, p in enumerate(PROMPTS[2:4])]
    assert batcher.max_rows_seen == 2 and len(set(map(tuple, results))) == 4


def test_a_late_request_joins_the_running_batch():
    model = tiny_gpt(1)
    batcher = ContinuousBatcher(model, max_batch=4)
    first = submit(batcher, [1, 2], 50, temperature=0.0)
    head = [next(first) for _ in range(5)]  # the first sequence is decoding
    steps_before = batcher.steps_run
    second = list(submit(batcher, [4, 5, 6], 10, temperature=0.0))
    rest = list(first)
    assert head + rest == alone(model, [1, 2], 50)
    assert second == alone(model, [4, 5, 6], 10)
    # The second finished while the first was still running, sharing its steps.
    assert batcher.max_rows_seen == 2 and batcher.steps_run - steps_before < 50 + 10


def test_stopping_early_frees_the_slot_and_eos_ends_a_sequence():
    model = tiny_gpt(2)
    batcher = ContinuousBatcher(model, max_batch=2)
    it = submit(batcher, [1], 60, temperature=0.0)
    next(it)
    it.close()  # the reader went away
    out = list(submit(batcher, [2], 5, temperature=0.0))
    assert len(out) == 5
    steps = batcher.steps_run
    submit(batcher, [4], 60, temperature=0.0).close()  # gone before reading anything (the server's echo)
    assert len(list(submit(batcher, [5], 5, temperature=0.0))) == 5
    assert batcher.steps_run - steps < 10  # the unread sequence did not decode its 60 tokens for nobody
    eos = alone(model, [3], 10)[3]
    stopped = list(submit(batcher, [3], 10, temperature=0.0, eos_id=eos))
    assert stopped[-1] == eos and len(stopped) <= 4
    # A full context shifts: the prompt's 60 and 4 fed tokens fill the 64 positions, whose last
    # logits give the 5th new token; from there the sequence goes on from its last 32 tokens.
    shifted = list(submit(batcher, list(range(60)), 50, temperature=0.0))
    assert len(shifted) == 50 and shifted[:5] == alone(model, list(range(60)), 5)
    assert shifted[5:] == alone(model, (list(range(60)) + shifted[:5])[-32:], 45)
    threading.Event().wait(0.05)
    assert sorted(batcher.free) == [0, 1]


def test_scored_tokens_carry_the_models_log_probabilities_and_the_prompt_can_be_scored_alone():
    # What `logprobs` / `echo` in the server rest on: each token's log-probability under the model
    # (teacher-forced on the same ids, one forward pass), its top alternatives, and, before the
    # first token, the prompt's own tokens scored; max_new_tokens=0 scores the prompt only.
    from lmforge.generate import PromptScores, Scored

    model = tiny_gpt(3)
    batcher = ContinuousBatcher(model, max_batch=4)
    prompt = [4, 8, 15, 16, 23]
    items = list(submit(batcher, prompt, 6, temperature=0.8, seed=1, logprobs=3, prompt_logprobs=True))
    head, tokens = items[0], items[1:]
    assert isinstance(head, PromptScores) and all(isinstance(t, Scored) for t in tokens) and len(tokens) == 6
    assert [t.id for t in tokens] == alone(model, prompt, 6, 0.8, seed=1)  # scoring changes no sample
    ids = prompt + [t.id for t in tokens]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids]))[0][0], dim=-1)  # (T, V)
    assert [s.id for s in head.tokens] == prompt and head.tokens[0].logprob is None
    for j, s in enumerate(head.tokens[1:] + tokens, start=1):  # token j is predicted at position j - 1
        assert abs(s.logprob - logp[j - 1, ids[j]].item()) < 1e-4
        values, order = logp[j - 1].topk(3)
        assert [i for i, _ in s.top] == order.tolist()
        assert torch.allclose(torch.tensor([v for _, v in s.top]), values, atol=1e-4)
    only = list(submit(batcher, prompt, 0, logprobs=0, prompt_logprobs=True))
    assert len(only) == 1 and [s.logprob for s in only[0].tokens] == [s.logprob for s in head.tokens]
    assert all(s.top == [] for s in only[0].tokens)
    assert list(submit(batcher, prompt, 4, temperature=0.0)) == alone(model, prompt, 4)  # plain ids as before
    assert sorted(batcher.free) == list(range(4)) and not batcher.active


def test_penalties_and_logit_bias_change_the_logits_as_openais_do():
    torch.manual_seed(4)
    model = GPT(GPTConfig(vocab_size=97, block_size=64, n_layer=2, n_head=2, n_embd=32)).eval()
    with torch.no_grad():
        model.transformer.wte.weight.mul_(3)  # margins a penalty of 0.5-2 can overturn, but no near-ties
    batcher = ContinuousBatcher(model, max_batch=2)
    prompt = [1, 2, 3]

    def reference(n, presence, frequency, bias=None):  # no cache: the whole sequence again for every token
        ids, counts = list(prompt), {}
        for _ in range(n):
            with torch.no_grad():
                logits = model(torch.tensor([ids]))[0][0, -1].clone()
            for t, c in counts.items():
                logits[t] -= frequency * c + presence
            for t, b in (bias or {}).items():
                logits[t] += b
            t = int(logits.argmax())
            counts[t] = counts.get(t, 0) + 1
            ids.append(t)
        return ids[len(prompt):]

    plain = list(submit(batcher, prompt, 20, temperature=0.0))
    assert plain == reference(20, 0.0, 0.0)
    runs = [list(submit(batcher, prompt, 20, temperature=0.0, presence_penalty=pp, frequency_penalty=fp))
            for pp, fp in ((1.5, 0.0), (0.0, 0.7), (0.5, -0.5))]
    assert runs == [reference(20, 1.5, 0.0), reference(20, 0.0, 0.7), reference(20, 0.5, -0.5)]
    assert plain == [3] * 20 and runs[0] != runs[1] and plain not in runs[:2]  # each penalty changes the picks
    scored = list(submit(batcher, prompt, 20, temperature=0.0, presence_penalty=1.5, logprobs=1))
    assert [s.id for s in scored] == runs[0]  # scores are the model's own; the penalised pick is kept
    # logit_bias: +100 forces a token, -100 bans one (here the greedy favourite), anything between shifts.
    assert list(submit(batcher, prompt, 5, temperature=0.0, logit_bias={42: 100.0})) == [42] * 5
    banned = list(submit(batcher, prompt, 20, temperature=0.0, logit_bias={3: -100.0}))
    assert 3 not in banned and banned == reference(20, 0.0, 0.0, {3: -100.0})
    mixed = list(submit(batcher, prompt, 20, temperature=0.0, frequency_penalty=0.7, logit_bias={66: 1.0, 28: -2.0}))
    assert mixed == reference(20, 0.0, 0.7, {66: 1.0, 28: -2.0})


def test_a_sequence_whose_sampling_fails_fails_alone():
    import pytest

    model = tiny_gpt()
    batcher = ContinuousBatcher(model, max_batch=4)
    fine = [submit(batcher, p, 12, temperature=0.0) for p in PROMPTS[:3]]
    broken = submit(batcher, PROMPTS[3], 12, temperature=0.0, logit_bias={10 ** 6: 1.0})  # no such token
    with pytest.raises(IndexError):
        list(broken)
    assert [list(it) for it in fine] == [alone(model, p, 12) for p in PROMPTS[:3]]
    # Temperatures too small to divide by, and top_p near 0, sample the likeliest token.
    assert list(submit(batcher, PROMPTS[0], 8, temperature=1e-40)) == alone(model, PROMPTS[0], 8)
    assert list(submit(batcher, PROMPTS[1], 8, temperature=1.0, top_p=1e-46, seed=1)) == alone(model, PROMPTS[1], 8)
    assert sorted(batcher.free) == list(range(4)) and not batcher.active


def test_concurrent_callers_of_the_shared_engine_decode_together_and_as_each_alone():
    # The support server's conversations call stream_text from their own threads: they share the
    # model's inline engine (no thread of its own; waiting readers run its rounds) and its steps.
    from lmforge.generate import engine_for
    from lmforge.generate.text import SHARED_ROWS

    model = tiny_gpt(5)
    engine = engine_for(model, SHARED_ROWS, 128)
    assert engine.inline and engine_for(model, SHARED_ROWS, 128) is engine
    readers = [submit(engine, PROMPTS[i], 30, **(dict(temperature=0.9, seed=i) if i % 2 else dict(temperature=0.0)))
               for i in range(3)]  # queued together, then read (and driven) from three threads at once
    results = {}

    def call(i):
        results[i] = list(readers[i])

    threads = [threading.Thread(target=call, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert results[0] == alone(model, PROMPTS[0], 30) and results[2] == alone(model, PROMPTS[2], 30)
    assert results[1] == alone(model, PROMPTS[1], 30, 0.9, seed=1)
    assert engine.max_rows_seen == 3 and engine.thread is None and not engine.active
