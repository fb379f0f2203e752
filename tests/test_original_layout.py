"""The original-layout single file loads back into diffusers bit for bit (SD 1.x, 2.x, SDXL)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from accelerate import init_empty_weights
from diffusers import (
    AutoencoderKL,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from diffusers.loaders import single_file_utils
from safetensors import safe_open
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from conceptctl.interop.original_layout import diffusers_to_original, save_single_file
from conceptctl.testing import build_tiny_pipeline

PARTS = ("unet", "vae", "text_encoder")


def _round_trip(pipe, tmp_path, metadata=None):
    """Save ``pipe`` as a diffusers folder (the config) and a single file; load the file back."""
    config_dir = tmp_path / "diffusers"
    pipe.save_pretrained(config_dir)
    single = save_single_file(pipe, tmp_path / "model.safetensors", metadata)
    loaded = StableDiffusionPipeline.from_single_file(
        str(single),
        config=str(config_dir),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    return loaded, single


def _assert_same_weights(original, loaded):
    for part in PARTS:
        expected = getattr(original, part).state_dict()
        actual = getattr(loaded, part).state_dict()
        assert actual.keys() == expected.keys(), part
        differing = [k for k in expected if not torch.equal(actual[k], expected[k])]
        assert not differing, f"{part}: {differing[:5]}"


def _sample(pipe) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(0)
    return pipe("a cat", num_inference_steps=3, generator=generator, output_type="np").images


def _deeper_unet(cross_attention_dim: int, sd2: bool) -> UNet2DConditionModel:
    """Three blocks of two layers (and two transformer layers each): not the tiny default."""
    return UNet2DConditionModel(
        sample_size=8,
        layers_per_block=2,
        block_out_channels=(16, 32, 32),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        transformer_layers_per_block=2,
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=(2, 4, 4) if sd2 else 2,
        use_linear_projection=sd2,
        norm_num_groups=8,
    )


@pytest.mark.parametrize(
    ("flavor", "prediction_type"), [("sd1", "epsilon"), ("sd2", "v_prediction")]
)
def test_round_trip_is_exact(tmp_path, flavor, prediction_type):
    pipe = build_tiny_pipeline(flavor)
    loaded, _ = _round_trip(pipe, tmp_path)

    _assert_same_weights(pipe, loaded)
    assert loaded.scheduler.config.prediction_type == prediction_type
    np.testing.assert_array_equal(_sample(loaded), _sample(pipe))


def test_text_encoder_layout_follows_flavor():
    sd1, sd2 = build_tiny_pipeline("sd1"), build_tiny_pipeline("sd2")
    clip = diffusers_to_original(sd1.unet, sd1.vae, sd1.text_encoder)
    open_clip = diffusers_to_original(sd2.unet, sd2.vae, sd2.text_encoder)

    assert "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight" in clip
    qkv = open_clip["cond_stage_model.model.transformer.resblocks.1.attn.in_proj_weight"]
    assert qkv.shape == (3 * 64, 64)
    assert open_clip["cond_stage_model.model.positional_embedding"].shape == (77, 64)
    # SD 2 projects into the UNet with linear layers, SD 1 with 1x1 convs.
    key = "model.diffusion_model.input_blocks.1.1.proj_in.weight"
    assert (clip[key].ndim, open_clip[key].ndim) == (4, 2)
    assert open_clip["first_stage_model.encoder.mid.attn_1.q.weight"].shape == (32, 32, 1, 1)


@pytest.mark.parametrize("flavor", ["sd1", "sd2"])
def test_deeper_unet_round_trips(tmp_path, flavor):
    pipe = build_tiny_pipeline(flavor)
    torch.manual_seed(1)
    pipe.unet = _deeper_unet(pipe.unet.config.cross_attention_dim, sd2=flavor == "sd2")
    loaded, single = _round_trip(pipe, tmp_path)

    _assert_same_weights(pipe, loaded)
    with safe_open(single, "pt") as f:
        keys = set(f.keys())
    # 2 layers per block: down blocks end in downsamplers at input_blocks 3 and 6, and the
    # second up block (cross-attention) upsamples after its attention at output_blocks 5.
    assert "model.diffusion_model.input_blocks.6.0.op.weight" in keys
    assert "model.diffusion_model.input_blocks.5.1.transformer_blocks.1.attn2.to_k.weight" in keys
    assert "model.diffusion_model.output_blocks.5.2.conv.weight" in keys
    assert "model.diffusion_model.output_blocks.2.1.conv.weight" in keys


def test_metadata_in_header(tmp_path):
    pipe = build_tiny_pipeline("sd2")
    metadata = {"conceptctl.erased": "cat", "prediction_type": "v_prediction"}
    out = tmp_path / "out"
    out.mkdir()
    path = save_single_file(pipe, out / "m.safetensors", metadata)

    with safe_open(path, "pt") as f:
        assert f.metadata() == metadata
    assert [p.name for p in out.iterdir()] == ["m.safetensors"]
    # Readable like any other new file, not private like safetensors' own temp file.
    reference = out / "reference"
    reference.touch()
    assert path.stat().st_mode & 0o777 == reference.stat().st_mode & 0o777


def test_failed_save_keeps_previous_file(tmp_path):
    pipe = build_tiny_pipeline("sd1")
    out = tmp_path / "out"
    out.mkdir()
    path = out / "m.safetensors"
    path.write_bytes(b"previous")

    with pytest.raises(TypeError):  # safetensors only takes str -> str metadata
        save_single_file(pipe, path, {"not a string": 1})

    assert path.read_bytes() == b"previous"
    assert [p.name for p in out.iterdir()] == ["m.safetensors"]


def test_rejects_non_sd_unet():
    pipe = build_tiny_pipeline("sd1")
    unet = UNet2DConditionModel(
        sample_size=8,
        layers_per_block=1,
        block_out_channels=(16, 32),
        down_block_types=("SimpleCrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "SimpleCrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=2,
        norm_num_groups=8,
    )
    with pytest.raises(ValueError, match="SimpleCrossAttnDownBlock2D"):
        diffusers_to_original(unet, pipe.vae, pipe.text_encoder)


def test_rejects_weights_without_original_name():
    pipe = build_tiny_pipeline("sd1")
    unet = UNet2DConditionModel.from_config(pipe.unet.config, class_embed_type="timestep")
    with pytest.raises(ValueError, match="class_embedding"):
        diffusers_to_original(unet, pipe.vae, pipe.text_encoder)


def _full_size(sd2: bool):
    """SD 1.5 / 2.1 shaped models on the meta device: real key names and shapes, no memory."""
    width = 1024 if sd2 else 768
    with init_empty_weights():
        unet = UNet2DConditionModel(
            cross_attention_dim=width,
            attention_head_dim=(5, 10, 20, 20) if sd2 else 8,
            use_linear_projection=sd2,
        )
        vae = AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(128, 256, 512, 512),
            layers_per_block=2,
        )
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                hidden_size=width,
                intermediate_size=4 * width,
                num_hidden_layers=23 if sd2 else 12,
                num_attention_heads=16 if sd2 else 12,
                hidden_act="gelu" if sd2 else "quick_gelu",
            )
        )
    return unet, vae, text_encoder


@pytest.mark.parametrize(("sd2", "model_type", "count"), [(False, "v1", 1130), (True, "v2", 1214)])
def test_full_size_layout_matches_diffusers_reader(sd2, model_type, count):
    unet, vae, text_encoder = _full_size(sd2)
    checkpoint = diffusers_to_original(unet, vae, text_encoder)

    # 686 UNet + 248 VAE tensors, plus 196 for CLIP or 280 for OpenCLIP's 23 blocks. Released
    # files also carry tensors diffusers ignores on load (DDPM schedule buffers, position_ids,
    # OpenCLIP's 24th block, text_projection, logit_scale), so they are not written.
    assert len(checkpoint) == count
    # What from_single_file guesses without config= (it picks the hub repo it would fetch).
    assert single_file_utils.infer_diffusers_model_type(checkpoint) == model_type
    unet_back = single_file_utils.convert_ldm_unet_checkpoint(checkpoint, dict(unet.config))
    assert unet_back.keys() == unet.state_dict().keys()
    vae_back = single_file_utils.convert_ldm_vae_checkpoint(checkpoint, dict(vae.config))
    assert vae_back.keys() == vae.state_dict().keys()


# --- SDXL ------------------------------------------------------------------------------------


def test_sdxl_round_trip_is_exact(tmp_path):
    pipe = build_tiny_pipeline("sdxl")
    config_dir = tmp_path / "diffusers"
    pipe.save_pretrained(config_dir)
    single = save_single_file(pipe, tmp_path / "sdxl.safetensors")
    loaded = StableDiffusionXLPipeline.from_single_file(str(single), config=str(config_dir),
                                                         add_watermarker=False)
    for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
        expected, actual = getattr(pipe, part).state_dict(), getattr(loaded, part).state_dict()
        assert actual.keys() == expected.keys(), part
        assert all(torch.equal(actual[k], expected[k]) for k in expected), part
    with safe_open(single, "pt") as f:
        keys = set(f.keys())
        projection = f.get_tensor("conditioner.embedders.1.model.text_projection")
    assert {"model.diffusion_model.label_emb.0.0.weight",
            "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight",
            "conditioner.embedders.1.model.transformer.resblocks.1.attn.in_proj_weight",
            "conditioner.embedders.1.model.ln_final.weight"} <= keys
    assert not any(k.startswith("cond_stage_model.") for k in keys)
    # OpenCLIP multiplies from the right: (hidden 64, projection 48), transformers' transpose.
    assert torch.equal(projection, pipe.text_encoder_2.text_projection.weight.T)


def test_sdxl_unet_needs_both_text_encoders():
    pipe = build_tiny_pipeline("sdxl")
    with pytest.raises(ValueError, match="exactly two text encoders"):
        diffusers_to_original(pipe.unet, pipe.vae, pipe.text_encoder)
    sd1 = build_tiny_pipeline("sd1")
    with pytest.raises(ValueError, match="SD UNet with two text encoders"):
        diffusers_to_original(sd1.unet, sd1.vae, sd1.text_encoder, pipe.text_encoder_2)
    # The slots are fixed: CLIP (quick_gelu) first, OpenCLIP (gelu) second.
    with pytest.raises(ValueError, match="quick_gelu"):
        diffusers_to_original(pipe.unet, pipe.vae, pipe.text_encoder_2, pipe.text_encoder_2)


def test_full_size_sdxl_layout_matches_diffusers_reader():
    """SDXL base 1.0's shapes on the meta device (its published configs)."""
    with init_empty_weights():
        unet = UNet2DConditionModel(
            sample_size=128, layers_per_block=2, block_out_channels=(320, 640, 1280),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
            cross_attention_dim=2048, use_linear_projection=True,
            addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816)
        vae = _full_size(False)[1]
        clip = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072,
                                            num_hidden_layers=12, num_attention_heads=12,
                                            hidden_act="quick_gelu"))
        big_g = CLIPTextModelWithProjection(CLIPTextConfig(
            hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
            num_attention_heads=20, hidden_act="gelu", projection_dim=1280))
    checkpoint = diffusers_to_original(unet, vae, clip, big_g)

    # 1680 UNet + 248 VAE + 196 CLIP ViT-L + 389 OpenCLIP bigG tensors (all 32 blocks and the
    # projection); position_ids and logit_scale, which diffusers ignores, are not written.
    assert len(checkpoint) == 2513
    assert single_file_utils.infer_diffusers_model_type(checkpoint) == "xl_base"
    unet_back = single_file_utils.convert_ldm_unet_checkpoint(checkpoint, dict(unet.config))
    assert unet_back.keys() == unet.state_dict().keys()
    vae_back = single_file_utils.convert_ldm_vae_checkpoint(checkpoint, dict(vae.config))
    assert vae_back.keys() == vae.state_dict().keys()
    clip_back = single_file_utils.convert_ldm_clip_checkpoint(checkpoint)
    assert {k.removeprefix("text_model.") for k in clip_back} == clip.state_dict().keys()
    big_g_back = single_file_utils.convert_open_clip_checkpoint(
        big_g, checkpoint, prefix="conditioner.embedders.1.model.")
    assert big_g_back.keys() == big_g.state_dict().keys()
    assert big_g_back["text_model.encoder.layers.31.self_attn.v_proj.weight"].shape == (1280,
                                                                                        1280)
