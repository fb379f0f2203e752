"""One DoCo step as the authors' code takes it: the generator judged by D before D's update, the
preservation loss on its own images, and the learning rate scaled with the batch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conceptctl.erasure.config import LR_PER_IMAGE, EraseConfig, preset
from conceptctl.erasure.trainer import TrainingData


def _data(side: int, tokens: int, width: int, n: int = 12, prompts: int = 3) -> TrainingData:
    g = torch.Generator().manual_seed(0)
    return TrainingData(
        latents=torch.randn(n, 4, side, side, generator=g),
        prompt_index=torch.arange(prompts).repeat_interleave(n // prompts),
        anchor_text=torch.randn(prompts, tokens, width, generator=g),
        target_text=torch.randn(prompts, tokens, width, generator=g),
        empty_text=torch.randn(1, tokens, width, generator=g),
    )


@pytest.fixture
def training(tiny_sd1):
    from conceptctl.backbones.loading import open_backbone
    from conceptctl.erasure.run import prepare_training

    backbone = open_backbone(str(tiny_sd1), device="cpu", dtype="float32")
    cfg = EraseConfig(concept="church", anchor="house", backbone=str(tiny_sd1), warmup=1,
                      batch_size=4, steps=4, lr=1e-3, d_lr=1e-3)
    side = backbone.resolution // backbone.vae_scale_factor
    tokens = backbone.encode_prompts(["x"]).shape[1]
    return backbone, prepare_training(backbone, cfg), _data(side, tokens, backbone.text_width)


def test_the_prior_batch_has_its_own_images_timesteps_and_noise(training):
    _, _, data = training
    batch = data.batch(4, torch.Generator().manual_seed(0), "cpu", torch.float32)
    prior = batch.prior
    assert prior.latents.shape == batch.latents.shape
    assert not torch.equal(prior.noise, batch.noise)
    assert not torch.equal(prior.timesteps, batch.timesteps)
    # Each prior image comes with its own anchor caption.
    for latent, text in zip(prior.latents, prior.text, strict=True):
        i = next(i for i in range(len(data.latents)) if torch.equal(data.latents[i], latent))
        torch.testing.assert_close(text, data.anchor_text[data.prompt_index[i]])


def test_the_preservation_loss_is_taken_on_the_prior_images(training):
    from conceptctl.erasure.methods import _preserving_loss

    backbone, trained, data = training
    batch = data.batch(4, torch.Generator().manual_seed(0), "cpu", torch.float32)
    p = batch.prior
    with torch.no_grad():
        x_t = backbone.add_noise(p.latents, p.noise, p.timesteps)
        expected = F.mse_loss(backbone.unet(x_t, p.timesteps, p.text).sample,
                              backbone.training_target(p.latents, p.noise, p.timesteps))
        got = _preserving_loss(trained.context, batch, None, None, None)
    torch.testing.assert_close(got, expected)


def test_the_generator_is_judged_by_d_before_d_learns_from_the_same_pictures(training):
    _, trained, data = training
    method = trained.method
    disc, d_opt = method.disc, method.d_opt
    events = []

    def snapshot():
        return torch.cat([p.detach().flatten().clone() for p in disc.parameters()])

    g_loss, d_loss, step = disc.g_loss, disc.d_loss, d_opt.step

    def record(name, fn):
        def wrapped(*args, **kwargs):
            events.append((name, snapshot(), [a.detach().clone() for a in args
                                              if torch.is_tensor(a)]))
            return fn(*args, **kwargs)
        return wrapped

    disc.g_loss, disc.d_loss = record("g", g_loss), record("d", d_loss)
    d_opt.step = record("step", step)
    gen = torch.Generator().manual_seed(1)
    method.training_step(data.batch(4, gen, "cpu", torch.float32), step=1)  # warm-up: D only
    assert [e[0] for e in events] == ["d", "step"]
    events.clear()
    stats = method.training_step(data.batch(4, gen, "cpu", torch.float32), step=2)
    assert [e[0] for e in events] == ["g", "d", "step"]
    (_, d_at_g, (fake_g,)), (_, d_at_d, (_, fake_d)), _ = events
    assert torch.equal(d_at_g, d_at_d)  # the generator step saw D before its update
    torch.testing.assert_close(fake_g, fake_d)  # and D then learns from those same pictures
    assert stats.generator_step and stats.d_loss is not None and stats.preserve_loss is not None


def test_the_learning_rate_is_per_image_times_the_batch():
    from conceptctl.toy.recipe import TOY_ERASE_PRESETS as TOY

    assert preset("style")["lr"] == pytest.approx(LR_PER_IMAGE * 8)  # 4.8e-5, reference
    assert preset("object", batch_size=4)["lr"] == pytest.approx(2.4e-5)
    assert preset("style", 16, backbone=TOY)["lr"] == pytest.approx(2 * preset(
        "style", backbone=TOY)["lr"])


def test_the_cli_scales_the_learning_rate_with_batch_size(cli, tiny_sd1, tmp_path):
    import json

    anchors = tmp_path / "anchors.txt"
    anchors.write_text("a photo of a house\n")
    common = ("erase", "church", "-a", "house", "-b", tiny_sd1, "--anchor-prompts", anchors,
              "--batch-size", "4", "--steps", "2", "--warmup", "1", "--anchor-images", "1")
    result = cli(*common, "-o", tmp_path / "out")
    assert result.code == 0, result.err
    manifest = json.loads((tmp_path / "out" / "conceptctl.json").read_text())
    assert manifest["hyperparameters"]["lr"] == pytest.approx(LR_PER_IMAGE * 4)
    given = cli(*common, "--lr", "1e-4", "-o", tmp_path / "o2")
    assert given.code == 0, given.err
    manifest = json.loads((tmp_path / "o2" / "conceptctl.json").read_text())
    assert manifest["hyperparameters"]["lr"] == 1e-4  # --lr is taken as given


def test_a_shared_prior_batch_reuses_the_adversarial_images(training):
    from dataclasses import replace

    from conceptctl.erasure.methods import _noised, _preserving_loss

    backbone, trained, data = training
    batch = data.batch(4, torch.Generator().manual_seed(0), "cpu", torch.float32)
    with torch.no_grad():
        x_t, noise, t = _noised(trained.context, batch)
        expected = F.mse_loss(backbone.unet(x_t, t, batch.anchor_text).sample,
                              backbone.training_target(batch.latents, noise, t))
        shared = _preserving_loss(trained.context, replace(batch, prior=None), x_t, noise, t)
        separate = _preserving_loss(trained.context, batch, x_t, noise, t)
    torch.testing.assert_close(shared, expected)
    assert not torch.allclose(shared, separate)


def test_an_unknown_prior_batch_is_refused():
    from conceptctl.erasure.run import check_config
    from conceptctl.errors import UsageError

    with pytest.raises(UsageError, match="unknown prior batch 'sideways'"):
        check_config(EraseConfig(concept="church", anchor="house", prior_batch="sideways"))


@pytest.mark.parametrize("d_update", ["own", "reference"])
def test_d_learns_from_its_own_loss_or_also_the_generators_as_the_reference_code(
        training, d_update):
    """The authors' code never clears D's gradients after the generator's backward pass, so its
    D update also carries ∇_D of the generator's loss; ``d_update="reference"`` does the same."""
    import copy

    _, trained, data = training
    method = trained.method
    method.d_update = d_update
    disc, d_opt = method.disc, method.d_opt
    gen = torch.Generator().manual_seed(1)
    method.training_step(data.batch(4, gen, "cpu", torch.float32), step=1)  # warm-up
    before = copy.deepcopy(disc)
    seen = {}
    d_loss, step = disc.d_loss, d_opt.step

    def record_inputs(real, fake):
        seen["inputs"] = (real.detach().clone(), fake.detach().clone())
        return d_loss(real, fake)

    def record_grads(*args, **kwargs):
        seen["grads"] = [p.grad.clone() for p in disc.parameters()]
        return step(*args, **kwargs)

    disc.d_loss, d_opt.step = record_inputs, record_grads
    method.training_step(data.batch(4, gen, "cpu", torch.float32), step=2)
    real, fake = seen["inputs"]
    loss = before.d_loss(real, fake)
    if d_update == "reference":
        loss = loss + before.g_loss(fake)
    expected = torch.autograd.grad(loss, list(before.parameters()))
    for got, want in zip(seen["grads"], expected, strict=True):
        torch.testing.assert_close(got, want)
    own_only = torch.autograd.grad(before.d_loss(real, fake), list(before.parameters()))
    differs = any(not torch.allclose(g, o) for g, o in zip(seen["grads"], own_only, strict=True))
    assert differs == (d_update == "reference")


def test_an_unknown_d_update_is_refused():
    from conceptctl.erasure.run import check_config
    from conceptctl.errors import UsageError

    with pytest.raises(UsageError, match="unknown discriminator update 'both'"):
        check_config(EraseConfig(concept="church", anchor="house", d_update="both"))
