"""What architecture a local folder or checkpoint holds, read before loading (model_index.json,
a safetensors header), and the defaults that suit each architecture. No torch: resolving a
``--backbone`` must stay instant.

An SDXL model given as a folder or file (not by the name ``sdxl-1.0``) still samples and erases
with SDXL's defaults (:data:`SDXL_DEFAULTS`), and the loader builds the SDXL pipeline class for a
single-file checkpoint, which carries no class name of its own.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

# SDXL's erase recipe over conceptctl's SD one (BackboneSpec.erase_presets; docs/erase.md says
# why). DoCo has no published SDXL recipe: its SD one stays (the UNet rate per image of the batch,
# batch 8, 2000 steps of which 1000 warm-up, the discriminator rates by concept type, anchors
# drawn by DPM-Solver in 25 steps), except the anchors' guidance, 5: the SDXL pipeline's own
# default (and sdxl-1.0's sampling default), as the reference drew SD's anchors near SD's usual
# scale. ESD-x on SDXL follows the authors' esd_sdxl.py (rohitgandikota/erasing): 200
# iterations of batch 1 at Adam rate 2e-4, every cross-attention parameter, negative guidance 1.
_SDXL_ANCHORS = dict(anchor_guidance=5.0)
SDXL_ERASE_PRESETS: dict = {
    "style": _SDXL_ANCHORS,
    "object": _SDXL_ANCHORS,
    "nudity": _SDXL_ANCHORS,
    "methods": {
        "esd-x": dict(steps=200, lr_per_image=2e-4, checkpointing_steps=50),
    },
}

# BackboneSpec fields every SDXL-architecture model gets unless its spec says otherwise.
# Guidance 5: StableDiffusionXLPipeline's default (SD's 7.5 over-saturates SDXL's pictures).
SDXL_DEFAULTS: dict = dict(family="sdxl", sample_guidance=5.0, erase_presets=SDXL_ERASE_PRESETS)

# A key only SDXL base checkpoints have in the original layout: the second text encoder
# (OpenCLIP ViT-bigG), as diffusers' single-file loader recognises SDXL base.
SDXL_FILE_MARKER = "conditioner.embedders.1.model."
# A safetensors header larger than this is not a checkpoint's (SDXL's is about 200 KB).
_MAX_HEADER = 100 * 2**20


def folder_is_sdxl(folder: str | Path) -> bool:
    """Whether a diffusers folder holds an SDXL pipeline: its model_index.json's ``_class_name``
    (``StableDiffusionXL…``), else a ``text_encoder_2`` entry. False when unreadable."""
    try:
        index = json.loads((Path(folder) / "model_index.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(index, dict):
        return False
    return str(index.get("_class_name", "")).startswith("StableDiffusionXL") or bool(
        index.get("text_encoder_2"))


def file_is_sdxl(path: str | Path) -> bool:
    """Whether a ``.safetensors`` checkpoint holds SDXL base weights in the original layout, from
    the key names in its header (no tensor is read). False for a pickle or an unreadable file:
    the loader then reports what is wrong with it."""
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        return False
    try:
        with path.open("rb") as handle:
            (size,) = struct.unpack("<Q", handle.read(8))
            if size > _MAX_HEADER:
                return False
            header = json.loads(handle.read(size))
    except (OSError, ValueError, struct.error):
        return False
    return isinstance(header, dict) and any(
        key.startswith(SDXL_FILE_MARKER) for key in header)


def is_sdxl_source(source: str | Path) -> bool:
    """Whether a local folder or checkpoint holds SDXL (False for hub ids and anything else)."""
    path = Path(source)
    return folder_is_sdxl(path) if path.is_dir() else file_is_sdxl(path)
