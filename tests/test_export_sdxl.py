"""conceptctl export on the tiny SDXL pipeline: two seconds-long DoCo erasures, of the UNet's
cross-attention (the default) and of both text encoders (``--params text-encoder``), exported
in every format and read back by the tool each format is for: the diffusers folder draws what
``sample --model`` draws, the kohya LoRA in SDXL's original-layout names gives the erased model
in diffusers within its reported error, the single file loads back with equal tensors, the
delta and the diff give the erased weights. (The UIs' own key maps: tests/test_export_interop.py.)
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from conceptctl.backbones.backbone import TEXT_ENCODER_2_PREFIX, TEXT_ENCODER_PREFIX
from conceptctl.backbones.loading import open_backbone
from conceptctl.erasure.artifact import apply_artifact, read_artifact
from conceptctl.export.run import export_artifact
from conceptctl.testing import write_test_artifact

PROMPT = "a red church"
GROUPS = ("cross-attn-kv", "text-encoder")
# conceptctl draws SDXL raw (conceptctl.backbones.loading); so must plain diffusers here.
PLAIN = dict(add_watermarker=False)


@pytest.fixture(scope="module")
def erasures(tmp_path_factory, tiny_sdxl):
    """params group -> the artifact of a 2-step DoCo erasure of the tiny SDXL."""
    from conceptctl.erasure.run import erase
    from conceptctl.plugins import reset_plugins
    from conceptctl.testing import tiny_erase_config

    root = tmp_path_factory.mktemp("sdxl-erasures")
    made = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CONCEPTCTL_HOME", str(root / "home"))
        mp.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
        reset_plugins()
        for group in GROUPS:
            # No warm-up for the text encoders: with 2 steps, both must move.
            erase(tiny_erase_config(tiny_sdxl, params=group, steps=2, checkpointing_steps=2,
                                    warmup=1 if group == "cross-attn-kv" else 0),
                  root / group)
            made[group] = root / group
    reset_plugins()
    return made


def _erased(base, artifact):
    model = open_backbone(str(base), device="cpu")
    apply_artifact(model, read_artifact(artifact))
    return model


def _named(pipe) -> dict[str, torch.Tensor]:
    """A pipeline's tensors named as artifacts name them."""
    return {**dict(pipe.unet.named_parameters()),
            **{TEXT_ENCODER_PREFIX + k: v for k, v in pipe.text_encoder.named_parameters()},
            **{TEXT_ENCODER_2_PREFIX + k: v for k, v in pipe.text_encoder_2.named_parameters()}}


def _moved(base, artifact) -> dict[str, torch.Tensor]:
    """The artifact's tensors whose value differs from the base's."""
    params = open_backbone(str(base), device="cpu").named_tensors()
    return {n: v for n, v in read_artifact(artifact).weights.items()
            if not torch.equal(v, params[n])}


def _draw(pipe, output_type="pil"):
    """What 'conceptctl sample -n 1 --steps 3' draws (seed 0, SDXL's guidance 5), with
    diffusers alone (conceptctl.sampling.initial_noise)."""
    pipe.set_progress_bar_config(disable=True)
    side = pipe.unet.config.sample_size
    noise = torch.randn((pipe.unet.config.in_channels, side, side),
                        generator=torch.Generator("cpu").manual_seed(0))
    size = side * pipe.vae_scale_factor
    image = pipe(PROMPT, latents=noise[None], height=size, width=size, num_inference_steps=3,
                 guidance_scale=5.0, output_type=output_type).images[0]
    return np.asarray(image)


def _sampled(cli, out, *args):
    result = cli("sample", PROMPT, "-n", "1", "--steps", "3", "-o", out, *args)
    assert result.code == 0, result.err
    return np.asarray(Image.open(next(out.glob("000-*.png"))))


def _metadata(path) -> dict[str, str]:
    with safe_open(str(path), "pt") as f:
        return f.metadata()


def test_both_erasures_move_what_they_train(erasures, tiny_sdxl):
    assert {n.split(".")[0] for n in _moved(tiny_sdxl, erasures["text-encoder"])} == {
        "text_encoder", "text_encoder_2"}
    kv = _moved(tiny_sdxl, erasures["cross-attn-kv"])
    assert kv and all(".attn2.to_k." in n or ".attn2.to_v." in n for n in kv)


@pytest.mark.parametrize("group", GROUPS)
def test_diffusers_folder_draws_what_sample_model_draws(erasures, tiny_sdxl, group, tmp_path,
                                                        cli):
    artifact = erasures[group]
    out = tmp_path / "folder"
    result = cli("export", artifact, "--format", "diffusers", "--out", out)
    assert result.code == 0, result.err

    # Plain diffusers, no conceptctl code: the pixels of 'conceptctl sample --model'.
    plain = StableDiffusionXLPipeline.from_pretrained(out, **PLAIN)
    np.testing.assert_array_equal(_draw(plain), _sampled(cli, tmp_path / "s", "--model",
                                                         artifact))
    base = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl, **PLAIN)
    assert not np.array_equal(_draw(base, "np"), _draw(plain, "np")), "the erasure changes them"

    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline"
    assert {"text_encoder_2", "tokenizer_2"} <= index.keys()
    # The second tokenizer is its own (SDXL's pads with '!'), not a copy of the first.
    assert (plain.tokenizer_2.pad_token, plain.tokenizer.pad_token) == ("!", "<|endoftext|>")
    weights = sorted(p.parent.name for p in out.rglob("*.safetensors"))
    assert weights == ["text_encoder", "text_encoder_2", "unet", "vae"]
    for path in out.rglob("*.safetensors"):
        assert json.loads(_metadata(path)["conceptctl"])["kind"] == "diffusers"
    card = (out / "README.md").read_text()
    assert "StableDiffusionXLPipeline.from_pretrained" in card and "add_watermarker" in card
    assert "stable-diffusion-xl" in card
    # 'conceptctl sample -b FOLDER' takes it as SDXL with SDXL's defaults.
    folder = open_backbone(str(out), device="cpu")
    assert (folder.is_sdxl, folder.spec.family, folder.spec.sample_guidance) == (
        True, "sdxl", 5.0)


def _loaded_errors(base, artifact, lora_file) -> dict[str, float]:
    """Relative error of each changed weight after diffusers loads and fuses the LoRA."""
    pipe = StableDiffusionXLPipeline.from_pretrained(base, **PLAIN)
    original = {k: v.detach().clone() for k, v in _named(pipe).items()}
    pipe.load_lora_weights(str(lora_file))
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    fused = _named(pipe)
    errors = {}
    for name, erased in _moved(base, artifact).items():
        change = (erased - original[name]).double()
        errors[name.removesuffix(".weight")] = float(
            (fused[name].double() - erased.double()).norm() / change.norm())
    return errors


@pytest.mark.parametrize("group", GROUPS)
def test_kohya_lora_reproduces_the_erased_model_within_its_reported_error(
        erasures, tiny_sdxl, group, tmp_path, cli):
    artifact = erasures[group]
    out = tmp_path / "church.safetensors"
    # The defaults: kohya names, --rank auto with a 1 % bound per layer.
    result = cli("export", artifact, "--format", "lora", "--out", out, "--json")
    assert result.code == 0, result.err
    report = json.loads(result.out)["report"]
    assert report["lora_format"] == "kohya" and report["overall_error"] <= 0.01
    loaded = _loaded_errors(tiny_sdxl, artifact, out)
    assert loaded.keys() == {layer["module"] for layer in report["layers"]}
    for layer in report["layers"]:
        assert loaded[layer["module"]] == pytest.approx(layer["error"], abs=1e-5)

    modules = {key.partition(".")[0] for key in load_file(out)}
    if group == "text-encoder":  # kohya's SDXL prefixes, transformers 4's CLIP names
        assert {m[:9] for m in modules} == {"lora_te1_", "lora_te2_"}
        assert "lora_te2_text_model_encoder_layers_1_self_attn_q_proj" in modules
    else:  # the original (SGM) layout: the tiny's second level is input_blocks 3, SDXL's 4
        assert all(m.startswith("lora_unet_") for m in modules)
        assert "lora_unet_input_blocks_3_1_transformer_blocks_1_attn2_to_k" in modules
        assert "lora_unet_middle_block_1_transformer_blocks_0_attn2_to_v" in modules
        assert not any("down_blocks" in m or "up_blocks" in m for m in modules)
    metadata = _metadata(out)
    assert {k: metadata[k] for k in ("ss_v2", "ss_base_model_version", "ss_network_module",
                                     "modelspec.architecture", "modelspec.implementation",
                                     "modelspec.resolution", "modelspec.prediction_type")} == {
        "ss_v2": "False", "ss_base_model_version": "sdxl_base_v1-0",
        "ss_network_module": "networks.lora",
        "modelspec.architecture": "stable-diffusion-xl-v1-base/lora",
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
        "modelspec.resolution": "16x16", "modelspec.prediction_type": "epsilon"}
    assert json.loads(metadata["conceptctl"])["kind"] == "lora"
    ui = json.loads(out.with_suffix(".json").read_text())  # what A1111 shows and filters by
    assert ui["sd version"] == "SDXL"
    card = out.with_suffix(".md").read_text()
    assert 'StableDiffusionXLPipeline.from_pretrained("PATH/TO/BASE")' in card


@pytest.mark.parametrize("naming", ["kohya", "diffusers"])
def test_full_rank_lora_draws_the_erased_images(erasures, tiny_sdxl, naming, tmp_path):
    artifact = erasures["text-encoder"]  # both encoders: te1 / te2, text_encoder_2.
    out = tmp_path / "lora.safetensors"
    report = export_artifact(artifact, "lora", out, options={"rank": "1000",
                                                             "lora_format": naming}).report
    assert report["overall_error"] < 1e-6
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl, **PLAIN)
    pipe.load_lora_weights(str(out))
    erased = _erased(tiny_sdxl, artifact).pipeline
    np.testing.assert_allclose(_draw(pipe, "np"), _draw(erased, "np"), atol=1e-5)
    if naming == "diffusers":
        assert {k.partition(".")[0] for k in load_file(out)} == {"text_encoder",
                                                                "text_encoder_2"}


def test_every_unet_module_keeps_its_kohya_name_through_diffusers(tiny_sdxl, tmp_path):
    """Every Linear and Conv2d of the SDXL UNet (resnets, skip connections, down- and
    upsamplers, attention, feed-forward, time and added embeddings, conv_in/out) under its
    original-layout kohya name lands on the right diffusers weight."""
    model = open_backbone(str(tiny_sdxl), device="cpu")
    names = [f"{name}.weight" for name, module in model.unet.named_modules()
             if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d))]
    artifact = write_test_artifact(model, tmp_path / "art", names=names)
    out = tmp_path / "all.safetensors"
    export_artifact(artifact, "lora", out, options={"rank": "1000"})
    modules = {key.partition(".")[0] for key in load_file(out)}
    assert {"lora_unet_input_blocks_0_0", "lora_unet_label_emb_0_0", "lora_unet_time_embed_2",
            "lora_unet_input_blocks_2_0_op", "lora_unet_output_blocks_1_2_conv",
            "lora_unet_out_2"} <= modules
    errors = _loaded_errors(tiny_sdxl, artifact, out)
    assert len(errors) == len(names) and max(errors.values()) < 1e-5


@pytest.mark.parametrize("group", GROUPS)
def test_single_file_loads_back_with_equal_tensors(erasures, tiny_sdxl, group, tmp_path, cli):
    artifact = erasures[group]
    out = tmp_path / "church-sdxl.safetensors"
    result = cli("export", artifact, "--format", "single-file", "--out", out, "--json")
    assert result.code == 0, result.err
    assert json.loads(result.out)["report"]["text_encoder"] == "CLIP + OpenCLIP"

    # config= names the base folder: from_single_file would otherwise ask the hub (offline).
    loaded = StableDiffusionXLPipeline.from_single_file(str(out), config=str(tiny_sdxl),
                                                        **PLAIN)
    erased = _erased(tiny_sdxl, artifact)
    want, got = erased.named_tensors(), _named(loaded)
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k]) for k in want)
    assert all(torch.equal(a, b) for a, b in zip(erased.vae.state_dict().values(),
                                                 loaded.vae.state_dict().values(), strict=True))
    assert json.loads(_metadata(out)["conceptctl"])["kind"] == "single-file"
    card = out.with_suffix(".md").read_text()
    assert "StableDiffusionXLPipeline.from_single_file" in card
    # conceptctl itself takes the file as SDXL too.
    assert open_backbone(str(out), device="cpu", config=str(tiny_sdxl)).is_sdxl


@pytest.mark.parametrize("group", GROUPS)
def test_delta_samples_like_the_artifact(erasures, tiny_sdxl, group, tmp_path, cli):
    artifact = erasures[group]
    out = tmp_path / "church.delta.safetensors"
    result = cli("export", artifact, "--format", "delta", "--out", out, "--json")
    assert result.code == 0, result.err
    assert json.loads(result.out)["report"]["max_reapply_error"] < 1e-6
    delta = load_file(out)
    # conceptctl's own format: the tensors' names, the second encoder's under text_encoder_2.
    assert set(delta) == set(_moved(tiny_sdxl, artifact))
    np.testing.assert_array_equal(_sampled(cli, tmp_path / "a", "--model", out),
                                  _sampled(cli, tmp_path / "b", "--model", artifact))


def _diff_names(model) -> dict[str, str]:
    """kohya module name -> tensor-name module path, from the modules' own paths: the inverse
    of the SDXL naming, built independently of the exporter (the original-layout table of
    diffusers' single-file reader, via conceptctl.interop, for the UNet)."""
    from conceptctl.interop.original_layout import unet_original_modules

    names = {"lora_unet_" + original.replace(".", "_"): module
             for module, original in unet_original_modules(model.unet).items()}
    for key_prefix, prefix, encoder in (("lora_te1_", TEXT_ENCODER_PREFIX, model.text_encoder),
                                        ("lora_te2_", TEXT_ENCODER_2_PREFIX,
                                         model.pipeline.text_encoder_2)):
        for name, _ in encoder.named_modules():
            named = name if name.startswith("text_model.") else "text_model." + name
            names[key_prefix + named.replace(".", "_")] = prefix + name
    return names


@pytest.mark.parametrize("group", GROUPS)
def test_diff_gives_the_erased_weights(erasures, tiny_sdxl, group, tmp_path, cli):
    artifact = erasures[group]
    out = tmp_path / "church.diff.safetensors"
    result = cli("export", artifact, "--format", "diff", "--out", out, "--json")
    assert result.code == 0, result.err
    reported = json.loads(result.out)["report"]["max_reapply_error"]
    assert reported < 1e-6  # float rounding of erased - base, added back
    model = open_backbone(str(tiny_sdxl), device="cpu")
    params, names = model.named_tensors(), _diff_names(model)
    restored = {}
    for key, value in load_file(out).items():
        module, _, suffix = key.partition(".")
        name = f"{names[module]}.{ {'diff': 'weight', 'diff_b': 'bias'}[suffix] }"
        restored[name] = params[name].detach() + value
    moved = _moved(tiny_sdxl, artifact)
    assert moved.keys() <= restored.keys()
    for name, value in restored.items():  # unchanged siblings get zeros, never others
        expected = moved.get(name, params[name].detach())
        assert float((value - expected).abs().max()) <= reported, name
    prefixes = {key[:9] for key in load_file(out)}
    assert prefixes == ({"lora_te1_", "lora_te2_"} if group == "text-encoder"
                        else {"lora_unet"})
    metadata = _metadata(out)
    assert (metadata["ss_base_model_version"], metadata["ss_v2"]) == ("sdxl_base_v1-0", "False")


def test_what_no_format_can_hold_is_refused_in_one_line(tiny_sdxl, tmp_path, cli):
    """SDXL's pooled projection is no attention or MLP weight: the UIs' diff loaders have no
    place for it. A bias has no LoRA. Each is one line, and nothing is written."""
    model = open_backbone(str(tiny_sdxl), device="cpu")
    cases = (
        (["text_encoder_2.text_projection.weight"], "diff",
         "text_encoder_2.text_projection.weight has no place"),
        (["down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_out.0.bias"], "lora",
         "cannot be written as a LoRA"),
    )
    for index, (names, fmt, message) in enumerate(cases):
        artifact = write_test_artifact(model, tmp_path / f"art{index}", names=names)
        out = tmp_path / f"out{index}.safetensors"
        result = cli("export", artifact, "--format", fmt, "--out", out)
        assert result.code == 1 and result.err.startswith("error: "), result.err
        assert message in " ".join(result.err.split()) and "Traceback" not in result.err
        assert not out.exists() and not out.with_suffix(".md").exists()
