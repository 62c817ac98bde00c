"""Image classification: a CNN or MLP (``models/vision.py``) on a ``prepare --kind images`` data
directory, in the one training loop (exact resume, Ctrl-C, DDP, early stopping, TensorBoard).

The training split is held in memory as uint8; each micro-batch is cut from it by (seed, step)
like any epoch task, moved to the device as uint8, converted there and augmented, batched, with
``kornia.augmentation``: a random crop from the image padded by ``task.crop_padding`` pixels, a small
random affine (rotation, shift, scale), and a horizontal flip only with ``task.flip`` (never right
for digits or text). The augmentation's randomness is drawn from a generator seeded by (seed, step,
micro-batch) inside a forked RNG, so it neither depends on nor disturbs anything else: a resumed
run sees the same augmented images. The input shape, classes and normalisation come from the data
and are recorded in the model's config.
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
from lmforge.evaluate.classify import classification_metrics, split_summary, write_report
from lmforge.fsutil import write_json
from lmforge.models import build_model
from lmforge.models.vision import pixels_to_input
from lmforge.tasks.epochs import EpochTask

METRICS = ("accuracy", "macro_f1", "weighted_f1", "roc_auc", "loss")
TRAIN_SAMPLE = 2048  # training examples scored at each evaluation (the train accuracy curve)


@dataclass
class ImageClassifyOptions:
    name: str = "image-classify"
    epochs: int = 10  # the schedule's length without train.max_steps (as Keras' model.fit(epochs=10))
    # Defaults measured on digits (bench/RESULTS.md §23): a small affine; a padded random crop
    # (crop_padding 1) or larger shifts cost test accuracy there. Photos: crop_padding 4, flip.
    augment: bool = True  # the augmentation below, on the device
    crop_padding: int = 0  # pixels of zero padding a random crop moves within (0: no crop)
    rotate: float = 8.0  # degrees of the random rotation (0: none)
    shift: float = 0.05  # the affine's random translation, a fraction of the size
    scale: float = 0.05  # the affine's random scale range, 1 +- scale
    flip: bool = False  # horizontal flips (photos; never digits or text)
    label_smoothing: float = 0.0


def predict_images(model, x: np.ndarray, device, batch_size: int = 512) -> np.ndarray:
    """Class probabilities (N, K) of uint8 images (N, H, W, C), in eval mode."""
    model.eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            batch = pixels_to_input(torch.from_numpy(np.array(x[i:i + batch_size])).to(device))
            out.append(model.classify(batch).float().softmax(-1).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, model.config.num_labels))


def mistakes_grid(x: np.ndarray, y: np.ndarray, probs: np.ndarray, names: list[str], path: Path, n: int = 32) -> None:
    """The ``n`` most confident mistakes as a PNG grid, each marked "true>predicted probability"."""
    pred = probs.argmax(1)
    wrong = np.flatnonzero(pred != y)
    top = wrong[np.argsort(-probs[wrong, pred[wrong]], kind="stable")][:n]
    path.parent.mkdir(parents=True, exist_ok=True)
    if not len(top):
        from lmforge.fsutil import write_text

        write_text(path.with_suffix(".txt"), "no mistakes\n")
        return
    cols = 8
    save_mosaic([np.asarray(x[i]) for i in top], cols, [""] * (-(-len(top) // cols)), path,
                f"most confident mistakes ({len(wrong)} in all): true>predicted probability",
                [f"{names[y[i]]}>{names[pred[i]]} {probs[i, pred[i]]:.2f}" for i in top])


def plot_curves(run_dir: Path) -> Path | None:
    """Loss and accuracy per evaluation, training and validation, as the Keras programs plot them
    (training loss: the mean logged loss since the previous evaluation) -> ``plots/curves.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lmforge.evaluate.report import read_metrics, save_figure, step_axes

    rows = read_metrics(run_dir)
    evals = [r for r in rows if "val_loss" in r]
    if not evals:
        return None
    train_loss, pending = [], []
    for r in rows:
        if "loss" in r and "val_loss" not in r:
            pending.append(r["loss"])
        elif "val_loss" in r:
            train_loss.append(float(np.mean(pending)) if pending else None)
            pending = []
    steps = [r["step"] for r in evals]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8), dpi=110)
    a.plot([s for s, v in zip(steps, train_loss) if v is not None], [v for v in train_loss if v is not None],
           "o-", label="train")
    a.plot(steps, [r["val_loss"] for r in evals], "o-", label="validation")
    a.set_title("loss")
    b.plot(steps, [r.get("train_accuracy") for r in evals], "o-", label="train")
    b.plot(steps, [r.get("val_accuracy") for r in evals], "o-", label="validation")
    b.set_title("accuracy")
    step_axes(a, b)
    return save_figure(fig, Path(run_dir) / "plots" / "curves.png")


def write_image_report(run_dir: Path, model, data: ImageData, split: str, device, baseline=None,
                       verdict: dict | None = None, out_dir: Path | None = None) -> dict:
    """Metrics of ``model`` on ``split`` of ``data`` with the classification report, its plots
    (under ``out_dir`` for data the run was not trained on), a grid of the most confident mistakes
    (``plots/mistakes_<split>.png``) and the ``baseline`` (``fit_pixel_baseline``) beside it."""
    x, y = data.split(split)
    if not len(y):
        raise UserError(f"{data.path}: the {split} split is empty")
    probs = predict_images(model, x, device)
    m = write_report(run_dir, y, probs, data.names, "validation" if split == "val" else split, str(data.path),
                     what="images", baseline=baseline.on(x) if baseline is not None else None, verdict=verdict,
                     out_dir=out_dir)
    grid = Path(out_dir or run_dir) / "plots" / f"mistakes_{split}.png"
    mistakes_grid(x, y, probs, data.names, grid)
    m["plots"] = m["plots"] + [str(grid)]
    return m


class ImageClassifyTask(EpochTask):
    name = "image-classify"
    ARCHS = ("cnn", "mlp")
    Options = ImageClassifyOptions
    METRICS = METRICS
    # model.fit's defaults, nearly: Adam(W) at 1e-3, a little weight decay; one evaluation per
    # epoch, keeping the best checkpoint by validation accuracy; the schedule from task.epochs.
    DEFAULTS = {"train": dict(lr=1e-3, batch_size=64, max_steps=None, eval_interval=None, log_interval=10,
                              weight_decay=0.01, beta2=0.999, warmup_steps=50, early_stop="accuracy",
                              keep_best=True)}
    method = "classify"

    @classmethod
    def validate_options(cls, cfg) -> None:
        o = cfg.task
        if o.epochs <= 0 or o.crop_padding < 0:
            raise UserError("task.epochs must be positive and task.crop_padding >= 0")
        if not (0 <= o.rotate <= 180 and 0 <= o.shift < 0.5 and 0 <= o.scale < 0.5):
            raise UserError("task.rotate must be in [0, 180], task.shift and task.scale in [0, 0.5)")
        if not 0.0 <= o.label_smoothing < 1.0:
            raise UserError(f"task.label_smoothing must be in [0, 1), got {o.label_smoothing}")

    def __init__(self, cfg, run=None):
        super().__init__(cfg, run)
        if cfg.data.path is None:
            raise UserError("--task image-classify needs --data DIR (made by `lmforge prepare --kind images`)")
        self.data = ImageData.open(cfg.data.path)
        self.names = self.data.names
        self.x, self.y = self.data.split("train")
        self.val_x, self.val_y = self.data.split("val")
        if len(self.y) == 0:
            raise UserError(f"{cfg.data.path}: the training split is empty")

    def resolve(self, cfg, world):
        if not self.resume:
            h, w, c = self.data.meta["shape"]
            cfg = cfgmod.replace(cfg, data={"path": str(Path(cfg.data.path).resolve())},
                                 model=dict(height=h, width=w, in_channels=c, num_labels=len(self.names),
                                            mean=self.data.meta["mean"], std=self.data.meta["std"]))
        elif list(self.data.meta["shape"]) != [cfg.model.height, cfg.model.width, cfg.model.in_channels]:
            raise UserError(f"{cfg.data.path} no longer holds the images this run was trained on")
        self.plan_epochs(cfg, world, len(self.y))
        return cfg if self.resume else self.epoch_schedule(cfg)

    def build_model(self, cfg):
        return build_model(cfg.arch, cfg.model)

    def write_files(self, run, model) -> None:
        write_json(run.labels, self.names)

    def to(self, device):
        super().to(device)
        self.train_x = torch.from_numpy(np.array(self.x))  # uint8 (N, H, W, C), on the CPU (a copy: the file is read-only)
        self.train_y = torch.from_numpy(np.asarray(self.y))
        self.aug = self._augmentation() if self.cfg.task.augment else None
        # The training images each evaluation scores, taken from the in-memory copy once.
        sample = np.sort(np.random.default_rng(self.cfg.train.seed).permutation(len(self.y))[:TRAIN_SAMPLE])
        self.sample_x, self.sample_y = self.train_x.numpy()[sample], np.asarray(self.y)[sample]

    def _augmentation(self):
        import kornia.augmentation as K

        o, m = self.cfg.task, self.cfg.model
        steps = []
        if o.crop_padding:
            steps.append(K.RandomCrop((m.height, m.width), padding=o.crop_padding))
        if o.flip:
            steps.append(K.RandomHorizontalFlip())
        if o.rotate or o.shift or o.scale:
            steps.append(K.RandomAffine(degrees=o.rotate, translate=(o.shift, o.shift),
                                        scale=(1 - o.scale, 1 + o.scale), p=1.0))
        return K.AugmentationSequential(*steps).to(self.device) if steps else None

    def eval_cost(self, cfg) -> float:
        return (len(self.val_y) + min(TRAIN_SAMPLE, len(self.y))) / (3 * self.B * cfg.train.grad_accum)

    def batch(self, step, micro):
        b = self.batch_indices(step, micro)
        return self.train_x[b], self.train_y[b], torch.tensor([step, micro])

    def augment(self, x: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        """``x`` augmented with randomness drawn from (seed, step, micro-batch) alone."""
        if self.aug is None:
            return x
        step, micro = key.tolist()
        seed = int(np.random.default_rng([self.cfg.train.seed, 7, step, micro]).integers(2**62))
        devices = [x.device] if x.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            return self.aug(x)

    def loss(self, call, model, batch):
        x, y, key = batch
        x = self.augment(pixels_to_input(x), key)
        if x.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        return F.cross_entropy(call(x).float(), y, label_smoothing=self.cfg.task.label_smoothing)

    def evaluate(self, model, ctx):
        if not len(self.val_y):
            return {}
        with ctx:
            val = classification_metrics(self.val_y, predict_images(model, self.val_x, self.device), self.names)
            fit = classification_metrics(self.sample_y, predict_images(model, self.sample_x, self.device), self.names)
        model.train()
        return {**{f"val_{k}": val[k] for k in METRICS}, "train_accuracy": fit["accuracy"],
                "train_eval_loss": fit["loss"]}

    def finish(self, run, model, ctx):
        from lmforge.evaluate.baselines import fit_pixel_baseline

        out = {"arch": self.cfg.arch, "labels": self.names, "train_examples": len(self.y),
               "val_examples": len(self.val_y), "validation": None}
        baseline = fit_pixel_baseline(self.x, self.y, len(self.names))
        verdict = self.training_verdict(run)
        if verdict is not None:
            out["still_improving"] = verdict["still_improving"]
        for split, key in (("val", "validation"), ("test", "test")):
            if self.data.meta["splits"][split]["images"]:
                m = write_image_report(run.path, model, self.data, split, self.device, baseline, verdict)
                out[key] = split_summary(m)
        plot_curves(run.path)
        model.train()
        return out
