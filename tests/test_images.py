"""Image classification on the one spine: readers (folders, IDX, CSV, npz) on files the tests
write, output-directory safety, every image family's shapes and gradients, augmentation
reproducible from (seed, step), exact resume, and the interface the checks use: prepare --kind
images on MNIST-format IDX files -> train --preset keras-mnist -> eval --json -> predict --image ->
POST /v1/classify with an image through HTTP."""

import base64
import gzip
import io
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from lmforge import config as cfgmod
from lmforge.data.images import ImageData, prepare_images, read_idx
from lmforge.errors import UserError
from lmforge.models import MODELS, build_model
from tests.conftest import cli_here, run_cli

PIL = pytest.importorskip("PIL")
from PIL import Image  # noqa: E402


def write_idx(path: Path, a: np.ndarray) -> None:
    data = bytes([0, 0, 8, a.ndim]) + b"".join(struct.pack(">I", d) for d in a.shape) + a.astype(np.uint8).tobytes()
    (gzip.open if path.suffix == ".gz" else open)(path, "wb").write(data)


def digits(n: int | None = None, size: int = 8):
    """scikit-learn's digits as uint8 (N, size, size) and labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = np.rint(d.images * (255 / 16)).astype(np.uint8)[:n]
    if size != 8:
        x = np.stack([np.asarray(Image.fromarray(a).resize((size, size), Image.BILINEAR)) for a in x])
    return x, d.target[:n]


def write_folder(root: Path, n_per_class: int = 6) -> Path:
    x, y = digits(60)
    for k in (0, 1, 2):
        (root / f"class_{k}").mkdir(parents=True)
        for j, i in enumerate(np.flatnonzero(y == k)[:n_per_class]):
            Image.fromarray(x[i]).save(root / f"class_{k}" / f"{j}.png")
    return root


def test_class_folders_skip_corrupt_files_and_refuse_mixed_sizes_unless_resized(tmp_path):
    root = write_folder(tmp_path / "imgs")
    (root / "class_0" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (root / "class_1" / "notes.txt").write_text("not an image")
    Image.new("L", (12, 10)).save(root / "class_2" / "big.png")
    with pytest.raises(UserError, match="different sizes.*--image-size"):
        prepare_images([str(root)], tmp_path / "d1")
    assert not (tmp_path / "d1").exists()  # nothing half-written
    meta = prepare_images([str(root)], tmp_path / "d2", image_size="8x8", val_fraction=0.2, test_fraction=0.2)
    assert meta["shape"] == [8, 8, 1] and meta["classes"] == ["class_0", "class_1", "class_2"]
    assert sum(meta["skipped"].values()) == 2  # the damaged PNG and the text file, each with a reason
    report = (tmp_path / "d2" / "data_report.md").read_text()
    assert "Skipped" in report and "not an image file (.txt)" in report
    assert sum(s["images"] for s in meta["splits"].values()) == 19
    data = ImageData.open(tmp_path / "d2")
    x, y = data.split("train")
    assert x.dtype == np.uint8 and isinstance(x, np.memmap) and len(x) == len(y)
    assert (tmp_path / "d2" / "examples.png").stat().st_size > 1000


def test_idx_csv_and_npz_readers_give_the_same_images(tmp_path):
    x, y = digits(200)
    idx = tmp_path / "idx"
    idx.mkdir()
    write_idx(idx / "train-images-idx3-ubyte.gz", x[:150])
    write_idx(idx / "train-labels-idx1-ubyte.gz", y[:150])
    write_idx(idx / "t10k-images-idx3-ubyte", x[150:])
    write_idx(idx / "t10k-labels-idx1-ubyte", y[150:])
    assert (read_idx(idx / "t10k-images-idx3-ubyte") == x[150:]).all()
    m_idx = prepare_images([str(idx)], tmp_path / "a", val_fraction=0.1)
    assert m_idx["splits"]["test"]["images"] == 50 and m_idx["test_from"] == "the source's test split"
    test_x, test_y = ImageData.open(tmp_path / "a").split("test")
    assert (test_x[..., 0] == x[150:]).all() and (test_y == y[150:]).all()

    header = "label," + ",".join(f"p{i}" for i in range(64))
    rows = [f"{label}," + ",".join(map(str, img.reshape(-1))) for img, label in zip(x, y)]
    (tmp_path / "h.csv").write_text("\n".join([header] + rows) + "\n")
    headerless = [",".join(map(str, img.reshape(-1))) + f",{label}" for img, label in zip(x, y)]
    (tmp_path / "n.csv").write_text("\n".join(headerless) + "\n")
    np.savez(tmp_path / "d.npz", x=x, y=y)
    metas = [prepare_images([str(tmp_path / "h.csv")], tmp_path / "b"),
             prepare_images([str(tmp_path / "n.csv")], tmp_path / "c", label_column="last"),
             prepare_images([str(tmp_path / "d.npz")], tmp_path / "e")]
    splits = [ImageData.open(tmp_path / d).split("train") for d in ("b", "c", "e")]
    for (xs, ys), m in zip(splits, metas):  # one seeded, stratified split of the same images
        assert (xs == splits[0][0]).all() and (ys == splits[0][1]).all() and m["mean"] == metas[0]["mean"]
    with pytest.raises(UserError, match="no header row"):
        prepare_images([str(tmp_path / "n.csv")], tmp_path / "f")
    with pytest.raises(UserError, match="no column 'digit'"):
        prepare_images([str(tmp_path / "h.csv")], tmp_path / "f", label_column="digit")


def test_prepare_never_deletes_what_it_did_not_write(tmp_path, corpus_dir):
    """issue 22: `prepare --out DIR` with a meta.json in DIR once deleted all of DIR."""
    p = tmp_path / "p"
    p.mkdir()
    (p / "meta.json").write_text("{}")
    (p / "thesis.tex").write_text("x")
    for args in (["--input", str(corpus_dir)], ["--kind", "images", "--input", "digits"]):
        r = run_cli("prepare", *args, "--out", str(p), "--overwrite")
        assert r.returncode == 2 and "thesis.tex" in r.stderr
        assert (p / "thesis.tex").read_text() == "x"
    prepare_images(["digits"], tmp_path / "d")
    with pytest.raises(UserError, match="--overwrite"):
        prepare_images(["digits"], tmp_path / "d")
    prepare_images(["digits"], tmp_path / "d", overwrite=True, seed=3)
    assert ImageData.open(tmp_path / "d").meta["seed"] == 3


@pytest.mark.parametrize("preset", ["keras-mnist", "keras-cifar", "cnn-small", "resnet-small", "mlp"])
def test_every_image_family_has_the_right_shapes_and_gradients(preset):
    spec = cfgmod.PRESETS[preset]
    c = 3 if preset in ("keras-cifar", "resnet-small") else 1
    side = 8 if preset == "cnn-small" else 32 if c == 3 else 28
    config = MODELS[spec["arch"]].config(**spec["model"], height=side, width=side, in_channels=c, num_labels=7,
                                         mean=[0.5] * c, std=[0.25] * c)
    model = build_model(spec["arch"], config)
    x = torch.rand(4, c, side, side, requires_grad=True)
    logits = model.classify(x)
    assert logits.shape == (4, 7)
    logits.sum().backward()
    assert x.grad is not None and all(p.grad is not None for p in model.parameters())
    model.eval()
    again = build_model(spec["arch"], config)
    again.load_saved_state(model.state_dict_for_save())
    again.eval()
    assert torch.equal(again.classify(x), model.classify(x))


def test_the_data_decides_the_input_and_bad_model_settings_are_one_error(tmp_path):
    with pytest.raises(UserError, match="too small"):
        build_model("cnn", MODELS["cnn"].config(height=8, width=8))  # valid 3x3 convs shrink 8x8 to nothing
    with pytest.raises(UserError, match="image-classify task trains cnn or mlp"):
        cfgmod.build_config(task="image-classify", arch="gpt")
    cfg = cfgmod.build_config(task="image-classify", overrides=["model.channels=16,32", "model.dense=[8]"])
    assert cfg.arch == "cnn" and cfg.model.channels == [16, 32] and cfg.model.dense == [8]


def small_config(data, **train):
    return cfgmod.build_config("cnn-small", task="image-classify", values={
        "data": {"path": str(data)}, "train": {"max_steps": 12, "batch_size": 32, "eval_interval": 4,
                                               "log_interval": 1, **train}})


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("images") / "digits"
    prepare_images(["digits"], out)
    return out


def test_augmentation_is_a_function_of_seed_and_step(digits_dir):
    from lmforge.tasks.images import ImageClassifyTask
    from lmforge.models.vision import pixels_to_input
    from lmforge.train.distributed import world_from_env

    cfg = small_config(digits_dir)
    task = ImageClassifyTask(cfg)
    task.cfg = task.resolve(cfg, world_from_env())
    task.to(torch.device("cpu"))
    x, _, key = task.batch(5, 0)
    before = torch.get_rng_state()
    a = task.augment(pixels_to_input(x), key)
    assert torch.equal(torch.get_rng_state(), before)  # dropout's randomness is left alone
    torch.manual_seed(123)  # whatever the global RNG holds
    b = task.augment(pixels_to_input(x), key)
    assert torch.equal(a, b) and not torch.equal(a, pixels_to_input(x))
    x6, _, key6 = task.batch(6, 0)
    assert not torch.equal(task.augment(pixels_to_input(x6), key6), task.augment(pixels_to_input(x6), key))


def test_image_classifier_resumes_bitwise(digits_dir, tmp_path):
    from lmforge.evaluate.report import read_metrics
    from lmforge.train.trainer import train

    whole = train(small_config(digits_dir), run_dir=tmp_path / "whole")
    train(small_config(digits_dir), run_dir=tmp_path / "split", stop_at=6)
    with open(tmp_path / "split" / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "loss": 0.')  # a line torn by a kill: the resume drops it
    resumed = train(cfgmod.load(tmp_path / "split" / "config.yaml"), run_dir=tmp_path / "split", resume=True)
    assert resumed["step"] == whole["step"] == 12
    # The training lines (a pause also evaluates at its step, which is one more validation line).
    rows = [[r for r in read_metrics(tmp_path / d) if "loss" in r] for d in ("whole", "split")]
    assert rows[0] and [r["step"] for r in rows[1]] == [r["step"] for r in rows[0]]  # no step logged twice
    for a, b in zip(*rows):
        assert {k: v for k, v in a.items() if "per_second" not in k} == \
            {k: v for k, v in b.items() if "per_second" not in k}


def test_the_interface_from_idx_files_to_http(tmp_path, capsys):
    """prepare --kind images on IDX files, train --preset keras-mnist, eval --json, predict --image,
    and /v1/classify with a base64 PNG through a real server."""
    def run_cli(*args, **kw):  # in this process: each CLI start costs ~2 s of imports
        return cli_here(capsys, *args)

    httpx = pytest.importorskip("httpx")
    from lmforge.serve import common

    x, y = digits(None, size=28)
    idx = tmp_path / "mnist"
    idx.mkdir()
    for prefix, part in (("train", slice(0, 1400)), ("t10k", slice(1400, None))):
        write_idx(idx / f"{prefix}-images-idx3-ubyte.gz", x[part])
        write_idx(idx / f"{prefix}-labels-idx1-ubyte.gz", y[part])
    data, run = tmp_path / "data", tmp_path / "run"
    r = run_cli("prepare", "--kind", "images", "--input", str(idx), "--out", str(data))
    assert r.returncode == 0, r.stderr
    r = run_cli("train", "--task", "image-classify", "--data", str(data), "--out", str(run), "--preset", "keras-mnist",
                "--max-seconds", "60", "--epochs", "5")
    assert r.returncode == 0, r.stderr
    r = run_cli("eval", str(run), "--json")
    assert r.returncode == 0, r.stderr
    m = json.loads(r.stdout)
    assert m["n_examples"] == len(y) - 1400
    assert m["accuracy"] > 0.8 and m["macro_f1"] > 0.8  # far above the largest class (~0.1)
    assert m["accuracy"] > m["majority_baseline_accuracy"] + 0.6
    assert m["baseline"]["method"] == "pixel_logistic_regression" and m["baseline"]["accuracy"] > 0.8
    assert "logistic regression on the pixels" in (run / "report_test.md").read_text()
    assert (run / "plots" / "mistakes_test.png").is_file() and (run / "plots" / "curves.png").is_file()

    png = io.BytesIO()
    Image.fromarray(x[1400]).save(png, format="PNG")
    (tmp_path / "one.png").write_bytes(png.getvalue())
    r = run_cli("predict", str(run), "--image", str(tmp_path / "one.png"), "--json")
    assert r.returncode == 0, r.stderr
    predicted = json.loads(r.stdout)["predictions"][0]
    assert abs(sum(predicted["probabilities"].values()) - 1) < 1e-4

    proc, base = common.start_server(["serve", str(run), "--api-key", "k"])
    try:
        auth = {"Authorization": "Bearer k"}
        url = base + "/v1/classify"
        body = {"model": run.name, "images": ["data:image/png;base64," + base64.b64encode(png.getvalue()).decode()]}
        got = httpx.post(url, json=body, headers=auth, timeout=30)
        assert got.status_code == 200, got.text
        assert got.json()["data"][0]["label"] == predicted["label"]
        assert httpx.post(url, json=body, timeout=30).status_code == 401
        for bad in ({"model": run.name, "images": ["%%%"]}, {"model": run.name, "images": ["aGVsbG8="]},
                    {"model": run.name, "input": "a text"}):
            assert httpx.post(url, json=bad, headers=auth, timeout=30).status_code == 400
        assert httpx.post(base + "/tokenize", json={"prompt": "x"}, headers=auth, timeout=30).status_code == 400
        assert httpx.get(base + "/", headers=auth, timeout=30).status_code == 404  # no chat page for images
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_bad_image_inputs_are_one_error_line_and_leave_nothing(tmp_path, digits_dir):
    one = tmp_path / "one"
    (one / "only").mkdir(parents=True)
    Image.new("L", (8, 8)).save(one / "only" / "a.png")
    cases = [
        (["prepare", "--kind", "images", "--input", str(one), "--out", str(tmp_path / "o1")], "only one class"),
        (["prepare", "--kind", "images", "--input", str(tmp_path / "missing.csv"), "--out", str(tmp_path / "o2")],
         "not found"),
        (["train", "--task", "image-classify", "--model", "banana", "--data", str(digits_dir), "--out",
          str(tmp_path / "o3")], "unknown arch"),
        (["train", "--task", "image-classify", "--data", str(digits_dir), "--out", str(tmp_path / "o4"),
          "--init", "x"], "unknown config key 'task.init'"),
        (["train", "--task", "lm", "--data", str(digits_dir), "--out", str(tmp_path / "o5"), "--preset", "debug"],
         "images"),
    ]
    for args, message in cases:
        r = run_cli(*args)
        assert r.returncode == 2, (args, r.stderr)
        lines = [line for line in r.stderr.splitlines() if line.strip() and not line.startswith("[lmforge]")]
        assert len(lines) == 1 and message in lines[0], (args, r.stderr)
    assert not any((tmp_path / f"o{k}").exists() for k in range(1, 6))


@pytest.mark.parametrize("optimizer,schedule", [("sgd", "onecycle"), ("adam", "step"), ("adamw", "constant")])
def test_every_optimizer_and_schedule_trains_the_cnn(digits_dir, tmp_path, optimizer, schedule):
    from lmforge.train.trainer import train

    lr = 0.05 if optimizer == "sgd" else 2e-3
    cfg = small_config(digits_dir, optimizer=optimizer, schedule=schedule, lr=lr, nesterov=optimizer == "sgd",
                       eval_interval=0)
    train(cfg, run_dir=tmp_path / "run")
    from lmforge.evaluate.report import read_metrics

    losses = [r["loss"] for r in read_metrics(tmp_path / "run") if "loss" in r]
    assert np.mean(losses[-3:]) < np.mean(losses[:3])


def test_the_one_cycle_and_step_schedules_match_pytorch():
    from lmforge.train.optim import lr_at

    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.1)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=50)
    theirs = []
    for _ in range(50):
        theirs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    ours = [lr_at(s, 0.1, 0, 50, 0.0, "onecycle") for s in range(50)]
    np.testing.assert_allclose(ours, theirs, rtol=1e-9)
    opt = torch.optim.SGD([p], lr=0.1)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[20, 30], gamma=0.1)
    theirs = []
    for _ in range(40):
        theirs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    np.testing.assert_allclose([lr_at(s, 0.1, 0, 40, 0.0, "step", (0.5, 0.75)) for s in range(40)], theirs)


def test_the_keras_benchmark_runs_the_same_network_on_the_same_data(tmp_path, monkeypatch):
    """`lmforge bench train --model cnn`: both implementations train the keras-mnist network on
    the same images and report images/s, test accuracy and the ratio (a smoke test; the figures
    are in bench/RESULTS.md)."""
    monkeypatch.setenv("KERAS_BACKEND", "torch")
    pytest.importorskip("keras")
    from lmforge.bench_images import bench_train_images, format_result

    x, y = digits(300, size=28)
    np.savez(tmp_path / "d.npz", x=x, y=y)
    prepare_images([str(tmp_path / "d.npz")], tmp_path / "data", val_fraction=0.0)
    r = bench_train_images("keras-mnist", str(tmp_path / "data"), epochs=2, batch=32)
    assert r["lmforge"]["params"] == r["keras"]["params"] == 34826  # the same network
    assert r["speedup"] > 0 and r["lmforge"]["images_per_second"] > 0
    assert "lmforge / Keras" in format_result(r)


def test_an_image_classifier_under_two_process_ddp_equals_one_process_with_double_accumulation(digits_mlp, tmp_path):
    """torchrun with two processes trains what one process with two micro-batches per step trains,
    augmentation included (drawn from (seed, step, micro-batch), whichever process holds it); dropout
    off, since each process draws its own masks by design."""
    from safetensors.torch import load_file

    from tests.test_distributed import torchrun
    from tests.test_spine import step_losses

    data, _ = digits_mlp
    common = ["--task", "image-classify", "--data", str(data), "--model", "mlp", "--max-steps", "6",
              "--set", "train.batch_size=32", "--set", "model.dropout=0.0", "--set", "train.log_interval=1", "--json"]
    one = run_cli("train", *common, "--set", "train.grad_accum=2", "--out", str(tmp_path / "one"))
    assert one.returncode == 0, one.stderr
    two = torchrun("train", *common, "--out", str(tmp_path / "two"))
    assert two.returncode == 0, two.stderr[-3000:]
    assert json.loads(two.stdout)["processes"] == 2
    wa, wb = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    assert sorted(wa) == sorted(wb) and max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-5
    la, lb = step_losses(tmp_path / "one"), step_losses(tmp_path / "two")
    assert [s for s, _ in la] == [s for s, _ in lb] == list(range(1, 7))
    assert [x for _, x in lb] == pytest.approx([x for _, x in la], abs=1e-5)
