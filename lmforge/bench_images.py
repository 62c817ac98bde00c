"""``lmforge bench train --model cnn``: lmforge's image classifier training against Keras 3 (its
PyTorch backend, ``model.fit``) on the same network, data, batch size and epochs, in the same run.

lmforge runs its product path, ``train()`` with the task's loop (no augmentation, since the
Keras program has none; no evaluation between epochs); Keras runs ``model.fit``. Throughput is
images per second over each epoch after the first (warm-up: allocator, kernel choice), the median
over epochs: lmforge's from its ``metrics.jsonl`` lines (one per epoch, evaluation excluded),
Keras's from an epoch-timing callback. Both then predict the same test split, so the accuracy
each reaches in those epochs is reported beside its speed.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from lmforge.errors import UserError

PRESETS = ("keras-mnist", "keras-cifar")


def keras_model(preset: str, shape: tuple[int, int, int], classes: int, lr: float):
    """The Keras network a preset copies (the Keras MNIST example; the TF CIFAR-10 tutorial's)."""
    os.environ.setdefault("KERAS_BACKEND", "torch")
    import keras
    from keras import layers

    if keras.backend.backend() != "torch":
        raise UserError(f"KERAS_BACKEND is {keras.backend.backend()!r}; the comparison needs the torch backend")
    if preset == "keras-mnist":
        body = [layers.Conv2D(32, 3, activation="relu"), layers.MaxPooling2D(2), layers.Conv2D(64, 3, activation="relu"),
                layers.MaxPooling2D(2), layers.Flatten(), layers.Dropout(0.5)]
    else:
        body = [layers.Conv2D(32, 3, activation="relu"), layers.MaxPooling2D(2), layers.Conv2D(64, 3, activation="relu"),
                layers.MaxPooling2D(2), layers.Conv2D(64, 3, activation="relu"), layers.Flatten(),
                layers.Dense(64, activation="relu")]
    model = keras.Sequential([keras.Input(shape), layers.Rescaling(1 / 255.0), *body,
                              layers.Dense(classes, activation="softmax")])
    model.compile(loss="sparse_categorical_crossentropy", optimizer=keras.optimizers.AdamW(lr, weight_decay=0.01),
                  metrics=["accuracy"])
    return model


def _run_keras(preset, x, y, x_test, y_test, batch, epochs, lr) -> dict:
    import keras

    class Timer(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.t0 = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            times.append(time.perf_counter() - self.t0)

    times: list[float] = []
    model = keras_model(preset, x.shape[1:], int(y.max()) + 1, lr)
    model.fit(x, y, batch_size=batch, epochs=epochs, verbose=0, shuffle=True, callbacks=[Timer()])
    probs = model.predict(x_test, batch_size=512, verbose=0)
    per_epoch = (len(x) // batch) * batch  # lmforge drops a last partial batch; count what both train on
    return {"images_per_second": round(per_epoch / statistics.median(times[1:] or times), 1),
            "test_accuracy": float((probs.argmax(1) == y_test).mean()),
            "params": int(model.count_params()), "epoch_seconds": [round(t, 3) for t in times]}


def _run_lmforge(preset, data_dir, batch, epochs, lr, device) -> dict:
    from lmforge import config as cfgmod
    from lmforge.data.images import ImageData
    from lmforge.evaluate.report import read_metrics
    from lmforge.runs import load_run
    from lmforge.tasks.images import predict_images
    from lmforge.train.trainer import train

    data = ImageData.open(data_dir)
    n = len(data.split("train")[1])
    steps_per_epoch = n // batch
    cfg = cfgmod.build_config(preset, task="image-classify", values={
        "data": {"path": str(data_dir)}, "task": {"epochs": epochs, "augment": False},
        "train": {"batch_size": batch, "lr": lr, "eval_interval": 0, "log_interval": steps_per_epoch,
                  "device": device, "early_stop": None, "keep_best": False, "warmup_steps": 1}})
    with tempfile.TemporaryDirectory() as tmp:
        summary = train(cfg, run_dir=Path(tmp) / "run")
        rates = [r["examples_per_second"] for r in read_metrics(Path(tmp) / "run") if "examples_per_second" in r]
        run = load_run(Path(tmp) / "run", device=device)
        x_test, y_test = data.split("test")
        probs = predict_images(run.model, np.asarray(x_test), run.device)
    return {"images_per_second": round(statistics.median(rates[1:] or rates), 1),
            "test_accuracy": float((probs.argmax(1) == y_test).mean()), "params": summary["params"],
            "steps": summary["steps"], "per_epoch_images_per_second": rates}


def bench_train_images(preset: str = "keras-mnist", data: str = "mnist5k", epochs: int = 5, batch: int | None = None,
                       device: str = "cpu", reference: bool = True) -> dict:
    """Images per second training ``preset`` on ``data`` (a prepared image directory, or a source
    ``prepare --kind images`` reads), lmforge against Keras, and the test accuracy of each."""
    import torch

    from lmforge import config as cfgmod
    from lmforge.data.images import ImageData, prepare_images

    if preset not in PRESETS:
        raise UserError(f"--preset for --model cnn: one of {', '.join(PRESETS)} (the networks Keras has too)")
    if epochs < 2:
        raise UserError("--epochs must be at least 2 (the first epoch is warm-up)")
    spec = cfgmod.PRESETS[preset]
    batch = batch or spec["train"]["batch_size"]
    lr = spec["train"]["lr"]
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(data)
        if not (data_dir / "meta.json").is_file():
            prepare_images([data], Path(tmp) / "data")
            data_dir = Path(tmp) / "data"
        d = ImageData.open(data_dir)
        (x, y), (x_test, y_test) = d.split("train"), d.split("test")
        result = {"bench": "train-images", "preset": preset, "data": data, "device": device, "epochs": epochs,
                  "batch_size": batch, "train_images": int(len(y)), "test_images": int(len(y_test)),
                  "threads": torch.get_num_threads(), "lmforge": _run_lmforge(preset, data_dir, batch, epochs, lr,
                                                                             device)}
        if reference:
            os.environ.setdefault("KERAS_BACKEND", "torch")  # before keras is first imported
            import keras

            result["keras_version"] = keras.__version__
            result["keras"] = _run_keras(preset, np.asarray(x), np.asarray(y), np.asarray(x_test),
                                         np.asarray(y_test), batch, epochs, lr)
            result["speedup"] = round(result["lmforge"]["images_per_second"] / result["keras"]["images_per_second"], 3)
    return result


def format_result(r: dict) -> str:
    lines = [f"bench train --model cnn: preset {r['preset']} on {r['data']} ({r['train_images']:,} training "
             f"images, batch {r['batch_size']}, {r['epochs']} epochs, {r['device']}, {r['threads']} threads)"]
    for name in ("lmforge", "keras"):
        if name in r:
            m = r[name]
            lines.append(f"  {name:<8} {m['images_per_second']:>10,.0f} images/s   test accuracy "
                         f"{m['test_accuracy']:.4f}   {m['params']:,} parameters")
    if "speedup" in r:
        lines.append(f"  lmforge / Keras {r['keras_version']} (torch backend): {r['speedup']:.2f}x")
    return "\n".join(lines)
