"""x_t, ᾱ_t and the v-prediction target come from the model's training (DDPM) noise schedule,
whatever sampler the backbone ships with and whatever state that sampler is in.

Multistep and sigma samplers (DPM-Solver, Euler, UniPC) look t up in their *inference*
timesteps in ``add_noise``/``get_velocity``: used at training time they noise at the wrong level
(or fail), and the answer changes once anything calls ``set_timesteps``.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)

from conceptctl.backbones.loading import LoadOptions, wrap_pipeline
from conceptctl.backbones.spec import BackboneSpec
from conceptctl.testing import build_tiny_pipeline

SCHEDULERS = [DDPMScheduler, DDIMScheduler, PNDMScheduler, DPMSolverMultistepScheduler,
              EulerDiscreteScheduler, UniPCMultistepScheduler]
TIMESTEPS = torch.tensor([0, 10, 300, 600, 990, 999])


@pytest.fixture(scope="module")
def pipelines():
    return {"sd1": build_tiny_pipeline("sd1"), "sd2": build_tiny_pipeline("sd2")}


def _backbone(pipeline, scheduler_class, *, stepped: bool, **config):
    """The tiny pipeline with ``scheduler_class`` as its sampler (from the pipeline's own
    config), optionally after ``set_timesteps(20)`` as drawing images leaves it."""
    pipeline.scheduler = scheduler_class.from_config(pipeline.scheduler.config, **config)
    backbone = wrap_pipeline(BackboneSpec(name="tiny", family="sd"), pipeline, LoadOptions())
    if stepped:
        backbone.scheduler.set_timesteps(20)
    return backbone


def _expected_abar(config) -> torch.Tensor:
    """ᾱ_t computed here from the config's betas, independently of diffusers."""
    n, start, end = config.num_train_timesteps, config.beta_start, config.beta_end
    if config.beta_schedule == "scaled_linear":
        betas = torch.linspace(start**0.5, end**0.5, n, dtype=torch.float64) ** 2
    elif config.beta_schedule == "linear":
        betas = torch.linspace(start, end, n, dtype=torch.float64)
    else:
        raise AssertionError(config.beta_schedule)
    return torch.cumprod(1 - betas, dim=0)


def _draw(shape=(len(TIMESTEPS), 4, 3, 3)):
    gen = torch.Generator().manual_seed(0)
    return torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)


def _coefficients(abar_t, like):
    shape = (-1, *([1] * (like.dim() - 1)))
    return abar_t.sqrt().view(shape).float(), (1 - abar_t).sqrt().view(shape).float()


@pytest.mark.parametrize("stepped", [False, True], ids=["fresh", "after-set_timesteps"])
@pytest.mark.parametrize("scheduler_class", SCHEDULERS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("beta_schedule", ["scaled_linear", "linear"])
def test_x_t_comes_from_the_training_schedule(pipelines, scheduler_class, stepped,
                                              beta_schedule):
    backbone = _backbone(pipelines["sd1"], scheduler_class, stepped=stepped,
                         beta_schedule=beta_schedule, beta_start=0.00085, beta_end=0.012)
    abar = _expected_abar(backbone.scheduler.config)[TIMESTEPS]
    torch.testing.assert_close(backbone.alphas_cumprod(TIMESTEPS), abar.float())
    clean, noise = _draw()
    a, s = _coefficients(abar, clean)
    torch.testing.assert_close(backbone.add_noise(clean, noise, TIMESTEPS), a * clean + s * noise)
    # The epsilon target is the noise, and x̂0 from it recovers x0.
    target = backbone.training_target(clean, noise, TIMESTEPS)
    assert torch.equal(target, noise)
    torch.testing.assert_close(
        backbone.predicted_original(backbone.add_noise(clean, noise, TIMESTEPS), target,
                                    TIMESTEPS)[:-1], clean[:-1], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("stepped", [False, True], ids=["fresh", "after-set_timesteps"])
@pytest.mark.parametrize("scheduler_class", SCHEDULERS, ids=lambda c: c.__name__)
def test_v_prediction_target_and_its_inverse(pipelines, scheduler_class, stepped):
    backbone = _backbone(pipelines["sd2"], scheduler_class, stepped=stepped)
    assert backbone.prediction_type == "v_prediction"
    abar = _expected_abar(backbone.scheduler.config)[TIMESTEPS]
    clean, noise = _draw()
    a, s = _coefficients(abar, clean)
    noisy = backbone.add_noise(clean, noise, TIMESTEPS)
    torch.testing.assert_close(noisy, a * clean + s * noise)
    target = backbone.training_target(clean, noise, TIMESTEPS)
    torch.testing.assert_close(target, a * noise - s * clean)
    torch.testing.assert_close(backbone.predicted_original(noisy, target, TIMESTEPS), clean,
                               atol=1e-4, rtol=1e-4)


def test_the_training_schedule_is_fixed_at_load(pipelines):
    """Stepping the sampler (drawing images) leaves x_t unchanged, bit for bit."""
    backbone = _backbone(pipelines["sd1"], DPMSolverMultistepScheduler, stepped=False)
    clean, noise = _draw()
    before = backbone.add_noise(clean, noise, TIMESTEPS)
    backbone.scheduler.set_timesteps(20)
    assert torch.equal(backbone.add_noise(clean, noise, TIMESTEPS), before)


def test_the_samplers_own_defaults_define_the_schedule(pipelines):
    """Heun defaults to SD's betas (DDPM to others): a config that leaves them to the default
    still gets the sampler's values, not DDPMScheduler's."""
    from diffusers import HeunDiscreteScheduler

    pipeline = pipelines["sd1"]
    pipeline.scheduler = HeunDiscreteScheduler(beta_schedule="scaled_linear")
    backbone = wrap_pipeline(BackboneSpec(name="tiny", family="sd"), pipeline, LoadOptions())
    assert backbone.noise_schedule.config.beta_start == 0.00085
    torch.testing.assert_close(backbone.alphas_cumprod(TIMESTEPS),
                               _expected_abar(backbone.scheduler.config)[TIMESTEPS].float())


@pytest.mark.parametrize("scheduler_class", [DDIMScheduler, DPMSolverMultistepScheduler,
                                             EulerDiscreteScheduler, UniPCMultistepScheduler],
                         ids=lambda c: c.__name__)
def test_zero_terminal_snr_is_the_training_value(pipelines, scheduler_class):
    """With rescaled betas ᾱ_{T-1} is exactly 0 in training (samplers clamp it to 2^-24 for
    their own use): x_t is pure noise and the v target is −x0."""
    backbone = _backbone(pipelines["sd2"], scheduler_class, stepped=True,
                         rescale_betas_zero_snr=True)
    last = torch.tensor([999])
    assert backbone.alphas_cumprod(last).item() == 0
    clean, noise = _draw((1, 4, 3, 3))
    torch.testing.assert_close(backbone.add_noise(clean, noise, last), noise)
    torch.testing.assert_close(backbone.training_target(clean, noise, last), -clean)


def test_a_sampler_without_betas_is_refused(pipelines):
    from conceptctl.backbones.backbone import training_schedule
    from conceptctl.errors import BackboneError

    with pytest.raises(BackboneError, match="noise schedule"):
        training_schedule({"num_train_timesteps": 1000, "shift": 3.0})


@pytest.mark.parametrize("method", ["doco", "ca"])
def test_erase_is_the_same_whether_anchors_are_drawn_or_cached(tmp_path, method):
    """On a backbone whose sampler is DPM-Solver, drawing the anchor images (which steps the
    sampler) must not change what training sees: the erase that draws them and the one that
    finds them cached end with bit-identical weights."""
    from conceptctl.erasure.artifact import read_artifact
    from conceptctl.erasure.run import erase
    from conceptctl.testing import tiny_erase_config

    pipeline = build_tiny_pipeline("sd1")
    pipeline.scheduler = DPMSolverMultistepScheduler.from_config(pipeline.scheduler.config)
    base = tmp_path / "sd1-dpm"
    pipeline.save_pretrained(base, safe_serialization=True)

    drew = erase(tiny_erase_config(base, method=method), tmp_path / "drew")
    cached = erase(tiny_erase_config(base, method=method), tmp_path / "cached")
    assert (drew.anchors_cached, cached.anchors_cached) == (False, True)
    first, second = read_artifact(tmp_path / "drew"), read_artifact(tmp_path / "cached")
    assert first.weights.keys() == second.weights.keys()
    assert all(torch.equal(first.weights[n], second.weights[n]) for n in first.weights)
