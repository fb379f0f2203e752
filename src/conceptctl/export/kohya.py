"""The names and header entries kohya's sd-scripts write, which Automatic1111 and ComfyUI read.

**Names.** kohya's scripts name a module's adapter ``lora_unet_`` plus the diffusers UNet module
path with dots as underscores, and ``lora_te_`` plus transformers 4's ``CLIPTextModel`` path
(``text_model.`` included) for the text encoder. ComfyUI keys exactly these names to its own
weights (``comfy/lora.py``: ``model_lora_keys_unet`` from every diffusers UNet weight,
``model_lora_keys_clip`` for the attention and MLP projections of each text-encoder layer);
Automatic1111 rewrites them into its original-layout module names
(``convert_diffusers_name_to_compvis``, ``extensions-builtin/Lora/networks.py``). One module
needs another name: A1111 has no rule for the UNet's ``conv_norm_out``, so it is written under
its original-layout name ``lora_unet_out_0``, which both UIs accept too (A1111 retries every
unmatched ``lora_unet_`` name as ``diffusion_model_``, ComfyUI keys every original UNet weight
that way). tests/test_export_interop.py runs transcriptions of these loaders on our files.

**Header.** The entries kohya's own extractor (``networks/extract_lora_from_models.py``) writes:
``ss_*`` (``ss_v2`` and ``ss_base_model_version`` decide which checkpoints A1111 lists a file for:
without them every file counts as SD 1 and hides on SD 2), the Stability AI ModelSpec
``modelspec.*`` entries of ``library/sai_model_spec.py``, and the hashes A1111 shows and caches,
computed as ``library/train_util.py`` does. They are written only for SD 1.x / 2.x-shaped
backbones (a CLIP text encoder): for another model they would name a base the UIs cannot load.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import struct

import torch

from conceptctl.backbones.backbone import TEXT_ENCODER_PREFIX

UNET_PREFIX = "lora_unet_"
TEXT_ENCODER_KEY_PREFIX = "lora_te_"
# The diffusers name A1111 cannot map, and its original-layout name (module docstring).
_ORIGINAL_NAMES = {"conv_norm_out": "out.0"}
# What ComfyUI keys for a text-encoder layer (LORA_CLIP_MAP in comfy/lora.py): other text-encoder
# modules have a kohya name but no place in either UI.
CLIP_LAYER_MODULES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                      "self_attn.out_proj", "mlp.fc1", "mlp.fc2")
MODELSPEC_VERSION = "1.0.1"  # what library/sai_model_spec.py writes today
_LEGACY_WINDOW = (0x100000, 0x110000)  # the bytes train_util's addnet_hash_legacy reads


def clip_module_name(module: str) -> str:
    """A CLIP text-encoder module's name as transformers 4 gave it: transformers >= 5.6 dropped
    the ``text_model.`` level, the LoRA files in the wild (and the UIs' key maps) have it."""
    return module if module.startswith("text_model.") else "text_model." + module


def module_key(module: str) -> str:
    """kohya's name for ``module`` (a UNet module path, or a text-encoder one under
    ``TEXT_ENCODER_PREFIX``), e.g. ``lora_unet_down_blocks_0_attentions_0_proj_in``."""
    if module.startswith(TEXT_ENCODER_PREFIX):
        inner = clip_module_name(module.removeprefix(TEXT_ENCODER_PREFIX))
        return TEXT_ENCODER_KEY_PREFIX + inner.replace(".", "_")
    return UNET_PREFIX + _ORIGINAL_NAMES.get(module, module).replace(".", "_")


def sd_version(backbone) -> tuple[bool, bool] | None:
    """``(v2, v_parameterization)`` of an SD 1.x / 2.x-shaped backbone, as kohya's scripts
    describe a base; None when its text encoder is not CLIP (no UI loads such a base)."""
    from transformers import CLIPTextModel

    from conceptctl.interop.original_layout import uses_open_clip

    encoder = backbone.text_encoder
    if not isinstance(encoder, CLIPTextModel):
        return None
    try:
        v2 = uses_open_clip(encoder.config)
    except ValueError:
        return None
    return v2, backbone.prediction_type == "v_prediction"


def base_header(job) -> dict[str, str]:
    """The entries that say which base a file is for (any kohya-named file): empty for a
    backbone the UIs cannot load."""
    version = sd_version(job.backbone)
    if version is None:
        return {}
    v2, v_parameterization = version
    # library/model_util.get_model_version_str_for_sd1_sd2
    base_version = ("sd_v2" if v2 else "sd_v1") + ("_v" if v_parameterization else "")
    return {"ss_v2": str(v2), "ss_base_model_version": base_version,
            "ss_sd_model_name": str(job.info["base"].get("source") or job.info["base"]["name"])}


def lora_header(job, ranks: list[int], alpha: float, conv_ranks: list[int]) -> dict[str, str]:
    """kohya's and ModelSpec's entries for a LoRA whose layers have ``ranks`` (``conv_ranks``:
    those of 3x3 convolutions) and the file-wide ``alpha``; empty for a non-SD backbone."""
    header = base_header(job)
    if not header:
        return {}
    v2, v_parameterization = sd_version(job.backbone)
    args = {}
    if conv_ranks:  # kohya's LoCon arguments: its own scripts apply 3x3 conv adapters only then
        args = {"conv_dim": _dim(conv_ranks), "conv_alpha": str(float(alpha))}
    header |= {
        "ss_network_module": "networks.lora",
        # kohya writes "Dynamic" where layers have different ranks (networks/merge_lora.py);
        # the alpha is one value for the whole file (conceptctl.export.lora).
        "ss_network_dim": _dim(ranks),
        "ss_network_alpha": str(float(alpha)),
        "ss_network_args": json.dumps(args),
    }
    if v2:  # sai_model_spec.determine_architecture: SD 2 by its prediction type
        architecture = "stable-diffusion-v2-768-v" if v_parameterization \
            else "stable-diffusion-v2-512"
    else:
        architecture = "stable-diffusion-v1"
    from conceptctl import __version__

    resolution = job.backbone.resolution
    concepts = ", ".join(c["concept"] for c in job.info.get("concepts") or []) \
        or str(job.info.get("concept"))
    return header | {
        "modelspec.sai_model_spec": MODELSPEC_VERSION,
        "modelspec.architecture": architecture + "/lora",
        "modelspec.implementation": "diffusers",  # kohya's value for SD 1.x / 2.x LoRAs
        "modelspec.title": f"{concepts} erased",
        "modelspec.description": f"Erases {concepts} from {header['ss_sd_model_name']} "
                                 f"({job.info.get('method')}); made with conceptctl.",
        "modelspec.date": datetime.datetime.now().replace(microsecond=0).isoformat(),
        "modelspec.resolution": f"{resolution}x{resolution}",
        "modelspec.prediction_type": "v" if v_parameterization else "epsilon",
        "modelspec.implementation_version": f"conceptctl/{__version__}",
    }


def _dim(ranks: list[int]) -> str:
    return str(ranks[0]) if len(set(ranks)) == 1 else "Dynamic"


def with_hashes(tensors: dict[str, torch.Tensor], header: dict[str, str]) -> dict[str, str]:
    """``header`` plus ``sshs_model_hash`` and ``sshs_legacy_hash`` as kohya's
    ``precalculate_safetensors_hashes`` computes them: the file serialised with its ``ss_``
    entries only, then sha256 of everything after the safetensors header (what A1111 shows as
    the file's hash and otherwise computes itself) and the 8-hex-digit hash of bytes 1 MiB to
    1 MiB + 64 KiB (the old additional-networks extension's). Serialises in memory: for LoRA
    files, which are small; see :func:`data_sha256` for large ones."""
    from safetensors.torch import save

    if not header:  # not an SD base: no kohya entries to go with
        return header
    blob = save(tensors, {k: v for k, v in header.items() if k.startswith("ss_")})
    (length,) = struct.unpack_from("<Q", blob)
    start, end = _LEGACY_WINDOW
    return header | {"sshs_model_hash": hashlib.sha256(blob[8 + length:]).hexdigest(),
                     "sshs_legacy_hash": hashlib.sha256(blob[start:end]).hexdigest()[:8]}


def data_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 of the tensor data of ``save_file(tensors)`` (all after the header: the
    ``sshs_model_hash``), tensor by tensor, without serialising the file in memory. safetensors
    lays out tensors of one dtype by name, so all must share one (raises otherwise)."""
    if len({t.dtype for t in tensors.values()}) > 1:
        raise ValueError("data_sha256 needs tensors of one dtype (safetensors orders mixed "
                         "dtypes by dtype first)")
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(tensors[name].contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()

