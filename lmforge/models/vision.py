"""Image classifiers: a configurable convolutional network (``cnn``) and a multilayer perceptron on
flattened pixels (``mlp``).

Both take images as float (N, C, H, W) in [0, 1] (``pixels_to_input`` turns stored uint8
(N, H, W, C) into that) and normalise them with the training split's per-channel mean and std,
which their config holds: a run directory's model needs nothing else to classify a raw image.

The CNN is a stack of blocks, one per entry of ``channels``: ``convs_per_block`` x (conv ->
[BatchNorm] -> ReLU), with an identity (or 1x1 projection) shortcut around the block when
``residual``, then a 2x2 pooling for the first ``pools`` blocks (all by default); then global
average pooling (``global_pool``) or flattening, dropout, ``dense`` hidden layers and the linear
head. The Keras programs lmforge's users start from are presets (``config.PRESETS``):
``keras-mnist`` is Conv 32 -> MaxPool -> Conv 64 -> MaxPool -> Flatten -> Dropout 0.5 -> Dense;
``keras-cifar`` adds a third convolution and a Dense 64 layer.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmforge.errors import UserError

INITS = ("kaiming", "xavier", "orthogonal", "default")


def pixels_to_input(x: torch.Tensor) -> torch.Tensor:
    """Stored pixels, uint8 (N, H, W, C), as the models' input: float (N, C, H, W) in [0, 1]."""
    return x.permute(0, 3, 1, 2).float().div_(255.0)


@dataclass
class ImageInput:
    """What every image model's config holds about its input (filled in from the data)."""

    height: int = 28
    width: int = 28
    in_channels: int = 1
    num_labels: int = 10
    mean: list[float] = field(default_factory=lambda: [0.0])  # per channel, of pixels in [0, 1]
    std: list[float] = field(default_factory=lambda: [1.0])


@dataclass
class CNNConfig(ImageInput):
    channels: list[int] = field(default_factory=lambda: [32, 64])  # one block per entry
    kernel: int = 3
    padding: str = "valid"  # valid (as Keras' default) | same
    convs_per_block: int = 1
    batchnorm: bool = False
    residual: bool = False  # a shortcut around each block (ResNet-style)
    pool: str = "max"  # max | avg | none: the 2x2 pooling after a block
    pools: int | None = None  # blocks followed by a pooling, from the first (None: all)
    global_pool: bool = False  # global average pooling instead of flattening
    dropout: float = 0.5  # before the dense layers
    dense: list[int] = field(default_factory=list)  # hidden dense layers before the head
    init: str = "kaiming"  # kaiming | xavier | orthogonal | default (PyTorch's)


@dataclass
class MLPConfig(ImageInput):
    hidden: list[int] = field(default_factory=lambda: [256, 128])
    dropout: float = 0.2
    batchnorm: bool = False
    init: str = "kaiming"


def _init(module: nn.Module, scheme: str) -> None:
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)) and scheme != "default":
            if scheme == "kaiming":
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            elif scheme == "xavier":
                nn.init.xavier_uniform_(m.weight)
            else:
                nn.init.orthogonal_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def _check_input(c: ImageInput) -> None:
    for key in ("height", "width", "in_channels", "num_labels"):
        if getattr(c, key) <= 0:
            raise UserError(f"model.{key} must be positive, got {getattr(c, key)}")
    if len(c.mean) != c.in_channels or len(c.std) != c.in_channels or min(c.std) <= 0:
        raise UserError(f"model.mean and model.std need {c.in_channels} values (std > 0)")
    if c.init not in INITS:
        raise UserError(f"model.init must be one of {', '.join(INITS)}, got {c.init!r}")


class ImageClassifier(nn.Module):
    """What the spine asks of an image model (the families below fill in ``features``/``head``)."""

    can_generate = False
    can_embed = False
    classifier_head = "head."
    activation_checkpointing = False  # set by the trainer; these models are small enough without

    def __init__(self, config: ImageInput):
        super().__init__()
        self.config = config
        self.register_buffer("mean", torch.tensor(config.mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(config.std).view(1, -1, 1, 1), persistent=False)

    @staticmethod
    def classification_config(config, num_labels: int):
        return dataclasses.replace(config, num_labels=num_labels)

    def blocks(self) -> nn.ModuleList:
        return self.features

    def embeddings(self) -> list[nn.Module]:
        return []

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (N, num_labels) of images ``x``: float (N, C, H, W) in [0, 1]."""
        return self.head(self.trunk((x - self.mean) / self.std))

    forward = classify

    def state_dict_for_save(self) -> dict[str, torch.Tensor]:
        return plain_state(self)

    def load_saved_state(self, state: dict[str, torch.Tensor]) -> None:
        load_exact(self, state)


def plain_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict as plain contiguous tensors (what a safetensors file holds)."""
    return {k: v.detach().contiguous() for k, v in model.state_dict().items()}


def load_exact(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load ``state``, refusing (one line) weights that miss, add or reshape any tensor."""
    ours = model.state_dict()
    missing, extra = sorted(set(ours) - set(state)), sorted(set(state) - set(ours))
    wrong = [k for k in ours if k in state and tuple(state[k].shape) != tuple(ours[k].shape)]
    if missing or extra or wrong:
        raise UserError(f"the weights do not fit this {type(model).__name__} (missing {missing[:3]}, "
                        f"unexpected {extra[:3]}, other shapes {wrong[:3]})")
    model.load_state_dict(state)


def _take(state: dict[str, torch.Tensor], prefix: str, idx: torch.Tensor, dim: int = 0) -> None:
    """Keep units ``idx`` along ``dim`` of every tensor of module ``prefix`` that has that many
    (a layer's weight rows and bias, or a BatchNorm's four vectors; columns with ``dim`` 1)."""
    for name in ("weight", "bias", "running_mean", "running_var"):
        key = f"{prefix}.{name}"
        if key in state and (dim == 0 or name == "weight"):
            state[key] = state[key].index_select(dim, idx).contiguous()


def _names(model: nn.Module) -> dict[int, str]:
    return {id(m): n for n, m in model.named_modules()}


class ConvBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, c: CNNConfig, pool: bool):
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(c.convs_per_block):
            layers.append(nn.Conv2d(c_in if i == 0 else c_out, c_out, c.kernel,
                                    padding="same" if c.padding == "same" else 0, bias=not c.batchnorm))
            if c.batchnorm:
                layers.append(nn.BatchNorm2d(c_out))
            if i < c.convs_per_block - 1 or not c.residual:
                layers.append(nn.ReLU())
        self.body = nn.Sequential(*layers)
        self.shortcut = None
        if c.residual:
            self.shortcut = nn.Identity() if c_in == c_out else nn.Conv2d(c_in, c_out, 1, bias=False)
        self.pool = {"max": nn.MaxPool2d(2), "avg": nn.AvgPool2d(2)}[c.pool] if pool and c.pool != "none" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        if self.shortcut is not None:
            y = F.relu(y + self.shortcut(x))
        return self.pool(y) if self.pool is not None else y


def _dense(n_in: int, sizes: list[int], dropout: float, batchnorm: bool) -> tuple[nn.Sequential, int]:
    layers: list[nn.Module] = []
    for n in sizes:
        layers.append(nn.Linear(n_in, n))
        if batchnorm:
            layers.append(nn.BatchNorm1d(n))
        layers += [nn.ReLU(), nn.Dropout(dropout)]
        n_in = n
    return nn.Sequential(*layers), n_in


class CNN(ImageClassifier):
    def __init__(self, config: CNNConfig):
        super().__init__(config)
        c = config
        self.check_config(c)
        pools = len(c.channels) if c.pools is None else c.pools
        self.features = nn.ModuleList(
            ConvBlock(c.in_channels if i == 0 else c.channels[i - 1], ch, c, pool=i < pools)
            for i, ch in enumerate(c.channels))
        h, w = self.feature_size(c)
        n_flat = c.channels[-1] * (1 if c.global_pool else h * w)
        self.dropout = nn.Dropout(c.dropout)
        self.dense, n_in = _dense(n_flat, c.dense, c.dropout, False)
        self.head = nn.Linear(n_in, c.num_labels)
        _init(self, c.init)

    @staticmethod
    def feature_size(c: CNNConfig) -> tuple[int, int]:
        """(H, W) of the last block's output."""
        pools = len(c.channels) if c.pools is None else c.pools
        h, w = c.height, c.width
        for i in range(len(c.channels)):
            if c.padding != "same":
                h, w = h - c.convs_per_block * (c.kernel - 1), w - c.convs_per_block * (c.kernel - 1)
            if h < 1 or w < 1:
                break
            if i < pools and c.pool != "none":
                h, w = h // 2, w // 2
        return h, w

    @staticmethod
    def check_config(c: CNNConfig) -> None:
        _check_input(c)
        if not c.channels or min(c.channels) <= 0 or (c.dense and min(c.dense) <= 0):
            raise UserError("model.channels needs at least one positive entry (and model.dense positive ones)")
        if c.kernel <= 0 or c.convs_per_block <= 0:
            raise UserError("model.kernel and model.convs_per_block must be positive")
        if c.padding not in ("valid", "same") or c.pool not in ("max", "avg", "none"):
            raise UserError("model.padding must be valid or same; model.pool max, avg or none")
        if c.padding == "same" and c.kernel % 2 == 0:
            raise UserError("model.padding=same needs an odd model.kernel")
        h, w = CNN.feature_size(c)
        if h < 1 or w < 1:
            raise UserError(f"{c.height}x{c.width} images are too small for {len(c.channels)} blocks of "
                            f"{c.kernel}x{c.kernel} '{c.padding}' convolutions with pooling; use model.padding=same "
                            "or fewer model.channels")

    def trunk(self, x):
        for block in self.features:
            x = block(x)
        x = x.mean((2, 3)) if self.config.global_pool else x.flatten(1)
        return self.dense(self.dropout(x))

    def prunable_layers(self) -> list[tuple[int, nn.Module]]:
        """Per block, (its output channels, the block: its output (N, channels, H, W) is what their
        importance is measured on). Structured pruning keeps some channels of each
        (:meth:`pruned`); residual blocks add their input to their output, and are not pruned."""
        if self.config.residual or self.config.convs_per_block != 1:
            raise UserError("--prune thins CNNs of one convolution per block without shortcuts (the Keras presets, "
                            "cnn-small); a residual or multi-convolution block's channels are tied together")
        return [(ch, block) for ch, block in zip(self.config.channels, self.features)]

    def pruned(self, keep: list[torch.Tensor]) -> "CNN":
        """A CNN with only channels ``keep[i]`` (sorted ids) of block i: the block's convolution and
        BatchNorm keep those rows, the next block's convolution (or the first dense layer, per
        flattened position) those inputs."""
        c, names, state = self.config, _names(self), self.state_dict_for_save()
        h, w = self.feature_size(c)
        for i, (block, idx) in enumerate(zip(self.features, keep)):
            for m in block.body:
                if isinstance(m, (nn.Conv2d, nn.BatchNorm2d)):
                    _take(state, names[id(m)], idx)
            if i + 1 < len(self.features):
                _take(state, names[id(self.features[i + 1].body[0])], idx, dim=1)
            else:  # flattened (C, H, W): channel k is columns k*h*w ... (k+1)*h*w - 1
                first = next((m for m in self.dense if isinstance(m, nn.Linear)), self.head)
                cols = idx if c.global_pool else (idx[:, None] * (h * w) + torch.arange(h * w)).flatten()
                _take(state, names[id(first)], cols, dim=1)
        model = CNN(dataclasses.replace(c, channels=[len(k) for k in keep]))
        model.load_saved_state(state)
        return model


class MLP(ImageClassifier):
    def __init__(self, config: MLPConfig):
        super().__init__(config)
        c = config
        self.check_config(c)
        n_in = c.in_channels * c.height * c.width
        self.features = nn.ModuleList()
        for n in c.hidden:
            layers: list[nn.Module] = [nn.Linear(n_in, n)]
            if c.batchnorm:
                layers.append(nn.BatchNorm1d(n))
            layers += [nn.ReLU(), nn.Dropout(c.dropout)]
            self.features.append(nn.Sequential(*layers))
            n_in = n
        self.head = nn.Linear(n_in, c.num_labels)
        _init(self, c.init)

    @staticmethod
    def check_config(c: MLPConfig) -> None:
        _check_input(c)
        if c.hidden and min(c.hidden) <= 0:
            raise UserError("model.hidden sizes must be positive")

    def trunk(self, x):
        x = x.flatten(1)
        for layer in self.features:
            x = layer(x)
        return x

    def prunable_layers(self) -> list[tuple[int, nn.Module]]:
        """Per hidden layer, (its units, the layer: its output (N, units) is their importance)."""
        return [(n, layer) for n, layer in zip(self.config.hidden, self.features)]

    def pruned(self, keep: list[torch.Tensor]) -> "MLP":
        """An MLP with only units ``keep[i]`` of hidden layer i (and the next layer's columns)."""
        names, state = _names(self), self.state_dict_for_save()
        for i, (layer, idx) in enumerate(zip(self.features, keep)):
            for m in layer:
                if isinstance(m, (nn.Linear, nn.BatchNorm1d)):
                    _take(state, names[id(m)], idx)
            nxt = self.features[i + 1][0] if i + 1 < len(self.features) else self.head
            _take(state, names[id(nxt)], idx, dim=1)
        model = MLP(dataclasses.replace(self.config, hidden=[len(k) for k in keep]))
        model.load_saved_state(state)
        return model
