"""Generative adversarial training (``--task gan``): a DCGAN (``models/gan.py``) on a ``prepare
--kind images`` data directory, in the one training loop as two phases per step — the
discriminator on real and generated images, then the generator against it — each with its own
optimizer on the task's schedule (``Task.phases``). Losses are the non-saturating ones of
Goodfellow et al.: D minimises BCE(D(real), 1) + BCE(D(G(z)), 0), G minimises BCE(D(G(z)), 1).

Batches are (real images, noise) cut by (seed, step, micro-batch), so ``--resume`` is exact.
Each evaluation scores ``len(held-out)`` samples from fixed noise with :class:`~lmforge.evaluate.
gan.Judge` (Fréchet distance in an image classifier's feature space, beside the real-vs-real
figure; label entropies) and writes a grid of samples (``samples/step_<N>.png``); the best
checkpoint by Fréchet distance is kept. The classifier is ``task.classifier`` (an image-classify
run on the same images) or, by default, one the task trains first into ``RUN/classifier`` with
the same loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lmforge import config as cfgmod
from lmforge.data.images import ImageData, save_mosaic
from lmforge.errors import UserError
from lmforge.models import build_model
from lmforge.models.gan import images_to_uint8
from lmforge.models.vision import pixels_to_input
from lmforge.tasks.epochs import EpochTask

CLASSIFIER_DIR = "classifier"  # inside the GAN's run directory, when the task trains its own
MAX_SCORED = 2000  # generated (and held-out real) images per quality figure, at most
# The feature classifier the task trains when none is given: two same-padded conv blocks and a
# 128-unit dense layer (the features), a few epochs (seconds on digits).
CLASSIFIER = ["model.channels=[32, 64]", "model.padding=same", "model.dense=[128]", "model.dropout=0.3"]


@dataclass
class GANOptions:
    name: str = "gan"
    epochs: int = 40  # the schedule's length without train.max_steps
    classifier: str | None = None  # an image-classify run on these images; None: one trained into RUN/classifier
    classifier_epochs: int = 10
    grid: int = 64  # samples in each evaluation's grid


def sample_grid(model, z: torch.Tensor, path: Path, title: str) -> None:
    """A PNG grid of the samples of noise ``z`` (8 per row)."""
    cells = list(images_to_uint8(model.sample(z)))
    save_mosaic(cells, 8, [""] * (-(-len(cells) // 8)), path, title)


def open_classifier(path: str | Path, shape: list[int]):
    """The model of an image-classify run for images of ``shape`` (H, W, C), checked."""
    from lmforge.runs import load_run

    run = load_run(path, device="cpu")
    m = run.model.config
    if run.config.task.name != "image-classify" or [m.height, m.width, m.in_channels] != list(shape):
        raise UserError(f"task.classifier {path} must be an image-classify run on {shape} images "
                        f"(it is a {run.config.task.name} run)")
    return run.model


class GANTask(EpochTask):
    name = "gan"
    ARCHS = ("gan",)
    Options = GANOptions
    METRICS = ("fid", "label_entropy", "class_entropy")
    LOWER_IS_BETTER = ("fid", "label_entropy")
    supports_dp = False  # two phases: Opacus's accounting is for one model, one optimizer
    # DCGAN's settings: Adam at 2e-4 with beta1 0.5, no decay, a constant rate; one evaluation per
    # epoch, keeping the weights with the lowest Fréchet distance.
    DEFAULTS = {"train": dict(lr=2e-4, beta1=0.5, beta2=0.999, batch_size=64, weight_decay=0.0, warmup_steps=0,
                              schedule="constant", max_steps=None, eval_interval=None, log_interval=10,
                              early_stop="fid", keep_best=True, grad_clip=0.0)}

    @classmethod
    def validate_options(cls, cfg) -> None:
        o = cfg.task
        if o.epochs <= 0 or o.classifier_epochs <= 0 or not 1 <= o.grid <= 1024:
            raise UserError("task.epochs and task.classifier_epochs must be positive, task.grid in 1..1024")

    def __init__(self, cfg, run=None):
        super().__init__(cfg, run)
        if cfg.data.path is None:
            raise UserError("--task gan needs --data DIR (made by `lmforge prepare --kind images`)")
        self.data = ImageData.open(cfg.data.path)
        self.x, _ = self.data.split("train")
        if len(self.x) < 2:
            raise UserError(f"{cfg.data.path}: the training split has {len(self.x)} images; a GAN needs more")
        held = [self.data.split(s)[0] for s in ("val", "test") if self.data.meta["splits"][s]["images"]]
        self.heldout = np.concatenate([np.asarray(h) for h in held]) if held else None
        self.out = run.path if run is not None else None
        if run is not None and list(self.data.meta["shape"]) != [cfg.model.height, cfg.model.width,
                                                                 cfg.model.in_channels]:
            raise UserError(f"{cfg.data.path} holds {self.data.meta['shape']} images, not the "
                            f"{[cfg.model.height, cfg.model.width, cfg.model.in_channels]} this GAN was trained on")
        if cfg.task.classifier:
            open_classifier(cfg.task.classifier, self.data.meta["shape"])  # checked before anything is written
        self.seen_step = 0

    def resolve(self, cfg, world):
        if not self.resume:
            h, w, c = self.data.meta["shape"]
            cfg = cfgmod.replace(cfg, data={"path": str(Path(cfg.data.path).resolve())},
                                 model=dict(height=h, width=w, in_channels=c, mean=self.data.meta["mean"],
                                            std=self.data.meta["std"]),
                                 task={"classifier": str(Path(cfg.task.classifier).resolve())
                                       if cfg.task.classifier else None})
        self.plan_epochs(cfg, world, len(self.x))
        return cfg if self.resume else self.epoch_schedule(cfg)

    def build_model(self, cfg):
        return build_model(cfg.arch, cfg.model)

    def write_files(self, run, model) -> None:
        self.out = run.path
        if not self.cfg.task.classifier:
            self.train_classifier(run.path / CLASSIFIER_DIR)

    def train_classifier(self, out: Path) -> None:
        """The feature classifier, trained by the same loop on the same images (its RNG use kept
        out of the GAN's)."""
        from lmforge.progress import status
        from lmforge.train.trainer import train

        status(f"training the feature classifier for the quality figures into {out}")
        cfg = cfgmod.build_config(task="image-classify", arch="cnn", overrides=CLASSIFIER + [
            f"task.epochs={self.cfg.task.classifier_epochs}", f"train.seed={self.cfg.train.seed}",
            f"train.device={self.cfg.train.device}"])
        with torch.random.fork_rng(devices=[]):
            train(cfg, self.data.path, out)

    def classifier_path(self) -> Path:
        return Path(self.cfg.task.classifier) if self.cfg.task.classifier else self.out / CLASSIFIER_DIR

    def to(self, device):
        from lmforge.evaluate.gan import Judge

        super().to(device)
        self.train_x = torch.from_numpy(np.array(self.x))  # uint8 (N, H, W, C)
        rng = np.random.default_rng(self.cfg.train.seed)
        if self.heldout is None or len(self.heldout) < 2:  # no held-out images: half the training split
            order = rng.permutation(len(self.x))
            reference, heldout = self.train_x.numpy()[order[len(order) // 2:]], self.train_x.numpy()[order[:len(order) // 2]]
        else:
            reference, heldout = self.train_x.numpy(), self.heldout
        reference = reference[np.sort(rng.permutation(len(reference))[:MAX_SCORED])]
        heldout = heldout[np.sort(rng.permutation(len(heldout))[:MAX_SCORED])]
        classifier = open_classifier(self.classifier_path(), self.data.meta["shape"]).to(device)
        self.judge = Judge(classifier, reference, heldout, device)
        gen = torch.Generator().manual_seed(self.cfg.train.seed + 1)
        self.fixed_z = torch.randn(max(self.judge.n, self.cfg.task.grid), self.cfg.model.z_dim, generator=gen)

    def eval_cost(self, cfg) -> float:
        return 2 * self.judge.n / (3 * self.B * cfg.train.grad_accum) if hasattr(self, "judge") else 0.0

    def batch(self, step, micro):
        b = self.batch_indices(step, micro)
        seed = int(np.random.default_rng([self.cfg.train.seed, 11, step, micro]).integers(2**62))
        z = torch.randn(2, len(b), self.cfg.model.z_dim, generator=torch.Generator().manual_seed(seed))
        self.seen_step = step + 1  # evaluations come after a step's batches: they are of this step
        return self.train_x[b], z

    def phases(self, model):
        return [("discriminator", model.discriminator), ("generator", model.generator)]

    def phase_loss(self, call, model, batch, phase):
        x, z = batch
        if phase == "discriminator":
            real = model.discriminator(pixels_to_input(x) * 2 - 1)
            with torch.no_grad():
                fake_images = model.generator(z[0])
            fake = model.discriminator(fake_images)
            return (F.binary_cross_entropy_with_logits(real.float(), torch.ones_like(real, dtype=torch.float))
                    + F.binary_cross_entropy_with_logits(fake.float(), torch.zeros_like(fake, dtype=torch.float)))
        fake = model.discriminator(model.generator(z[1]))
        return F.binary_cross_entropy_with_logits(fake.float(), torch.ones_like(fake, dtype=torch.float))

    def quality(self, model) -> dict[str, float]:
        images = torch.cat([model.sample(self.fixed_z[i:i + 512]) for i in range(0, self.judge.n, 512)])
        return self.judge.score(images)

    def evaluate(self, model, ctx):
        with ctx:
            q = self.quality(model)
        if self.out is not None:
            sample_grid(model, self.fixed_z[:self.cfg.task.grid], self.out / "samples" / f"step_{self.seen_step:06d}.png",
                        f"step {self.seen_step}: Fréchet distance {q['fid']:.2f} (real vs real {q['fid_real']:.2f})")
        model.train()
        return {f"val_{k}": v for k, v in q.items()}

    def finish(self, run, model, ctx):
        with ctx:
            q = self.quality(model)
        sample_grid(model, self.fixed_z[:self.cfg.task.grid], run.path / "samples.png",
                    f"Fréchet distance {q['fid']:.2f} (real vs real {q['fid_real']:.2f})")
        plot_gan(run.path)
        model.train()
        return {"arch": self.cfg.arch, **q, "classifier": str(self.classifier_path()), "samples": str(run.path / "samples.png"),
                "scored_images": self.judge.n}


def plot_gan(run_dir: Path) -> Path | None:
    """The two losses per logged step and the Fréchet distance per evaluation -> ``plots/gan.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lmforge.evaluate.report import read_metrics, save_figure, step_axes

    rows = read_metrics(run_dir)
    logged = [r for r in rows if "loss_generator" in r]
    evals = [r for r in rows if "val_fid" in r]
    if not logged:
        return None
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8), dpi=110)
    for key in ("loss_discriminator", "loss_generator"):
        a.plot([r["step"] for r in logged], [r[key] for r in logged], label=key[5:])
    a.set_title("training losses")
    b.plot([r["step"] for r in evals], [r["val_fid"] for r in evals], "o-", label="generated vs training")
    b.plot([r["step"] for r in evals], [r["val_fid_real"] for r in evals], "--", label="held-out real vs training")
    b.set_title("Fréchet distance (classifier features)")
    step_axes(a, b)
    return save_figure(fig, Path(run_dir) / "plots" / "gan.png")
