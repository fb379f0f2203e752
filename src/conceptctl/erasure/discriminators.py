"""Discriminators on predicted clean latents x̂0: anchor-concept latents are "real", target ones
"fake". DoCo trains the UNet so that x̂0 under the target prompt is classified as the anchor's.

Each discriminator is an ``nn.Module`` with three methods the trainer calls:
``d_loss(anchor, target)`` (train D; ``target`` already detached), ``g_loss(target)`` (the
generator's adversarial loss, gradients flow into the UNet) and ``accuracy(anchor, target)``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def _depth(latent_size: int) -> int:
    """Stride-2 stages that bring the latent to 4x4 before the final 4x4 conv (3x3 patches):
    four for SD's 64x64 latents, as in the reference; fewer for small latents."""
    return max(1, min(4, int(math.log2(max(latent_size, 8))) - 2))


def _conv_stack(channels: int, latent_size: int, norm: bool, spectral: bool) -> nn.Sequential:
    wrap = nn.utils.spectral_norm if spectral else (lambda m: m)
    layers: list[nn.Module] = []
    c_in = channels
    for i in range(_depth(latent_size)):
        c_out = min(64 * 2**i, 512)
        layers.append(wrap(nn.Conv2d(c_in, c_out, 4, stride=2, padding=1, bias=not norm or i == 0)))
        if norm and i > 0:
            layers.append(nn.BatchNorm2d(c_out))
        layers.append(nn.LeakyReLU(0.2, inplace=True))
        c_in = c_out
    layers.append(wrap(nn.Conv2d(c_in, 1, 4, stride=1, padding=1)))
    return nn.Sequential(*layers)


class PatchGAN(nn.Module):
    """``patchgan``: the reference discriminator (Isola et al. 2017 style): 4x4 stride-2 convs
    64→128→256→512, LeakyReLU 0.2, BatchNorm on all but the first, 1-channel patch logits,
    binary cross-entropy with the reference's labels (anchor 0, target 1)."""

    ANCHOR, TARGET = 0.0, 1.0

    def __init__(self, latent_channels: int = 4, latent_size: int = 64) -> None:
        super().__init__()
        self.net = _conv_stack(latent_channels, latent_size, norm=True, spectral=False)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.net(latents)

    def _bce(self, logits: torch.Tensor, label: float) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, label))

    def d_loss(self, anchor: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self._bce(self(anchor), self.ANCHOR) + self._bce(self(target), self.TARGET)

    def g_loss(self, target: torch.Tensor) -> torch.Tensor:
        return self._bce(self(target), self.ANCHOR)

    @torch.no_grad()
    def accuracy(self, anchor: torch.Tensor, target: torch.Tensor) -> float:
        hits = (self(anchor) < 0).float().mean() + (self(target) > 0).float().mean()
        return float(hits / 2)


class HingeSpectral(nn.Module):
    """``hinge-sn``: the same patch layout with spectral normalisation instead of BatchNorm and
    the hinge loss (Miyato et al. 2018): steadier when the two domains are nearly identical."""

    def __init__(self, latent_channels: int = 4, latent_size: int = 64) -> None:
        super().__init__()
        self.net = _conv_stack(latent_channels, latent_size, norm=False, spectral=True)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.net(latents)

    def d_loss(self, anchor: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.relu(1 - self(anchor)).mean() + F.relu(1 + self(target)).mean()

    def g_loss(self, target: torch.Tensor) -> torch.Tensor:
        return -self(target).mean()

    @torch.no_grad()
    def accuracy(self, anchor: torch.Tensor, target: torch.Tensor) -> float:
        hits = (self(anchor) > 0).float().mean() + (self(target) < 0).float().mean()
        return float(hits / 2)
