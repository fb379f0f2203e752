"""Draw every case of a suite with one model: fixed seeds, batched, latents kept.

Image k of a case starts from the noise of ``case.seed + k`` whatever the batch, so the original
and the erased model draw each case from the same noise and their pictures compare one to one.
Latents are kept because the embedding attack learns from the original model's target latents.

Under ``accelerate launch`` with several processes (``dist``), each process draws and decodes its
contiguous share of the pictures and every process gets all of them back, in the same order: a
picture's noise depends only on its case and index, so the result equals a one-process run.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from conceptctl.erasure.distributed import SingleProcess
from conceptctl.evaluation.cases import Case
from conceptctl.sampling import SampleSettings, initial_noise, sample_latents


@dataclass(frozen=True)
class DrawSettings:
    images_per_prompt: int
    steps: int
    guidance: float
    batch_size: int = 32


@dataclass
class Drawn:
    images: np.ndarray  # uint8 (cases x images_per_prompt, H, W, 3), case by case
    latents: torch.Tensor  # the same order, scaled latents on the CPU


def to_uint8(backbone, latents: torch.Tensor, batch_size: int = 64) -> np.ndarray:
    """Decode scaled latents to pictures exactly as the pipeline's PIL output does."""
    out = []
    for start in range(0, len(latents), batch_size):
        pixels = backbone.decode_latents(latents[start : start + batch_size])
        pixels = ((pixels.float() / 2 + 0.5).clamp(0, 1) * 255).round()
        out.append(pixels.to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy())
    return np.concatenate(out)


def _gathered(backbone, mine: torch.Tensor, dist, total: int) -> Drawn:
    """This process's latents decoded, then every process's share put together in order."""
    mine = mine.cpu()
    images = torch.from_numpy(to_uint8(backbone, mine)) if len(mine) else torch.empty(
        (0, *_picture_shape(backbone)), dtype=torch.uint8)
    if dist.world == 1:
        return Drawn(images.numpy(), mine)
    sizes = dist.shares(total)
    return Drawn(dist.gather(images, sizes).numpy(), dist.gather(mine.float(), sizes))


def _picture_shape(backbone) -> tuple[int, int, int]:
    return (backbone.resolution, backbone.resolution, 3)


def draw_cases(backbone, cases: Sequence[Case], draw: DrawSettings,
               on_step: Callable[[int], None] | None = None, dist=None) -> Drawn:
    settings = SampleSettings(
        prompts=tuple(c.prompt for c in cases), images_per_prompt=draw.images_per_prompt,
        steps=draw.steps, guidance=draw.guidance, batch_size=draw.batch_size,
        prompt_seeds=tuple(c.seed for c in cases))
    dist = dist or SingleProcess()
    total = len(cases) * draw.images_per_prompt
    rows = dist.shard(total)
    if rows.stop > rows.start:
        latents = sample_latents(backbone, settings, on_step=on_step, rows=rows)
    else:  # more processes than pictures
        latents = torch.empty((0, *_latent_shape(backbone)))
    return _gathered(backbone, latents, dist, total)


def _latent_shape(backbone) -> tuple[int, int, int]:
    side = backbone.resolution // backbone.vae_scale_factor
    return (backbone.latent_channels, side, side)


@torch.no_grad()
def draw_embeddings(backbone, prompt_embeds: torch.Tensor, seeds: Sequence[int],
                    draw: DrawSettings, on_step: Callable[[int], None] | None = None,
                    dist=None) -> Drawn:
    """Like :func:`draw_cases` for prompts given as text-encoder states (attacked prompts): row
    i of ``prompt_embeds`` is drawn ``images_per_prompt`` times from seeds ``seeds[i] + k``."""
    jobs = [(i, seeds[i] + k) for i in range(len(prompt_embeds))
            for k in range(draw.images_per_prompt)]
    dist = dist or SingleProcess()
    total = len(jobs)
    jobs = jobs[dist.shard(total)]
    empty = backbone.encode_prompts([""])
    size = backbone.resolution
    chunks = []
    for start in range(0, len(jobs), draw.batch_size):
        batch = jobs[start : start + draw.batch_size]
        embeds = prompt_embeds[[i for i, _ in batch]].to(backbone.device, backbone.dtype)

        def step_done(pipe, step, timestep, kwargs, n=len(batch)):
            if on_step is not None:
                on_step(n)
            return kwargs

        result = backbone.pipeline(
            prompt_embeds=embeds,
            negative_prompt_embeds=empty.expand(len(batch), -1, -1),
            latents=initial_noise(backbone, [s for _, s in batch], size),
            height=size, width=size, num_inference_steps=draw.steps,
            guidance_scale=draw.guidance, output_type="latent",
            callback_on_step_end=step_done)
        chunks.append(result.images.cpu())
    latents = torch.cat(chunks) if chunks else torch.empty((0, *_latent_shape(backbone)))
    return _gathered(backbone, latents, dist, total)
