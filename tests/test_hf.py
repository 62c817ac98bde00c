"""Hugging Face GPT-2 interoperability: our converter against ``transformers`` itself (fp32, CPU)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

transformers = pytest.importorskip("transformers")

from lmforge.generate import generate_ids  # noqa: E402
from lmforge.models.gpt import GPT, GPTConfig  # noqa: E402
from lmforge.models.hf import from_hf_gpt2, gpt_state_to_hf, hf_state_to_gpt, to_hf_gpt2  # noqa: E402


def hf_tiny():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=101, n_positions=48, n_embd=48, n_layer=3, n_head=4,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():  # HF zero-initialises biases; give every tensor a value that matters
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def test_import_from_hf_gives_the_same_logits():
    hf = hf_tiny()
    ours = from_hf_gpt2(hf)
    x = torch.randint(0, 101, (3, 40))
    with torch.no_grad():
        torch.testing.assert_close(ours(x)[0], hf(x).logits, rtol=1e-5, atol=1e-5)


def test_export_to_hf_gives_the_same_logits_and_greedy_tokens():
    torch.manual_seed(1)
    ours = GPT(GPTConfig(vocab_size=101, block_size=48, n_layer=2, n_head=4, n_embd=48)).eval()
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    hf = to_hf_gpt2(ours)
    x = torch.randint(0, 101, (2, 30))
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, ours(x)[0], rtol=1e-5, atol=1e-5)
    prompt = x[:, :6]
    mine = torch.stack(list(generate_ids(ours, prompt, 20, temperature=0)), dim=1)
    theirs = hf.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=20,
                         min_new_tokens=20, do_sample=False, pad_token_id=0)[:, 6:]
    assert torch.equal(mine, theirs)


def test_state_conversion_round_trips_and_transposes_projections():
    ours = GPT(GPTConfig(vocab_size=50, block_size=16, n_layer=1, n_head=2, n_embd=8))
    state = ours.state_dict_for_save()
    hf_state = gpt_state_to_hf(state)
    assert hf_state["transformer.h.0.attn.c_attn.weight"].shape == (8, 24)  # Conv1D (in, out)
    assert torch.equal(hf_state["lm_head.weight"], state["transformer.wte.weight"])
    back = hf_state_to_gpt(hf_state)
    assert back.keys() == state.keys()
    for k in state:
        assert torch.equal(back[k], state[k]), k
