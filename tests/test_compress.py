"""lmforge compress: int8 parity and its safetensors round trip, structured pruning (shapes, exactness
on dead neurons), and the command end to end on classifier, image and decoder runs with bad inputs."""

import json

import pytest
import torch

from tests.conftest import cli_here


def _models():
    from lmforge.models.bert import Bert, BertConfig
    from lmforge.models.gpt import GPT, GPTConfig
    from lmforge.models.llama import Llama, LlamaConfig

    torch.manual_seed(0)
    return [GPT(GPTConfig(vocab_size=64, n_layer=2, n_head=2, n_embd=32, block_size=16)),
            Llama(LlamaConfig(vocab_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, block_size=16, n_inner=96)),
            Bert(BertConfig(vocab_size=64, n_layer=2, n_head=2, n_embd=32, block_size=16, num_labels=3, mlm_head=False))]


def _out(model, x):
    return model.classify(x) if hasattr(model, "bert") else model(x)[0]


@pytest.mark.parametrize("index", [0, 1, 2])
def test_int8_stays_close_and_round_trips_through_safetensors_exactly(index, tmp_path):
    from safetensors.torch import load_file, save_file

    from lmforge.compress.quantize import INT8, int8_state, load_int8_state, quantize_int8

    model = _models()[index].eval()
    x = torch.randint(0, 64, (2, 12))
    with torch.no_grad():
        ref = _out(model, x)
        q = quantize_int8(model)
        got = _out(q, x)
    assert (got - ref).abs().max() < 0.05 * ref.abs().max() + 1e-3  # int8 error, not a different model
    state = int8_state(q)
    assert any(k.endswith(INT8) and v.dtype == torch.int8 for k, v in state.items())
    save_file(state, tmp_path / "m.safetensors")
    fresh = quantize_int8(_models()[index].eval())  # other random weights, the same structure
    load_int8_state(fresh, load_file(tmp_path / "m.safetensors"))
    with torch.no_grad():
        torch.testing.assert_close(_out(fresh, x), got, rtol=0, atol=0)
    if hasattr(model, "lm_head"):  # the tied head stays the embedding's float matrix
        assert type(fresh.lm_head) is torch.nn.Linear and fresh.lm_head.weight is fresh.token_embedding().weight


def test_int8_error_finds_the_layer_with_outlier_inputs_and_it_stays_float(tmp_path):
    from safetensors.torch import load_file, save_file

    from lmforge.compress.quantize import int8_errors, int8_state, load_int8_state, quantize_int8

    class Two(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.plain, self.outlier = torch.nn.Linear(16, 16), torch.nn.Linear(16, 16)

        def forward(self, x):
            return self.plain(x[:, :16]) + self.outlier(x[:, 16:])

        def load_saved_state(self, state):
            self.load_state_dict(state)

    torch.manual_seed(0)
    x = torch.randn(256, 32)
    x[:, 16] *= 500  # one feature far above the others: per-tensor int8 flattens the rest to 0,
    model = Two().eval()
    with torch.no_grad():
        model.outlier.weight[:, 0] = 1e-3  # and it adds little itself (as an LLM's massive activations)
    errors = int8_errors(model, lambda m: m(x))
    assert errors["outlier"] > 0.3 and errors["plain"] < 0.02
    with torch.no_grad():
        ref = model(x)
        mixed = quantize_int8(model, keep_float=["outlier"])
        assert type(mixed.outlier) is torch.nn.Linear and type(mixed.plain) is not torch.nn.Linear
        got = mixed(x)
    assert ((got - ref).norm() / ref.norm()) < 0.02
    save_file(int8_state(mixed), tmp_path / "m.safetensors")
    fresh = quantize_int8(Two().eval(), keep_float=["outlier"])
    load_int8_state(fresh, load_file(tmp_path / "m.safetensors"))
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), got, rtol=0, atol=0)


@pytest.mark.parametrize("index", [0, 1, 2])
def test_pruning_rebuilds_smaller_layers_and_dead_neurons_go_first(index):
    from lmforge.compress.prune import prune_mlp

    model = _models()[index].eval()
    inner = model.mlp_neurons()[0][1].in_features
    dead = torch.arange(0, inner, 4)  # a quarter of every block's neurons contribute nothing
    with torch.no_grad():
        for _, out in model.mlp_neurons():
            out.weight[:, dead] = 0
    x = torch.randint(0, 64, (2, 12))
    pruned, info = prune_mlp(model, 0.25)
    assert info["widths"][1][0] == inner - len(dead) and pruned.config.n_inner == inner - len(dead)
    assert info["params"][1] < info["params"][0] and info["params"][1] == sum(p.numel() for p in set(pruned.parameters()))
    with torch.no_grad():
        a, b = _out(model, x), _out(pruned, x)
    assert a.shape == b.shape
    torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)  # exactly the dead ones were removed
    for rows, out in pruned.mlp_neurons():
        assert out.in_features == inner - len(dead) and all(r.out_features == inner - len(dead) for r in rows)


@pytest.mark.parametrize("family", ["cnn", "mlp"])
def test_image_families_lose_their_dead_channels_exactly(family):
    """Channels (units) whose output is always zero rank last by activation and go first; the
    rebuilt model's logits are the original's."""
    from lmforge.compress.prune import prune
    from lmforge.models.vision import CNN, MLP, CNNConfig, MLPConfig

    torch.manual_seed(0)
    if family == "cnn":
        model = CNN(CNNConfig(height=12, width=12, in_channels=1, num_labels=4, channels=[8, 16], dense=[12],
                              batchnorm=False, dropout=0.0))
        dead_layers = [(block.body[0], w) for block, w in zip(model.features, [8, 16])]
    else:
        model = MLP(MLPConfig(height=12, width=12, in_channels=1, num_labels=4, hidden=[16, 8], dropout=0.0))
        dead_layers = [(layer[0], w) for layer, w in zip(model.features, [16, 8])]
    model.eval()
    with torch.no_grad():
        for m, width in dead_layers:  # a quarter of every layer's units: zero weights, negative bias -> ReLU 0
            m.weight[::4] = 0
            m.bias[::4] = -1.0
    x = torch.rand(64, 1, 12, 12)
    pruned, info = prune(model, 0.25, lambda m: m.classify(x))
    assert info["widths"] == [[w for _, w in dead_layers], [w - w // 4 for _, w in dead_layers]]
    assert info["params"][1] < info["params"][0]
    with torch.no_grad():
        torch.testing.assert_close(pruned.classify(x), model.classify(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("n_head, n_kv_head, left", [(4, 2, 2), (4, 4, 2), (6, 2, 2)])  # 6/2: 1 of 3 per group
def test_pruned_heads_are_the_model_with_those_heads_silenced(n_head, n_kv_head, left):
    """--prune-heads rebuilds the projections with fewer heads: its output equals the original's
    with the removed heads' o_proj columns zeroed — grouped-query attention keeping each query
    on its own key/value head, and whole heads (queries, keys, values) where each has its own."""
    from lmforge.compress.prune import prune_heads
    from lmforge.models.llama import Llama, LlamaConfig

    torch.manual_seed(0)
    model = Llama(LlamaConfig(vocab_size=50, block_size=16, n_layer=2, n_head=n_head, n_kv_head=n_kv_head, n_embd=24,
                              head_dim=8, qkv_bias=True)).eval()
    x = torch.randint(0, 50, (2, 10))
    pruned, info = prune_heads(model, 0.5, lambda m: m(x))
    assert pruned.config.n_head == left and info["params"][1] < info["params"][0]
    silenced = Llama(model.config).eval()
    silenced.load_state_dict(model.state_dict())
    with torch.no_grad():
        for full, small in zip(silenced.attention_layers(), pruned.attention_layers()):
            w, kept = full.o_proj.weight.view(24, n_head, 8), small.o_proj.weight.view(24, -1, 8)
            for h in range(n_head):
                if not any(torch.equal(w[:, h], kept[:, j]) for j in range(kept.size(1))):
                    w[:, h] = 0
    with torch.no_grad():
        assert torch.allclose(pruned(x)[0], silenced(x)[0], atol=1e-6)
    weights_only, _ = prune_heads(model, 0.5)  # without calibration data: from the weights
    assert weights_only.config.n_head == left


def test_compress_prune_heads_of_a_llama_run_then_generate(capsys, tmp_path, data_dir):
    lm, small = tmp_path / "lm", tmp_path / "small"
    assert cli_here(capsys, "train", "--data", data_dir, "--out", lm, "--preset", "llama-debug",
                    "--max-steps", "10").returncode == 0
    r = cli_here(capsys, "compress", lm, "--out", small, "--prune-heads", "0.5", "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["prune_heads"]["widths"] == [[4, 4], [2, 2]] and res["verdict"]["metric"] == "val_bpb"
    assert "attention heads per block 4 -> 2" in (small / "compress_report.md").read_text()
    r = cli_here(capsys, "generate", small, "--prompt", "def ", "--max-new-tokens", "4", "--temperature", "0")
    assert r.returncode == 0 and r.stdout.strip(), r.stderr


def test_compress_a_decoder_prune_recover_quantize_then_eval_and_generate(capsys, tmp_path, data_dir):
    lm, small = tmp_path / "lm", tmp_path / "small"
    assert cli_here(capsys, "train", "--data", data_dir, "--out", lm, "--preset", "debug", "--max-steps", "20").returncode == 0
    r = cli_here(capsys, "compress", lm, "--out", small, "--prune", "0.25", "--recover-seconds", "3", "--quantize", "int8",
                 "--batch-size", "4", "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    o, c = res["original"], res["compressed"]
    assert res["kind"] == "decoder" and res["prune"]["widths"][1][0] < res["prune"]["widths"][0][0]
    assert res["prune"]["recovery"]["steps"] > 0
    q = res["int8"]
    assert q["layers"] > 0 and len(q["kept_float"]) <= q["layers"]
    assert all((n in q["kept_float"]) == (e > q["max_error"]) for n, e in q["worst"])  # float exactly above it
    for key in ("size_mb", "weights_mb", "latency_ms", "throughput_tokens_per_s", "decode_tokens_per_s", "peak_memory_mb"):
        assert o[key] > 0 and c[key] > 0, key
    assert c["size_mb"] < 0.7 * o["size_mb"]
    assert {"val_bpb", "val_loss"} <= set(o["quality"]) and res["verdict"]["metric"] == "val_bpb"
    saved = (small / "compress_report.json").read_text()
    assert json.loads(saved)["verdict"] == res["verdict"] and "| size on disk (MiB) |" in (small / "compress_report.md").read_text()
    assert not (small / "trainer_state.json").exists()  # int8 weights: nothing to resume
    r = cli_here(capsys, "eval", small, "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["val_bpb"] == pytest.approx(c["quality"]["val_bpb"], rel=0.02)
    r = cli_here(capsys, "generate", small, "--prompt", "def ", "--max-new-tokens", "8", "--temperature", "0")
    assert r.returncode == 0 and r.stdout.strip(), r.stderr


def test_compress_classifiers_int8_and_pruned(keyword_classifier, capsys, tmp_path):
    small = tmp_path / "int8"
    r = cli_here(capsys, "compress", keyword_classifier, "--out", small, "--quantize", "int8", "--prune", "0.25", "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["kind"] == "text-classifier" and set(res["original"]["quality"]) == {"accuracy", "macro_f1", "n"}
    assert res["verdict"]["metric"] == "accuracy" and isinstance(res["verdict"]["within"], bool)
    o, c = res["original"], res["compressed"]  # the original is measured as it was, not as compressed
    assert c["weights_mb"] < 0.5 * o["weights_mb"] and c["size_mb"] < 0.5 * o["size_mb"]
    r = cli_here(capsys, "predict", small, "--text", "please awful order", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["predictions"][0]["label"] == "no"  # still reads the keyword
    # Pruned harder, then fine-tuned from the pruned run on its own data: its trained head kept.
    r = cli_here(capsys, "compress", keyword_classifier, "--out", tmp_path / "rec", "--prune", "0.5",
                 "--recover-seconds", "3", "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["prune"]["recovery"]["steps"] > 0 and res["compressed"]["quality"]["accuracy"] > 0.8
    r = cli_here(capsys, "predict", tmp_path / "rec", "--text", "please awful order", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["predictions"][0]["label"] == "no", r.stderr


def test_bad_inputs_get_one_line_and_leave_nothing_behind(keyword_classifier, capsys, tmp_path):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("keep")
    cases = [
        (["compress", keyword_classifier, "--out", tmp_path / "a", "--prune", "1.0"], "in (0, 1)"),
        (["compress", keyword_classifier, "--out", tmp_path / "b"], "give --quantize int8, --prune"),
        (["compress", keyword_classifier, "--out", tmp_path / "f", "--prune-heads", "0.5"], "Llama-family"),
        (["compress", keyword_classifier, "--out", busy, "--quantize", "int8"], "is not empty"),
        (["compress", keyword_classifier, "--out", tmp_path / "c", "--quantize", "int8", "--recover-seconds", "5"],
         "--recover-seconds fine-tunes a pruned"),  # nothing pruned: nothing to recover
        (["compress", tmp_path / "nowhere", "--out", tmp_path / "d", "--quantize", "int8"], "not a run directory"),
        (["compress", keyword_classifier, "--out", tmp_path / "e", "--quantize", "int8", "--batch-size", "0"],
         "--batch-size must be in"),
    ]
    for args, message in cases:
        r = cli_here(capsys, *args)
        assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, (args, r.stderr)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy"] and [p.name for p in busy.iterdir()] == ["notes.txt"]
    once = tmp_path / "once"
    assert cli_here(capsys, "compress", keyword_classifier, "--out", once, "--quantize", "int8").returncode == 0
    r = cli_here(capsys, "compress", once, "--out", tmp_path / "twice", "--quantize", "int8")
    assert r.returncode == 2 and "already quantised" in r.stderr and not (tmp_path / "twice").exists()


def test_language_model_training_windows_can_be_shorter_than_the_context(capsys, tmp_path, data_dir):
    """task.seq_len (what a long-context model's recovery fine-tune uses): windows of that many tokens."""
    r = cli_here(capsys, "train", "--data", data_dir, "--out", tmp_path / "w", "--preset", "debug", "--max-steps", "3",
                 "--set", "task.seq_len=16", "--set", "train.batch_size=4", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["tokens_seen"] == 3 * 4 * 16
    r = cli_here(capsys, "train", "--data", data_dir, "--out", tmp_path / "x", "--preset", "debug", "--max-steps", "3",
                 "--set", "task.seq_len=100000")
    assert r.returncode == 2 and "task.seq_len must be in 2.." in r.stderr and not (tmp_path / "x").exists()


def test_compress_an_image_classifier_pruned_and_int8(digits_mlp, capsys, tmp_path):
    digits, img = digits_mlp
    small = tmp_path / "small"
    r = cli_here(capsys, "compress", img, "--out", small, "--prune", "0.25", "--quantize", "int8", "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["kind"] == "image-classifier" and res["prune"]["widths"] == [[256, 128], [192, 96]]
    assert res["compressed"]["size_mb"] < 0.3 * res["original"]["size_mb"]
    r = cli_here(capsys, "eval", small, "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["accuracy"] > 0.5
    # Three quarters of the units gone, then a short fine-tune on the run's own images.
    accuracy = {}
    for name, extra in (("cut", []), ("recovered", ["--recover-seconds", "4"])):
        r = cli_here(capsys, "compress", img, "--out", tmp_path / name, "--prune", "0.75", *extra, "--json")
        assert r.returncode == 0, r.stderr
        res = json.loads(r.stdout)
        accuracy[name] = res["compressed"]["quality"]["accuracy"]
    assert res["prune"]["recovery"]["steps"] > 0 and res["prune"]["widths"][1] == [64, 32]
    assert accuracy["recovered"] >= accuracy["cut"], accuracy
    r = cli_here(capsys, "eval", tmp_path / "recovered", "--json")
    assert r.returncode == 0 and 0 < json.loads(r.stdout)["accuracy"] <= 1, r.stderr  # an ordinary run
    resnet = tmp_path / "resnet"
    assert cli_here(capsys, "train", "--task", "image-classify", "--data", digits, "--out", resnet,
                    "--preset", "resnet-small", "--max-steps", "1").returncode == 0
    r = cli_here(capsys, "compress", resnet, "--out", tmp_path / "no", "--prune", "0.25")
    assert r.returncode == 2 and "residual" in r.stderr and not (tmp_path / "no").exists()


def test_peak_memory_is_the_probe_process_own(keyword_classifier):
    """The probe is a fresh process: its figure must not inherit the parent's peak (ru_maxrss would)."""
    from lmforge.compress.report import own_peak_mb, peak_memory_mb

    ballast = bytearray(1200 * 2**20)  # the parent's peak: at least 1.2 GiB
    ballast[::4096] = b"x" * len(ballast[::4096])  # touched, so resident
    assert own_peak_mb() > 1200
    probe = peak_memory_mb(keyword_classifier, 4, None)
    del ballast
    assert probe is not None and 50 < probe < 1100
