"""The GAN task on the one spine: DCGAN shapes and gradients, two phases per step with exact
resume, the Fréchet distance against scipy's matrix square root, the best checkpoint by it, and
the commands a user runs (eval --json, generate --n --out)."""

import json

import numpy as np
import pytest
import torch

from lmforge import config as cfgmod
from lmforge.data.images import prepare_images
from lmforge.evaluate.gan import frechet_distance
from lmforge.models.gan import GAN, GANConfig
from lmforge.train.trainer import train
from tests.conftest import run_cli


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("gan") / "digits"
    prepare_images(["digits"], out)
    return out


def test_frechet_distance_matches_a_direct_scipy_computation():
    from scipy.linalg import sqrtm

    rng = np.random.default_rng(0)
    a = rng.normal(size=(400, 6)) @ rng.normal(size=(6, 6))
    b = rng.normal(0.3, 1.5, size=(300, 6))
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    direct = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(s_a + s_b - 2 * sqrtm(s_a @ s_b).real)
    assert frechet_distance(a, b) == pytest.approx(direct, rel=1e-6)
    assert abs(frechet_distance(a, a)) < 1e-6


@pytest.mark.parametrize("size", [(8, 8, 1), (28, 28, 1), (32, 32, 3)])
def test_dcgan_shapes_and_each_phase_reaches_its_own_weights(size):
    h, w, c = size
    torch.manual_seed(0)
    gan = GAN(GANConfig(height=h, width=w, in_channels=c, z_dim=16, g_width=8, d_width=8))
    x = gan.sample(gan.noise(4))
    assert x.shape == (4, c, h, w) and 0 <= x.min() and x.max() <= 1
    gan.train()
    gan.discriminator(gan.generator(gan.noise(4))).mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in gan.parameters())


def test_gan_two_phase_training_resumes_exactly_and_keeps_the_lowest_fid(tmp_path, digits_dir):
    over = ["train.max_steps=12", "train.eval_interval=4", "train.batch_size=32", "train.log_interval=1",
            "model.g_width=16", "model.d_width=16", "task.classifier_epochs=1"]
    whole, part = tmp_path / "whole", tmp_path / "part"
    summary = train(cfgmod.build_config(task="gan", overrides=over), digits_dir, whole)
    assert (whole / "classifier" / "model.safetensors").is_file()  # the feature classifier it trained
    # The second run scores with the first one's classifier (the same weights: trained from the same seed).
    given = cfgmod.build_config(task="gan", overrides=over + [f"task.classifier={whole / 'classifier'}"])
    train(given, digits_dir, part, stop_at=6)
    train(cfgmod.load(part / "config.yaml"), run_dir=part, resume=True)

    def rows(run):
        return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    logged = [(r["step"], r["loss_discriminator"], r["loss_generator"]) for r in rows(whole) if "loss" in r]
    assert logged == [(r["step"], r["loss_discriminator"], r["loss_generator"]) for r in rows(part) if "loss" in r]
    assert len(logged) == 12
    fids = {r["step"]: r["val_fid"] for r in rows(whole) if "val_fid" in r}
    part_fids = {r["step"]: r["val_fid"] for r in rows(part) if "val_fid" in r}  # also at the stop, step 6
    assert fids == {s: part_fids[s] for s in fids}
    assert summary["best_step"] == min(fids, key=fids.get) and summary["fid"] == pytest.approx(min(fids.values()))
    assert summary["fid_real"] < summary["fid"]  # twelve steps are far from real digits
    assert sorted(p.name for p in (whole / "samples").iterdir()) == ["step_000004.png", "step_000008.png",
                                                                     "step_000012.png"]
    assert (whole / "plots" / "gan.png").is_file()

    r = run_cli("eval", str(whole), "--json")
    assert r.returncode == 0, r.stderr
    m = json.loads(r.stdout)
    assert m["fid"] == pytest.approx(summary["fid"]) and m["scored_images"] == summary["scored_images"]
    assert 0 <= m["label_entropy"] <= np.log2(10) + 1e-6 and m["fid_real"] == pytest.approx(summary["fid_real"])
    grid = tmp_path / "grid.png"
    r = run_cli("generate", str(whole), "--n", "16", "--out", str(grid), "--seed", "1")
    assert r.returncode == 0 and grid.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", r.stderr
    r = run_cli("generate", str(whole), "--n", "16")
    assert r.returncode == 2 and "--out" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_a_classifier_for_other_images_is_refused_before_anything_is_written(tmp_path, digits_dir):
    from lmforge.errors import UserError

    other = tmp_path / "big"
    x = np.random.default_rng(0).integers(0, 255, size=(40, 12, 12, 1), dtype=np.uint8)
    np.savez(tmp_path / "big.npz", x=x, y=np.arange(40) % 2)
    prepare_images([str(tmp_path / "big.npz")], other)
    clf = tmp_path / "clf"
    train(cfgmod.build_config(task="image-classify", overrides=["train.max_steps=2"]), other, clf)
    cfg = cfgmod.build_config(task="gan", overrides=[f"task.classifier={clf}", "train.max_steps=2"])
    with pytest.raises(UserError, match="must be an image-classify run on"):
        train(cfg, digits_dir, tmp_path / "run")
    assert not (tmp_path / "run").exists()
