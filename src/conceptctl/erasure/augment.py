"""The reference's resize augmentation of the anchor images, kept as a measured option
(``EraseConfig.augment = "rescale"``; docs/erase.md "Differences from the reference code").

DoCo's train.py reads its anchor images through concept-ablation's ``CustomDiffusionDataset``
(diffusers/utils.py), which by default rescales each picture at random: with probability 0.66
to a side in [S/3, S] pasted at a random place on a blank (0 in [-1, 1]) canvas, otherwise to a
side in [1.2 S, 1.4 S) and cropped at a random place back to S. The *target* caption then
starts with "a far away " or "very small " (side below 0.6 S) or "zoomed in " or "close up "
(side above S); the anchor caption is left as it is. The picture is encoded by the VAE at every
step (``latent_dist.sample()``). Here the pictures are the cached anchor latents decoded once
and rounded to 8-bit levels (the reference saves them as image files), and every random number
comes from the run's generator, so a resumed run draws what an uninterrupted one would.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

AUGMENTS = ("none", "rescale")
# Index 0: no prefix; the reference's words for a zoomed-out and a zoomed-in picture.
PREFIXES = ("", "a far away ", "very small ", "zoomed in ", "close up ")
_FAR, _NEAR = (1, 2), (3, 4)


@dataclass(frozen=True)
class Draw:
    """One picture's augmentation: its new side, where it goes (or where the crop starts), and
    which caption prefix (an index into PREFIXES) its target caption takes."""

    scale: int
    top: int
    left: int
    prefix: int


def _randint(low: int, high: int, generator: torch.Generator) -> int:
    """An integer in [low, high), as ``np.random.randint``."""
    return int(torch.randint(low, high, (1,), generator=generator))


def draw(size: int, generator: torch.Generator) -> Draw:
    """The reference's random choices for one picture of side ``size``, in its order."""
    if float(torch.rand(1, generator=generator)) < 0.66:
        scale = _randint(size // 3, size + 1, generator)
    else:
        scale = _randint(int(1.2 * size), int(1.4 * size), generator)
    outer, inner = (scale, size) if scale > size else (size, scale)
    top, left = _randint(0, outer - inner + 1, generator), _randint(0, outer - inner + 1,
                                                                   generator)
    prefix = 0
    if scale < 0.6 * size:
        prefix = _FAR[_randint(0, 2, generator)]
    elif scale > size:
        prefix = _NEAR[_randint(0, 2, generator)]
    return Draw(scale, top, left, prefix)


def rescale(picture: torch.Tensor, d: Draw) -> torch.Tensor:
    """(3, S, S) in [-1, 1] -> the augmented (3, S, S): zoomed out onto a blank canvas, or
    zoomed in and cropped. Bilinear with antialiasing, as PIL's resize."""
    size = picture.shape[-1]
    resized = F.interpolate(picture[None].float(), size=(d.scale, d.scale), mode="bilinear",
                            antialias=True, align_corners=False)[0]
    if d.scale > size:
        return resized[:, d.top:d.top + size, d.left:d.left + size]
    canvas = torch.zeros_like(picture, dtype=torch.float32)
    canvas[:, d.top:d.top + d.scale, d.left:d.left + d.scale] = resized
    return canvas


def to_pixels(backbone, latents: torch.Tensor, chunk: int = 32) -> torch.Tensor:
    """Cached anchor latents -> their pictures as uint8 (N, 3, S, S) on the CPU (a quarter of
    float32's memory; the reference's pictures are 8-bit files too)."""
    out = []
    for start in range(0, len(latents), chunk):
        pixels = backbone.decode_latents(latents[start:start + chunk])
        out.append(((pixels.float().cpu() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8))
    return torch.cat(out)


class Rescale:
    """Augmented anchor latents for a batch: ``(indices, generator, rows) -> (latents of the
    rows, prefix index per row)``. Choices and the VAE's sampling noise are drawn for the whole
    (global) batch, so every process of a data-parallel run draws the same numbers.
    ``target_variants`` (len(PREFIXES), P, tokens, width): each target prompt encoded with each
    prefix, indexed [prefix, prompt]."""

    def __init__(self, backbone, pixels: torch.Tensor, target_variants: torch.Tensor) -> None:
        self.backbone, self.pixels, self.target_variants = backbone, pixels, target_variants

    def __call__(self, indices: torch.Tensor, generator: torch.Generator,
                 rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
        size = self.pixels.shape[-1]
        draws = [draw(size, generator) for _ in range(len(indices))]
        side = size // self.backbone.vae_scale_factor
        eps = torch.randn((len(indices), self.backbone.latent_channels, side, side),
                          generator=generator)
        own = range(len(indices))[rows]
        if len(own) == 0:
            empty = torch.empty((0, self.backbone.latent_channels, side, side))
            return empty, torch.zeros(0, dtype=torch.long)
        pictures = torch.stack([rescale(self.pixels[indices[i]].float() / 127.5 - 1, draws[i])
                                for i in own])
        latents = self.backbone.encode_images(pictures, noise=eps[rows]).float().cpu()
        return latents, torch.tensor([draws[i].prefix for i in own])
