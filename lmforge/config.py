"""Run configuration: typed sections, named presets, YAML files and overrides.

A run's config has four sections: ``task`` (what is learned: the task's own options dataclass,
chosen by ``task.name``), ``model`` (the family's config dataclass, chosen by ``arch``), ``data``
(where the examples are) and ``train`` (how: optimizer, schedule, loop). Config flows one way:
preset -> the task's defaults -> YAML file -> flags and ``--set`` overrides -> validate, then saved,
fully resolved, as ``config.yaml`` in the run directory. Presets are plain data.
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lmforge import __version__
from lmforge.errors import UserError
from lmforge.models import MODELS
from lmforge.models.gpt import GPTConfig
from lmforge.models.lora import LoRAConfig
from lmforge.models.lora import check_config as check_lora
from lmforge.train.privacy import DPConfig
from lmforge.train.privacy import check_config as check_dp
from lmforge.train.optim import OPTIMIZERS, SCHEDULES

SECTIONS = ("task", "model", "data", "train", "finetune", "compress")


@dataclass
class TrainConfig:
    """How to train. Step counts are optimizer steps (one step = ``grad_accum`` micro-batches)."""

    batch_size: int = 16  # examples (sequences) per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 1e-3  # peak learning rate
    # cosine (warm-up, then cosine decay) | constant | step | onecycle (train/optim.py:lr_at)
    schedule: str = "cosine"
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    lr_milestones: list[float] = field(default_factory=lambda: [0.5, 0.75])  # step: fractions of the schedule
    lr_gamma: float = 0.1  # step: the factor at each milestone
    warmup_steps: int = 20
    # Length of the schedule. None: planned from max_seconds after a few timed steps, so the
    # cosine decay ends when the time budget does (a task may also derive it, e.g. from epochs).
    max_steps: int | None = 500
    max_seconds: float | None = None  # wall-clock budget for the optimizer loop (hard stop)
    weight_decay: float = 0.1  # on matrices only; biases, norms and embeddings get none
    # adamw | adam | sgd | muon (Muon on the hidden matrices, AdamW on embeddings, biases, norms;
    # optim.py)
    optimizer: str = "adamw"
    momentum: float = 0.9  # sgd
    nesterov: bool = False  # sgd: Nesterov momentum
    # Muon's peak learning rate (None: train.lr), on the same schedule; RMS-matched to AdamW's.
    muon_lr: float | None = None
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # max global grad norm; 0 disables
    # Fine-tuning: each block's learning rate is lr * layer_lr_decay ** (blocks above it), the
    # embeddings' one step lower still (1: one learning rate for all; optim.layer_scales).
    layer_lr_decay: float = 1.0
    # Steps between validation evaluations (0: only at the end; None: the task's own interval,
    # e.g. once per epoch for classification).
    eval_interval: int | None = 100
    eval_batches: int = 8  # validation micro-batches per evaluation during training (token tasks)
    # Early stopping and best-checkpoint selection, for any task: the validation metric watched
    # (a name the task reports without its "val_" prefix, e.g. loss, macro_f1; None: off), how
    # many evaluations without improvement end training (0: never), and whether the run keeps the
    # best-scoring weights rather than the last.
    early_stop: str | None = None
    patience: int = 0
    keep_best: bool = False
    log_interval: int = 10  # steps between metrics.jsonl lines and progress-bar updates
    # Differentially private training (DP-SGD through Opacus, train/privacy.py): train.dp.epsilon
    # (the target; None: off), train.dp.delta, train.dp.max_grad_norm (per-example clipping).
    dp: DPConfig = field(default_factory=DPConfig)
    tensorboard: bool = False  # also write the logged scalars as TensorBoard event files
    checkpoint_interval: int = 0  # steps between checkpoints (0: only at the end / on stop)
    seed: int = 1337
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU) | float32 | bfloat16
    compile: bool | None = None  # torch.compile the model (None: on CUDA only, where it pays)
    # Recompute each block's activations in the backward pass instead of keeping them: less
    # memory for more compute (see bench/RESULTS.md for the measured trade).
    activation_checkpointing: bool = False
    # Under torchrun: shard parameters, gradients and optimizer state across processes (FSDP)
    # instead of replicating them (DDP). For models that do not fit one device with DDP.
    fsdp: bool = False
    # Rows per chunk of the fused head + cross-entropy (0: full logits and F.cross_entropy).
    # None: by device, as measured (bench/RESULTS.md): 256 on CPU, where it is 13% faster; full
    # logits on CUDA, where torch.compile fuses the loss and chunks of 256 are 1.6x slower.
    loss_chunk: int | None = None


@dataclass
class DataConfig:
    """Where the examples are (saved resolved, so a run directory knows what it was trained on)."""

    path: str | None = None  # token tasks: a `lmforge prepare` directory; classify: a .csv/.jsonl file
    val: str | None = None  # a separate validation file (classify; default: split from path)
    test: str | None = None  # a test file, evaluated once at the end (classify)


@dataclass
class FinetuneConfig:
    """How pretrained weights are adapted, for any task: LoRA adapters (``finetune.lora.r`` > 0)
    train instead of the whole model."""

    lora: LoRAConfig = field(default_factory=LoRAConfig)


QUANTIZE = ("int8",)


@dataclass
class CompressConfig:
    """How a run's weights were made smaller by ``lmforge compress`` (nothing for a trained run):
    ``quantize: int8`` stores every Linear layer's weights as int8 with one scale per output
    channel and runs them through PyTorch's dynamic int8 kernels (CPU); ``prune`` is the fraction
    of MLP neurons, convolution channels or hidden units removed (the model config holds the
    smaller shape); ``source`` the run it came from."""

    quantize: str | None = None
    float_layers: list[str] = field(default_factory=list)  # int8: layers kept float (their int8 error was too high)
    prune: float = 0.0
    prune_heads: float = 0.0  # the fraction of attention heads removed (the model config holds how many are left)
    source: str | None = None


def _default_task():
    from lmforge.tasks import TASKS

    return TASKS["lm"].Options()


@dataclass
class RunConfig:
    """Everything a run directory needs to rebuild the model and continue training."""

    task: Any = field(default_factory=_default_task)  # the task's Options dataclass
    model: Any = field(default_factory=GPTConfig)  # the family's config dataclass (MODELS[arch].config)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    compress: CompressConfig = field(default_factory=CompressConfig)
    preset: str | None = None
    arch: str = "gpt"  # a row of lmforge.models.MODELS


# Presets are data. `micro` and the default vocabulary were chosen by measurement on a 2-core CPU
# (see bench/RESULTS.md): the model that reaches the lowest validation loss in ~5 minutes.
PRESETS: dict[str, dict[str, Any]] = {
    "debug": {
        "model": dict(n_layer=2, n_head=2, n_embd=32, block_size=64, dropout=0.0),
        "train": dict(batch_size=4, lr=3e-3, warmup_steps=5, max_steps=40, eval_interval=20,
                      eval_batches=2, log_interval=1),
    },
    "nano": {
        "model": dict(n_layer=3, n_head=3, n_embd=96, block_size=256, dropout=0.0),
        "train": dict(batch_size=8, lr=2e-3, warmup_steps=30, max_steps=1000, beta2=0.99),
    },
    "micro": {
        # Two layers, not three: with Muon and the fused loss, the extra tokens a shallower model
        # sees in 5 minutes are worth more than depth (bench/RESULTS.md §10: 0.9-5% lower bits per
        # byte on the four corpora measured, with the 4,096-token default vocabulary).
        # Position embeddings start at the sinusoidal table (still learned): 1.2-2.9% lower
        # bits/byte after the same 1,100 steps on all four corpora measured (§14). On that table the
        # first layer's first head starts as a previous-token head: 1.9-7.4% lower again (§15).
        "model": dict(n_layer=2, n_head=3, n_embd=192, block_size=256, dropout=0.0, pos_init="sinusoidal",
                      prev_token_head=True),
        # beta2 0.99: with only 2k tokens per step the second-moment estimate needs a longer memory.
        # Muon on the hidden matrices, AdamW at 1e-2 on embeddings (= the tied head), biases and
        # norms: 0.21 bits/byte better than AdamW at 2e-3 in the same 5 minutes (§6). Muon's rate is
        # 4e-3 since the 2-layer shape: lower bits/byte than 2e-3 on all four corpora (§11).
        "train": dict(batch_size=8, lr=1e-2, warmup_steps=30, max_steps=1000, beta2=0.99, optimizer="muon",
                      muon_lr=4e-3),
    },
    # Llama-family decoders (`--task lm`); real ones come from `import-gguf` / `import-hf`.
    "llama-debug": {
        "arch": "llama", "task": "lm",
        "model": dict(n_layer=2, n_head=4, n_kv_head=2, n_embd=64, block_size=64, dropout=0.0),
        "train": dict(batch_size=4, lr=3e-3, warmup_steps=5, max_steps=40, eval_interval=20,
                      eval_batches=2, log_interval=1),
    },
    # LSTM language models (`--task lm` on the same prepared token data as a GPT).
    "lstm-debug": {
        "arch": "lstm", "task": "lm",
        "model": dict(n_layer=2, n_embd=32, n_hidden=48, block_size=64, dropout=0.0),
        "train": dict(batch_size=4, lr=3e-3, warmup_steps=5, max_steps=40, eval_interval=20,
                      eval_batches=2, log_interval=1),
    },
    # The Keras program's Embedding -> LSTM -> Dense, two layers deep. AdamW at 2e-2 (clipped at
    # norm 1): a 128/256 LSTM reached 4.96, 4.38, 4.18, 4.14 nats after 300 steps at 3e-3, 1e-2,
    # 2e-2, 3e-2 on the quickstart corpus (bench/RESULTS.md section 25); 2e-2 for the wider preset.
    "lstm": {
        "arch": "lstm", "task": "lm",
        "model": dict(n_layer=2, n_embd=256, n_hidden=512, block_size=128, dropout=0.1),
        "train": dict(batch_size=16, lr=2e-2, warmup_steps=30, max_steps=1000, beta2=0.99, grad_clip=1.0),
    },
    # Encoders (masked-LM pretraining: `lmforge train --task mlm` on `prepare --tokenizer wordpiece` data).
    "bert-debug": {
        "arch": "bert", "task": "mlm",
        "model": dict(n_layer=2, n_head=2, n_embd=32, block_size=64, dropout=0.0),
        "train": dict(batch_size=4, lr=3e-3, warmup_steps=5, max_steps=40, eval_interval=20,
                      eval_batches=2, log_interval=1),
    },
    "bert-mini": {
        "arch": "bert", "task": "mlm",
        "model": dict(n_layer=4, n_head=4, n_embd=256, block_size=128, dropout=0.1),
        "train": dict(batch_size=32, lr=1e-3, warmup_steps=50, max_steps=2000, beta2=0.99),
    },
    "bert-base": {
        "arch": "bert", "task": "mlm",
        "model": dict(n_layer=12, n_head=12, n_embd=768, block_size=512, dropout=0.1),
        "train": dict(batch_size=32, grad_accum=8, lr=1e-4, warmup_steps=1000, max_steps=100000,
                      weight_decay=0.01, beta2=0.999, eval_interval=500, eval_batches=40),
    },
    # Image classifiers (`lmforge train --task image-classify` on `prepare --kind images` data). The
    # input shape, classes and normalisation come from the data. keras-mnist is the Keras MNIST
    # example (Conv 32 -> MaxPool -> Conv 64 -> MaxPool -> Flatten -> Dropout 0.5 -> Dense softmax,
    # Adam 1e-3, batch 128); keras-cifar the TensorFlow CIFAR-10 tutorial's network (a third
    # convolution, no pooling after it, Dense 64).
    "keras-mnist": {
        "arch": "cnn", "task": "image-classify",
        "model": dict(channels=[32, 64], kernel=3, padding="valid", pool="max", dropout=0.5, dense=[]),
        "train": dict(batch_size=128, lr=1e-3),
    },
    "keras-cifar": {
        "arch": "cnn", "task": "image-classify",
        "model": dict(channels=[32, 64, 64], kernel=3, padding="valid", pool="max", pools=2, dropout=0.0,
                      dense=[64]),
        "train": dict(batch_size=64, lr=1e-3),
    },
    # Small inputs (8x8 digits): same-padded convolutions with BatchNorm.
    "cnn-small": {
        "arch": "cnn", "task": "image-classify",
        "model": dict(channels=[32, 64], kernel=3, padding="same", batchnorm=True, pool="max", dropout=0.3,
                      dense=[128]),
        "train": dict(batch_size=64, lr=2e-3),
    },
    # A small residual network for 32x32 colour images: three stages of two residual blocks'
    # worth of convolutions (16, 32, 64 channels), BatchNorm, global average pooling.
    "resnet-small": {
        "arch": "cnn", "task": "image-classify",
        "model": dict(channels=[16, 32, 64], kernel=3, padding="same", convs_per_block=2, batchnorm=True,
                      residual=True, pool="max", pools=2, global_pool=True, dropout=0.0, dense=[]),
        "train": dict(batch_size=128, lr=2e-3),
    },
    "mlp": {
        "arch": "mlp", "task": "image-classify",
        "model": dict(hidden=[256, 128], dropout=0.2),
        "train": dict(batch_size=64, lr=1e-3),
    },
    "gpt2-124m": {
        "model": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, dropout=0.0),
        "train": dict(batch_size=12, grad_accum=40, lr=6e-4, warmup_steps=700, max_steps=20000,
                      eval_interval=500, eval_batches=40),
    },
}


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check and convert ``value`` to the dataclass field type ``tp`` (int, float, bool, str, optional)."""
    args = typing.get_args(tp)
    if tp is dict or typing.get_origin(tp) is dict:  # a YAML mapping, or JSON on the command line
        if isinstance(value, str):
            try:
                value = json.loads(value) if value.strip() else {}
            except ValueError:
                pass
        if isinstance(value, dict):
            return dict(value)
        raise UserError(f"config key {key!r} expects a mapping (JSON), got {value!r}")
    if typing.get_origin(tp) is list:  # a list of one type: a YAML list or "32,64"
        if isinstance(value, str):
            value = [v for v in value.replace("[", "").replace("]", "").split(",") if v.strip()]
        if isinstance(value, (list, tuple)):
            return [_coerce(v.strip() if isinstance(v, str) else v, args[0], key) for v in value]
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return [_coerce(value, args[0], key)]
        raise UserError(f"config key {key!r} expects a list, got {value!r}")
    if args and type(None) in args:  # Optional[X]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        tp = next(a for a in args if a is not type(None))
        if typing.get_origin(tp) in (list, dict):  # Optional[list[X]]: as a list
            return _coerce(value, tp, key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
    elif tp is int:
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            value = int(value)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, (str, int, float)):
            return str(value)
    raise UserError(f"config key {key!r} expects {getattr(tp, '__name__', tp)}, got {value!r}")


def _apply(section_obj: Any, section: str, values: dict[str, Any], source: str) -> None:
    hints = typing.get_type_hints(type(section_obj))
    names = {f.name for f in dataclasses.fields(section_obj)}
    for k, v in values.items():
        k, _, rest = k.partition(".")  # "lora.r": a key of the nested section "lora"
        if k not in names:
            raise UserError(f"{source}: unknown config key '{section}.{k}' (known: {', '.join(sorted(names))})")
        if dataclasses.is_dataclass(hints[k]):
            nested = {rest: v} if rest else v
            if not isinstance(nested, dict):
                raise UserError(f"{source}: config key '{section}.{k}' is a section; give its keys ({section}.{k}.KEY)")
            _apply(getattr(section_obj, k), f"{section}.{k}", nested, source)
        elif rest:
            raise UserError(f"{source}: unknown config key '{section}.{k}.{rest}'")
        else:
            setattr(section_obj, k, _coerce(v, hints[k], f"{section}.{k}"))


def apply_dict(cfg: RunConfig, data: dict[str, Any], source: str) -> None:
    """Apply a nested ``{"task": {...}, "model": {...}, "data": {...}, "train": {...}}`` mapping onto
    ``cfg`` (``task.name`` and ``arch`` are chosen before, by :func:`_skeleton`)."""
    if not isinstance(data, dict):
        raise UserError(f"{source}: expected a mapping with {', '.join(SECTIONS)} sections")
    for section, values in data.items():
        if section in ("preset", "arch"):
            continue
        if section not in SECTIONS:
            raise UserError(f"{source}: unknown config section {section!r} (known: {', '.join(SECTIONS)})")
        if not isinstance(values, dict):
            raise UserError(f"{source}: section {section!r} must be a mapping")
        if section == "task":
            values = {k: v for k, v in values.items() if k != "name"}
        _apply(getattr(cfg, section), section, values, source)


def parse_overrides(items: list[str]) -> dict[str, dict[str, Any]]:
    """Turn ``["train.lr=3e-4", "model.n_layer=4"]`` into a nested mapping (values parsed as YAML)."""
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        section, dot, name = key.strip().partition(".")
        if not sep or not dot or not name:
            raise UserError(f"--set expects section.key=value (e.g. train.lr=3e-4), got {item!r}")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        out.setdefault(section, {})[name] = value
    return out


def _skeleton(task: str, arch: str, source: str, with_defaults: bool = True) -> RunConfig:
    """A default config for ``task`` on family ``arch``, with the task's own training defaults
    unless ``with_defaults`` is false (a saved config, which holds every value itself)."""
    from lmforge.tasks import TASKS

    if task not in TASKS:
        raise UserError(f"{source}: unknown task {task!r} (known: {', '.join(TASKS)})")
    if arch not in MODELS:
        raise UserError(f"{source}: unknown arch {arch!r} (known: {', '.join(MODELS)})")
    cfg = RunConfig(task=TASKS[task].Options(), arch=arch, model=MODELS[arch].config())
    if with_defaults:
        apply_dict(cfg, TASKS[task].DEFAULTS, f"task {task} defaults")
    return cfg


def build_config(preset: str | None = None, config_file: str | Path | None = None,
                 overrides: list[str] | None = None, task: str | None = None,
                 values: dict[str, dict[str, Any]] | None = None, arch: str | None = None) -> RunConfig:
    """Resolve preset -> the task's defaults -> YAML file -> ``values`` (typed, from command-line
    flags) -> ``--set`` overrides into a validated :class:`RunConfig`. ``arch`` (``--model``)
    chooses the model family; without it the file's, the preset's or the task's default."""
    from lmforge.tasks import TASKS

    file_data: dict[str, Any] = {}
    if config_file is not None:
        file_data = load_yaml(config_file)
        preset = preset or file_data.get("preset")
    if preset is not None and preset not in PRESETS:
        raise UserError(f"unknown preset {preset!r} (known: {', '.join(PRESETS)})")
    spec = PRESETS[preset] if preset else {}
    task = task or (file_data.get("task") or {}).get("name") or spec.get("task") or "lm"
    if task not in TASKS:
        raise UserError(f"unknown task {task!r} (known: {', '.join(TASKS)})")
    if arch is not None and spec.get("arch") and arch != spec["arch"]:
        raise UserError(f"--model {arch} does not go with --preset {preset} (a {spec['arch']} preset)")
    # A preset without an arch is a GPT preset; without a preset the task picks its first family.
    arch = arch or file_data.get("arch") or spec.get("arch", "gpt" if preset else None) or TASKS[task].ARCHS[0]
    cfg = _skeleton(task, arch, str(config_file or "config"))
    if preset is not None:
        apply_dict(cfg, {k: v for k, v in spec.items() if k != "task"}, f"preset {preset}")
        cfg.preset = preset
    layers = [(d, source) for d, source in ((file_data, str(config_file)), (values or {}, "options"),
                                             (parse_overrides(overrides or []), "--set")) if d]
    for data, source in layers:
        apply_dict(cfg, data, source)
    base_model = getattr(TASKS[task], "base_model", None)
    default_init = getattr(TASKS[task], "default_init", None)
    if base_model is not None and not getattr(cfg.task, "init", None) and default_init is not None \
            and not cfg.preset:
        cfg.task.init = default_init()  # the task says so when it starts
    if base_model is not None and getattr(cfg.task, "init", None):
        # The model is --init's (a fine-tuning task); model settings given apply on top of it.
        cfg.arch, cfg.model = base_model(cfg.task.init)
        for data, source in layers:
            if isinstance(data.get("model"), dict):
                _apply(cfg.model, "model", data["model"], source)
    validate(cfg)
    return cfg


def validate(cfg: RunConfig) -> None:
    """Reject configurations that cannot train, with a message naming the key."""
    from lmforge.tasks import TASKS

    m, t = cfg.model, cfg.train
    positive = {f"model.{k}": getattr(m, k) for k in ("n_layer", "n_head", "n_embd", "block_size")
                if getattr(m, k, None) is not None}
    positive.update({"train.batch_size": t.batch_size, "train.grad_accum": t.grad_accum, "train.lr": t.lr,
                     "train.eval_batches": t.eval_batches, "train.log_interval": t.log_interval})
    for key, v in positive.items():
        if not v > 0 or v == math.inf:  # NaN fails the first test
            raise UserError(f"config key {key!r} must be positive (a finite number), got {v}")
    non_negative = {f"train.{k}": getattr(t, k) for k in ("weight_decay", "grad_clip", "warmup_steps",
                                                           "checkpoint_interval", "min_lr_ratio")}
    for key, v in non_negative.items():
        if not v >= 0 or v == math.inf:
            raise UserError(f"config key {key!r} must be a number >= 0, got {v}")
    for key in ("beta1", "beta2"):
        if not 0.0 <= getattr(t, key) < 1.0:
            raise UserError(f"train.{key} must be in [0, 1), got {getattr(t, key)}")
    if hasattr(m, "n_head") and m.n_embd % m.n_head:
        raise UserError(f"model.n_embd ({m.n_embd}) must be divisible by model.n_head ({m.n_head})")
    if not 0.0 <= getattr(m, "dropout", 0.0) < 1.0:
        raise UserError(f"model.dropout must be in [0, 1), got {m.dropout}")
    if getattr(m, "pos_init", "normal") not in ("normal", "sinusoidal"):
        raise UserError(f"model.pos_init must be normal or sinusoidal, got {m.pos_init!r}")
    if getattr(m, "prev_token_head", False) and m.pos_init != "sinusoidal":
        raise UserError("model.prev_token_head needs model.pos_init=sinusoidal (it is built on that table)")
    if t.loss_chunk is not None and t.loss_chunk < 0:
        raise UserError(f"train.loss_chunk must be >= 0, got {t.loss_chunk}")
    if t.max_steps is not None and t.max_steps <= 0:
        raise UserError(f"train.max_steps must be positive, got {t.max_steps}")
    if t.max_seconds is not None and not 0 < t.max_seconds < math.inf:
        raise UserError(f"train.max_seconds must be positive (a finite number), got {t.max_seconds}")
    if t.eval_interval is not None and t.eval_interval < 0:
        raise UserError(f"train.eval_interval must be >= 0, got {t.eval_interval}")
    if t.dtype not in ("auto", "float32", "bfloat16"):
        raise UserError(f"train.dtype must be auto, float32 or bfloat16, got {t.dtype!r}")
    if not 0.0 <= t.min_lr_ratio <= 1.0:
        raise UserError(f"train.min_lr_ratio must be in [0, 1], got {t.min_lr_ratio}")
    if t.optimizer not in OPTIMIZERS:
        raise UserError(f"train.optimizer must be one of {', '.join(OPTIMIZERS)}, got {t.optimizer!r}")
    if t.schedule not in SCHEDULES:
        raise UserError(f"train.schedule must be one of {', '.join(SCHEDULES)}, got {t.schedule!r}")
    if not 0.0 <= t.momentum < 1.0 or (t.nesterov and t.momentum == 0):
        raise UserError(f"train.momentum must be in [0, 1) (and > 0 with train.nesterov), got {t.momentum}")
    if not 0.0 < t.lr_gamma <= 1.0 or any(not 0.0 < m < 1.0 for m in t.lr_milestones):
        raise UserError("train.lr_gamma must be in (0, 1] and train.lr_milestones fractions in (0, 1)")
    if t.optimizer == "muon" and t.fsdp:
        raise UserError("train.optimizer muon needs whole matrices; it cannot run with train.fsdp")
    if t.muon_lr is not None and t.muon_lr <= 0:
        raise UserError(f"train.muon_lr must be positive, got {t.muon_lr}")
    if not 0.0 < t.layer_lr_decay <= 1.0:
        raise UserError(f"train.layer_lr_decay must be in (0, 1], got {t.layer_lr_decay}")
    if t.patience < 0:
        raise UserError(f"train.patience must be >= 0, got {t.patience}")
    task = TASKS[cfg.task.name]
    if t.early_stop is not None and t.early_stop not in task.METRICS:
        raise UserError(f"train.early_stop must be a metric the {cfg.task.name} task reports "
                        f"({', '.join(task.METRICS)}), got {t.early_stop!r}")
    if (t.patience or t.keep_best) and t.early_stop is None:
        raise UserError("train.patience and train.keep_best need train.early_stop (the metric to watch)")
    if cfg.arch not in task.ARCHS:
        raise UserError(f"the {cfg.task.name} task trains {' or '.join(task.ARCHS)} models, not {cfg.arch!r}")
    check_lora(cfg.finetune.lora)
    if cfg.compress.quantize not in (None, *QUANTIZE):
        raise UserError(f"compress.quantize must be one of {', '.join(QUANTIZE)}, got {cfg.compress.quantize!r}")
    check_dp(t.dp)
    check = getattr(MODELS[cfg.arch].model, "check_config", None)
    if check is not None:
        check(m)
    task.validate_options(cfg)


def loss_chunk_for(value: int | None, device_type: str) -> int:
    """Resolve ``train.loss_chunk`` (None: chosen by device) to a number of rows (0: no chunking)."""
    if value is not None:
        return value
    return 0 if device_type == "cuda" else 256


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping, turning a missing or malformed file into a one-line error."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise UserError(f"cannot parse {path}: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping at the top level")
    return data


def to_dict(cfg: RunConfig) -> dict[str, Any]:
    """Plain-data view for ``config.yaml``."""
    return {"preset": cfg.preset, "arch": cfg.arch, "task": dataclasses.asdict(cfg.task),
            "model": dataclasses.asdict(cfg.model), "data": dataclasses.asdict(cfg.data),
            "train": dataclasses.asdict(cfg.train), "finetune": dataclasses.asdict(cfg.finetune),
            "compress": dataclasses.asdict(cfg.compress)}


def _legacy_task(data: dict[str, Any]) -> str:
    """The task of a config saved before configs had a task section (lmforge 0.1 runs)."""
    if (data.get("model") or {}).get("num_labels"):
        return "classify"
    return "mlm" if data.get("arch") == "bert" else "lm"


def from_dict(data: dict[str, Any], source: str = "config.yaml") -> RunConfig:
    """Rebuild a saved config (no preset or task default is re-applied: the saved file is fully
    resolved)."""
    task = (data.get("task") or {}).get("name") or _legacy_task(data)
    cfg = _skeleton(task, data.get("arch", "gpt"), source, with_defaults=False)
    cfg.preset = data.get("preset")
    if "task" not in data:  # saved before configs had a task section: label_smoothing was a train key
        train = dict(data.get("train") or {})
        moved = {k: train.pop(k) for k in ("label_smoothing",) if k in train}
        data = {**data, "train": train, "task": {k: v for k, v in moved.items() if hasattr(cfg.task, k)}}
    apply_dict(cfg, data, source)
    validate(cfg)
    return cfg


def replace(cfg: RunConfig, **sections: dict[str, Any]) -> RunConfig:
    """A copy of ``cfg`` with fields of some sections replaced, e.g. ``replace(cfg, train={"max_steps": 9})``.
    Configs are not changed in place once validated: a planned schedule is a new config."""
    new = {name: dataclasses.replace(getattr(cfg, name), **values) for name, values in sections.items()}
    return dataclasses.replace(cfg, **new)


def save(cfg: RunConfig, path: str | Path) -> None:
    """Write the fully resolved config as YAML, atomically."""
    from lmforge.fsutil import write_text

    write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))


def load(path: str | Path) -> RunConfig:
    """Load a run directory's ``config.yaml``. A key this version does not know most likely means the
    run was written by a newer lmforge; the error says so rather than only naming the key."""
    data = load_yaml(path)
    if not isinstance(data.get("model"), dict):
        raise UserError(f"{path}: not a run's config (no model section); it was emptied or edited by hand")
    try:
        return from_dict(data, str(path))
    except UserError as e:
        if "unknown config key" not in str(e):
            raise
        raise UserError(f"{e}; was this run written by a newer version of lmforge ({__version__} here)?") from None
