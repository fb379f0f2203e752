"""Anchor images: drawn once by the original model, cached by content.

The cache key is a hash of everything that determines the latents — the backbone's weights
(content digest), the prompts, the sampler and its settings, the seeds — so a later erasure
with the same anchor reuses them at once, and any change makes new ones. Latents are stored (not
PNGs): they are what training consumes, and skipping the VAE round trip saves time.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from conceptctl.fileio import staged_file
from conceptctl.fingerprint import module_digest
from conceptctl.sampling import SampleSettings, sample_latents

CACHE_FORMAT = 1


def backbone_digest(backbone) -> str:
    """Digest of the weights that shape generated images (UNet, text encoder, VAE; SDXL's second
    text encoder after them, so SD digests, and their caches, stay what they were)."""
    modules = (backbone.unet, backbone.text_encoder, backbone.vae, *backbone.text_encoders[1:])
    parts = [module_digest(m) for m in modules]
    return "sha256:" + hashlib.sha256("|".join(parts).encode()).hexdigest()


def cache_key(digest: str, settings: SampleSettings) -> str:
    fields = asdict(settings)
    # Fields added later are left out while unset, so keys of older caches stay valid.
    for name in ("prompt_seeds", "sampler", "prompt_guidances"):
        if fields.get(name) is None:
            fields.pop(name, None)
    blob = json.dumps({"format": CACHE_FORMAT, "backbone": digest, "settings": fields},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


class AnchorCacheWarning(UserWarning):
    """The anchor cache could not be read or written; the run went on without it."""


def anchor_latents(
    backbone,
    settings: SampleSettings,
    cache_dir: Path,
    digest: str | None = None,
    on_step: Callable[[int], None] | None = None,
    dist=None,
) -> tuple[torch.Tensor, bool, Path]:
    """Latents for every (prompt, image) of ``settings``; (latents, came_from_cache, file).

    ``settings`` must be fully resolved (``for_backbone``) so that defaults are part of the key.
    With several processes (``dist``), the main process's cache decides: a cached set is sent to
    the others, a new one is drawn by all of them, each its contiguous share of the images, and
    gathered; only the main process writes the cache.
    """
    from conceptctl.erasure.distributed import SingleProcess

    dist = dist or SingleProcess()
    path = None
    if dist.is_main:
        key = cache_key(digest or backbone_digest(backbone), settings)
        path = cache_dir / "anchors" / f"{key}.safetensors"
    path = dist.broadcast_object(path)
    latents = _read_cache(path, settings) if dist.is_main and path.is_file() else None
    cached = dist.broadcast_object(latents is not None)
    if cached:
        if dist.world > 1:
            shape = dist.broadcast_object(None if latents is None else tuple(latents.shape))
            latents = latents if latents is not None else torch.empty(shape)
            dist.broadcast_([latents])
        return latents, True, path
    total = len(settings.prompts) * settings.images_per_prompt
    rows = dist.shard(total)
    if rows.stop > rows.start:
        mine = sample_latents(backbone, settings, on_step=on_step, rows=rows)
    else:  # more processes than images
        side = settings.resolution // backbone.vae_scale_factor
        mine = torch.empty((0, backbone.latent_channels, side, side))
    latents = dist.gather(mine.float(), dist.shares(total)).cpu().contiguous()
    if dist.is_main:
        try:
            _write(path, latents, settings)
        except OSError as err:  # a full or read-only cache disk: the run itself can go on
            warnings.warn(f"could not cache the anchor images in {path} ({err.strerror}); "
                          "the run goes on without the cache", AnchorCacheWarning, stacklevel=2)
    return latents, False, path


def _read_cache(path: Path, settings: SampleSettings) -> torch.Tensor | None:
    """The cached latents, or None (with a warning) if the file is damaged: drawn again then."""
    expected = len(settings.prompts) * settings.images_per_prompt
    try:
        latents = load_file(path)["latents"]
    except (SafetensorError, OSError, KeyError) as err:
        problem = f"unreadable ({err})"
    else:
        if latents.dim() == 4 and len(latents) == expected and torch.isfinite(latents).all():
            return latents
        problem = f"holds {tuple(latents.shape)} latents, not {expected} finite ones"
    warnings.warn(f"the anchor cache file {path} is {problem}; drawing the images again",
                  AnchorCacheWarning, stacklevel=3)
    return None


def _write(path: Path, latents: torch.Tensor, settings: SampleSettings) -> None:
    with staged_file(path) as tmp:  # another run may have cached it meanwhile
        save_file({"latents": latents}, str(tmp), metadata={
            "conceptctl": json.dumps({"settings": asdict(settings)})})
