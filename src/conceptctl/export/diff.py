"""The exact weight change in the UIs' own naming: ``--format diff``.

For every tensor the erasure changed, ``erased − base`` under the name ComfyUI and Automatic1111
read as a full weight difference (the "full" module of LyCORIS, built into both):
``<module>.diff`` for a module's weight and ``<module>.diff_b`` for its bias, the module named
as kohya names LoRA modules (:mod:`conceptctl.export.kohya`; SDXL's in its original layout,
``lora_unet_input_blocks_…``, ``lora_te1_…``, ``lora_te2_…``). Both UIs add it to the loaded
checkpoint's tensors at the strength the user picks, 1.0 giving the erased model; unlike a LoRA
it is exact and carries biases and norms, so every ``--params`` group exports. The values are
computed in the artifact's precision and written in the export dtype; the header holds the
erasure's record with the hash of exactly the base tensors it changes (as a delta's), the base
entries A1111 reads (``ss_v2``, ``ss_base_model_version``: which checkpoints it lists the file
for) and ``sshs_model_hash``.

Only SD 1.x / 2.x- and SDXL-shaped models are written (the UIs load nothing else), and of the
text encoders only the attention and MLP weights of their layers, the modules both UIs have a
place for (what ``--params text-encoder`` trains). On OpenCLIP encoders (SD 2.x's, SDXL's
second), A1111 applies a layer's q/k/v/out change only when all four are in the file (it fuses
them into one projection), so a layer's unchanged ones are written as zeros.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from conceptctl.backbones.backbone import is_text_encoder_tensor
from conceptctl.erasure.artifact import base_record
from conceptctl.errors import ConceptctlError
from conceptctl.export import kohya
from conceptctl.export.delta import delta_tensors
from conceptctl.export.metadata import header

_HINT = ("export it as 'delta', 'diffusers' or 'single-file' instead; the diff format holds "
         "what Automatic1111 and ComfyUI can add to an SD 1.x / 2.x or SDXL checkpoint")
_SUFFIX = {"weight": "diff", "bias": "diff_b"}
_ATTENTION = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj")


def diff_key(name: str, module_key=kohya.module_key) -> str:
    """The file's key for tensor ``name`` (named as ``Backbone.named_tensors``), its module named
    by ``module_key`` (SD 1.x / 2.x's by default, :func:`kohya.module_keys` for a backbone's)."""
    module, _, leaf = name.rpartition(".")
    return f"{module_key(module)}.{_SUFFIX[leaf]}"


def _check(job, names: list[str]) -> None:
    from conceptctl.interop.original_layout import unet_original_names

    backbone = job.backbone
    if kohya.sd_version(backbone) is None:
        raise ConceptctlError(
            f"the diff format is unsupported for backbone {backbone.spec.name}: its text encoder "
            f"is a {type(backbone.text_encoder).__name__}, and Automatic1111 and ComfyUI load "
            "SD 1.x / 2.x and SDXL models with CLIP text encoders only", hint=_HINT)
    try:
        unet_original_names(backbone.unet)
    except ValueError as err:
        raise ConceptctlError(f"the diff format is unsupported for backbone "
                              f"{backbone.spec.name}: {err}", hint=_HINT) from err
    for name in names:
        module, _, leaf = name.rpartition(".")
        placed = leaf in _SUFFIX
        if is_text_encoder_tensor(name):
            placed = leaf == "weight" and _layer_module(module) in kohya.CLIP_LAYER_MODULES
        if not placed:
            raise ConceptctlError(
                f"the change of {name} has no place in Automatic1111's or ComfyUI's diff "
                "loaders (of the text encoder they take the attention and MLP weights of its "
                "layers only)", hint=_HINT)


def _layer_module(module: str) -> str:
    """``self_attn.q_proj`` for ``text_encoder.text_model.encoder.layers.3.self_attn.q_proj``;
    '' for a module outside the encoder's layers."""
    _, found, tail = module.partition("encoder.layers.")
    return tail.partition(".")[2] if found else ""


def _attention_siblings(job, diffs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Zero differences for the q/k/v/out weights of every text-encoder layer the file changes
    some of (module docstring)."""
    params = job.backbone.named_tensors()
    zeros = {}
    for name in diffs:
        module = name.removesuffix(".weight")
        if is_text_encoder_tensor(name) and _layer_module(module) in _ATTENTION:
            layer = module.rpartition(".self_attn.")[0]
            for sibling in _ATTENTION:
                other = f"{layer}.{sibling}.weight"
                if other not in diffs:
                    zeros[other] = torch.zeros_like(params[other], dtype=job.dtype)
    return zeros


def export_diff(job, out: Path) -> dict[str, Any]:
    diffs = delta_tensors(job)  # refuses an artifact that changes nothing
    names = sorted(diffs)
    _check(job, names)
    zeros = _attention_siblings(job, diffs)
    module_key = kohya.module_keys(job.backbone)
    tensors = {diff_key(name, module_key): value for name, value in {**diffs, **zeros}.items()}
    # As for a delta, the record names exactly the base tensors the file changes.
    base = {**job.info["base"], **base_record({name: job.base[name] for name in names}),
            "tensors": names}
    metadata = kohya.base_header(job)
    metadata["sshs_model_hash"] = kohya.data_sha256(tensors)
    save_file(tensors, str(out), metadata={**metadata, **header({**job.info, "base": base})})
    # What a UI gets back at strength 1: base + difference in the base's precision.
    worst = max(float(((job.base[n] + diffs[n].to(job.base[n].dtype)) - job.erased[n])
                      .abs().max()) for n in names)
    return {"tensors": len(names), "zero_filled": len(zeros),
            "skipped_unchanged": len(job.erased) - len(names),
            "parameters": sum(d.numel() for d in diffs.values()),
            "max_reapply_error": worst}
