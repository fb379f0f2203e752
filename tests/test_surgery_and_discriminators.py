"""Gradient surgeries do exactly their maths; discriminators fit every latent size."""

import pytest
import torch

from conceptctl.erasure.discriminators import HingeSpectral, PatchGAN
from conceptctl.erasure.surgery import DocoProjection, DocoReference, PCGrad, WeightedSum


def _pair(conflict: bool):
    gen = torch.Generator().manual_seed(0)
    p = torch.randn(3, 5, generator=gen)
    u = torch.randn(3, 5, generator=gen)
    dot = (u * p).sum()
    if (dot < 0) != conflict:
        u = u - 2 * dot / p.pow(2).sum() * p  # reflect u across p's normal plane
    return u, p


def test_doco_removes_exactly_the_conflicting_component():
    u, p = _pair(conflict=True)
    out, fired = DocoProjection(1.0)(u, p)
    assert fired
    assert abs(float((out * p).sum())) < 1e-6  # nothing left along g_p
    # what was removed is parallel to g_p, and the part orthogonal to g_p is untouched
    removed = u - out
    cos = (removed * p).sum() / (removed.norm() * p.norm())
    assert float(cos.abs()) == pytest.approx(1.0, abs=1e-6)
    half, _ = DocoProjection(0.5)(u, p)
    assert float((half * p).sum()) == pytest.approx(float((u * p).sum()) / 2, rel=1e-5)


def test_doco_leaves_agreeing_gradients_alone():
    u, p = _pair(conflict=False)
    out, fired = DocoProjection(1.0)(u, p)
    assert not fired and torch.equal(out, u)


def test_reference_variant_clips_then_subtracts_cosine():
    u, p = _pair(conflict=True)
    u, p = u * 10, p * 10  # both norms > 1: clipped to unit norm first
    out, fired = DocoReference(1.0)(u, p)
    uu, pp = u / u.norm(), p / p.norm()
    cos = (uu * pp).sum()
    assert fired
    torch.testing.assert_close(out, uu - cos * pp)
    # with unit-norm inputs it coincides with the exact projection
    exact, _ = DocoProjection(1.0)(uu, pp)
    torch.testing.assert_close(out, exact)


def test_pcgrad_projects_both_and_sums():
    u, p = _pair(conflict=True)
    out, fired = PCGrad()(u, p)
    dot = (u * p).sum()
    expected = (u - dot / p.pow(2).sum() * p) + (p - dot / u.pow(2).sum() * u)
    assert fired
    torch.testing.assert_close(out, expected)


def test_weighted_sum_is_the_no_surgery_baseline():
    u, p = _pair(conflict=True)
    out, fired = WeightedSum(0.1)(u, p)
    assert not fired
    torch.testing.assert_close(out, u + 0.1 * p)


@pytest.mark.parametrize("cls", [PatchGAN, HingeSpectral])
@pytest.mark.parametrize("size", [8, 16, 64])
def test_discriminators_give_patch_logits_and_losses(cls, size):
    torch.manual_seed(0)
    disc = cls(latent_channels=4, latent_size=size)
    anchor, target = torch.randn(2, 4, size, size), torch.randn(2, 4, size, size) + 1
    logits = disc(anchor)
    assert logits.shape == (2, 1, 3, 3)
    assert disc.d_loss(anchor, target.detach()).ndim == 0
    target.requires_grad_(True)
    disc.g_loss(target).backward()
    assert target.grad is not None and target.grad.abs().sum() > 0
    assert 0.0 <= disc.accuracy(anchor, target) <= 1.0


def test_patchgan_matches_the_reference_layout_at_sd_scale():
    disc = PatchGAN(latent_channels=4, latent_size=64)
    convs = [m for m in disc.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [64, 128, 256, 512, 1]
    assert all(c.kernel_size == (4, 4) for c in convs)
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in disc.modules()) == 3
