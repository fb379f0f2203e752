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

SDXL is named otherwise, because kohya's scripts train it on their own copy of Stability AI's
UNet (``library/sdxl_original_unet.py``), not diffusers': ``lora_unet_`` plus the original
(SGM) module path, e.g. ``lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k`` (the
names of :func:`conceptctl.interop.original_layout.unet_original_modules`), and ``lora_te1_`` /
``lora_te2_`` plus each text encoder's transformers path (``networks/lora.py``:
``LORA_PREFIX_TEXT_ENCODER1`` / ``2``). ComfyUI keys these for SDXL (every original UNet
weight; ``lora_te1_`` / ``lora_te2_`` for CLIP-L's and bigG's layers), A1111 takes
``lora_unet_`` names of SDXL as original ones ("SDXL loras seem to already have correct compvis
keys"), and diffusers' ``load_lora_weights`` maps them back with the UNet's config
(``_maybe_map_sgm_blocks_to_diffusers``).

**Header.** The entries kohya's own extractor (``networks/extract_lora_from_models.py``) writes:
``ss_*`` (``ss_v2`` and ``ss_base_model_version`` decide which checkpoints A1111 lists a file for:
without them every file counts as SD 1 and hides on SD 2), the Stability AI ModelSpec
``modelspec.*`` entries of ``library/sai_model_spec.py``, and the hashes A1111 shows and caches,
computed as ``library/train_util.py`` does. SDXL's are those of kohya's SDXL scripts:
``ss_base_model_version`` ``sdxl_base_v1-0`` (``sdxl_model_util.MODEL_VERSION_SDXL_BASE_V1_0``,
which A1111 reads as SDXL), ``ss_v2`` ``False``, ModelSpec's ``stable-diffusion-xl-v1-base``
architecture with Stability AI's implementation. They are written only for SD 1.x / 2.x- and
SDXL-shaped backbones (CLIP text encoders): for another model they would name a base the UIs
cannot load.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import struct
from collections.abc import Callable

import torch

from conceptctl.backbones.backbone import TEXT_ENCODER_2_PREFIX, TEXT_ENCODER_PREFIX
from conceptctl.errors import ConceptctlError

UNET_PREFIX = "lora_unet_"
TEXT_ENCODER_KEY_PREFIX = "lora_te_"
# SDXL's encoders (kohya's LORA_PREFIX_TEXT_ENCODER1 / 2), by how conceptctl names their tensors.
SDXL_TEXT_ENCODER_KEY_PREFIXES = {TEXT_ENCODER_PREFIX: "lora_te1_",
                                  TEXT_ENCODER_2_PREFIX: "lora_te2_"}
# kohya's library/sdxl_model_util.MODEL_VERSION_SDXL_BASE_V1_0, its ss_base_model_version.
SDXL_BASE_VERSION = "sdxl_base_v1-0"
# library/sai_model_spec.py: the architecture and, for SDXL LoRAs, the implementation.
SDXL_ARCHITECTURE = "stable-diffusion-xl-v1-base"
IMPL_STABILITY_AI = "https://github.com/Stability-AI/generative-models"
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
    """kohya's name for an SD 1.x / 2.x ``module`` (a UNet module path, or a text-encoder one
    under ``TEXT_ENCODER_PREFIX``), e.g. ``lora_unet_down_blocks_0_attentions_0_proj_in``."""
    if module.startswith(TEXT_ENCODER_PREFIX):
        inner = clip_module_name(module.removeprefix(TEXT_ENCODER_PREFIX))
        return TEXT_ENCODER_KEY_PREFIX + inner.replace(".", "_")
    return UNET_PREFIX + _ORIGINAL_NAMES.get(module, module).replace(".", "_")


def module_keys(backbone) -> Callable[[str], str]:
    """kohya's naming of ``backbone``'s modules (names as ``Backbone.named_tensors`` without the
    leaf): :func:`module_key` for SD 1.x / 2.x, SDXL's original-layout names for SDXL (module
    docstring)."""
    if not backbone.is_sdxl:
        return module_key
    from conceptctl.interop.original_layout import unet_original_modules

    try:
        unet = unet_original_modules(backbone.unet)
    except ValueError as err:
        raise ConceptctlError(
            f"kohya's SDXL names come from the original UNet layout, and {err}",
            hint="export it as 'delta' or 'diffusers' instead") from err

    def sdxl_key(module: str) -> str:
        for prefix, key_prefix in SDXL_TEXT_ENCODER_KEY_PREFIXES.items():
            if module.startswith(prefix):
                inner = clip_module_name(module.removeprefix(prefix))
                return key_prefix + inner.replace(".", "_")
        return UNET_PREFIX + unet[module].replace(".", "_")

    return sdxl_key


def _clip_encoders(backbone) -> bool:
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    return all(isinstance(encoder, (CLIPTextModel, CLIPTextModelWithProjection))
               for encoder in backbone.text_encoders)


def sd_version(backbone) -> tuple[bool, bool] | None:
    """``(v2, v_parameterization)`` of an SD 1.x / 2.x- or SDXL-shaped backbone, as kohya's
    scripts describe a base (SDXL is not v2: its scripts write ``ss_v2`` False); None when a
    text encoder is not CLIP (no UI loads such a base)."""
    from conceptctl.interop.original_layout import uses_open_clip

    if not _clip_encoders(backbone):
        return None
    v_parameterization = backbone.prediction_type == "v_prediction"
    if backbone.is_sdxl:
        return False, v_parameterization
    try:
        v2 = uses_open_clip(backbone.text_encoder.config)
    except ValueError:
        return None
    return v2, v_parameterization


def base_model_version(backbone) -> str | None:
    """kohya's ``ss_base_model_version`` of the base: ``sd_v1``, ``sd_v2``, ``sd_v2_v`` (its
    ``model_util.get_model_version_str_for_sd1_sd2``) or ``sdxl_base_v1-0``; None as
    :func:`sd_version`."""
    version = sd_version(backbone)
    if version is None:
        return None
    if backbone.is_sdxl:
        return SDXL_BASE_VERSION
    v2, v_parameterization = version
    return ("sd_v2" if v2 else "sd_v1") + ("_v" if v_parameterization else "")


def base_header(job) -> dict[str, str]:
    """The entries that say which base a file is for (any kohya-named file): empty for a
    backbone the UIs cannot load."""
    base_version = base_model_version(job.backbone)
    if base_version is None:
        return {}
    v2, _ = sd_version(job.backbone)
    return {"ss_v2": str(v2), "ss_base_model_version": base_version,
            "ss_sd_model_name": str(job.info["base"].get("source") or job.info["base"]["name"])}


def lora_header(job, ranks: list[int], alpha: float, conv_ranks: list[int]) -> dict[str, str]:
    """kohya's and ModelSpec's entries for a LoRA whose layers have ``ranks`` (``conv_ranks``:
    those of 3x3 convolutions) and the file-wide ``alpha``; empty for a backbone no UI loads."""
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
    # sai_model_spec.determine_architecture (SD 2 by its prediction type) and
    # determine_implementation (an SDXL LoRA is Stability AI's, an SD one diffusers').
    implementation = "diffusers"
    if job.backbone.is_sdxl:
        architecture, implementation = SDXL_ARCHITECTURE, IMPL_STABILITY_AI
    elif v2:
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
        "modelspec.implementation": implementation,
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

