"""Draw every case of a suite with one model: fixed seeds, batched, latents kept.

Image k of a case starts from the noise of ``case.seed + k`` whatever the batch, so the original
and the erased model draw each case from the same noise and their pictures compare one to one.
A case with a guidance scale of its own (a prompt file's row) is drawn with it, in batches of
cases of equal guidance. Every picture of a run has one size (``DrawSettings.size``, chosen for
a prompt file by :func:`picture_size`). Latents are kept because the embedding attack learns
from the original model's target latents.

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
    guidance: float  # for cases without a guidance of their own
    batch_size: int = 32
    size: tuple[int, int] | None = None  # (height, width); None: the backbone's native square


def picture_size(cases: Sequence[Case], backbone, source: str
                 ) -> tuple[tuple[int, int] | None, str]:
    """The one size a run draws ``cases`` at, and a note saying what the cases asked for and was
    not honoured (empty when nothing was left out). ``source``: the file the cases came from,
    for the note. None: the backbone's native size.

    The rows' size is honoured where the backbone can draw it: not on a backbone that draws at
    its native size only (``BackboneSpec.fixed_resolution``, the toy), nor above its size limit
    (``sampling.MAX_RESOLUTION_SCALE`` times its native side). One run draws every picture at
    one size (metrics, attacks and the report compare pictures one to one), so rows asking for
    several sizes are drawn at the size most of them ask for."""
    from collections import Counter

    from conceptctl.sampling import MAX_RESOLUTION_SCALE

    native = backbone.resolution
    asked = Counter(c.size for c in cases if c.size is not None)
    if set(asked) <= {(native, native)}:  # none, or the native size: nothing to choose
        return None, ""
    shown = ", ".join(f"{h}x{w} px ({n} rows)" for (h, w), n in asked.most_common())
    if backbone.spec.fixed_resolution:
        return None, (f"{source}: the rows' sizes ({shown}) are ignored: backbone "
                      f"{backbone.spec.name} draws only at its native {native}x{native} px")
    size, count = asked.most_common(1)[0]
    limit = MAX_RESOLUTION_SCALE * native
    if max(size) > limit:
        return None, (f"{source}: the rows' sizes ({shown}) are ignored: {size[0]}x{size[1]} "
                      f"is above backbone {backbone.spec.name}'s limit of {limit} px "
                      f"({MAX_RESOLUTION_SCALE}x its native {native} px); drawn at "
                      f"{native}x{native} px")
    note = ""
    if len(asked) > 1 or count < len(cases):
        others = len(cases) - count
        note = (f"{source}: {others} row(s) ask for another size than {size[0]}x{size[1]} px "
                f"or none ({shown}); one evaluation draws every picture at one size: "
                f"{size[0]}x{size[1]} px")
    return size, note


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


def _gathered(backbone, mine: torch.Tensor, dist, total: int, draw: DrawSettings) -> Drawn:
    """This process's latents decoded, then every process's share put together in order."""
    mine = mine.cpu()
    images = torch.from_numpy(to_uint8(backbone, mine)) if len(mine) else torch.empty(
        (0, *_sides(backbone, draw), 3), dtype=torch.uint8)
    if dist.world == 1:
        return Drawn(images.numpy(), mine)
    sizes = dist.shares(total)
    return Drawn(dist.gather(images, sizes).numpy(), dist.gather(mine.float(), sizes))


def _sides(backbone, draw: DrawSettings) -> tuple[int, int]:
    """(height, width) of the run's pictures."""
    return draw.size or (backbone.resolution, backbone.resolution)


def draw_cases(backbone, cases: Sequence[Case], draw: DrawSettings,
               on_step: Callable[[int], None] | None = None, dist=None) -> Drawn:
    own = tuple(c.guidance for c in cases)
    settings = SampleSettings(
        prompts=tuple(c.prompt for c in cases), images_per_prompt=draw.images_per_prompt,
        steps=draw.steps, guidance=draw.guidance, batch_size=draw.batch_size,
        prompt_seeds=tuple(c.seed for c in cases), resolution=draw.size,
        prompt_guidances=own if any(g is not None for g in own) else None)
    dist = dist or SingleProcess()
    total = len(cases) * draw.images_per_prompt
    rows = dist.shard(total)
    if rows.stop > rows.start:
        latents = sample_latents(backbone, settings, on_step=on_step, rows=rows)
    else:  # more processes than pictures
        latents = torch.empty((0, *_latent_shape(backbone, draw)))
    return _gathered(backbone, latents, dist, total, draw)


def _latent_shape(backbone, draw: DrawSettings) -> tuple[int, int, int]:
    height, width = _sides(backbone, draw)
    factor = backbone.vae_scale_factor
    return (backbone.latent_channels, height // factor, width // factor)


@torch.no_grad()
def draw_embeddings(backbone, prompt_embeds: torch.Tensor, seeds: Sequence[int],
                    draw: DrawSettings, on_step: Callable[[int], None] | None = None,
                    dist=None, guidances: Sequence[float | None] | None = None) -> Drawn:
    """Like :func:`draw_cases` for prompts given as text-encoder states (attacked prompts): row
    i of ``prompt_embeds`` is drawn ``images_per_prompt`` times from seeds ``seeds[i] + k``,
    with guidance ``guidances[i]`` (None, or a None entry: ``draw.guidance``)."""
    per = draw.images_per_prompt
    jobs = [(i * per + k, i, seeds[i] + k) for i in range(len(prompt_embeds)) for k in range(per)]
    dist = dist or SingleProcess()
    total = len(jobs)
    jobs = jobs[dist.shard(total)]
    # The unconditional side the pipeline's own sampling uses (SDXL: zeros), so that an
    # attacked prompt is drawn as `sample` draws a typed one.
    empty = backbone.unconditional_text()
    height, width = _sides(backbone, draw)
    # A pipeline call takes one guidance scale: rows of equal guidance share batches.
    groups: dict[float, list] = {}
    for job in jobs:
        own = guidances[job[1]] if guidances is not None else None
        groups.setdefault(draw.guidance if own is None else own, []).append(job)
    done = []
    for guidance, group in groups.items():
        done += _draw_embedded(backbone, prompt_embeds, empty, group, guidance, draw,
                               (height, width), on_step)
    done.sort(key=lambda item: item[0])  # back in job order
    latents = (torch.stack([latent for _, latent in done]) if done
               else torch.empty((0, *_latent_shape(backbone, draw))))
    return _gathered(backbone, latents, dist, total, draw)


def _draw_embedded(backbone, prompt_embeds, empty, jobs, guidance: float, draw: DrawSettings,
                   size: tuple[int, int], on_step) -> list[tuple[int, torch.Tensor]]:
    """(job number, latent) for ``jobs`` = (number, row, seed), all drawn with ``guidance``."""
    height, width = size
    out = []
    for start in range(0, len(jobs), draw.batch_size):
        batch = jobs[start : start + draw.batch_size]
        embeds = prompt_embeds[[i for _, i, _ in batch]].to(backbone.device, backbone.dtype)

        def step_done(pipe, step, timestep, kwargs, n=len(batch)):
            if on_step is not None:
                on_step(n)
            return kwargs

        result = backbone.pipeline(
            **backbone.pipeline_arguments(embeds, empty.expand(len(batch), -1, -1)),
            latents=initial_noise(backbone, [s for _, _, s in batch], size),
            height=height, width=width, num_inference_steps=draw.steps,
            guidance_scale=guidance, output_type="latent",
            callback_on_step_end=step_done)
        out += [(n, latent) for (n, _, _), latent in zip(batch, result.images.cpu(),
                                                         strict=True)]
    return out
