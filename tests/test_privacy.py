"""Privacy: personal data scrubbed from corpora by ``prepare --scrub-pii`` (one masking module with
the support app) — planted PII comes out with none left, ordinary numbers, dates, versions and
code stay as they were, the counts per kind are reported, bad input is one error line. The
exposure of planted secrets (``eval --canaries``) is higher for a model trained on them, and lower
again when it is trained with differential privacy (DP-SGD through Opacus, for classifiers and
decoders alike)."""

import json

import numpy as np
import pytest

from lmforge.data.pii import iban_ok, luhn_ok, mask
from tests.conftest import run_cli

# (planted value, kind): each must be gone from the prepared corpus.
PLANTED = [("ana.b@example.co.uk", "email"), ("j.doe+news@mail.example.org", "email"),
           ("+44 20 7946 0958", "phone"), ("(555) 123-4567", "phone"), ("555-867-5309", "phone"),
           ("4111 1111 1111 1111", "card"), ("5500-0000-0000-0004", "card"),
           ("GB82 WEST 1234 5698 7654 32", "iban"), ("DE89370400440532013000", "iban"),
           ("192.168.10.20", "ip"), ("2001:db8:85a3::8a2e:370:7334", "ip"),
           ("https://intranet.example.com/users/ana?id=7", "url"), ("www.example.net/private", "url"),
           ("EMP-004211", "EMPLOYEE"), ("555.123.4567", "phone"), ("4111.1111.1111.1111", "card"),
           ("josé.müller@beispiel.de", "email")]
# Text that looks like numbers or addresses but is not personal data: each must survive.
ORDINARY = ["order 12345", "released on 2026-11-23", "Python 3.11.7", "version v1.2.3.4", "at 10:30:00",
            "pi is 3.14159", "1,000,000 rows", "not a card 4111111111111112", "bad IBAN GB82WEST12345698765433",
            "ts 1701388800", "items[::2]", "shape (1 2 3 4 5 6 7)", "999.999.999.999", "x = y @ z",
            "on 03.12.2026", "numpy 1.26.4", "call @handle"]


def test_checksums_and_what_is_left_alone():
    assert luhn_ok("4111111111111111") and not luhn_ok("4111111111111112")
    assert iban_ok("GB82 WEST 1234 5698 7654 32") and not iban_ok("GB82 WEST 1234 5698 7654 33")
    for text in ORDINARY:
        assert mask(text) == text, text
    assert mask("write to ana@example.com or call +1 555 123 4567") == "write to <EMAIL> or call <PHONE>"
    assert mask("card 4111 1111 1111 1111, ip 10.0.0.1", ["card"]) == "card <CARD>, ip 10.0.0.1"


def test_prepare_scrubs_planted_pii_and_counts_it(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    lines = [f"Record {i}: contact {value} about the account. " + ORDINARY[i % len(ORDINARY)]
             for i, (value, _) in enumerate(PLANTED)]
    for k in range(6):  # several documents, so that both splits get some
        (corpus / f"doc{k}.txt").write_text("\n".join(lines[k::6]) + "\n" + "\n".join(ORDINARY) + "\n",
                                            encoding="utf-8")
    patterns = tmp_path / "patterns.txt"
    patterns.write_text("# employee numbers\nEMPLOYEE=EMP-\\d{6}\n", encoding="utf-8")
    data = tmp_path / "data"
    r = run_cli("prepare", "--input", str(corpus), "--out", str(data), "--vocab-size", "300",
                "--scrub-pii", "all", "--pii-patterns", str(patterns), "--json")
    assert r.returncode == 0, r.stderr
    meta = json.loads(r.stdout)
    want = {}
    for _, kind in PLANTED:
        want[kind] = want.get(kind, 0) + 1
    assert meta["pii"]["masked"] == dict(sorted(want.items()))
    assert meta["pii"]["patterns"] == ["EMPLOYEE"]

    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(data / "tokenizer.json"))
    text = "".join(tok.decode(np.fromfile(data / f"{s}.bin", dtype=meta["dtype"]).tolist()) for s in ("train", "val"))
    for value, kind in PLANTED:
        assert value not in text, value
    assert text.count("<EMAIL>") == want["email"] and text.count("<EMPLOYEE>") == 1
    for ordinary in ORDINARY:
        assert text.count(ordinary) >= 6, ordinary  # every document's copy kept
    report = (data / "data_report.md").read_text()
    assert "## Personal data masked" in report and f"| card | {want['card']} |" in report


def test_a_labelled_file_gets_a_masked_copy_in_its_own_format(tmp_path, capsys):
    """``prepare --kind labeled``: classify's .csv/.jsonl data with every planted value masked in
    whatever text field it is, the labels and the ordinary numbers as they were, the source kept;
    the copy trains as the original would (same columns, same rows)."""
    from lmforge.data.labeled import read_examples, read_rows
    from tests.conftest import cli_here

    rows = [{"text": f"contact {value} please. {ORDINARY[i % len(ORDINARY)]}", "label": ["billing", "shipping"][i % 2],
             "note": f"agent saw {PLANTED[(i + 1) % len(PLANTED)][0]}"} for i, (value, _) in enumerate(PLANTED)]
    patterns = tmp_path / "patterns.txt"
    patterns.write_text("EMPLOYEE=EMP-\\d{6}\n", encoding="utf-8")
    csv_in = tmp_path / "tickets.csv"
    csv_in.write_text("text,label,note\n" + "".join(f'"{r["text"]}",{r["label"]},"{r["note"]}"\n' for r in rows),
                      encoding="utf-8")
    jsonl_in = tmp_path / "tickets.jsonl"
    jsonl_in.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    for source in (csv_in, jsonl_in):
        before = source.read_bytes()
        out = tmp_path / f"clean{source.suffix}"
        r = cli_here(capsys, "prepare", "--kind", "labeled", "--input", source, "--out", out, "--scrub-pii", "all",
                     "--pii-patterns", patterns, "--json")
        assert r.returncode == 0, r.stderr
        result = json.loads(r.stdout)
        assert sum(result["masked"].values()) == 2 * len(PLANTED), result  # each planted value twice
        text = out.read_text(encoding="utf-8")
        for value, _ in PLANTED:
            assert value not in text, value
        for ordinary in ORDINARY:
            assert ordinary in text, ordinary
        clean, original = read_examples(out), read_examples(source)
        assert clean.labels == original.labels and read_rows(out)[0] == read_rows(source)[0]
        assert source.read_bytes() == before
        r = cli_here(capsys, "prepare", "--kind", "labeled", "--input", source, "--out", source, "--scrub-pii", "all")
        assert r.returncode == 2 and "exists" in r.stderr
    r = cli_here(capsys, "prepare", "--kind", "labeled", "--input", csv_in, "--out", tmp_path / "x.csv")
    assert r.returncode == 2 and "--scrub-pii" in r.stderr and not (tmp_path / "x.csv").exists()


@pytest.mark.parametrize("args, message", [
    (["--scrub-pii", "email,passport"], "unknown kind"),
    (["--pii-patterns", "MISSING"], "not found"),
    (["--pii-patterns", "BAD"], "bad regular expression"),
])
def test_bad_scrub_options_are_one_error_line_and_write_nothing(tmp_path, corpus_dir, args, message):
    (tmp_path / "BAD").write_text("ID=[0-9\n", encoding="utf-8")
    args = [str(tmp_path / a) if a in ("MISSING", "BAD") else a for a in args]
    r = run_cli("prepare", "--input", str(corpus_dir), "--out", str(tmp_path / "data"), *args)
    assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "data").exists()


def test_a_canary_in_the_training_data_is_exposed_and_one_that_is_not_is_not(tmp_path, corpus_dir):
    import shutil

    from lmforge import config as cfgmod
    from lmforge.data.prepare import prepare
    from lmforge.evaluate.canaries import exposure, read_canaries
    from lmforge.runs import load_run
    from lmforge.train.trainer import train

    planted = tmp_path / "corpus_planted"
    shutil.copytree(corpus_dir, planted)
    (planted / "notes.txt").write_text("\n".join(f"note {i}: the vault code is 839201" for i in range(40)) + "\n",
                                       encoding="utf-8")
    canaries = tmp_path / "canaries.txt"
    canaries.write_text("the vault code is {839201}\n", encoding="utf-8")
    for name, corpus in (("clean", corpus_dir), ("planted", planted)):
        prepare([str(corpus)], tmp_path / f"data_{name}", vocab_size=400, val_fraction=0.2, seed=0)
        train(cfgmod.build_config("debug", overrides=["train.max_steps=60"]), tmp_path / f"data_{name}",
              tmp_path / name)
    # The same training on the planted data with differential privacy.
    train(cfgmod.build_config("debug", overrides=["train.max_steps=60", "train.dp.epsilon=8"]),
          tmp_path / "data_planted", tmp_path / "private")
    r = run_cli("eval", str(tmp_path / "planted"), "--canaries", str(canaries), "--candidates", "200", "--json")
    assert r.returncode == 0, r.stderr
    exposed = json.loads(r.stdout)["canaries"][0]
    run = load_run(tmp_path / "clean", device="cpu")
    clean = exposure(run.model, run.tokenizer, read_canaries(canaries), 200)["canaries"][0]
    assert exposed["candidates"] == clean["candidates"] == 200
    assert exposed["exposure"] > clean["exposure"] + 2 and exposed["exposure"] > 4  # of at most log2(201) = 7.65
    private = exposure(load_run(tmp_path / "private", device="cpu").model, run.tokenizer, read_canaries(canaries),
                       200)["canaries"][0]
    assert private["exposure"] < exposed["exposure"] - 2
    (tmp_path / "bad.txt").write_text("no secret in braces here\n", encoding="utf-8")
    r = run_cli("eval", str(tmp_path / "clean"), "--canaries", str(tmp_path / "bad.txt"))
    assert r.returncode == 2 and "{secret}" in r.stderr and len(r.stderr.strip().splitlines()) == 1


# ----------------------------------------------------------------------------- differential privacy
@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
    from lmforge.data.images import prepare_images

    out = tmp_path_factory.mktemp("dp") / "digits"
    prepare_images(["digits"], out)
    return out


def dp_config(*extra):
    from lmforge import config as cfgmod

    return cfgmod.build_config("mlp", overrides=["train.max_steps=12", "train.eval_interval=6", "train.log_interval=1",
                                                 "train.dp.epsilon=3", *extra])


def test_dp_training_resumes_exactly_and_spends_what_opacus_accounts(tmp_path, digits_dir):
    from opacus.accountants import RDPAccountant
    from opacus.accountants.utils import get_noise_multiplier

    from lmforge import config as cfgmod
    from lmforge.train.trainer import train

    whole, part = tmp_path / "whole", tmp_path / "part"
    summary = train(dp_config(), digits_dir, whole)
    train(dp_config(), digits_dir, part, stop_at=6)
    train(cfgmod.load(part / "config.yaml"), run_dir=part, resume=True)

    def rows(run):
        return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in rows(whole) if "loss" in r] == \
        [(r["step"], r["loss"]) for r in rows(part) if "loss" in r]
    spent = {r["step"]: r["dp_epsilon"] for r in rows(whole) if "dp_epsilon" in r}
    assert spent[6] < spent[12] and spent == {s: e for s, e in ((r["step"], r.get("dp_epsilon")) for r in rows(part))
                                               if s in spent and e is not None}

    q = summary["dp_sample_rate"]
    assert q == pytest.approx(64 / summary["train_examples"])
    sigma = get_noise_multiplier(target_epsilon=3, target_delta=1e-5, sample_rate=q, steps=12)
    assert summary["dp_noise_multiplier"] == pytest.approx(sigma)
    accountant = RDPAccountant()
    for _ in range(12):
        accountant.step(noise_multiplier=sigma, sample_rate=q)
    assert summary["dp_epsilon"] == pytest.approx(accountant.get_epsilon(1e-5))
    assert summary["dp_epsilon"] <= 3 and summary["dp_epsilon"] == pytest.approx(3, abs=0.05)  # the plan is spent


def test_per_example_gradients_of_text_classifiers_are_each_examples_own():
    """Opacus's per-example gradients through the encoder's and the decoder's classifiers (padding
    masked) equal the gradient of each example alone — the positions carry the batch dimension."""
    import torch
    import torch.nn.functional as F

    from lmforge.models.bert import Bert, BertConfig
    from lmforge.models.gpt import GPT, GPTConfig
    from lmforge.train.privacy import DPConfig, PrivateTraining

    shape = dict(vocab_size=50, block_size=16, n_layer=1, n_head=2, n_embd=16, dropout=0.0, num_labels=3)
    for model in (Bert(BertConfig(**shape, mlm_head=False)), GPT(GPTConfig(**shape))):
        torch.manual_seed(0)
        ids, mask, y = torch.randint(1, 50, (4, 7)), torch.ones(4, 7, dtype=torch.long), torch.tensor([0, 1, 2, 1])
        mask[1, 5:] = mask[3, 3:] = 0

        def flat(grads):
            return torch.cat([g.flatten(int(g.dim() > p.dim())) for g, p in zip(grads, model.parameters())], -1)
        alone = []
        for i in range(4):
            model.zero_grad()
            F.cross_entropy(model.classify(ids[i:i + 1], mask[i:i + 1]), y[i:i + 1]).backward()
            alone.append(flat([p.grad if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]))
        model.zero_grad()
        PrivateTraining(model, torch.optim.SGD(model.parameters(), lr=0.1), DPConfig(epsilon=3), sample_rate=0.1,
                        planned_steps=10, expected_batch=4)
        F.cross_entropy(model.classify(ids, mask), y).backward()
        got = flat([p.grad_sample for p in model.parameters()])
        want = torch.stack(alone)
        assert ((got - want).norm(dim=1) / want.norm(dim=1)).max() < 1e-5, type(model).__name__


def test_dp_clips_each_example_and_refuses_what_it_cannot_guarantee(tmp_path, digits_dir, data_dir):
    import torch

    from lmforge.errors import UserError
    from lmforge.models.vision import MLP, MLPConfig
    from lmforge.train.privacy import DPConfig, PrivateTraining
    from lmforge.train.trainer import train

    torch.manual_seed(0)
    model = MLP(MLPConfig(height=8, width=8, hidden=[16], dropout=0.0))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    private = PrivateTraining(model, opt, DPConfig(epsilon=3, max_grad_norm=0.01), sample_rate=0.1,
                              planned_steps=10, expected_batch=8)
    private.optimizer.noise_multiplier = 0.0  # the clipped sum alone
    x, y = torch.rand(8, 1, 8, 8), torch.arange(8)
    torch.nn.functional.cross_entropy(model(x), y).backward()
    per_example = torch.cat([p.grad_sample.flatten(1) for p in model.parameters()], 1).norm(dim=1)
    assert (per_example > 0.01).all()  # every example's gradient is above the bound ...
    private.optimizer.pre_step()
    total = torch.cat([p.grad.flatten() for p in model.parameters()]).norm()
    assert total <= 0.01 * 8 / 8 + 1e-6  # ... and the mean of the clipped ones is within it

    for extra, message in ((["train.dp.epsilon=0"], "must be positive"),
                           (["train.optimizer=muon"], "not muon")):
        with pytest.raises(UserError, match=message):
            train(dp_config(*extra), digits_dir, tmp_path / "x")
    from lmforge import config as cfgmod

    bn = cfgmod.build_config("cnn-small", overrides=["train.max_steps=2", "train.dp.epsilon=3"])
    with pytest.raises(UserError, match="BatchNorm"):
        train(bn, digits_dir, tmp_path / "bn")
    assert not (tmp_path / "x").exists() and not (tmp_path / "bn").exists()
    for args in (["--task", "gan", "--data", str(digits_dir)],  # two models in turn: refused
                 ["--preset", "debug", "--data", str(data_dir), "--set", "train.activation_checkpointing=true"]):
        r = run_cli("train", "--out", str(tmp_path / "refused"), "--set", "train.dp.epsilon=3",
                    "--set", "train.max_steps=2", *args)
        assert r.returncode == 2 and "train.dp" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert not (tmp_path / "refused").exists()


def test_per_example_gradients_of_decoders_next_token_loss_are_each_windows_own():
    """Through GPT (learned positions), Llama (RMSNorm, lmforge's own grad sampler), the LSTM (its
    layers swapped for DPLSTM) and a LoRA-adapted GPT (the adapters alone): Opacus's per-example
    gradient of the mean next-token loss is the gradient of each window's own mean loss."""
    import torch

    from lmforge.models.gpt import GPT, GPTConfig
    from lmforge.models.llama import Llama, LlamaConfig
    from lmforge.models.lora import LoRAConfig, apply_lora
    from lmforge.models.lstm import LSTM, LSTMConfig
    from lmforge.train.privacy import DPConfig, PrivateTraining, per_example_ready

    torch.manual_seed(0)
    shape = dict(vocab_size=40, block_size=12, n_layer=2, n_embd=16, dropout=0.0)
    lora = GPT(GPTConfig(**shape, n_head=2))
    apply_lora(lora, LoRAConfig(r=2))
    models = {"gpt": GPT(GPTConfig(**shape, n_head=2)), "lora": lora,
              "llama": Llama(LlamaConfig(**shape, n_head=2, n_kv_head=1)), "lstm": LSTM(LSTMConfig(**shape, n_hidden=20))}
    x, y = torch.randint(0, 40, (4, 12)), torch.randint(0, 40, (4, 12))
    for name, model in models.items():
        per_example_ready(model)
        params = [p for p in model.parameters() if p.requires_grad]
        alone = [torch.cat([g.flatten() for g in torch.autograd.grad(model(x[i:i + 1], y[i:i + 1])[1], params)])
                 for i in range(4)]
        PrivateTraining(model, torch.optim.SGD(params, lr=0.1), DPConfig(epsilon=3), sample_rate=0.1,
                        planned_steps=10, expected_batch=4)
        model(x, y)[1].backward()
        got = torch.cat([p.grad_sample.flatten(1) for p in params], 1)
        want = torch.stack(alone)
        assert ((got - want).norm(dim=1) / want.norm(dim=1)).max() < 1e-5, name
    plain = LSTM(LSTMConfig(**shape, n_hidden=20))
    assert set(models["lstm"].state_dict_for_save()) == set(plain.state_dict_for_save())  # checkpoints as ever
    plain.load_saved_state(models["lstm"].state_dict_for_save())
    models["lstm"].load_saved_state(plain.state_dict_for_save())


def test_dp_next_token_training_samples_windows_and_resumes_exactly(tmp_path, data_dir):
    """An LSTM language model trained with train.dp: Poisson batches of the training file's whole
    windows, an exact --resume, the saved weights an ordinary LSTM's (eval and generate use them)."""
    from lmforge import config as cfgmod
    from lmforge.data.tokens import TokenFile, load_meta
    from lmforge.train.trainer import train

    def config():
        return cfgmod.build_config("lstm-debug", overrides=["train.max_steps=8", "train.eval_interval=4",
                                                            "train.log_interval=1", "train.batch_size=8",
                                                            "train.dp.epsilon=3"])
    whole, part = tmp_path / "whole", tmp_path / "part"
    summary = train(config(), data_dir, whole)
    train(config(), data_dir, part, stop_at=4)
    train(cfgmod.load(part / "config.yaml"), run_dir=part, resume=True)

    def rows(run):
        return [(r["step"], r["loss"]) for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
                if "loss" in r]
    assert rows(whole) == rows(part) and len(rows(whole)) == 8
    windows = (len(TokenFile(data_dir / "train.bin", load_meta(data_dir)["dtype"])) - 1) // config().model.block_size
    assert summary["dp_sample_rate"] == pytest.approx(8 / windows)
    assert summary["dp_epsilon"] == pytest.approx(3, abs=0.05)
    r = run_cli("generate", str(whole), "--prompt", "The", "--max-new-tokens", "4")
    assert r.returncode == 0, r.stderr
    r = run_cli("eval", str(whole), "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["val_bpb"] > 0, r.stderr
