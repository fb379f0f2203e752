"""Which parameters an erasure trains.

DoCo's default, like Ablating Concepts', is the cross-attention key and value projections
(``attn2.to_k`` / ``attn2.to_v`` in diffusers naming): they alone map text features into the
UNet, so editing them changes what a prompt means while leaving image synthesis untouched.

``text-encoder`` trains the text encoder instead, as AdvUnlearn (Zhang et al., NeurIPS 2024)
does: it found the text encoder the module whose erasure best withstands adversarial prompts.
Its ``text_encoder_full`` trains every tensor of the transformer layers and the final layer
norm, not the token and position embeddings; this group trains the layers' linear weights
(attention and MLP matrices), not their biases and layer norms, so that every export format,
LoRA included, carries the whole change (a LoRA holds matrices only). SDXL's group covers both
its text encoders (``text_encoder.`` and ``text_encoder_2.``), the second's pooled projection
excepted (``text_projection``, like SD's, is no attention or MLP weight), and so is the first
encoder's last layer, which SDXL never reads (it conditions on the penultimate one). Names follow
:meth:`conceptctl.backbones.backbone.Backbone.named_tensors`.

The cross-attention groups match every ``attn2`` of the UNet by name, so they cover every
transformer block whatever the depth of each attention stack (SDXL's 1, 2 and 10).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from conceptctl.backbones.backbone import is_text_encoder_tensor

Rule = Callable[[str, torch.Tensor], bool]


def _unet(rule: Callable[[str], bool]) -> Rule:
    return lambda name, tensor: not is_text_encoder_tensor(name) and rule(name)


def _text_encoder_layers(name: str, tensor: torch.Tensor) -> bool:
    # Matrices only (a layer norm's or a bias's tensor is 1-D), and not the embeddings (token
    # and position tables are matrices too) nor what the UNet never sees (a BERT pooler, a
    # projection head): their gradient is zero.
    return (is_text_encoder_tensor(name) and tensor.dim() == 2
            and not any(part in name for part in ("embeddings", "pooler", "projection")))


PARAM_GROUPS: dict[str, tuple[str, Rule]] = {
    "cross-attn-kv": (
        "cross-attention key/value projections (DoCo's default)",
        _unet(lambda name: ".attn2.to_k." in name or ".attn2.to_v." in name),
    ),
    "cross-attn": ("every cross-attention parameter (q, k, v, out)",
                   _unet(lambda name: ".attn2." in name)),
    "full": ("every UNet parameter", _unet(lambda name: True)),
    "text-encoder": ("the text encoders' attention and MLP weights (AdvUnlearn's module)",
                     _text_encoder_layers),
}


def trains_text_encoder(group: str) -> bool:
    """Whether ``group`` changes the text encoder (so prompts must be encoded by the model being
    trained, with gradients, instead of once by the original)."""
    return group == "text-encoder"


def select_parameters(backbone, group: str) -> dict[str, nn.Parameter]:
    """Name -> parameter for ``group``, in the model's own order (names as
    ``Backbone.named_tensors``); raises if none match."""
    from conceptctl.errors import UsageError

    if group not in PARAM_GROUPS:
        raise UsageError(f"unknown parameter group {group!r}; available: "
                         f"{', '.join(PARAM_GROUPS)}")
    rule = PARAM_GROUPS[group][1]
    idle = backbone.idle_tensors()  # e.g. SDXL's first text encoder's last layer
    chosen = {name: p for name, p in backbone.named_tensors().items()
              if rule(name, p) and name not in idle}
    if not chosen:
        raise UsageError(f"the backbone has no parameters in group {group!r} (no "
                         "cross-attention layers?)")
    return chosen
