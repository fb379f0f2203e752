"""The erased model as one original-layout Stable Diffusion checkpoint (Automatic1111, ComfyUI).

The renaming is :mod:`conceptctl.interop.original_layout` (SD 1.x, 2.x and SDXL); this module only
decides whether the backbone has such a layout and turns the converter's refusals into one-line
errors.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from conceptctl.errors import ConceptctlError
from conceptctl.interop.original_layout import write_single_file

_UNSUPPORTED_HINT = ("export it as 'diffusers' (a full pipeline folder) or 'delta' instead; the "
                     "single-file layout exists for SD 1.x / 2.x- and SDXL-shaped models only")


def export_single_file(job, out: Path) -> dict[str, Any]:
    from transformers import CLIPTextModel

    backbone = job.backbone
    text_encoder = backbone.text_encoder
    # The original layout has places for OpenAI CLIP (SD 1) and OpenCLIP (SD 2) only (SDXL: one
    # of each, checked by the converter); another encoder would be renamed as if it were one of
    # them and fail, or worse, half-load.
    if not isinstance(text_encoder, CLIPTextModel):
        raise ConceptctlError(
            f"the single-file format is unsupported for backbone {backbone.spec.name}: its text "
            f"encoder is a {type(text_encoder).__name__}, and the original SD layout only holds "
            "CLIP (SD 1.x) or OpenCLIP (SD 2.x) text encoders", hint=_UNSUPPORTED_HINT)
    try:
        write_single_file(backbone.pipeline, out, job.metadata)  # export stages the file
    except ValueError as err:
        raise ConceptctlError(f"the single-file format is unsupported for backbone "
                              f"{backbone.spec.name}: {err}", hint=_UNSUPPORTED_HINT) from err
    if backbone.is_sdxl:
        encoders = "CLIP + OpenCLIP"  # conditioner.embedders.0 / .1
    else:
        encoders = "OpenCLIP" if text_encoder.config.hidden_act == "gelu" else "CLIP"
    return {"prediction_type": backbone.prediction_type, "text_encoder": encoders}
