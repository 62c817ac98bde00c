"""Instruction tuning (``--task sft``): assistant-only targets, packing that keeps conversations
apart, exact resume, evaluation on any decoder run, bad chat files."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from lmforge.chat import DEFAULT_CHAT_TEMPLATE
from lmforge.tasks.sft import assistant_loss, encode_conversation, pack, read_conversations
from tests.conftest import cli_here, run_cli

CHATS = [
    {"messages": [{"role": "system", "content": "You answer briefly."},
                  {"role": "user", "content": "what does the model read?"},
                  {"role": "assistant", "content": "the model reads text"}]},
    {"messages": [{"role": "user", "content": "and then?"}, {"role": "assistant", "content": "it learns"},
                  {"role": "user", "content": "what splits words?"}, {"role": "assistant", "content": "a tokenizer"}]},
    {"instruction": "Say what lowers the loss.", "input": "", "output": "training lowers the loss"},
    {"instruction": "Repeat:", "input": "validation checks", "output": "validation checks"},
] * 3


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, data_dir):
    """A tiny Llama language model (the run to fine-tune)."""
    run = tmp_path_factory.mktemp("sft") / "base"
    r = run_cli("train", "--data", str(data_dir), "--preset", "llama-debug", "--max-steps", "20", "--out", str(run),
                "--set", "model.block_size=256")
    assert r.returncode == 0, r.stderr
    return run


@pytest.fixture(scope="module")
def chat_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("chats") / "chats.jsonl"
    path.write_text("".join(json.dumps(c) + "\n" for c in CHATS), encoding="utf-8")
    return path


def test_only_assistant_tokens_are_targets(base_run):
    from lmforge.runs import load_run

    run = load_run(base_run, device="cpu")
    messages = read_conversations_from(CHATS[1])
    ids, trained = encode_conversation(DEFAULT_CHAT_TEMPLATE, run.tokenizer, messages)
    target_text = run.tokenizer.decode([t for t, m in zip(ids, trained) if m], skip_special_tokens=False)
    # the two answers (each closed by the template's blank line) and the end-of-text token, nothing else
    assert target_text == "it learns\n\na tokenizer\n\n<|endoftext|>"
    prompt_text = run.tokenizer.decode([t for t, m in zip(ids, trained) if not m])
    assert "and then?" in prompt_text and "it learns" not in prompt_text


def read_conversations_from(row, tmp=None):
    from lmforge.tasks.sft import _conversation

    return _conversation(row, "test")


def test_packed_rows_score_each_conversation_as_if_alone(base_run):
    """The loss over packed rows equals a hand computation over each conversation alone, with only
    its assistant tokens counted (it would differ if prompt tokens counted or attention leaked)."""
    from lmforge.runs import load_run

    run = load_run(base_run, device="cpu")
    encoded = [encode_conversation(DEFAULT_CHAT_TEMPLATE, run.tokenizer, read_conversations_from(c)) for c in CHATS[:4]]
    x, y, seg, cut = pack(encoded, 256)
    assert cut == 0 and len(x) < 4  # several conversations share a row
    total, count, every, n_every = 0.0, 0, 0.0, 0
    with torch.no_grad():
        for ids, trained in encoded:
            logits = run.model(torch.tensor([ids[:-1]]))[0][0]
            target = torch.tensor([t if m else -1 for t, m in zip(ids[1:], trained[1:])])
            total += F.cross_entropy(logits, target, ignore_index=-1, reduction="sum").item()
            count += int((target >= 0).sum())
            every += F.cross_entropy(logits, torch.tensor(ids[1:]), reduction="sum").item()
            n_every += len(ids) - 1
        packed, n = assistant_loss(run.model, x, y, seg, "cpu", torch.no_grad())
    assert n == count and abs(packed - total / count) < 1e-5
    assert abs(every / n_every - packed) > 1e-3  # counting the prompt's tokens too is a different figure


def test_sft_trains_resumes_exactly_and_evaluates(base_run, chat_file, tmp_path, capsys):
    def run_cli(*args, **kw):  # in this process: each CLI start costs ~2 s of imports
        return cli_here(capsys, *args)

    args = ["train", "--task", "sft", "--init", str(base_run), "--data", str(chat_file), "--max-steps", "6",
            "--set", "train.batch_size=2"]
    whole, part = tmp_path / "whole", tmp_path / "part"
    r = run_cli(*args, "--out", str(whole), "--json")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["val_conversations"] == 1 and summary["train_conversations"] == 11
    assert run_cli(*args, "--out", str(part), "--stop-at", "3").returncode == 0
    r = run_cli("train", "--out", str(part), "--resume", "--data", str(chat_file))
    assert r.returncode == 0, r.stderr

    def losses(run):
        return [(m["step"], m["loss"]) for m in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
                if "loss" in m]
    assert losses(part) == losses(whole) and len(losses(whole)) == 6
    # fine-tuning lowers the assistant-token loss on these conversations; eval works on any decoder run
    before = json.loads(run_cli("eval", str(base_run), "--task", "sft", "--data", str(chat_file), "--json").stdout)
    after = run_cli("eval", str(whole), "--task", "sft", "--data", str(chat_file), "--json")
    assert after.returncode == 0, after.stderr
    after = json.loads(after.stdout)
    assert after["val_loss"] < before["val_loss"] and after["assistant_tokens"] == before["assistant_tokens"] > 0
    assert (whole / "chat_template.json").is_file() and (whole / "tokenizer.json").is_file()
    from lmforge.chat import chat_trained  # what decides the chat warnings of serve and chat

    assert chat_trained(whole) and not chat_trained(base_run)


def test_dp_sft_takes_one_conversation_per_row_and_each_rows_gradient_is_its_own(base_run, chat_file, tmp_path,
                                                                                 capsys):
    """With train.dp the examples are conversations: one per row, Poisson-sampled, each row's loss
    the mean over its own answer tokens, so Opacus's per-example gradient is that conversation's
    alone (a longer neighbour does not shrink it). DPO, whose pair is two rows, is refused."""
    from lmforge.runs import load_run
    from lmforge.tasks.sft import per_row_loss
    from lmforge.train.privacy import DPConfig, PrivateTraining

    r = cli_here(capsys, "train", "--task", "sft", "--init", str(base_run), "--data", str(chat_file), "--max-steps",
                 "3", "--set", "train.batch_size=4", "--set", "train.dp.epsilon=8", "--out", str(tmp_path / "dp"),
                 "--json")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["train_rows"] == summary["train_conversations"] == 11
    assert summary["dp_sample_rate"] == pytest.approx(4 / 11) and 0 < summary["dp_epsilon"] <= 8

    run = load_run(base_run, device="cpu")
    encoded = [encode_conversation(DEFAULT_CHAT_TEMPLATE, run.tokenizer, read_conversations_from(c)) for c in CHATS[:4]]
    x, y, _, _ = pack(encoded, 96, alone=True)
    assert len(x) == 4
    model = run.model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    alone = [torch.cat([g.flatten() for g in torch.autograd.grad(per_row_loss(model(x[i:i + 1])[0], y[i:i + 1]),
                                                                   params)]) for i in range(4)]
    PrivateTraining(model, torch.optim.SGD(params, lr=0.1), DPConfig(epsilon=3), sample_rate=0.1, planned_steps=10,
                    expected_batch=4)
    per_row_loss(model(x)[0], y).backward()
    got, want = torch.cat([p.grad_sample.flatten(1) for p in params], 1), torch.stack(alone)
    assert ((got - want).norm(dim=1) / want.norm(dim=1)).max() < 1e-4

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(p) + "\n" for p in PAIRS), encoding="utf-8")
    r = cli_here(capsys, "train", "--task", "dpo", "--init", str(base_run), "--data", str(pairs), "--max-steps", "2",
                 "--set", "train.dp.epsilon=8", "--out", str(tmp_path / "dpo"))
    assert r.returncode == 2 and "dpo" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "dpo").exists()


BAD_ROWS = [({"messages": [{"content": "hi"}, {"role": "assistant", "content": "x"}]}, "needs a role"),
            ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant message"),
            ({"prompt": "x"}, "expected")]


def test_bad_chat_files_are_one_error_line(base_run, tmp_path):
    from lmforge.errors import UserError

    for k, (row, message) in enumerate(BAD_ROWS):
        path = tmp_path / f"bad{k}.jsonl"
        path.write_text(json.dumps(CHATS[0]) + "\n" + json.dumps(row) + "\n", encoding="utf-8")
        with pytest.raises(UserError, match=f"{path}:2: .*{message}"):
            read_conversations(path)
    # and through the CLI: one line, exit 2, nothing written
    r = run_cli("train", "--task", "sft", "--init", str(base_run), "--data", str(path), "--max-steps", "1",
                "--out", str(tmp_path / "out"))
    assert r.returncode == 2 and BAD_ROWS[-1][1] in r.stderr and f"{path}:2" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def test_lora_starts_as_a_no_op_and_merging_changes_no_output():
    from lmforge.models.llama import Llama, LlamaConfig
    from lmforge.models.lora import LoRAConfig, LoRALinear, apply_lora, merge_lora

    torch.manual_seed(0)
    model = Llama(LlamaConfig(vocab_size=50, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, block_size=32)).eval()
    x = torch.randint(0, 50, (2, 12))
    with torch.no_grad():
        before = model(x)[0]
        counts = apply_lora(model, LoRAConfig(r=4, alpha=8))
        assert torch.equal(model(x)[0], before)  # B starts at zero
        assert counts["lora_layers"] == 4 and counts["trainable_params"] == 2 * (4 * 32 + 32 * 4 + 4 * 32 + 16 * 4)  # q (32 out), v (16 out), 2 layers
        assert all(("lora_" in n) == p.requires_grad for n, p in model.named_parameters())
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.weight.normal_(0, 0.5)
        adapted = model(x)[0]
        assert not torch.allclose(adapted, before)
        assert merge_lora(model) == 4 and not any(isinstance(m, LoRALinear) for m in model.modules())
        torch.testing.assert_close(model(x)[0], adapted, rtol=1e-5, atol=1e-5)
    assert "model.layers.0.self_attn.q_proj.weight" in model.state_dict_for_save()  # the base's names


def test_lora_fine_tuning_resumes_exactly_and_merges(base_run, chat_file, tmp_path, capsys):
    def run_cli(*args, **kw):  # in this process: each CLI start costs ~2 s of imports
        return cli_here(capsys, *args)

    from lmforge.runs import load_run

    args = ["train", "--task", "sft", "--init", str(base_run), "--data", str(chat_file), "--max-steps", "4",
            "--set", "train.batch_size=2", "--set", "finetune.lora.r=4", "--set", "train.lr=1e-2"]
    whole, part = tmp_path / "whole", tmp_path / "part"
    r = run_cli(*args, "--out", str(whole), "--json")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert 0 < summary["trainable_params"] < summary["params"] / 10
    assert run_cli(*args, "--out", str(part), "--stop-at", "2").returncode == 0
    assert run_cli("train", "--out", str(part), "--resume", "--data", str(chat_file)).returncode == 0
    losses = [[json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()
               if "loss" in json.loads(line)] for run in (whole, part)]
    assert losses[0] == losses[1] and len(losses[0]) == 4
    # The run stores its adapters alone, naming its base (PEFT's way), and loads laid over that base.
    from lmforge.train.adapters import ADAPTER_FORMAT, weights_metadata
    from lmforge.train.checkpoint import load_model_state

    stored = load_model_state(whole / "model.safetensors")
    assert stored and all(".lora_" in k for k in stored)
    assert sum(v.numel() for v in stored.values()) == summary["trainable_params"]
    assert weights_metadata(whole / "model.safetensors")["format"] == ADAPTER_FORMAT
    # only the adapters moved
    base, tuned = load_run(base_run, device="cpu").model, load_run(whole, device="cpu").model
    assert torch.equal(tuned.model.layers[0].self_attn.q_proj.weight, base.model.layers[0].self_attn.q_proj.weight)
    assert tuned.model.layers[0].self_attn.q_proj.lora_B.weight.abs().sum() > 0
    r = run_cli("merge-lora", str(whole), "--out", str(tmp_path / "merged"))
    assert r.returncode == 0, r.stderr
    merged = load_run(tmp_path / "merged", device="cpu")
    x = torch.randint(0, 400, (1, 20))
    with torch.no_grad():
        torch.testing.assert_close(merged.model(x)[0], tuned(x)[0], rtol=1e-5, atol=1e-5)
    assert merged.config.finetune.lora.r == 0 and (tmp_path / "merged" / "chat_template.json").is_file()
    # unmerged, in PEFT's format: peft loads the adapters onto the exported base with the same logits
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    r = run_cli("export-hf", str(whole), "--out", str(tmp_path / "hf"), "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["peft_adapter"] == str(tmp_path / "hf" / "lora")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, load_run(base_run, device="cpu").model(x)[0], rtol=1e-5, atol=1e-5)
        adapted = peft.PeftModel.from_pretrained(hf, tmp_path / "hf" / "lora").eval()
        torch.testing.assert_close(adapted(x).logits, tuned(x)[0], rtol=1e-5, atol=1e-5)
    # And back: PEFT's adapter directory over its Hugging Face base is a LoRA run again, the same model.
    r = run_cli("import-hf", str(tmp_path / "hf" / "lora"), "--base", str(tmp_path / "hf"), "--out",
                str(tmp_path / "from-peft"), "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["adapter_params"] == summary["trainable_params"]
    with torch.no_grad():
        torch.testing.assert_close(load_run(tmp_path / "from-peft", device="cpu").model(x)[0], tuned(x)[0],
                                   rtol=1e-5, atol=1e-5)
    r = run_cli("import-hf", str(tmp_path / "hf" / "lora"), "--base", str(base_run), "--out",
                str(tmp_path / "over-run"))
    assert r.returncode == 0, r.stderr  # the same base as a run directory fits too
    r = run_cli("import-hf", str(tmp_path / "hf"), "--base", str(base_run), "--out", str(tmp_path / "bad2"))
    assert r.returncode == 2 and "not a PEFT adapter directory" in r.stderr and not (tmp_path / "bad2").exists()
    # A base that is gone, or retrained since, is named in one error line; the merged run needs none.
    moved = base_run.with_name(base_run.name + "-moved")
    base_run.rename(moved)
    try:
        r = run_cli("eval", str(whole), "--task", "sft", "--data", str(chat_file), "--json")
        assert r.returncode == 2 and "gone" in r.stderr and str(base_run) in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
        assert run_cli("eval", str(tmp_path / "merged"), "--task", "sft", "--data", str(chat_file),
                       "--json").returncode == 0
    finally:
        moved.rename(base_run)


def test_a_lora_target_that_does_not_exist_is_one_error_line(base_run, chat_file, tmp_path):
    r = run_cli("train", "--task", "sft", "--init", str(base_run), "--data", str(chat_file), "--max-steps", "1",
                "--set", "finetune.lora.r=4", "--set", "finetune.lora.targets=[nope]", "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "no linear layer named nope" in r.stderr and "q_proj" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------- DPO
PAIRS = [{"prompt": "what does the model read?", "chosen": "the model reads text", "rejected": "nothing at all"},
         {"prompt": "what splits words?", "chosen": "a tokenizer", "rejected": "the loss"},
         {"prompt": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "what lowers the loss?"}],
          "chosen": "training", "rejected": "validation"}] * 4


def test_dpo_loss_is_the_papers_formula():
    from lmforge.tasks.dpo import dpo_loss, sequence_logp

    pc, pr, rc, rr = torch.tensor([-3.0, -5.0]), torch.tensor([-4.0, -2.0]), torch.tensor([-3.5, -4.0]), \
        torch.tensor([-3.5, -3.0])
    loss, chosen, rejected = dpo_loss(pc, pr, rc, rr, beta=0.5)
    by_hand = [math.log1p(math.exp(-0.5 * ((a - c) - (b - d)))) for a, b, c, d in zip(*(t.tolist() for t in
                                                                                       (pc, pr, rc, rr)))]
    assert abs(loss.item() - sum(by_hand) / 2) < 1e-6
    assert torch.allclose(chosen, torch.tensor([0.25, -0.5])) and torch.allclose(rejected, torch.tensor([-0.25, 0.5]))
    logits = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]]])  # (1, 2, 3)
    y = torch.tensor([[0, -1]])  # only the first position is scored
    assert abs(sequence_logp(logits, y).item() - torch.log_softmax(logits[0, 0], -1)[0].item()) < 1e-6


def test_dpo_prefers_the_chosen_answers(base_run, tmp_path, capsys):
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in PAIRS), encoding="utf-8")
    args = ["train", "--task", "dpo", "--init", str(base_run), "--data", str(path), "--max-steps", "8",
            "--set", "train.batch_size=2", "--set", "train.lr=3e-3", "--set", "task.beta=0.5",
            "--val-fraction", "0.25"]
    r = run_cli(*args, "--out", str(tmp_path / "whole"), "--json")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["train_pairs"] == 9 and summary["val_pairs"] == 3
    # the held-out pairs repeat training pairs here: the policy learns to prefer the chosen answers
    assert summary["val_reward_accuracy"] == 1.0 and summary["val_reward_margin"] > 0
    # Stopped halfway and resumed, it logs the uninterrupted run's losses: the frozen reference is
    # the --init weights again, not the checkpoint's.
    assert cli_here(capsys, *args, "--out", str(tmp_path / "part"), "--stop-at", "4").returncode == 0
    r = cli_here(capsys, "train", "--out", str(tmp_path / "part"), "--resume", "--data", str(path))
    assert r.returncode == 0, r.stderr
    losses = [[json.loads(line)["loss"] for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()
               if "loss" in json.loads(line)] for run in ("whole", "part")]
    assert losses[0] == losses[1] and len(losses[0]) == 8


def test_a_pair_without_a_rejected_answer_is_one_error_line(base_run, tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps(PAIRS[0]) + "\n" + json.dumps({"prompt": "x", "chosen": "y"}) + "\n", encoding="utf-8")
    r = run_cli("train", "--task", "dpo", "--init", str(base_run), "--data", str(path), "--max-steps", "1",
                "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and f"{path}:2" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "o").exists()


def test_a_base_fingerprint_sees_a_changed_or_replaced_base(tmp_path):
    """A LoRA run checks its base before laying adapters over it: retrained weights of the same
    shape (a changed tail, or a changed head) change the fingerprint; a copy elsewhere does not."""
    import shutil

    from safetensors.torch import save_file

    from lmforge.train.adapters import fingerprint

    hf = tmp_path / "hf"
    hf.mkdir()
    save_file({"a": torch.zeros(1 << 20), "b": torch.zeros(8)}, str(hf / "model.safetensors"))
    before = fingerprint(hf)
    shutil.copytree(hf, tmp_path / "copy")
    assert fingerprint(tmp_path / "copy") == before
    save_file({"a": torch.zeros(1 << 20), "b": torch.ones(8)}, str(hf / "model.safetensors"))
    assert fingerprint(hf) != before
