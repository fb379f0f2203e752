"""Are trained tensors finite? Asked after every optimiser step, so it must cost next to nothing.

One fused reduction per device answers for all tensors at once: the largest magnitude of each
(the ∞-norm: NaN propagates through it, an infinity is its own maximum, and unlike a 2-norm it
cannot overflow on large finite values), then one ``isfinite`` over those few numbers and a
single host sync. Only when the answer is no does a loop look for the first offender, to name it.
Measured on 2 shared CPU cores: 30 ms for tensors shaped like SD 1.x's cross-attention k/v
(20 M values), where one CPU training step of that model takes seconds; 150 ms per 100 M values
(the full SD 1.x UNet: about 1.3 s, against tens of seconds per step). In a tiny test run the
check, discriminator included, took 0.24 ms of a 35 ms step.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from conceptctl.errors import ConceptctlError


class NonFiniteWeightsError(ConceptctlError):
    """A trained tensor holds NaN or an infinity: it must not be saved, resumed or used."""


def all_finite(tensors: Iterable[torch.Tensor]) -> bool:
    """Whether every value of every floating-point tensor is finite (integers always are)."""
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for t in tensors:
        if (t.is_floating_point() or t.is_complex()) and t.numel():
            by_device.setdefault(t.device, []).append(t.detach())
    with torch.no_grad():
        peaks = [torch.stack([p.to(torch.float32) for p in torch._foreach_norm(ts, float("inf"))])
                 .isfinite().all() for ts in by_device.values()]
    return all(bool(p) for p in peaks)


def first_non_finite(tensors: dict[str, torch.Tensor]) -> str | None:
    """``"NAME holds NaN"`` (or ``"… holds inf"``) for the first tensor, in the given order,
    with a non-finite value; None when all are finite."""
    if all_finite(tensors.values()):
        return None
    for name, t in tensors.items():
        if t.is_floating_point() or t.is_complex():
            if torch.isnan(t).any():
                return f"{name} holds NaN"
            if torch.isinf(t).any():
                return f"{name} holds inf"
    return None
