"""Which UNet parameters an erasure trains.

DoCo's default, like Ablating Concepts', is the cross-attention key and value projections
(``attn2.to_k`` / ``attn2.to_v`` in diffusers naming): they alone map text features into the
UNet, so editing them changes what a prompt means while leaving image synthesis untouched.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

PARAM_GROUPS: dict[str, tuple[str, Callable[[str], bool]]] = {
    "cross-attn-kv": (
        "cross-attention key/value projections (DoCo's default)",
        lambda name: ".attn2.to_k." in name or ".attn2.to_v." in name,
    ),
    "cross-attn": ("every cross-attention parameter (q, k, v, out)",
                   lambda name: ".attn2." in name),
    "full": ("every UNet parameter", lambda name: True),
}


def select_parameters(unet: nn.Module, group: str) -> dict[str, nn.Parameter]:
    """Name -> parameter for ``group``, in the UNet's own order; raises if none match."""
    from conceptctl.errors import UsageError

    if group not in PARAM_GROUPS:
        raise UsageError(f"unknown parameter group {group!r}; available: "
                         f"{', '.join(PARAM_GROUPS)}")
    rule = PARAM_GROUPS[group][1]
    chosen = {name: p for name, p in unet.named_parameters() if rule(name)}
    if not chosen:
        raise UsageError(f"the backbone's UNet has no parameters in group {group!r} "
                         "(no cross-attention layers?)")
    return chosen
