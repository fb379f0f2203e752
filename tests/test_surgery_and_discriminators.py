"""Gradient surgeries do exactly their maths (``doco-reference`` is the authors' adjust_gradient,
checked against a line-by-line transcription); discriminators fit every latent size."""

import pytest
import torch
from torch import nn

from conceptctl.erasure.discriminators import HingeSpectral, PatchGAN
from conceptctl.erasure.methods import StepStats
from conceptctl.erasure.surgery import (
    DocoProjection,
    PCGrad,
    WeightedSum,
    clip_jointly,
)
from conceptctl.erasure.trainer import LoopState, TrainingData, run_loop
from conceptctl.registry import get_registry

NO_CLIP = 1e30  # a max_grad_norm no gradient reaches: the clip factor is exactly 1


def _pair(conflict: bool):
    gen = torch.Generator().manual_seed(0)
    p = torch.randn(3, 5, generator=gen)
    u = torch.randn(3, 5, generator=gen)
    dot = (u * p).sum()
    if (dot < 0) != conflict:
        u = u - 2 * dot / p.pow(2).sum() * p  # reflect u across p's normal plane
    return u, p


def _one(surgery, u, p):
    """A surgery on a one-tensor set."""
    out, changed = surgery({"w": u.clone()}, {"w": p.clone()})
    return out["w"], changed


def test_doco_removes_exactly_the_conflicting_component():
    u, p = _pair(conflict=True)
    out, changed = _one(DocoProjection(1.0, NO_CLIP), u, p)
    assert changed == 1
    assert abs(float((out * p).sum())) < 1e-6  # nothing left along g_p
    # what was removed is parallel to g_p, and the part orthogonal to g_p is untouched
    removed = u - out
    cos = (removed * p).sum() / (removed.norm() * p.norm())
    assert float(cos.abs()) == pytest.approx(1.0, abs=1e-6)
    half, _ = _one(DocoProjection(0.5, NO_CLIP), u, p)
    assert float((half * p).sum()) == pytest.approx(float((u * p).sum()) / 2, rel=1e-5)


def test_doco_leaves_agreeing_gradients_alone():
    u, p = _pair(conflict=False)
    out, changed = _one(DocoProjection(1.0, NO_CLIP), u, p)
    assert changed == 0 and torch.equal(out, u)


# Cross-attention k/v shapes of SD 1.x (a subset of its 32 tensors: 768-wide text, 320/640/1280
# channels), and a bias-like vector, as named in a diffusers UNet.
_SD_SHAPES = {"down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight": (320, 768),
              "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v.weight": (320, 768),
              "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight": (640, 768),
              "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_v.weight": (640, 768),
              "mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight": (1280, 768),
              "mid_block.attentions.0.transformer_blocks.0.attn2.to_v.weight": (1280, 768),
              "up_blocks.3.attentions.2.transformer_blocks.0.attn2.to_out.0.bias": (320,)}


def _gradient_sets(seed: int, scale_u: float, scale_p: float, signs):
    """Random g_u, g_p of SD-like shapes; per tensor, g_u = sign·0.3·ĝ_p + noise, so the cosine
    is negative where the sign is -1, positive where +1 (0: independent, cosine ≈ 0).
    ``scale_*``: each set's total norm (the clip is active where it is above max_grad_norm)."""
    gen = torch.Generator().manual_seed(seed)
    g_u, g_p = {}, {}
    for (name, shape), sign in zip(_SD_SHAPES.items(), signs, strict=True):
        p = torch.randn(shape, generator=gen)
        u = torch.randn(shape, generator=gen) / 3 + sign * 0.3 * p
        g_u[name], g_p[name] = u, p
    for grads, scale in ((g_u, scale_u), (g_p, scale_p)):
        total = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads.values()]))
        for g in grads.values():
            g.mul_(scale / total)
    return g_u, g_p


def _model(shapes) -> nn.Module:
    """A module whose named_parameters() are the given names and shapes (zeros)."""
    root = nn.Module()
    for name, shape in shapes.items():
        *path, leaf = name.split(".")
        module = root
        for part in path:
            if not hasattr(module, part):
                module.add_module(part, nn.Module())
            module = getattr(module, part)
        module.register_parameter(leaf, nn.Parameter(torch.zeros(shape)))
    return root


def _adjust_gradient(model, optim, norm_grad, loss_a, loss_b, lambda_=1):
    """DoCo/gradient_clip.py ``adjust_gradient`` (yongliang-wu/DoCo), line by line; accelerator
    .backward is .backward; the final optim.step() / zero_grad() are left out, so the gradients
    it would apply stay in .grad. Returns how many tensors it adjusted."""
    adjusted = 0
    optim.zero_grad()
    loss_b.backward(retain_graph=True)
    norm_grad()
    b_grads = [p.grad.clone() for name, p in model.named_parameters()
               if "attn2" in name and p.grad is not None]
    optim.zero_grad()
    loss_a.backward()
    norm_grad()
    for p, b_grad in zip([p for name, p in model.named_parameters()
                          if "attn2" in name and p.grad is not None], b_grads, strict=False):
        if p.grad is not None and b_grad is not None:
            b_grad_norm = b_grad / (torch.linalg.norm(b_grad) + 1e-8)
            a_grad_norm = p.grad / (torch.linalg.norm(p.grad) + 1e-8)
            dot_product = torch.dot(a_grad_norm.flatten(), b_grad_norm.flatten())
            if dot_product < 0:
                adjustment = lambda_ * dot_product * b_grad_norm
                p.grad -= adjustment
                adjusted += 1
    return adjusted


def _reference(g_u, g_p, lambda_, max_grad_norm):
    """What the authors' code applies for these gradients: real parameters, two linear losses
    whose gradients are g_u (loss_a, adversarial) and g_p (loss_b, prior), and
    torch.nn.utils.clip_grad_norm_ over all trained parameters as norm_grad."""
    model = _model({name: g.shape for name, g in g_u.items()})
    params = dict(model.named_parameters())
    optim = torch.optim.AdamW(params.values(), lr=1e-5)
    loss_a = sum((params[name] * g).sum() for name, g in g_u.items())
    loss_b = sum((params[name] * g).sum() for name, g in g_p.items())
    adjusted = _adjust_gradient(
        model, optim, lambda: torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm),
        loss_a, loss_b, lambda_)
    return {name: p.grad for name, p in params.items()}, adjusted


_N = len(_SD_SHAPES)


def _conflicts(g_u, g_p) -> int:
    return sum(float((g_u[k].double() * g_p[k].double()).sum()) < 0 for k in g_u)


@pytest.mark.parametrize("scale_u, scale_p, signs, lambda_, max_norm", [
    (37.0, 12.0, [-1, 1, -1, 0, 1, -1, 1], 1.0, 1.0),  # both clipped, mixed conflicts
    (0.4, 0.7, [-1, 1, -1, 0, 1, -1, 1], 1.0, 1.0),  # neither clipped
    (5.0, 0.2, [-1] * _N, 1.0, 1.0),  # g_u clipped only, every tensor conflicts
    (0.2, 5.0, [1] * _N, 1.0, 1.0),  # g_p clipped only, none conflicts
    (3.0, 3.0, [-1, -1, 1, 1, 0, 0, -1], 0.5, 2.0),  # the earlier λ, another max_grad_norm
])
def test_doco_reference_is_the_authors_adjust_gradient(scale_u, scale_p, signs, lambda_,
                                                      max_norm):
    g_u, g_p = _gradient_sets(0, scale_u, scale_p, signs)
    expected, adjusted = _reference(g_u, g_p, lambda_, max_norm)
    surgery = get_registry("gradient-surgery").get("doco-reference").build(
        strength=lambda_, prior_weight=0.1, max_grad_norm=max_norm)
    got, changed = surgery({k: v.clone() for k, v in g_u.items()},
                           {k: v.clone() for k, v in g_p.items()})
    assert set(got) == set(expected)
    worst = max(float((got[k] - expected[k]).abs().max()) for k in expected)
    assert worst <= 1e-6
    assert changed == adjusted == _conflicts(g_u, g_p) >= sum(s < 0 for s in signs)


def _projected(u, p, lam):
    u64, p64 = u.double(), p.double()
    dot = (u64 * p64).sum()
    return (u64 - lam * dot / (p64 * p64).sum() * p64).float() if dot < 0 else u.clone()


def _clipped(grads, max_norm):
    """torch.nn.utils.clip_grad_norm_ on parameters holding ``grads``."""
    params = {}
    for name, g in grads.items():
        params[name] = nn.Parameter(torch.zeros_like(g))
        params[name].grad = g.clone()
    torch.nn.utils.clip_grad_norm_(params.values(), max_norm)
    return {name: p.grad for name, p in params.items()}


@pytest.mark.parametrize("scale, lam", [(20.0, 1.0), (0.3, 1.0), (20.0, 0.5)])
def test_doco_is_the_projection_then_one_joint_clip(scale, lam):
    signs = [-1, 1, -1, 0, 1, -1, 1]
    g_u, g_p = _gradient_sets(1, scale, 3.0, signs)
    expected = _clipped({k: _projected(g_u[k], g_p[k], lam) for k in g_u}, 1.0)
    got, changed = DocoProjection(lam, 1.0)({k: v.clone() for k, v in g_u.items()},
                                            {k: v.clone() for k, v in g_p.items()})
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], rtol=1e-5, atol=1e-7)
    assert changed == _conflicts(g_u, g_p) >= sum(s < 0 for s in signs)
    total = torch.linalg.vector_norm(torch.stack([g.norm() for g in got.values()]))
    assert float(total) <= 1.0 + 1e-5 if scale > 1 else float(total) < 1.0


def test_pcgrad_projects_both_sums_and_clips_jointly():
    signs = [-1, 1, -1, 0, 1, -1, 1]
    g_u, g_p = _gradient_sets(2, 4.0, 3.0, signs)
    sums = {}
    for k in g_u:
        u, p = g_u[k].double(), g_p[k].double()
        dot = (u * p).sum()
        sums[k] = ((u - dot / p.pow(2).sum() * p) + (p - dot / u.pow(2).sum() * u)
                   if dot < 0 else u + p).float()
    expected = _clipped(sums, 1.0)
    got, changed = PCGrad(1.0)({k: v.clone() for k, v in g_u.items()},
                               {k: v.clone() for k, v in g_p.items()})
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], rtol=1e-5, atol=1e-7)
    assert changed == _conflicts(g_u, g_p) >= sum(s < 0 for s in signs)


def test_weighted_sum_is_the_no_surgery_baseline():
    g_u, g_p = _gradient_sets(3, 4.0, 3.0, [-1, 1, -1, 0, 1, -1, 1])
    expected = _clipped({k: g_u[k] + 0.1 * g_p[k] for k in g_u}, 1.0)
    got, changed = WeightedSum(0.1, 1.0)({k: v.clone() for k, v in g_u.items()},
                                         {k: v.clone() for k, v in g_p.items()})
    assert changed == 0
    for k in expected:
        torch.testing.assert_close(got[k], expected[k])


def test_joint_clip_is_torchs():
    g_u, _ = _gradient_sets(4, 9.0, 1.0, [0] * _N)
    for max_norm in (1.0, 100.0):
        expected = _clipped(g_u, max_norm)
        got = {k: v.clone() for k, v in g_u.items()}
        total = clip_jointly(list(got.values()), max_norm)
        assert float(total) == pytest.approx(9.0, rel=1e-5)
        for k in expected:
            assert torch.equal(got[k], expected[k])


class _BigGradient:
    """A method that leaves a gradient of norm 10 in its one parameter."""

    def __init__(self, param, clips):
        self.param, self.clips_gradients = param, clips

    def training_step(self, batch, step):
        self.param.grad = torch.full_like(self.param, 5.0)  # norm 10 over 4 values
        return StepStats(loss=0.0)


@pytest.mark.parametrize("clips, moved", [(False, 0.5), (True, 5.0)])
def test_the_trainer_clips_only_what_the_method_does_not(clips, moved):
    param = nn.Parameter(torch.zeros(4))
    data = TrainingData(latents=torch.zeros(2, 1, 1, 1), prompt_index=torch.zeros(2).long(),
                        anchor_text=torch.zeros(1, 1, 1), target_text=torch.zeros(1, 1, 1),
                        empty_text=torch.zeros(1, 1, 1))
    run_loop(_BigGradient(param, clips), torch.optim.SGD([param], lr=1.0), {"w": param}, data,
             LoopState(), steps=1, batch_size=1, max_grad_norm=1.0, device="cpu",
             dtype=torch.float32)
    torch.testing.assert_close(param.detach(), torch.full((4,), -moved))


@pytest.mark.parametrize("surgery", ["doco", "doco-reference", "pcgrad", "none"])
def test_doco_trains_with_every_surgery(tiny_sd1, tmp_path, surgery):
    from conceptctl.backbones.loading import open_backbone
    from conceptctl.erasure.artifact import read_artifact
    from conceptctl.erasure.run import erase
    from conceptctl.testing import tiny_erase_config

    before = open_backbone(str(tiny_sd1), device="cpu").unet.state_dict()
    erase(tiny_erase_config(tiny_sd1, surgery=surgery), tmp_path / "out")
    artifact = read_artifact(tmp_path / "out")
    assert artifact.manifest["components"]["gradient_surgery"]["name"] == surgery
    assert all(not torch.equal(v, before[n]) for n, v in artifact.weights.items())
    assert all(torch.isfinite(v).all() for v in artifact.weights.values())
    share = artifact.manifest["training"]["surgery_fired_share"]
    assert share == 0 if surgery == "none" else 0 <= share <= 1


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
