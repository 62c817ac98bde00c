"""A DCGAN (Radford et al. 2016): a generator of images from Gaussian noise and a discriminator
that tells them from real ones, in one module (``generator``, ``discriminator``) so that a run
directory saves, loads and resumes them together.

Generator: z (N, z_dim) -> a linear layer to (width * 2^k, h0, w0) -> k x [transposed conv 4x4
stride 2 -> BatchNorm -> ReLU], halving the channels each time -> a 3x3 conv to the image's
channels -> tanh. Discriminator, the mirror: k x [conv 4x4 stride 2 -> (BatchNorm but on the
first) -> LeakyReLU 0.2], doubling the channels -> flatten -> one logit. ``k`` is how often the
image size halves down to at least 4 pixels (8x8 digits: 1, 28x28 MNIST: 2, 32x32: 3).

Images travel as everywhere else in lmforge, float (N, C, H, W) in [0, 1]; the networks work in
[-1, 1] (the tanh's range) and convert at their edges.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn

from lmforge.errors import UserError
from lmforge.models.vision import load_exact, plain_state


@dataclass
class GANConfig:
    height: int = 28  # filled in from the data
    width: int = 28
    in_channels: int = 1
    num_labels: int = 0  # a generator has no classes (kept: the image spine reads it)
    mean: list[float] = field(default_factory=lambda: [0.0])
    std: list[float] = field(default_factory=lambda: [1.0])
    z_dim: int = 64
    g_width: int = 64  # the generator's channels at full resolution (doubling as it goes down)
    d_width: int = 64  # the discriminator's channels after its first convolution


def halvings(c: GANConfig) -> int:
    """How many stride-2 stages the networks have: the size halves while it stays >= 4 and even."""
    k, h, w = 0, c.height, c.width
    while h % 2 == 0 and w % 2 == 0 and h // 2 >= 4 and w // 2 >= 4:
        k, h, w = k + 1, h // 2, w // 2
    return k


def _init(module: nn.Module) -> None:
    """DCGAN's initialisation: N(0, 0.02) weights, BatchNorm scales N(1, 0.02)."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)


class Generator(nn.Module):
    def __init__(self, c: GANConfig):
        super().__init__()
        k = halvings(c)
        self.h0, self.w0, self.c0 = c.height >> k, c.width >> k, c.g_width << k
        self.project = nn.Sequential(nn.Linear(c.z_dim, self.c0 * self.h0 * self.w0, bias=False),
                                     nn.BatchNorm1d(self.c0 * self.h0 * self.w0), nn.ReLU(inplace=True))
        self.up = nn.ModuleList(
            nn.Sequential(nn.ConvTranspose2d(c.g_width << (k - i), c.g_width << (k - i - 1), 4, 2, 1, bias=False),
                          nn.BatchNorm2d(c.g_width << (k - i - 1)), nn.ReLU(inplace=True))
            for i in range(k))
        self.out = nn.Conv2d(c.g_width, c.in_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Noise (N, z_dim) -> images in [-1, 1], (N, C, H, W)."""
        x = self.project(z).view(-1, self.c0, self.h0, self.w0)
        for block in self.up:
            x = block(x)
        return torch.tanh(self.out(x))


class Discriminator(nn.Module):
    def __init__(self, c: GANConfig):
        super().__init__()
        k = halvings(c)
        layers, ch = [], c.in_channels
        for i in range(k):
            layers.append(nn.Sequential(nn.Conv2d(ch, c.d_width << i, 4, 2, 1, bias=i == 0),
                                        nn.BatchNorm2d(c.d_width << i) if i else nn.Identity(),
                                        nn.LeakyReLU(0.2, inplace=True)))
            ch = c.d_width << i
        if not k:  # images too small to halve: one 3x3 convolution instead
            layers.append(nn.Sequential(nn.Conv2d(ch, c.d_width, 3, padding=1), nn.LeakyReLU(0.2, inplace=True)))
            ch = c.d_width
        self.down = nn.ModuleList(layers)
        self.logit = nn.Linear(ch * (c.height >> k) * (c.width >> k), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] (N, C, H, W) -> logits (N,) of "real"."""
        for block in self.down:
            x = block(x)
        return self.logit(x.flatten(1)).squeeze(1)


class GAN(nn.Module):
    """What the spine asks of a model, for a generator/discriminator pair."""

    can_generate = False  # not a token generator; it samples images (:meth:`sample`)
    can_embed = False
    can_sample_images = True
    classifier_head = None  # not fine-tuned into a classifier
    activation_checkpointing = False

    def __init__(self, config: GANConfig):
        super().__init__()
        self.check_config(config)
        self.config = config
        self.generator = Generator(config)
        self.discriminator = Discriminator(config)
        _init(self)

    @staticmethod
    def check_config(c: GANConfig) -> None:
        for key in ("height", "width", "in_channels", "z_dim", "g_width", "d_width"):
            if getattr(c, key) <= 0:
                raise UserError(f"model.{key} must be positive, got {getattr(c, key)}")

    def blocks(self) -> nn.ModuleList:
        return nn.ModuleList([*self.generator.up, *self.discriminator.down])

    def embeddings(self) -> list[nn.Module]:
        return []

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def noise(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.randn(n, self.config.z_dim, generator=generator)

    @torch.no_grad()
    def sample(self, z: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1], (N, C, H, W), from noise ``z`` (N, z_dim), in eval mode."""
        was = self.training
        self.eval()
        out = (self.generator(z.to(next(self.parameters()).device)) + 1) / 2
        self.train(was)
        return out

    def real_logits(self, x: torch.Tensor) -> torch.Tensor:
        """The discriminator's logits for images ``x`` in [0, 1]."""
        return self.discriminator(x * 2 - 1)

    def state_dict_for_save(self) -> dict[str, torch.Tensor]:
        return plain_state(self)

    def load_saved_state(self, state: dict[str, torch.Tensor]) -> None:
        load_exact(self, state)


def images_to_uint8(x: torch.Tensor) -> np.ndarray:
    """Images in [0, 1] (N, C, H, W) as stored pixels, uint8 (N, H, W, C)."""
    return (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
