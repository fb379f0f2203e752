"""SDXL as a backbone, on the tiny SDXL-shaped pipeline: loading (folder and single file), the
packed text conditioning and the UNet hook that unpacks it, sampling, erasing, evaluating
(exports: tests/test_export_sdxl.py)."""

import copy
import json

import numpy as np
import pytest
import torch
from PIL import Image

from conceptctl.backbones import sdxl
from conceptctl.backbones.loading import open_backbone
from conceptctl.backbones.soft_prompt import PromptEncoder, SoftPromptEncoder
from conceptctl.erasure.artifact import apply_artifact, read_artifact
from conceptctl.erasure.config import EraseConfig, complete
from conceptctl.erasure.params import select_parameters
from conceptctl.erasure.run import erase, frozen_copy
from conceptctl.errors import BackboneError
from conceptctl.interop.original_layout import save_single_file
from conceptctl.testing import build_tiny_pipeline, tiny_erase_config

PROMPTS = ["a church", "a red boat on a lake"]


@pytest.fixture(scope="module")
def sdxl_artifact(tmp_path_factory, tiny_sdxl):
    """A seconds-long DoCo erasure of the tiny SDXL, for the tests that only read it."""
    from conceptctl.plugins import reset_plugins

    root = tmp_path_factory.mktemp("sdxl-artifact")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CONCEPTCTL_HOME", str(root / "home"))
        mp.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
        reset_plugins()
        erase(tiny_erase_config(tiny_sdxl, steps=2, warmup=1, checkpointing_steps=2),
              root / "art")
    reset_plugins()
    return root / "art"


def _pipeline_call(backbone, latents, t, prompts, size):
    """The UNet as StableDiffusionXLPipeline calls it: its own prompt encoding, its own
    _get_add_time_ids for a picture of ``size`` (height, width)."""
    pipe = backbone.pipeline
    hidden, _, pooled, _ = pipe.encode_prompt(prompts, device="cpu", num_images_per_prompt=1,
                                              do_classifier_free_guidance=False)
    ids = pipe._get_add_time_ids(size, (0, 0), size, dtype=hidden.dtype,
                                 text_encoder_projection_dim=pooled.shape[-1])
    return pipe.unet(latents, t, encoder_hidden_states=hidden,
                     added_cond_kwargs={"text_embeds": pooled,
                                        "time_ids": ids.repeat(len(latents), 1)}).sample


def test_tiny_sdxl_is_sdxl_shaped_and_seeded():
    pipe = build_tiny_pipeline("sdxl")
    assert type(pipe).__name__ == "StableDiffusionXLPipeline"
    assert (pipe.text_encoder.config.hidden_size, pipe.text_encoder_2.config.hidden_size) == (
        32, 64)
    assert type(pipe.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    unet = pipe.unet.config
    assert unet.addition_embed_type == "text_time" and unet.cross_attention_dim == 96
    assert unet.projection_class_embeddings_input_dim == (
        pipe.text_encoder_2.config.projection_dim + 6 * unet.addition_time_embed_dim)
    assert max(unet.transformer_layers_per_block) > 1
    schedule = pipe.scheduler.config
    assert (type(pipe.scheduler).__name__, schedule.beta_schedule, schedule.beta_start,
            schedule.beta_end, schedule.prediction_type) == (
        "EulerDiscreteScheduler", "scaled_linear", 0.00085, 0.012, "epsilon")
    again, other = build_tiny_pipeline("sdxl"), build_tiny_pipeline("sdxl", seed=1)
    for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
        mine, same = getattr(pipe, part).state_dict(), getattr(again, part).state_dict()
        assert all(torch.equal(mine[k], same[k]) for k in mine), part
    assert not torch.equal(pipe.unet.conv_in.weight, other.unet.conv_in.weight)


def test_folder_loads_as_sdxl_with_its_defaults(tiny_sdxl):
    backbone = open_backbone(str(tiny_sdxl), device="cpu")
    assert type(backbone.pipeline).__name__ == "StableDiffusionXLPipeline"
    assert (backbone.is_sdxl, backbone.pooled_width, backbone.text_width,
            backbone.resolution) == (True, 48, 96, 16)
    # SDXL's defaults follow the architecture, not the name it was given by.
    assert (backbone.spec.family, backbone.spec.sample_guidance) == ("sdxl", 5.0)
    assert backbone.describe()["family"] == "sdxl"
    assert backbone.pipeline.watermark is None  # the raw output, whatever is installed
    text = backbone.encode_prompts(PROMPTS)
    assert text.shape == (2, 77 + 1, 96)
    hidden, _, pooled, _ = backbone.pipeline.encode_prompt(
        PROMPTS, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False)
    assert torch.equal(text[:, :-1], hidden) and torch.equal(text[:, -1, :48], pooled)
    assert not text[:, -1, 48:].any()  # the pooled row's padding
    assert torch.equal(backbone.token_states(text), hidden)
    # The trainer's own encoder gives exactly the same tensor.
    assert torch.equal(PromptEncoder(backbone, PROMPTS)(), text)


def test_the_hook_feeds_the_unet_exactly_what_the_pipeline_does(tiny_sdxl):
    backbone = open_backbone(str(tiny_sdxl), device="cpu")
    text = backbone.encode_prompts(PROMPTS)
    t = torch.tensor([10, 700])
    for latent_size, picture in (((8, 8), (16, 16)), ((8, 12), (16, 24))):  # square or not
        x = torch.randn(2, 4, *latent_size, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            packed = backbone.unet(x, t, text).sample
            assert torch.equal(packed, _pipeline_call(backbone, x, t, PROMPTS, picture))
            # The frozen copy (a deepcopy) carries the hook along.
            frozen = frozen_copy(backbone.unet, select_parameters(backbone, "cross-attn-kv"))
            assert torch.equal(frozen(x, t, text).sample, packed)
            assert torch.equal(copy.deepcopy(backbone.unet)(x, t, encoder_hidden_states=text)
                               .sample, packed)
    # Wrapping the same pipeline again installs no second hook.
    sdxl.install(backbone.unet, 48, 2)
    assert sum(isinstance(h, sdxl.PooledRowUnpacker)
               for h in backbone.unet._forward_pre_hooks.values()) == 1
    # Gradient checkpointing recomputes after the hook; gradients reach the packed text.
    backbone.unet.enable_gradient_checkpointing()
    backbone.unet.train()
    text = text.clone().requires_grad_(True)
    out = backbone.unet(x, t, text).sample
    out.square().mean().backward()
    torch.testing.assert_close(out.detach(), packed, rtol=0, atol=1e-6)
    assert text.grad[:, :-1].abs().sum() > 0 and text.grad[:, -1, :48].abs().sum() > 0
    assert not text.grad[:, -1, 48:].any()


@pytest.mark.slow
def test_compiled_unet_keeps_the_hook(tiny_sdxl):
    backbone = open_backbone(str(tiny_sdxl), device="cpu")
    text = backbone.encode_prompts(PROMPTS)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 700])
    with torch.no_grad():
        expected = backbone.unet(x, t, text).sample
        compiled = copy.deepcopy(backbone.unet)
        compiled.compile(backend="eager")  # dynamo traces the hook; no C++ compiler needed
        assert torch.equal(compiled(x, t, text).sample, expected)


def test_soft_prompts_reach_both_text_encoders(tiny_sdxl):
    backbone = open_backbone(str(tiny_sdxl), device="cpu")
    encoder = SoftPromptEncoder(backbone, PROMPTS[:1], tokens=2)
    assert encoder.table().shape == (len(backbone.tokenizer), 32 + 64)
    words = encoder.random_words(torch.Generator().manual_seed(0))
    assert words.shape == (1, 2, 96)
    with torch.no_grad():
        base = encoder(words)
        second = words.clone()
        second[..., 32:] += 1  # only the second encoder's part of the soft words
        moved = encoder(second)
    assert base.shape == (1, 78, 96)
    assert torch.equal(moved[:, :-1, :32], base[:, :-1, :32])  # the first encoder's states
    assert not torch.equal(moved[:, :-1, 32:], base[:, :-1, 32:])
    assert not torch.equal(moved[:, -1], base[:, -1])  # the pooled row (second encoder)


def test_parameter_groups_cover_every_transformer_block_and_both_encoders(tiny_sdxl):
    backbone = open_backbone(str(tiny_sdxl), device="cpu")
    keys = [n for n in select_parameters(backbone, "cross-attn-kv") if ".attn2.to_k." in n]
    modules = [n for n, _ in backbone.unet.named_modules() if n.endswith("attn2.to_k")]
    assert len(keys) == len(modules) == 8  # 2 down + 2 mid + 2 × 2 up blocks deep
    assert any(".transformer_blocks.1." in n for n in keys)
    encoders = select_parameters(backbone, "text-encoder")
    assert {n.split(".")[0] for n in encoders} == {"text_encoder", "text_encoder_2"}
    # SDXL reads the first encoder's penultimate layer: its last layer cannot train.
    assert not any(n.startswith("text_encoder.") and ".layers.1." in n for n in encoders)
    assert any(n.startswith("text_encoder_2.") and ".layers.1." in n for n in encoders)
    assert not any(n.startswith("text_encoder") for n in select_parameters(backbone, "full"))
    named = backbone.named_tensors()
    assert sum(n.startswith("text_encoder_2.") for n in named) == len(
        list(backbone.pipeline.text_encoder_2.parameters()))


def test_single_file_loads_back_with_equal_tensors(tiny_sdxl, tmp_path):
    folder = open_backbone(str(tiny_sdxl), device="cpu")
    path = save_single_file(folder.pipeline, tmp_path / "sdxl.safetensors")
    loaded = open_backbone(str(path), device="cpu", config=str(tiny_sdxl))
    assert type(loaded.pipeline).__name__ == "StableDiffusionXLPipeline"
    assert (loaded.spec.format, loaded.spec.family) == ("single-file", "sdxl")
    want, got = folder.named_tensors(), loaded.named_tensors()
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k]) for k in want)
    assert all(torch.equal(a, b) for a, b in zip(folder.vae.state_dict().values(),
                                                 loaded.vae.state_dict().values(), strict=True))
    # Without the configs it needs the hub, and says what to pass instead.
    with pytest.raises(BackboneError) as info:
        open_backbone(str(path), device="cpu")
    assert "--backbone-config" in info.value.hint and "sdxl-1.0" in info.value.hint


def test_sample_is_deterministic(cli, tiny_sdxl, tmp_path):
    args = ["sample", *PROMPTS, "-b", tiny_sdxl, "-n", "2", "--steps", "3"]
    first = cli(*args, "-o", tmp_path / "a")
    assert first.code == 0, first.err
    second = cli(*args, "-o", tmp_path / "b")
    assert second.code == 0, second.err
    names = sorted(p.name for p in (tmp_path / "a").glob("0*.png"))
    assert len(names) == 4
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    sidecar = json.loads((tmp_path / "a" / "samples.json").read_text())
    assert sidecar["settings"]["guidance"] == 5.0  # SDXL's default


def test_sdxl_presets():
    from conceptctl.backbones.resolve import resolve_backbone

    spec = resolve_backbone("sdxl-1.0")
    doco = complete(EraseConfig(concept="Van Gogh", anchor="painting", backbone="sdxl-1.0"), spec)
    # DoCo's SD recipe, anchors at SDXL's guidance.
    assert (doco.steps, doco.warmup, doco.batch_size, doco.d_lr, doco.anchor_steps,
            doco.anchor_guidance) == (2000, 1000, 8, 5e-4, 25, 5.0)
    assert doco.lr == pytest.approx(6e-6 * 8)
    esd = complete(EraseConfig(concept="Van Gogh", anchor="painting", backbone="sdxl-1.0",
                               method="esd-x"), spec)
    assert (esd.steps, esd.batch_size, esd.params) == (200, 1, "cross-attn")
    assert esd.lr == pytest.approx(2e-4)


def test_doco_erase_writes_an_artifact_that_sample_applies(cli, tiny_sdxl, sdxl_artifact,
                                                          tmp_path):
    from conceptctl.sampling import SampleSettings, sample_images

    artifact = read_artifact(sdxl_artifact)
    assert artifact.base["family"] == "sdxl"
    assert "stable-diffusion-xl" in (sdxl_artifact / "README.md").read_text()  # card's tags
    assert any(".transformer_blocks.1.attn2.to_k." in n for n in artifact.weights)
    result = cli("sample", "a church", "--model", sdxl_artifact, "-n", "2", "--steps", "2",
                 "-o", tmp_path / "s")
    assert result.code == 0, result.err
    # The same pictures from the base with the artifact's tensors put in by hand.
    backbone = open_backbone(str(tiny_sdxl), device="cpu")
    params = backbone.named_tensors()
    changed = [n for n, v in artifact.weights.items() if not torch.equal(params[n], v)]
    assert changed  # the erasure moved weights
    with torch.no_grad():
        for name, value in artifact.weights.items():
            params[name].copy_(value)
    for image in sample_images(backbone, SampleSettings(("a church",), images_per_prompt=2,
                                                        steps=2)):
        drawn = Image.open(tmp_path / "s" / f"000-a-church-{image.index:02d}.png")
        assert np.array_equal(np.asarray(drawn), np.asarray(image.image))
    # apply_artifact (what --model runs) leaves exactly the artifact's values.
    fresh = open_backbone(str(tiny_sdxl), device="cpu")
    apply_artifact(fresh, artifact)
    fresh_params = fresh.named_tensors()
    assert all(torch.equal(fresh_params[n], v) for n, v in artifact.weights.items())


@pytest.mark.parametrize("method", ["ca", "esd-x", "uce"])
def test_baselines_erase_sdxl(tiny_sdxl, tmp_path, method):
    out = tmp_path / method
    erase(tiny_erase_config(tiny_sdxl, method=method, steps=2, checkpointing_steps=2), out)
    artifact = read_artifact(out)
    assert artifact.manifest["method"] == method and artifact.weights
    assert all(torch.isfinite(v).all() for v in artifact.weights.values())


def test_adversarial_text_encoder_erasure_trains_both_encoders(tiny_sdxl, tmp_path):
    out = tmp_path / "adv"
    erase(tiny_erase_config(tiny_sdxl, params="text-encoder", adversarial=True,
                            adversarial_steps=2, steps=2, warmup=0, checkpointing_steps=2), out)
    artifact = read_artifact(out)
    base = open_backbone(str(tiny_sdxl), device="cpu").named_tensors()
    moved = {n.split(".")[0] for n, v in artifact.weights.items() if not torch.equal(base[n], v)}
    assert moved == {"text_encoder", "text_encoder_2"}


@pytest.mark.slow
def test_eval_runs_with_the_soft_prompt_attacks(cli, sdxl_artifact, tmp_path):
    out = tmp_path / "eval"
    result = cli("eval", sdxl_artifact, "--steps", "2", "-n", "1", "--attack-cases", "1",
                 "--attacks", "embedding,unlearndiffatk", "--attack-option", "embedding.steps=2",
                 "--attack-option", "unlearndiffatk.steps=2", "--attack-option",
                 "unlearndiffatk.stages=2", "-o", out, "--json")
    assert result.code == 0, result.err
    report = json.loads(result.out)
    assert report["detector"] is None and report["suite"]["name"] == "templates"
    assert {a["attack"] for a in report["attacks"]} == {"embedding", "unlearndiffatk"}
    assert (out / "report.html").is_file()


def test_backbones_lists_sdxl(cli):
    result = cli("backbones", "--json")
    assert result.code == 0
    row = {r["name"]: r for r in json.loads(result.out)["backbones"]}["sdxl-1.0"]
    assert (row["source"], row["resolution"], row["prediction_type"], row["text_width"],
            row["family"], row["license"]) == (
        "stabilityai/stable-diffusion-xl-base-1.0", 1024, "epsilon", 2048, "sdxl", "openrail++")
    table = cli("backbones")
    assert "sdxl-1.0" in table.out


def test_discriminator_sizes_itself_from_the_latent():
    from conceptctl.erasure.discriminators import PatchGAN

    # SD's 64×64 latents: the reference's 3×3 patches; SDXL's 128×128 at 1024 px: the same
    # four stages (the same receptive field), 7×7 patches.
    assert PatchGAN(4, 64)(torch.zeros(2, 4, 64, 64)).shape == (2, 1, 3, 3)
    assert PatchGAN(4, 128)(torch.zeros(2, 4, 128, 128)).shape == (2, 1, 7, 7)


def test_half_precision_vae_runs_upcast(tiny_sdxl):
    backbone = open_backbone(str(tiny_sdxl), device="cpu", dtype="float16")
    seen = []
    handle = backbone.vae.decoder.register_forward_pre_hook(
        lambda module, args: seen.append(args[0].dtype))
    try:
        pixels = backbone.decode_latents(torch.randn(1, 4, 8, 8))
    finally:
        handle.remove()
    assert seen == [torch.float32]  # SDXL's VAE overflows in float16
    assert pixels.dtype == torch.float16 and backbone.vae.dtype == torch.float16
