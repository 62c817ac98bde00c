"""Hugging Face GPT-2 interoperability: our converter against ``transformers`` itself (fp32, CPU)."""

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

transformers = pytest.importorskip("transformers")

from lmforge.generate import generate_ids  # noqa: E402
from lmforge.models.gpt import GPT, GPTConfig  # noqa: E402
from lmforge.interop.hf import from_hf_gpt2, gpt_state_to_hf, hf_state_to_gpt, to_hf_gpt2  # noqa: E402


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


# ------------------------------------------------------------------ import-hf / export-hf (CLI)
from tests.conftest import run_cli, synthetic_text  # noqa: E402


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A Hugging Face GPT-2 directory as `save_pretrained` writes it, with a real tokenizer."""
    from lmforge.data.tokenizer import train_bpe

    tok = train_bpe([synthetic_text(i) for i in range(10)], vocab_size=320)
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=tok.get_vocab_size(), n_positions=64, n_embd=32, n_layer=2,
                                  n_head=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    path = tmp_path_factory.mktemp("hf") / "gpt2-tiny"
    model.save_pretrained(path)
    tok.save(str(path / "tokenizer.json"))
    return path, model, tok


def test_import_hf_then_generate_and_export_hf_round_trip(hf_dir, tmp_path):
    from lmforge.runs import load_run

    path, hf, tok = hf_dir
    run = tmp_path / "run"
    r = run_cli("import-hf", str(path), "--out", str(run), "--json")
    assert r.returncode == 0, r.stderr
    assert json_of(r)["params"] == sum(p.numel() for p in hf.parameters())
    loaded = load_run(run, device="cpu")
    x = torch.tensor([tok.encode("the model reads text").ids])
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x)[0], hf(x).logits, rtol=1e-5, atol=1e-5)
    g = run_cli("generate", str(run), "--prompt", "the model", "--max-new-tokens", "8", "--temperature", "0")
    assert g.returncode == 0 and g.stdout.startswith("the model"), g.stderr

    out = tmp_path / "exported"
    r = run_cli("export-hf", str(run), "--out", str(out))
    assert r.returncode == 0, r.stderr
    again = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(x).logits, hf(x).logits, rtol=1e-5, atol=1e-5)
    # transformers' generate stops at the token lmforge stops at (the end of text).
    eot = loaded.tokenizer.token_to_id("<|endoftext|>")
    assert again.config.eos_token_id == eot and again.generation_config.eos_token_id == eot
    fast = transformers.AutoTokenizer.from_pretrained(out)
    assert fast("the model reads text")["input_ids"] == tok.encode("the model reads text").ids
    # The run's chat template goes along, as a Jinja template `apply_chat_template` renders alike.
    from lmforge.chat import load_chat_template, render_chat

    chat = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi {there}"},
            {"role": "assistant", "content": "hello"}, {"role": "user", "content": "what is 'x'?\n"}]
    assert fast.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == \
        render_chat(load_chat_template(run), chat)


def test_import_hf_reads_pytorch_model_bin_without_unpickling_code(hf_dir, tmp_path):
    path, hf, _ = hf_dir
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    for f in ("config.json", "tokenizer.json"):
        (legacy / f).write_bytes((path / f).read_bytes())
    torch.save(hf.state_dict(), legacy / "pytorch_model.bin")
    r = run_cli("import-hf", str(legacy), "--out", str(tmp_path / "run"))
    assert r.returncode == 0, r.stderr

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    (legacy / "pytorch_model.bin").unlink()
    torch.save({"x": Evil()}, legacy / "pytorch_model.bin")
    r = run_cli("import-hf", str(legacy), "--out", str(tmp_path / "run2"))
    assert r.returncode == 2 and "pwned" not in r.stdout
    assert not (tmp_path / "run2").exists()


@pytest.mark.parametrize("case", ["missing", "t5", "bert-config-gpt2-weights", "no-tokenizer", "no-weights"])
def test_import_hf_bad_input_is_one_line_exit_2_and_no_output(hf_dir, tmp_path, case):
    path, _, _ = hf_dir
    src = tmp_path / "src"
    if case != "missing":
        src.mkdir()
        config = json.loads((path / "config.json").read_text())
        if case == "t5":
            config["model_type"] = "t5"
        if case == "bert-config-gpt2-weights":
            config.update(model_type="bert", hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                          intermediate_size=64, max_position_embeddings=64, architectures=["BertModel"])
        (src / "config.json").write_text(json.dumps(config))
        if case != "no-weights":
            (src / "model.safetensors").write_bytes((path / "model.safetensors").read_bytes())
        else:
            (src / "tokenizer.json").write_bytes((path / "tokenizer.json").read_bytes())
    r = run_cli("import-hf", str(src), "--out", str(tmp_path / "run"))
    assert r.returncode == 2
    assert r.stderr.strip().startswith("lmforge: error:") and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def json_of(r):
    return json.loads(r.stdout)


def test_gpt_classifier_round_trips_through_gpt2_for_sequence_classification(tmp_path):
    """import-hf of a GPT2ForSequenceClassification (labels included) and export-hf of our GPT
    classifier: the same class logits as transformers on right-padded batches."""
    from lmforge.data.tokenizer import encode_batch, train_bpe
    from lmforge.runs import load_run
    from tests.conftest import run_cli

    tok = train_bpe(["refund my order", "where is my parcel", "reset the password please"] * 20, 300)
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=tok.get_vocab_size(), n_positions=32, n_embd=32, n_layer=2, n_head=2,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, pad_token_id=0,
                                  id2label={0: "billing", 1: "shipping", 2: "account"},
                                  label2id={"billing": 0, "shipping": 1, "account": 2})
    hf = transformers.GPT2ForSequenceClassification(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    hf.save_pretrained(tmp_path / "hf")
    tok.save(str(tmp_path / "hf" / "tokenizer.json"))
    r = run_cli("import-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "run"), "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["labels"] == ["billing", "shipping", "account"]
    run = load_run(tmp_path / "run", device="cpu")
    ids, mask = encode_batch(run.tokenizer, ["refund my order", "where is my parcel please now"], 32)
    assert mask.sum(1).tolist()[0] < ids.size(1)  # the first row is padded
    with torch.no_grad():
        ours = run.model.classify(ids, mask)
        torch.testing.assert_close(ours, hf(input_ids=ids, attention_mask=mask).logits, rtol=1e-5, atol=1e-5)
    r = run_cli("export-hf", str(tmp_path / "run"), "--out", str(tmp_path / "back"), "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["architecture"] == "GPT2ForSequenceClassification"
    again = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "back").eval()
    assert again.config.id2label == {0: "billing", 1: "shipping", 2: "account"}
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids, attention_mask=mask).logits, ours, rtol=1e-5, atol=1e-5)
