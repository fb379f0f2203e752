"""SDXL's extra conditioning, handled in one place: the pooled text embedding and the size/crop
numbers travel inside the one text tensor every other module already passes to the UNet.

SDXL's UNet (``addition_embed_type="text_time"``) is conditioned on more than the token states
of its text encoders (the penultimate hidden states of both CLIP encoders side by side, 2048
wide): its forward also needs ``added_cond_kwargs={"text_embeds": pooled, "time_ids": ids}``,
the second encoder's pooled projection (1280 wide) and six numbers, the picture's original
size, crop corner and target size in pixels (diffusers' ``StableDiffusionXLPipeline
._get_add_time_ids``). Every method, attack, anchor cache and the adversarial trainer call
``backbone.unet(x_t, t, text).sample`` with one ``text`` from ``Backbone.encode_prompts``
(a plugin's method does too, as docs/plugins.md shows). Rather than teach each of them SDXL:

* :func:`pack` appends the pooled embedding to the token states as one extra token row,
  zero-padded to the hidden width, so ``text`` stays one tensor that batches, caches, indexes,
  concatenates (classifier-free guidance) and carries gradients (text-encoder training, soft
  prompts) like SD's;
* :class:`PooledRowUnpacker`, a forward pre-hook on the UNet installed when the backbone is
  wrapped (:func:`install`), takes that row back off whenever a caller gives no
  ``added_cond_kwargs``, and builds ``time_ids`` = (H, W, 0, 0, H, W) from the latent's own
  size times the VAE scale factor: original size = target size = the picture's and crop
  (0, 0), SDXL's defaults (the pipeline's with ``height``/``width`` only). The UNet never sees
  the extra row: cross-attention reads exactly the pipeline's hidden states.

When the pipeline itself calls the UNet (sampling) it passes ``added_cond_kwargs`` and plain
hidden states, and the hook does nothing, so ``conceptctl sample`` is the diffusers pipeline
unchanged. The hook is a small object of two integers rather than a closure over the backbone,
so ``copy.deepcopy`` of the UNet (the frozen copy, conceptctl.erasure.run.frozen_copy) copies
it along with the module's hooks and the copy unpacks the same way; ``torch.compile`` traces
module hooks with the forward, and gradient checkpointing works inside the forward, after the
hook. Latents of any size (the ``rescale`` augmentation, non-square samples) get their own
size's numbers.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from conceptctl.errors import BackboneError

# The size/crop conditioning has six numbers: original (H, W), crop corner (top, left), target
# (H, W).
TIME_IDS = 6


def is_sdxl(pipeline: Any) -> bool:
    """Whether ``pipeline`` is SDXL-shaped: a UNet with the pooled-text-and-size embedding."""
    unet = getattr(pipeline, "unet", None)
    config = getattr(unet, "config", None)
    return getattr(config, "addition_embed_type", None) == "text_time"


def pooled_width(pipeline: Any) -> int:
    """The pooled embedding's width (the second text encoder's projection), checked against
    what the UNet's added embedding takes; raises :class:`BackboneError` for a pipeline that
    cannot feed it (no second encoder, e.g. SDXL's refiner, or mismatched widths)."""
    encoder = getattr(pipeline, "text_encoder_2", None)
    if encoder is None or getattr(pipeline, "text_encoder", None) is None:
        raise BackboneError(
            "this SDXL-shaped pipeline lacks one of SDXL's two text encoders (the refiner has "
            "only the second)", hint="use an SDXL base model (text_encoder and text_encoder_2)")
    width = int(encoder.config.projection_dim)
    expected = int(pipeline.unet.add_embedding.linear_1.in_features)
    per_number = int(pipeline.unet.config.addition_time_embed_dim)
    if width + TIME_IDS * per_number != expected:
        raise BackboneError(
            f"the UNet's added embedding takes {expected} values, but the second text encoder's "
            f"pooled projection ({width}) and {TIME_IDS} size/crop numbers of {per_number} make "
            f"{width + TIME_IDS * per_number}",
            hint="the pipeline's UNet and text_encoder_2 configs do not belong together")
    hidden = int(pipeline.unet.config.cross_attention_dim)
    if width > hidden:  # the pooled row must fit one token row of the hidden states
        raise BackboneError(
            f"the pooled embedding ({width} wide) is wider than the UNet's text width "
            f"({hidden}); conceptctl carries it as one token row of that width",
            hint="SDXL's are 1280 and 2048 wide")
    return width


def pack(hidden: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
    """(B, T, W) token states and (B, P) pooled embeddings (P <= W) -> (B, T + 1, W): the
    pooled embedding as a last token row, zeros after its P values."""
    row = F.pad(pooled.to(hidden.dtype), (0, hidden.shape[-1] - pooled.shape[-1]))
    return torch.cat([hidden, row.unsqueeze(1)], dim=1)


def unpack(text: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`pack` undone: (token states (B, T, W), pooled (B, ``width``)). Contiguous, as the
    pipeline's own tensors are, so the UNet computes exactly what it computes for them."""
    return text[:, :-1].contiguous(), text[:, -1, :width].contiguous()


def time_ids(latents: torch.Tensor, vae_scale_factor: int, dtype: torch.dtype) -> torch.Tensor:
    """SDXL's default size/crop numbers for pictures of the latents' size, one row each:
    (H, W, 0, 0, H, W) in pixels, as the pipeline builds them for ``height``/``width``."""
    height, width = (int(side) * vae_scale_factor for side in latents.shape[-2:])
    row = torch.tensor([[height, width, 0, 0, height, width]], dtype=dtype,
                       device=latents.device)
    return row.repeat(latents.shape[0], 1)


class PooledRowUnpacker:
    """The UNet's forward pre-hook (``with_kwargs=True``): for a call without
    ``added_cond_kwargs``, the text argument is a :func:`pack`-ed tensor; hand the UNet its
    token states, and the pooled row and size numbers as ``added_cond_kwargs``."""

    def __init__(self, pooled_width: int, vae_scale_factor: int) -> None:
        self.pooled_width = pooled_width
        self.vae_scale_factor = vae_scale_factor

    def __call__(self, module, args: tuple, kwargs: dict):
        if kwargs.get("added_cond_kwargs") is not None:
            return None  # the pipeline's own call: everything given explicitly
        args = list(args)
        positional = len(args) > 2
        text = args[2] if positional else kwargs.get("encoder_hidden_states")
        sample = args[0] if args else kwargs.get("sample")
        if text is None or sample is None:
            raise TypeError("the SDXL UNet is called as unet(sample, timestep, text) with text "
                            "from Backbone.encode_prompts (token states + the pooled row)")
        hidden, pooled = unpack(text, self.pooled_width)
        if positional:
            args[2] = hidden
        else:
            kwargs["encoder_hidden_states"] = hidden
        kwargs["added_cond_kwargs"] = {
            "text_embeds": pooled,
            "time_ids": time_ids(sample, self.vae_scale_factor, hidden.dtype)}
        return tuple(args), kwargs


def install(unet: torch.nn.Module, width: int, vae_scale_factor: int) -> None:
    """Give ``unet`` the unpacking hook, once (wrapping the same pipeline twice adds none)."""
    if any(isinstance(hook, PooledRowUnpacker) for hook in unet._forward_pre_hooks.values()):
        return
    unet.register_forward_pre_hook(PooledRowUnpacker(width, vae_scale_factor), with_kwargs=True)


def pipeline_arguments(text: torch.Tensor, width: int, prefix: str = "") -> dict[str, Any]:
    """The pipeline-call keywords for packed ``text`` (``prefix`` ``negative_`` for the
    unconditional side): ``prompt_embeds`` and ``pooled_prompt_embeds``."""
    hidden, pooled = unpack(text, width)
    return {f"{prefix}prompt_embeds": hidden, f"{prefix}pooled_prompt_embeds": pooled}


def encoder_outputs(outputs: list[Any]) -> torch.Tensor:
    """The packed text tensor from both text encoders' outputs (run with
    ``output_hidden_states=True``), as the pipeline's ``encode_prompt`` builds its parts: each
    encoder's penultimate hidden states side by side, and the second's pooled projection."""
    hidden = torch.cat([output.hidden_states[-2] for output in outputs], dim=-1)
    return pack(hidden, outputs[-1][0])
