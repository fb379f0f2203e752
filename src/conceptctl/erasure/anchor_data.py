"""Anchor images: drawn once by the original model, cached by content.

The cache key is a hash of everything that determines the latents — the backbone's weights
(content digest), the prompts, the sampler settings and the seed — so a later erasure with the
same anchor reuses them at once, and any change makes new ones. Latents are stored (not PNGs):
they are what training consumes, and skipping the VAE round trip saves time.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from conceptctl.fingerprint import module_digest
from conceptctl.sampling import SampleSettings, sample_latents

CACHE_FORMAT = 1


def backbone_digest(backbone) -> str:
    """Digest of the weights that shape generated images (UNet, text encoder, VAE)."""
    parts = [module_digest(m) for m in (backbone.unet, backbone.text_encoder, backbone.vae)]
    return "sha256:" + hashlib.sha256("|".join(parts).encode()).hexdigest()


def cache_key(digest: str, settings: SampleSettings) -> str:
    fields = asdict(settings)
    if fields.get("prompt_seeds") is None:  # added later: keys of older caches stay valid
        fields.pop("prompt_seeds", None)
    blob = json.dumps({"format": CACHE_FORMAT, "backbone": digest, "settings": fields},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def anchor_latents(
    backbone,
    settings: SampleSettings,
    cache_dir: Path,
    digest: str | None = None,
    on_step: Callable[[int], None] | None = None,
) -> tuple[torch.Tensor, bool, Path]:
    """Latents for every (prompt, image) of ``settings``; (latents, came_from_cache, file).

    ``settings`` must be fully resolved (``for_backbone``) so that defaults are part of the key.
    """
    key = cache_key(digest or backbone_digest(backbone), settings)
    path = cache_dir / "anchors" / f"{key}.safetensors"
    if path.is_file():
        return load_file(path)["latents"], True, path
    latents = sample_latents(backbone, settings, on_step=on_step).float().cpu().contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".anchors-", suffix=".safetensors")
    os.close(fd)
    try:
        save_file({"latents": latents}, tmp, metadata={
            "conceptctl": json.dumps({"settings": asdict(settings)})})
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return latents, False, path
