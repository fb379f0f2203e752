"""Gradient surgery: how the unlearning gradient and the preserving gradient are combined.

DoCo's concept-preserving gradient (Wu et al., AAAI 2025, eq. 9) works per trainable tensor:
with g_u = ∇L_adv (unlearn) and g_p = ∇L_prior (preserve), when they conflict (g_u · g_p < 0)
the component of g_u along g_p is removed, g_u ← g_u − λ (g_u · g_p / ‖g_p‖²) g_p, and only g_u
is applied: g_p just defines the direction to protect. Each surgery here maps (g_u, g_p) for one
tensor to the gradient to apply and whether it changed anything ("fired").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_EPS = 1e-12


@dataclass(frozen=True)
class DocoProjection:
    """``doco``: the exact projection above (default). λ = ``strength`` (1 removes the whole
    conflicting component, 0.5 half of it)."""

    strength: float = 1.0

    def __call__(self, unlearn: torch.Tensor, preserve: torch.Tensor):
        # Element products in (at least) fp32, sums in fp64: as exact as converting both
        # tensors to fp64, at a fifth of the time (bench: 19 M trained values of SD 1.x).
        u, p = _at_least_fp32(unlearn), _at_least_fp32(preserve)
        dot = (u * p).sum(dtype=torch.float64)
        if dot >= 0:
            return unlearn, False
        scale = self.strength * dot / (p * p).sum(dtype=torch.float64).clamp_min(_EPS)
        return torch.add(u, p, alpha=-float(scale)).to(unlearn.dtype), True


@dataclass(frozen=True)
class DocoReference:
    """``doco-reference``: what the authors' current code computes. Both gradients are first
    clipped to norm ≤ 1, then g_u ← g_u − λ·cos(g_u, g_p)·g_p/‖g_p‖. This equals the projection
    only when ‖g_u‖ = 1 after clipping; it is here to reproduce the published runs."""

    strength: float = 1.0

    def __call__(self, unlearn: torch.Tensor, preserve: torch.Tensor):
        u, p = _clip_to_unit(unlearn.double()), _clip_to_unit(preserve.double())
        cos = torch.dot(u.flatten(), p.flatten()) / (u.norm() * p.norm()).clamp_min(_EPS)
        if cos >= 0:
            return u.to(unlearn.dtype), False
        return (u - self.strength * cos * p / p.norm().clamp_min(_EPS)).to(unlearn.dtype), True


@dataclass(frozen=True)
class PCGrad:
    """``pcgrad``: symmetric PCGrad (Yu et al., NeurIPS 2020). Each gradient loses its component
    along the other when they conflict, and both are applied (the sum)."""

    def __call__(self, unlearn: torch.Tensor, preserve: torch.Tensor):
        u, p = unlearn.double(), preserve.double()
        dot = torch.dot(u.flatten(), p.flatten())
        if dot >= 0:
            return (u + p).to(unlearn.dtype), False
        u_proj = u - dot / p.pow(2).sum().clamp_min(_EPS) * p
        p_proj = p - dot / u.pow(2).sum().clamp_min(_EPS) * u
        return (u_proj + p_proj).to(unlearn.dtype), True


@dataclass(frozen=True)
class WeightedSum:
    """``none``: no surgery; g_u + w·g_p, the reference's fallback (w = ``prior_weight``)."""

    prior_weight: float = 0.1

    def __call__(self, unlearn: torch.Tensor, preserve: torch.Tensor):
        return unlearn + self.prior_weight * preserve, False


def _at_least_fp32(g: torch.Tensor) -> torch.Tensor:
    return g if g.dtype in (torch.float32, torch.float64) else g.float()


def _clip_to_unit(g: torch.Tensor) -> torch.Tensor:
    norm = g.norm()
    return g / norm if norm > 1 else g
