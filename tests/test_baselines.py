"""The baselines as their authors' code takes them: CA's model-based step
(nupurkmr9/concept-ablation diffusers/train.py), ESD-x's partial sampling and target
(rohitgandikota/erasing train-scripts/train-esd.py), each recipe chosen with the method, and an
esd-x run that draws no anchor images."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from conceptctl.erasure.config import EraseConfig, preset
from conceptctl.toy.recipe import TOY_ERASE_PRESETS


@pytest.fixture
def backbone(tiny_sd1):
    from conceptctl.backbones.loading import open_backbone

    return open_backbone(str(tiny_sd1), device="cpu", dtype="float32")


def _training(backbone, method: str, **overrides):
    from conceptctl.erasure.run import prepare_training

    cfg = EraseConfig(concept="church", anchor="house", backbone="x", method=method,
                      **{**preset("object", None, method), "batch_size": 2, **overrides})
    return prepare_training(backbone, cfg)


def test_each_method_starts_from_its_authors_recipe():
    ca, esd = preset("style", None, "ca"), preset("style", None, "esd-x")
    # CA: 2e-6 x 8 images a step (4 per GPU on 2 GPUs, --scale_lr), 100 steps, k/v, AdamW.
    assert (ca["steps"], ca["batch_size"], ca["params"], ca["weight_decay"]) == (
        100, 8, "cross-attn-kv", 1e-2)
    assert ca["lr"] == pytest.approx(1.6e-5)
    # ESD-x: every attn2 tensor, Adam (no decay) at 1e-5, batch 1, 1000 iterations, eta 1.
    assert (esd["steps"], esd["batch_size"], esd["params"], esd["weight_decay"],
            esd["esd_eta"]) == (1000, 1, "cross-attn", 0.0, 1.0)
    assert esd["lr"] == pytest.approx(1e-5)
    assert esd["esd_sampling_steps"] == 50
    # The toy keeps its anchor-image settings, 400 steps and 20 sampler steps under every
    # recipe; rates, batches and tensors stay the authors'. DoCo keeps its own preset.
    toy_ca = preset("style", None, "ca", TOY_ERASE_PRESETS)
    toy_esd = preset("object", None, "esd-x", TOY_ERASE_PRESETS)
    assert (toy_ca["anchor_steps"], toy_ca["steps"], toy_ca["lr"]) == (20, 400, ca["lr"])
    assert (toy_esd["steps"], toy_esd["esd_sampling_steps"], toy_esd["batch_size"]) == (
        400, 20, 1)
    assert preset("style", None, "doco", TOY_ERASE_PRESETS)["steps"] == 400
    assert preset("style", None, "ca-doco-recipe") == preset("style", None, "doco")


def test_plan_gives_each_method_its_recipe_unless_a_flag_overrides_it(monkeypatch, tmp_path):
    """What `conceptctl erase --method M` and Python callers run: the trained tensors come from
    the method's recipe (ESD-x: every attn2 tensor) unless --params says otherwise."""
    from conceptctl.erasure.config import plan

    monkeypatch.setenv("CONCEPTCTL_HOME", str(tmp_path))
    assert plan("church", "house", "toy", method="esd-x").params == "cross-attn"
    assert plan("church", "house", "toy", method="ca").params == "cross-attn-kv"
    assert plan("church", "house", "toy", method="esd-x", params="full").params == "full"
    doco = plan("Van Gogh", "painting")  # default backbone: the toy
    assert (doco.backbone, doco.concept_type, doco.steps) == ("toy", "style", 400)
    assert doco.lr == pytest.approx(1.25e-5 * 8)
    assert plan("church", "house", "toy", batch_size=4).lr == pytest.approx(1.25e-5 * 4)
    assert plan("church", "house", "toy", batch_size=4, lr=3e-4).lr == 3e-4


def test_a_plugin_method_brings_its_own_recipe(monkeypatch, tmp_path):
    """A method's recipe travels with its registration: a plugin's method gets its own steps
    and rate per image, over DoCo's preset, and flags still win."""
    from conceptctl.components import Component
    from conceptctl.erasure.config import plan
    from conceptctl.hookspecs import hookimpl
    from conceptctl.plugins import register_plugin, unregister_plugin

    class Plugin:
        @hookimpl
        def register_methods(self, register):
            register(Component("mine", object, "a test method",
                               recipe={"steps": 7, "lr_per_image": 1e-3, "params": "full"}))

    monkeypatch.setenv("CONCEPTCTL_HOME", str(tmp_path))
    register_plugin(Plugin(), "recipe-plugin")
    try:
        mine = plan("church", "house", "sd-1.4", method="mine")
        assert (mine.steps, mine.params, mine.batch_size) == (7, "full", 8)
        assert mine.lr == pytest.approx(8e-3)
        assert mine.anchor_steps == 25  # the rest is DoCo's SD preset
        assert plan("church", "house", "sd-1.4", method="mine", steps=9).steps == 9
    finally:
        unregister_plugin("recipe-plugin")


def test_a_bare_config_completes_to_the_backbone_preset(monkeypatch, tmp_path):
    """erase(EraseConfig("church", "house"), out) from Python on the toy trains the toy's 400
    steps, not SD's 2000: erase() completes the config as the CLI does."""
    from conceptctl.erasure.config import complete, plan

    monkeypatch.setenv("CONCEPTCTL_HOME", str(tmp_path))
    bare = EraseConfig("church", "house")
    assert bare.steps is None and not bare.is_complete()
    done = complete(bare)
    assert done == plan("church", "house") and done.is_complete()
    assert (done.steps, done.warmup, done.concept_type, done.anchor_steps) == (
        400, 100, "object", 20)
    assert complete(done) is done
    # An exported toy folder carries the toy's presets (its conceptctl.json backbone_defaults).
    from conceptctl.backbones.spec import FOLDER_DEFAULTS

    assert "erase_presets" in FOLDER_DEFAULTS
    sd = complete(EraseConfig("church", "house", backbone="sd-1.4", method="ca"))
    assert (sd.steps, sd.params, sd.anchor_steps) == (100, "cross-attn-kv", 25)


def test_ca_step_is_the_reference_model_based_loss(backbone):
    """Transcription of the reference step: target = the model being trained, without gradient,
    on the anchor caption; loss = MSE(ε_θ(x_t, c_t), target); no prior loss."""
    from conceptctl.erasure.methods import Batch

    training = _training(backbone, "ca")
    params = list(training.params.values())
    g = torch.Generator().manual_seed(0)
    side = backbone.resolution // backbone.vae_scale_factor
    text = backbone.encode_prompts(["a house", "a church", ""])
    batch = Batch(latents=torch.randn(2, 4, side, side, generator=g),
                  anchor_text=text[:1].expand(2, -1, -1), target_text=text[1:2].expand(2, -1, -1),
                  empty_text=text[2:].expand(2, -1, -1),
                  timesteps=torch.tensor([10, 700]), noise=torch.randn(2, 4, side, side,
                                                                        generator=g))
    stats = training.method.training_step(batch, 1)
    ours = [p.grad.clone() for p in params]
    assert stats.preserve_loss is None

    unet = backbone.unet
    noisy = backbone.add_noise(batch.latents, batch.noise, batch.timesteps)
    model_pred = unet(noisy, batch.timesteps, batch.target_text).sample
    with torch.no_grad():
        model_pred_anchor = unet(noisy, batch.timesteps, batch.anchor_text).sample
    loss = F.mse_loss(model_pred.float(), model_pred_anchor.float())
    theirs = torch.autograd.grad(loss, params)
    assert stats.loss == pytest.approx(loss.item(), rel=1e-6)
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize(("pipeline", "prediction"),
                         [("tiny_sd1", "epsilon"), ("tiny_sd2", "v_prediction")])
def test_esd_partial_sampling_leaves_the_latent_at_the_timestep_it_returns(
        request, pipeline, prediction):
    """With a UNet that knows x0 exactly, k DDIM steps from noise land on √ᾱ x0 + √(1−ᾱ) ε at
    the returned timestep: the latent is asked about at the noise level it is at."""
    from conceptctl.backbones.loading import open_backbone
    from conceptctl.erasure.esd import ddim_timesteps, partial_sample

    backbone = open_backbone(str(request.getfixturevalue(pipeline)), device="cpu")
    assert backbone.prediction_type == prediction
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(2, 4, 8, 8, generator=g)
    noise = torch.randn(2, 4, 8, 8, generator=g)

    class Oracle(torch.nn.Module):
        def forward(self, x, t, text):
            abar = backbone.alphas_cumprod(t).view(-1, 1, 1, 1)
            clean = x0.repeat(len(x) // len(x0), 1, 1, 1)
            eps = (x - abar.sqrt() * clean) / (1 - abar).sqrt()
            out = eps if prediction == "epsilon" else abar.sqrt() * eps - (1 - abar).sqrt() * clean
            return type("Out", (), {"sample": out})

    text = torch.zeros(2, 3, 5)
    ts = ddim_timesteps(backbone.num_train_timesteps)
    assert ts[0] == 981 and ts[-1] == 1 and len(ts) == 50
    for k in (0, 1, 17, 49):
        x, t = partial_sample(backbone, Oracle(), noise, text, text, k)
        assert torch.equal(t, ts[k].expand(2))
        abar0 = backbone.alphas_cumprod(ts[:1]).item()
        eps0 = (noise - abar0 ** 0.5 * x0) / (1 - abar0) ** 0.5
        abar = backbone.alphas_cumprod(ts[k:k + 1]).item()
        torch.testing.assert_close(x, abar ** 0.5 * x0 + (1 - abar) ** 0.5 * eps0,
                                   rtol=1e-4, atol=1e-4)


def test_esd_step_is_the_reference_loss(backbone):
    """loss = MSE(ε_θ(z, t, c), ε*(z, t, ∅) − η (ε*(z, t, c) − ε*(z, t, ∅))) with z from the
    model being trained (transcribed from train-esd.py), here at the right t."""
    from conceptctl.erasure.esd import DDIM_STEPS, partial_sample

    training = _training(backbone, "esd-x", batch_size=1)
    method, params = training.method, list(training.params.values())
    generator = training.context.generator
    state = generator.get_state()
    stats = method.training_step(None, 1)
    ours = [p.grad.clone() for p in params]

    generator.set_state(state)
    k = int(torch.randint(DDIM_STEPS, (1,), generator=generator))
    side = backbone.resolution // backbone.vae_scale_factor
    start_code = torch.randn((1, 4, side, side), generator=generator)
    emb_0, emb_p = backbone.encode_prompts([""]), backbone.encode_prompts(["church"])
    z, t = partial_sample(backbone, backbone.unet, start_code, emb_p, emb_0, k)
    with torch.no_grad():
        e_0 = training.context.frozen_unet(z, t, emb_0).sample
        e_p = training.context.frozen_unet(z, t, emb_p).sample
    e_n = backbone.unet(z, t, emb_p).sample
    loss = F.mse_loss(e_n, e_0 - (1.0 * (e_p - e_0)))
    theirs = torch.autograd.grad(loss, params)
    assert stats.loss == pytest.approx(loss.item(), rel=1e-5)
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    # Every attn2 tensor trains (q, k, v, out), as the reference's 'xattn'.
    assert {n.split(".attn2.")[1].split(".")[0] for n in training.params} == {
        "to_q", "to_k", "to_v", "to_out"}


def test_esd_run_draws_no_anchor_images_and_resumes_exactly(tiny_sd1, tmp_path):
    from conceptctl.erasure.artifact import read_artifact
    from conceptctl.erasure.run import erase
    from conceptctl.testing import tiny_erase_config

    cfg = tiny_erase_config(tiny_sd1, method="esd-x", batch_size=1, warmup=0, steps=4,
                            params="cross-attn", checkpointing_steps=2)
    result = erase(cfg, tmp_path / "a")
    assert result.steps == 4 and result.seconds["anchors"] < 1
    manifest = json.loads((tmp_path / "a" / "conceptctl.json").read_text())
    assert manifest["anchors"]["cache_file"] is None
    assert "none (the method samples" in (tmp_path / "a" / "README.md").read_text()
    # Stopped after step 2 and resumed: the same weights as the uninterrupted run.
    erase(cfg.with_overrides(steps=2), tmp_path / "b")
    erase(cfg, tmp_path / "b", resume="latest")
    a, b = read_artifact(tmp_path / "a"), read_artifact(tmp_path / "b")
    assert a.weights.keys() == b.weights.keys()
    for name, tensor in a.weights.items():
        assert torch.equal(tensor, b.weights[name]), name
