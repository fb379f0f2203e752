"""Diffusers Stable Diffusion weights -> the original single-file checkpoint layout.

The original layout is the one CompVis/LDM trained with and that Automatic1111 and ComfyUI load:
one file holding ``model.diffusion_model.*`` (UNet), ``first_stage_model.*`` (VAE) and
``cond_stage_model.*`` (text encoder). diffusers only ships the opposite direction, so every name
written here is the inverse of what ``diffusers/loaders/single_file_utils.py`` reads
(``convert_ldm_unet_checkpoint``, ``convert_ldm_vae_checkpoint``, ``convert_ldm_clip_checkpoint``,
``convert_open_clip_checkpoint``); ``StableDiffusionPipeline.from_single_file(path, config=...)``
therefore loads the file back exactly.

SDXL's layout (Stability AI's generative-models, "SGM") is the same for the UNet and the VAE, with
the added embedding of the pooled text and size numbers as ``label_emb.0.0`` / ``label_emb.0.2``,
and holds its two text encoders under ``conditioner.embedders``: ``0.transformer.text_model.*``
the OpenAI CLIP ViT-L in transformers' names, ``1.model.*`` the OpenCLIP ViT-bigG in OpenCLIP's
(fused ``in_proj``, ``ln_final``, and ``text_projection`` as the matrix OpenCLIP multiplies from
the right, the transpose of transformers' Linear weight).

Each part is renamed through a table of module paths built from the model's config, so any number
of blocks and layers per block works, and a weight the table has no name for raises ``ValueError``
rather than being dropped from the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer.text_model."
OPEN_CLIP_PREFIX = "cond_stage_model.model."
# SDXL's two text encoders (diffusers' single-file reader finds SDXL base by the second).
SDXL_CLIP_PREFIX = "conditioner.embedders.0.transformer.text_model."
SDXL_OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."

# OpenCLIP drops this block's weights on load (SD_2_TEXT_ENCODER_KEYS_TO_IGNORE in
# single_file_utils.py): SD 2 conditions on the penultimate of 24 blocks, so diffusers' SD 2 text
# encoder has 23 layers and a 24th would silently stay unloaded.
MAX_OPEN_CLIP_LAYERS = 23

_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
_VAE_RESNET = {
    "norm1": "norm1",
    "conv1": "conv1",
    "norm2": "norm2",
    "conv2": "conv2",
    "conv_shortcut": "nin_shortcut",
}
_VAE_ATTENTION = {
    "group_norm": "norm",
    "to_q": "q",
    "to_k": "k",
    "to_v": "v",
    "to_out.0": "proj_out",
}
_OPEN_CLIP_LAYER = {
    "self_attn": "attn",
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}
_UNET_DOWN_TYPES = {"CrossAttnDownBlock2D", "DownBlock2D"}
_UNET_UP_TYPES = {"CrossAttnUpBlock2D", "UpBlock2D"}
_UNET_MID_TYPE = "UNetMidBlock2DCrossAttn"


def diffusers_to_original(unet, vae, text_encoder, text_encoder_2=None) -> dict[str, torch.Tensor]:
    """Return the models' weights under their original single-file names.

    ``unet`` is a ``UNet2DConditionModel``, ``vae`` an ``AutoencoderKL`` and ``text_encoder`` a
    ``CLIPTextModel``, each with the SD architecture; for SDXL, ``text_encoder_2`` is the second
    encoder (a ``CLIPTextModelWithProjection``) and the UNet has SDXL's added embedding. Anything
    else raises ``ValueError``.
    """
    sdxl = getattr(unet.config, "addition_embed_type", None) == "text_time"
    if sdxl != (text_encoder_2 is not None):
        # Each layout has one place for the text encoders: a checkpoint mixing SDXL's UNet with
        # SD's single encoder (or the reverse) would load as neither.
        raise ValueError("the original layouts pair SDXL's UNet (pooled text and size "
                         "embedding) with exactly two text encoders, and SD's with one; got a "
                         f"{'SDXL' if sdxl else 'SD'} UNet with "
                         f"{'two text encoders' if text_encoder_2 is not None else 'one'}")
    encoders = (_sdxl_text_encoder_weights(text_encoder, text_encoder_2) if sdxl
                else _text_encoder_weights(text_encoder))
    return {
        **_with_prefix(UNET_PREFIX, _unet_weights(unet)),
        **_with_prefix(VAE_PREFIX, _vae_weights(vae)),
        **encoders,
    }


def save_single_file(pipeline, path, metadata: dict[str, str] | None = None) -> Path:
    """Write ``pipeline``'s UNet, VAE and text encoder to ``path`` as one original-layout file.

    The file appears complete or not at all: it is written next to ``path`` and moved into place
    (:func:`conceptctl.fileio.staged_file`, which also gives it the permissions any new file
    gets: safetensors >= 0.8 creates it private, and a checkpoint is meant for other users' UIs),
    so a crash never leaves a truncated checkpoint under the final name. ``metadata`` goes into
    the safetensors header.
    """
    from conceptctl.fileio import staged_file

    path = Path(path)
    with staged_file(path) as tmp:
        write_single_file(pipeline, tmp, metadata)
    return path


def write_single_file(pipeline, path, metadata: dict[str, str] | None = None) -> None:
    """:func:`save_single_file` straight to ``path``, for a caller that stages the file itself
    (``conceptctl export``)."""
    weights = diffusers_to_original(pipeline.unet, pipeline.vae, pipeline.text_encoder,
                                    getattr(pipeline, "text_encoder_2", None))
    # safetensors refuses non-contiguous tensors, e.g. parameters replaced by a transposed edit.
    weights = {key: tensor.contiguous() for key, tensor in weights.items()}
    save_file(weights, str(path), metadata=metadata)


def unet_original_names(unet) -> dict[str, str]:
    """Each UNet tensor's original-layout name (without ``model.diffusion_model.``), by its
    diffusers name; ``ValueError`` when the layout has no place for one."""
    renamed = _rename({key: key for key in unet.state_dict()}, _unet_table(unet.config), "UNet")
    return {key: original for original, key in renamed.items()}


def unet_original_modules(unet) -> dict[str, str]:
    """Each UNet module's original-layout path (without ``model.diffusion_model.``), by its
    diffusers path, for every module that holds tensors: what kohya's scripts name SDXL's LoRA
    modules by. ``ValueError`` as :func:`unet_original_names`."""
    modules = {}
    for key, original in unet_original_names(unet).items():
        module, _, leaf = key.rpartition(".")
        # The table maps module paths, so a tensor keeps its leaf name.
        modules[module] = original.removesuffix("." + leaf)
    return modules


def _unet_weights(unet) -> dict[str, torch.Tensor]:
    return _rename(unet.state_dict(), _unet_table(unet.config), "UNet")


def _unet_table(config: Any) -> dict[str, str]:
    """Map diffusers UNet module paths to LDM ones, mirroring ``convert_ldm_unet_checkpoint``."""
    _check_unet(config)
    per_block = config.layers_per_block
    table = {
        "time_embedding.linear_1": "time_embed.0",
        "time_embedding.linear_2": "time_embed.2",
        "conv_in": "input_blocks.0.0",
        "conv_norm_out": "out.0",
        "conv_out": "out.2",
    }
    # input_blocks.0 is conv_in; then each down block takes one slot per layer plus one for its
    # downsampler (the last block has none, so its slot is simply never used).
    for block in range(len(config.down_block_types)):
        first = 1 + block * (per_block + 1)
        for layer in range(per_block):
            src, dst = f"down_blocks.{block}", f"input_blocks.{first + layer}"
            _add_resnet(table, f"{src}.resnets.{layer}", f"{dst}.0")
            table[f"{src}.attentions.{layer}"] = f"{dst}.1"
        table[f"down_blocks.{block}.downsamplers.0.conv"] = f"input_blocks.{first + per_block}.0.op"
    # The mid block is resnet, attention, resnet in one sequence.
    _add_resnet(table, "mid_block.resnets.0", "middle_block.0")
    table["mid_block.attentions.0"] = "middle_block.1"
    _add_resnet(table, "mid_block.resnets.1", "middle_block.2")
    # Up blocks have one layer more than down blocks; the upsampler follows the last layer's
    # resnet, after its attention when the block has one.
    for block, block_type in enumerate(config.up_block_types):
        first = block * (per_block + 1)
        for layer in range(per_block + 1):
            src, dst = f"up_blocks.{block}", f"output_blocks.{first + layer}"
            _add_resnet(table, f"{src}.resnets.{layer}", f"{dst}.0")
            table[f"{src}.attentions.{layer}"] = f"{dst}.1"
        slot = 2 if block_type.startswith("CrossAttn") else 1
        last = first + per_block
        table[f"up_blocks.{block}.upsamplers.0.conv"] = f"output_blocks.{last}.{slot}.conv"
    if getattr(config, "addition_embed_type", None) == "text_time":
        # SDXL: the pooled text + size numbers' MLP (SGM's label_emb, a Sequential in a
        # Sequential); any other added embedding has no original name and is reported.
        table["add_embedding.linear_1"] = "label_emb.0.0"
        table["add_embedding.linear_2"] = "label_emb.0.2"
    return table


def _check_unet(config: Any) -> None:
    """Reject UNets that the LDM layout (and diffusers' reader of it) cannot describe."""
    unsupported = [
        *(t for t in config.down_block_types if t not in _UNET_DOWN_TYPES),
        *(t for t in config.up_block_types if t not in _UNET_UP_TYPES),
        *([config.mid_block_type] if config.mid_block_type != _UNET_MID_TYPE else []),
    ]
    if unsupported:
        raise ValueError(f"the original SD layout has no blocks of type {sorted(set(unsupported))}")
    # The reader derives every block index from a single layers_per_block.
    if not isinstance(config.layers_per_block, int):
        raise ValueError(
            "the original SD layout needs one layers_per_block for all UNet blocks, "
            f"not {config.layers_per_block!r}"
        )


def _vae_weights(vae) -> dict[str, torch.Tensor]:
    weights = _rename(vae.state_dict(), _vae_table(vae.config), "VAE")
    # LDM's VAE attention projects with 1x1 convs where diffusers uses linear layers.
    for key, tensor in weights.items():
        if ".mid.attn_1." in key and key.endswith(".weight") and tensor.ndim == 2:
            weights[key] = tensor[:, :, None, None]
    return weights


def _vae_table(config: Any) -> dict[str, str]:
    """Map diffusers VAE module paths to LDM ones, mirroring ``convert_ldm_vae_checkpoint``."""
    _check_vae(config)
    per_block = config.layers_per_block
    blocks = len(config.down_block_types)
    table = {
        "quant_conv": "quant_conv",
        "post_quant_conv": "post_quant_conv",
    }
    for part in ("encoder", "decoder"):
        table.update(
            {
                f"{part}.conv_in": f"{part}.conv_in",
                f"{part}.conv_out": f"{part}.conv_out",
                f"{part}.conv_norm_out": f"{part}.norm_out",
            }
        )
        for index in range(2):
            src, dst = f"{part}.mid_block.resnets.{index}", f"{part}.mid.block_{index + 1}"
            _add_resnet(table, src, dst, _VAE_RESNET)
        for name, original in _VAE_ATTENTION.items():
            table[f"{part}.mid_block.attentions.0.{name}"] = f"{part}.mid.attn_1.{original}"
    for block in range(blocks):
        src, dst = f"encoder.down_blocks.{block}", f"encoder.down.{block}"
        for layer in range(per_block):
            _add_resnet(table, f"{src}.resnets.{layer}", f"{dst}.block.{layer}", _VAE_RESNET)
        table[f"{src}.downsamplers.0.conv"] = f"{dst}.downsample.conv"
    # The LDM decoder numbers its up blocks from the lowest resolution, diffusers from the highest.
    for block in range(blocks):
        src, dst = f"decoder.up_blocks.{block}", f"decoder.up.{blocks - 1 - block}"
        for layer in range(per_block + 1):
            _add_resnet(table, f"{src}.resnets.{layer}", f"{dst}.block.{layer}", _VAE_RESNET)
        table[f"{src}.upsamplers.0.conv"] = f"{dst}.upsample.conv"
    return table


def _check_vae(config: Any) -> None:
    down_types, up_types = tuple(config.down_block_types), tuple(config.up_block_types)
    if set(down_types) != {"DownEncoderBlock2D"} or set(up_types) != {"UpDecoderBlock2D"}:
        raise ValueError(
            f"the original SD layout has no VAE with blocks {down_types} / {up_types}; "
            "it needs DownEncoderBlock2D / UpDecoderBlock2D only"
        )
    if len(down_types) != len(up_types):
        raise ValueError("the original SD layout needs as many VAE up blocks as down blocks")


def _unprefixed(text_encoder) -> dict[str, torch.Tensor]:
    # transformers >= 5.6 flattened CLIPTextModel and dropped the "text_model." prefix (its
    # CLIPTextModelWithProjection keeps it); both the original layouts and diffusers' reader
    # expect it, so normalise to the unprefixed form.
    return {k.removeprefix("text_model."): v for k, v in text_encoder.state_dict().items()}


def _text_encoder_weights(text_encoder) -> dict[str, torch.Tensor]:
    weights = _unprefixed(text_encoder)
    if uses_open_clip(text_encoder.config):
        return _with_prefix(OPEN_CLIP_PREFIX, _open_clip_weights(
            weights, text_encoder.config, MAX_OPEN_CLIP_LAYERS))
    return _with_prefix(CLIP_PREFIX, weights)


def _sdxl_text_encoder_weights(first, second) -> dict[str, torch.Tensor]:
    """SDXL's ``conditioner.embedders``: OpenAI CLIP ViT-L as it is, OpenCLIP ViT-bigG renamed."""
    # The layout fixes which architecture each slot holds (A1111 and ComfyUI build CLIP-L for
    # the first, OpenCLIP for the second), so the activations must be those.
    if uses_open_clip(first.config) or not uses_open_clip(second.config):
        raise ValueError(
            "SDXL's original layout holds an OpenAI CLIP text encoder (quick_gelu) first and an "
            f"OpenCLIP one (gelu) second, not {first.config.hidden_act} and "
            f"{second.config.hidden_act}")
    weights = _unprefixed(second)
    projection = weights.pop("text_projection.weight", None)
    if projection is None:
        raise ValueError("SDXL's second text encoder has no text_projection (the pooled "
                         "embedding's projection); the original layout needs it")
    # All of bigG's 32 blocks are kept: SDXL reads the penultimate block's states and the last
    # block's pooled output, and diffusers' reader drops a block only under SD 2's prefix.
    open_clip = _open_clip_weights(weights, second.config, max_layers=None)
    # OpenCLIP computes pooled @ text_projection: the transpose of the Linear weight.
    open_clip["text_projection"] = projection.T.contiguous()
    return {**_with_prefix(SDXL_CLIP_PREFIX, _unprefixed(first)),
            **_with_prefix(SDXL_OPEN_CLIP_PREFIX, open_clip)}


def uses_open_clip(config: Any) -> bool:
    """Whether the text encoder is SD 2's OpenCLIP (True) or SD 1's OpenAI CLIP (False).

    diffusers stores both as a ``CLIPTextModel``; the only architectural difference is the MLP
    activation, exact GELU for OpenCLIP and quick-GELU for OpenAI CLIP. The UNet's
    use_linear_projection or cross_attention_dim == 1024 usually agree, but they describe the UNet,
    not the text encoder (small or custom models break the 1024 rule), whereas the layout chosen
    here tells A1111/ComfyUI which text-encoder architecture to build. So the activation decides.
    """
    if config.hidden_act not in ("gelu", "quick_gelu"):
        raise ValueError(
            f"text encoder activation {config.hidden_act!r} matches neither SD 1's CLIP "
            "(quick_gelu) nor SD 2's OpenCLIP (gelu)"
        )
    return config.hidden_act == "gelu"


def _open_clip_weights(weights: dict[str, torch.Tensor], config: Any,
                       max_layers: int | None) -> dict[str, torch.Tensor]:
    """Rename a CLIPTextModel's weights to OpenCLIP's, fusing q/k/v into ``in_proj_*``.

    ``text_projection`` is not handled here: SD 2's CLIPTextModel has none, and diffusers'
    reader ignores it under SD 2's prefix anyway (SD_2_TEXT_ENCODER_KEYS_TO_IGNORE); without it
    the reader splits ``in_proj`` at hidden_size, which is right. SDXL's caller adds its own.
    ``max_layers``: the most blocks the reader keeps under this prefix (None: all).
    """
    layers = config.num_hidden_layers
    if max_layers is not None and layers > max_layers:
        raise ValueError(
            f"an OpenCLIP text encoder with {layers} layers cannot round-trip: diffusers drops "
            f"block {max_layers} on load (SD 2 keeps {max_layers} layers)"
        )
    weights = dict(weights)
    table = {
        "embeddings.token_embedding": "token_embedding",
        "embeddings.position_embedding.weight": "positional_embedding",
        "final_layer_norm": "ln_final",
    }
    for layer in range(layers):
        src = f"encoder.layers.{layer}"
        for kind in ("weight", "bias"):
            parts = [weights.pop(f"{src}.self_attn.{p}_proj.{kind}") for p in "qkv"]
            weights[f"{src}.self_attn.in_proj_{kind}"] = torch.cat(parts)
        for name, original in _OPEN_CLIP_LAYER.items():
            table[f"{src}.{name}"] = f"transformer.resblocks.{layer}.{original}"
    return _rename(weights, table, "text encoder")


def _add_resnet(
    table: dict[str, str], src: str, dst: str, parts: dict[str, str] = _UNET_RESNET
) -> None:
    # Only the resnet's known children get entries, so an unexpected one stays unmapped and is
    # reported instead of being copied under a name no reader understands.
    for name, original in parts.items():
        table[f"{src}.{name}"] = f"{dst}.{original}"


def _rename(
    weights: dict[str, torch.Tensor], table: dict[str, str], what: str
) -> dict[str, torch.Tensor]:
    """Rename each key by the longest module path in ``table`` it starts with."""
    renamed, unmapped = {}, []
    for key, tensor in weights.items():
        new_key = _lookup(key, table)
        if new_key is None:
            unmapped.append(key)
        else:
            renamed[new_key] = tensor
    if unmapped:
        raise ValueError(
            f"the original SD layout has no place for these {what} weights "
            f"({len(unmapped)} in all): {', '.join(unmapped[:5])}"
        )
    return renamed


def _lookup(key: str, table: dict[str, str]) -> str | None:
    parts = key.split(".")
    for end in range(len(parts), 0, -1):
        head = ".".join(parts[:end])
        if head in table:
            return ".".join([table[head], *parts[end:]])
    return None


def _with_prefix(prefix: str, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {prefix + key: tensor for key, tensor in weights.items()}
