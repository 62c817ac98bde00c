"""WordPiece data, BERT masked-LM pretraining (masking statistics, resume, export), and its errors."""

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from lmforge.data.prepare import prepare  # noqa: E402
from lmforge.data.tokenizer import BERT_SPECIALS, load_tokenizer  # noqa: E402
from lmforge.tasks.mlm import mask_tokens  # noqa: E402
from tests.conftest import cli_here, run_cli  # noqa: E402


@pytest.fixture(scope="module")
def wp_data(tmp_path_factory, corpus_dir):
    out = tmp_path_factory.mktemp("wp") / "data"
    meta = prepare([str(corpus_dir)], out, vocab_size=400, val_fraction=0.2, seed=0, tokenizer="wordpiece")
    return out, meta


def test_wordpiece_prepare_has_bert_specials_and_template(wp_data):
    out, meta = wp_data
    tok = load_tokenizer(out / "tokenizer.json")
    assert [tok.token_to_id(t) for t in BERT_SPECIALS] == [0, 1, 2, 3, 4]
    assert meta["tokenizer"] == "wordpiece" and meta["eot_id"] == tok.token_to_id("[SEP]")
    enc = tok.encode("the model reads text")
    assert enc.tokens[0] == "[CLS]" and enc.tokens[-1] == "[SEP]"
    assert tok.decode(enc.ids) == "the model reads text"


def test_masking_follows_bert_proportions_and_is_reproducible():
    special = {t: i for i, t in enumerate(BERT_SPECIALS)}
    x = torch.randint(5, 1000, (64, 254))
    gen = lambda: torch.Generator().manual_seed(7)  # noqa: E731
    inputs, targets = mask_tokens(x, special, 1000, gen())
    again = mask_tokens(x, special, 1000, gen())
    assert torch.equal(inputs, again[0]) and torch.equal(targets, again[1])
    assert (inputs[:, 0] == special["[CLS]"]).all() and (inputs[:, -1] == special["[SEP]"]).all()
    chosen = targets >= 0
    assert not chosen[:, 0].any() and not chosen[:, -1].any()  # specials are never targets
    assert 0.14 < chosen.float().mean().item() * 256 / 254 < 0.16
    n = chosen.sum().item()
    masked = (inputs[chosen] == special["[MASK]"]).sum().item() / n
    unchanged = (inputs[chosen] == targets[chosen]).sum().item() / n
    assert 0.77 < masked < 0.83 and 0.08 < unchanged < 0.12  # the rest (~10%) became random tokens
    keep = ~chosen[:, 1:-1]
    assert torch.equal(inputs[:, 1:-1][keep], x[keep])  # every other token is untouched


def test_mlm_training_learns_resumes_exactly_and_exports(wp_data, tmp_path, capsys):
    def run_cli(*args, **kw):  # in this process: each CLI start costs ~2 s of imports
        return cli_here(capsys, *args)

    data, meta = wp_data
    full, part = tmp_path / "full", tmp_path / "part"
    common = ["--data", str(data), "--preset", "bert-debug", "--task", "mlm", "--max-steps", "30"]
    r = run_cli("train", *common, "--out", str(full), "--json")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["val_loss"] < 0.8 * torch.log(torch.tensor(float(meta["vocab_size"]))).item()
    assert 0 <= summary["val_mlm_accuracy"] <= 1
    assert run_cli("train", *common, "--out", str(part), "--stop-at", "12").returncode == 0
    r = run_cli("train", "--out", str(part), "--resume", "--task", "mlm")
    assert r.returncode == 0, r.stderr

    def losses(run):
        return [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert losses(part) == losses(full)  # bitwise: same masks, same batches

    r = run_cli("export-hf", str(full), "--out", str(tmp_path / "hf"))
    assert r.returncode == 0, r.stderr
    transformers = pytest.importorskip("transformers")
    from lmforge.runs import load_run

    run = load_run(full, device="cpu")
    hf = transformers.BertForMaskedLM.from_pretrained(tmp_path / "hf").eval()
    x = torch.tensor([run.tokenizer.encode("the model reads text").ids])
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, run.model.mlm_logits(run.model(x)), rtol=1e-5, atol=1e-5)
    r = run_cli("eval", str(full), "--json")
    assert r.returncode == 0 and "val_mlm_accuracy" in json.loads(r.stdout)


@pytest.mark.parametrize("case", ["mlm-on-gpt-preset", "bert-preset-with-lm", "mlm-on-bpe-data"])
def test_mlm_bad_input(case, wp_data, data_dir, tmp_path):
    wp, _ = wp_data
    args = {"mlm-on-gpt-preset": ["--data", str(wp), "--preset", "debug", "--task", "mlm"],
            "bert-preset-with-lm": ["--data", str(wp), "--preset", "bert-debug", "--task", "lm"],
            "mlm-on-bpe-data": ["--data", str(data_dir), "--preset", "bert-debug", "--task", "mlm"]}[case]
    r = run_cli("train", *args, "--out", str(tmp_path / "run"), "--max-steps", "2")
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().startswith("lmforge: error:") and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()
