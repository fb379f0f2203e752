"""Generate images from a backbone with fixed seeds, and write them with a sidecar of settings.

Each image's starting noise is drawn from its own CPU generator seeded with ``seed + k`` (k = the
image's index within its prompt), so image k of a prompt is the same whatever the batch size or
device (up to float rounding: kernels sum in another order for another batch), and image k of
two different prompts starts from the same noise, which is what a side-by-side comparison of
prompts or models wants. ``prompt_seeds`` gives each prompt its own base instead (anchor images
use it so that every image starts from its own noise).

The sampler is the backbone's own scheduler unless ``sampler`` names another one, which is built
from the backbone's scheduler config and used for that call only (anchor images are drawn with
DPM-Solver, as the reference does, whatever the backbone ships).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from conceptctl.errors import UsageError
from conceptctl.fileio import atomic_directory, write_json

if TYPE_CHECKING:
    from PIL import Image

    from conceptctl.backbones.backbone import Backbone


@dataclass(frozen=True)
class SampleSettings:
    prompts: tuple[str, ...]
    images_per_prompt: int = 4
    seed: int = 0
    steps: int | None = None  # None: the backbone's default (SD: 30)
    guidance: float | None = None  # None: the backbone's default (SD: 7.5)
    negative_prompt: str | None = None
    # The picture's side, or (height, width) for a non-square one; None: the backbone's native
    # square.
    resolution: int | tuple[int, int] | None = None
    batch_size: int = 8
    # One seed per prompt (evaluation files give each case its own); None: ``seed`` for all.
    prompt_seeds: tuple[int, ...] | None = None
    # One guidance per prompt (evaluation files may give each case its own; a None entry takes
    # ``guidance``); None: ``guidance`` for all. Prompts of equal guidance share batches.
    prompt_guidances: tuple[float | None, ...] | None = None
    # A sampler of SAMPLERS used instead of the backbone's own scheduler; None: the backbone's.
    sampler: str | None = None

    def check(self) -> None:
        """Reject values the pipeline would fail on, or silently misuse, with one clear line."""
        if not self.prompts or any(not p.strip() for p in self.prompts):
            raise UsageError("every prompt must be non-empty text")
        for name, minimum in (("images_per_prompt", 1), ("steps", 1), ("batch_size", 1)):
            value = getattr(self, name)
            if value is not None and value < minimum:
                raise UsageError(f"{name.replace('_', ' ')} must be at least {minimum}")
        if not 0 <= self.seed < 2**63:
            raise UsageError("seed must be between 0 and 2**63 - 1")
        if self.prompt_seeds is not None:
            if len(self.prompt_seeds) != len(self.prompts):
                raise UsageError("give one seed per prompt")
            # Image k of a prompt is seeded with its seed + k: all must fit a CPU generator.
            if any(not 0 <= s <= 2**64 - self.images_per_prompt for s in self.prompt_seeds):
                raise UsageError("prompt seeds must be between 0 and 2**64 - images per prompt")
        if self.sampler is not None and self.sampler not in SAMPLERS:
            raise UsageError(f"unknown sampler {self.sampler!r}",
                             hint=f"known: {', '.join(SAMPLERS)}; leave it out for the "
                             "backbone's own")
        check_guidance(self.guidance)
        if self.prompt_guidances is not None:
            if len(self.prompt_guidances) != len(self.prompts):
                raise UsageError("give one guidance per prompt")
            for guidance in self.prompt_guidances:
                check_guidance(guidance)
        if self.resolution is not None and any(side < 8 or side % 8
                                               for side in sides(self.resolution)):
            raise UsageError("resolution must be a positive multiple of 8")

    def check_sizes(self, native: int, pictures: bool = False) -> None:
        """Refuse sizes that would exhaust memory, before anything is allocated. The limits
        scale with the backbone's ``native`` side; ``pictures``: every picture is held in memory
        (for the grid) until written."""
        height, width = sides(self.resolution or native)
        side = max(height, width)
        shown = f"{side}" if height == width else f"{height}x{width}"
        limit = MAX_RESOLUTION_SCALE * native
        if side > limit:
            raise UsageError(f"resolution {shown} is above this backbone's limit of {limit} px "
                             f"({MAX_RESOLUTION_SCALE}x its native {native} px)",
                             hint=f"use --resolution {native} (native) or at most {limit}")
        max_batch = max(1, MAX_BATCH_AT_NATIVE * native**2 // (height * width))
        if self.batch_size > max_batch:
            raise UsageError(f"batch size {self.batch_size} is above this backbone's limit of "
                             f"{max_batch} images per batch at {shown} px",
                             hint=f"use --batch-size {max_batch} or less: a smaller batch draws "
                             "the same images, only more slowly")
        count = len(self.prompts) * self.images_per_prompt
        held = count * height * width * 3 * 2  # the pictures, and the grid showing them all
        if pictures and held > MAX_PICTURE_BYTES:
            raise UsageError(f"{count} pictures of {shown} px would take {held / 2**30:.0f} GiB of "
                             f"memory; the limit is {MAX_PICTURE_BYTES // 2**30} GiB",
                             hint="draw fewer images per prompt (-n) or fewer prompts per call")

    def for_backbone(self, backbone: Backbone) -> SampleSettings:
        """These settings with every unset value filled from the backbone's defaults."""
        spec = backbone.spec
        return replace(
            self,
            steps=self.steps or spec.sample_steps or DEFAULT_STEPS,
            guidance=self.guidance if self.guidance is not None else (
                spec.sample_guidance if spec.sample_guidance is not None else DEFAULT_GUIDANCE),
            resolution=self.resolution or backbone.resolution,
        )


def check_guidance(guidance: float | None) -> None:
    """Refuse a guidance scale the pipeline would misuse (None: the default, fine)."""
    # NaN fails every comparison (Typer reads 'nan' as a number); inf would draw NaN images.
    if guidance is not None and not (0 <= guidance < math.inf):
        raise UsageError(f"guidance must be a finite number, 0 or more, not {guidance}",
                         hint="1 or less disables guidance; leave it out for the backbone's "
                         "default")


def sides(resolution: int | tuple[int, int]) -> tuple[int, int]:
    """(height, width) of a resolution given as one side or as (height, width)."""
    if isinstance(resolution, int):
        return resolution, resolution
    height, width = resolution
    return int(height), int(width)


DEFAULT_STEPS = 30
DEFAULT_GUIDANCE = 7.5
# Size limits, relative to a backbone's native side (SD 1.x: 512 px, the toy: 64 px). Past 4x
# its native side a model draws noise at a memory cost that grows with the square. The batch
# limit holds the pixels of a batch to those of 256 native-size images (16 at 4x the side, so the
# default batch of 8 always fits), far past what any GPU needs for full speed.
MAX_RESOLUTION_SCALE = 4
MAX_BATCH_AT_NATIVE = 256
MAX_PICTURE_BYTES = 8 * 2**30
# Samplers that can stand in for a backbone's own scheduler: name -> diffusers scheduler class,
# built from the backbone's scheduler config (its noise schedule and prediction type) with that
# class's defaults for the rest. DPM-Solver: multistep, 2nd order, dpmsolver++ (what the
# reference's ``DPMSolverMultistepScheduler.from_config(pipeline.scheduler.config)`` gives).
SAMPLERS = {"dpm-solver": "DPMSolverMultistepScheduler"}


def build_sampler(backbone: Backbone, sampler: str | None) -> Any:
    """A fresh scheduler of kind ``sampler`` for ``backbone``; None: the backbone's own one."""
    if sampler is None:
        return backbone.scheduler
    import diffusers

    if sampler not in SAMPLERS:
        raise UsageError(f"unknown sampler {sampler!r}", hint=f"known: {', '.join(SAMPLERS)}")
    return getattr(diffusers, SAMPLERS[sampler]).from_config(backbone.scheduler.config)


@contextmanager
def using_sampler(backbone: Backbone, sampler: str | None) -> Iterator[Any]:
    """Swap ``sampler`` in as the pipeline's scheduler for the block; the backbone's own
    scheduler (and the pipeline config's record of it) is put back afterwards, even on error.
    Yields the scheduler in use."""
    if sampler is None:
        yield backbone.scheduler
        return
    pipeline = backbone.pipeline
    own = pipeline.scheduler
    pipeline.scheduler = build_sampler(backbone, sampler)
    try:
        yield pipeline.scheduler
    finally:
        pipeline.scheduler = own


@dataclass(frozen=True)
class SampledImage:
    prompt_index: int
    prompt: str
    index: int
    seed: int
    image: Image.Image


def initial_noise(backbone: Backbone, seeds: list[int], size: int | tuple[int, int]):
    """The starting latents of pictures of ``size`` (a side, or (height, width)), one CPU
    generator per seed."""
    import torch

    height, width = sides(size)
    factor = backbone.vae_scale_factor
    shape = (backbone.latent_channels, height // factor, width // factor)
    noise = [torch.randn(shape, generator=torch.Generator("cpu").manual_seed(s)) for s in seeds]
    return torch.stack(noise).to(device=backbone.device, dtype=backbone.dtype)


def _denoise_batches(
    backbone: Backbone,
    settings: SampleSettings,
    output_type: str,
    on_step: Callable[[int], None] | None,
    rows: slice | None = None,
) -> Iterator[tuple[list[tuple[int, str, int, int]], Any]]:
    """Run the pipeline batch by batch; yield (jobs, outputs) with jobs = (prompt index, prompt,
    image index, seed). ``rows`` keeps only that part of the job list (one process's share).
    With ``prompt_guidances``, the jobs of each guidance (in order of first use) are batched
    together, each group in job order; otherwise the batches follow the job order."""
    settings.check()
    settings.check_sizes(backbone.resolution, pictures=output_type == "pil")
    settings = settings.for_backbone(backbone)
    height, width = sides(settings.resolution)
    jobs = [
        (p, prompt, k, (settings.prompt_seeds[p] if settings.prompt_seeds else settings.seed) + k)
        for p, prompt in enumerate(settings.prompts)
        for k in range(settings.images_per_prompt)
    ]
    if rows is not None:
        jobs = jobs[rows]
    # One pipeline call takes one guidance scale: a batch holds pictures of one guidance.
    groups: dict[float, list] = {}
    for job in jobs:
        own = settings.prompt_guidances[job[0]] if settings.prompt_guidances else None
        groups.setdefault(settings.guidance if own is None else own, []).append(job)
    batches = [(guidance, group[start : start + settings.batch_size])
               for guidance, group in groups.items()
               for start in range(0, len(group), settings.batch_size)]
    for guidance, batch in batches:

        def step_done(pipe: Any, step: int, timestep: Any, kwargs: dict, n=len(batch)) -> dict:
            if on_step is not None:
                on_step(n)
            return kwargs

        negative = settings.negative_prompt
        # Swapped per batch, not around the loop: the caller may stop between batches.
        with using_sampler(backbone, settings.sampler):
            result = backbone.pipeline(
                prompt=[job[1] for job in batch],
                negative_prompt=[negative] * len(batch) if negative else None,
                latents=initial_noise(backbone, [job[3] for job in batch], (height, width)),
                height=height,
                width=width,
                num_inference_steps=settings.steps,
                guidance_scale=guidance,
                output_type=output_type,
                callback_on_step_end=step_done,
            )
        yield batch, result.images


def sample_images(
    backbone: Backbone,
    settings: SampleSettings,
    on_step: Callable[[int], None] | None = None,
) -> Iterator[SampledImage]:
    """Yield every image, prompt by prompt (with ``prompt_guidances``: guidance by guidance,
    then prompt by prompt). ``on_step(n)`` reports n more image-steps done."""
    for batch, images in _denoise_batches(backbone, settings, "pil", on_step):
        for (p, prompt, k, seed), image in zip(batch, images, strict=True):
            yield SampledImage(p, prompt, k, seed, image)


def sample_latents(
    backbone: Backbone,
    settings: SampleSettings,
    on_step: Callable[[int], None] | None = None,
    rows: slice | None = None,
):
    """The final (scaled) latents instead of pictures, shape (prompts x images, C, h, w), in the
    same order and with the same seeds as :func:`sample_images` — the VAE is never run.
    ``rows``: only those images of that order (a process's share in a data-parallel run)."""
    import torch

    done = [(job[0], job[2], latent) for batch, latents in
            _denoise_batches(backbone, settings, "latent", on_step, rows)
            for job, latent in zip(batch, latents, strict=True)]
    # Batches grouped by guidance come out of order; (prompt, image) is the job order.
    done.sort(key=lambda item: item[:2])
    return torch.stack([latent for _, _, latent in done])


def slug(text: str, limit: int = 40) -> str:
    """A file-name-safe short form of a prompt."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit].rstrip("-") or "prompt"


def make_grid(images: list[list[Image.Image]]) -> Image.Image:
    """Rows of images (one row per prompt) pasted into one picture."""
    from PIL import Image

    w, h = images[0][0].size
    cols = max(len(row) for row in images)
    grid = Image.new("RGB", (cols * w, len(images) * h), "white")
    for r, row in enumerate(images):
        for c, img in enumerate(row):
            grid.paste(img, (c * w, r * h))
    return grid


def library_versions() -> dict[str, str]:
    import diffusers
    import torch
    import transformers

    from conceptctl import __version__

    return {
        "conceptctl": __version__,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
    }


def write_samples(
    out_dir: Path,
    images: list[SampledImage],
    settings: SampleSettings,
    backbone: Backbone,
    overwrite: bool = False,
    originals: list[SampledImage] | None = None,
    model: dict | None = None,
) -> Path:
    """Write PNGs, ``grid.png`` and ``samples.json`` into ``out_dir`` atomically.

    With ``originals`` (the same prompts and seeds from the unmodified backbone) those go to
    ``original/`` and each grid row shows the original images, then the modified ones.
    """
    rows: dict[int, list[Image.Image]] = {}
    records = []
    with atomic_directory(out_dir, overwrite=overwrite) as staging:
        if originals is not None:
            (staging / "original").mkdir()
            for item in originals:
                item.image.save(staging / "original" / _file_name(item))
                rows.setdefault(item.prompt_index, []).append(item.image)
        for item in images:
            item.image.save(staging / _file_name(item))
            rows.setdefault(item.prompt_index, []).append(item.image)
            records.append({"file": _file_name(item), "prompt": item.prompt,
                            "prompt_index": item.prompt_index, "index": item.index,
                            "seed": item.seed})
        make_grid([rows[p] for p in sorted(rows)]).save(staging / "grid.png")
        scheduler = build_sampler(backbone, settings.sampler)
        write_json(staging / "samples.json", {
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "backbone": backbone.describe(),
            "model": model,
            "compare": originals is not None,
            "device": str(backbone.device),
            "scheduler": {"class": type(scheduler).__name__, **dict(scheduler.config)},
            "settings": asdict(settings.for_backbone(backbone)),
            "seeding": "image k of every prompt starts from CPU noise seeded with seed + k"
                       if settings.prompt_seeds is None else "image k of prompt p starts from "
                       "CPU noise seeded with prompt_seeds[p] + k",
            "versions": library_versions(),
            "grid": "grid.png" + (" (rows: original images, then erased)" if originals else ""),
            "images": records,
        })
    return out_dir


def sample_model(
    settings: SampleSettings,
    out_dir: Path,
    *,
    backbone: str | None = None,
    artifact: Path | None = None,
    compare: bool = False,
    force: bool = False,
    backbone_config: Path | None = None,
    allow_pickle: bool = False,
    device: str | None = None,
    dtype: str | None = None,
    overwrite: bool = False,
    on_step: Callable[[int, int], None] | None = None,
    message: Callable[[str], None] | None = None,
) -> Path:
    """``conceptctl sample`` as a function: load the backbone (default: the artifact's base, else
    the ``default-backbone`` setting), apply ``artifact`` (an erasure folder or a delta file),
    draw, and write ``out_dir`` (:func:`write_samples`). ``compare``: also draw the original
    first; the grid shows both. ``on_step(n, total)``: n more image-steps of ``total`` done;
    ``message``: warnings (e.g. a forced base mismatch)."""
    from conceptctl.backbones.loading import open_backbone

    if compare and artifact is None:
        raise UsageError("--compare needs --model ARTIFACT (the erased model to compare)")
    record = None
    if artifact is not None:
        from conceptctl.erasure.artifact import read_artifact

        record = read_artifact(artifact)
        backbone = backbone or record.base["name"]
    _check_sizes_early(settings, backbone, allow_pickle)
    model = open_backbone(backbone, device=device, dtype=dtype, config=backbone_config,
                          allow_pickle=allow_pickle)
    total = (len(settings.prompts) * settings.images_per_prompt
             * settings.for_backbone(model).steps * (1 + compare))

    def draw():
        report = None if on_step is None else (lambda n: on_step(n, total))
        return list(sample_images(model, settings, on_step=report))

    originals, about = None, None
    if record is not None:
        from conceptctl.erasure.artifact import apply_artifact

        if compare:
            originals = draw()
        for note in apply_artifact(model, record, force=force):
            if message is not None:
                message(note)
        from conceptctl.erasure.artifact import all_concepts

        about = {"artifact": str(artifact), "concept": record.manifest["concept"],
                 "concepts": [c["concept"] for c in all_concepts(record.manifest)],
                 "anchor": record.manifest["anchor"], "method": record.manifest["method"],
                 "forced": force}
    images = draw()
    return write_samples(out_dir, images, settings, model, overwrite=overwrite,
                         originals=originals, model=about)


def _check_sizes_early(settings: SampleSettings, backbone: str | None,
                       allow_pickle: bool) -> None:
    """Sizes against the backbone's known native side, before its weights load (a backbone
    whose side is only known once loaded is checked then, still before any sampling)."""
    from conceptctl.backbones.resolve import resolve_backbone
    from conceptctl.settings import load_settings

    config = load_settings()
    spec = resolve_backbone(backbone or config.default_backbone, settings=config,
                            allow_pickle=allow_pickle)
    if spec.resolution:
        settings.check_sizes(spec.resolution, pictures=True)


def _file_name(item: SampledImage) -> str:
    return f"{item.prompt_index:03d}-{slug(item.prompt)}-{item.index:02d}.png"
