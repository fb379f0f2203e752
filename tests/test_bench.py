"""bench/'s SDXL: the SDXL-shaped UNet is SDXL 1.0 base's, conditioned the way conceptctl
conditions SDXL, and the DoCo-step harness and the GPU script's SDXL part run on it. Tiny sizes
only: the figures come from the scripts themselves (docs/performance.md)."""

from __future__ import annotations

import importlib
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"

# network_config of Stability-AI/generative-models' configs/inference/sd_xl_base.yaml, the
# original description of SDXL 1.0 base's UNet (what its single-file checkpoints are read with).
SD_XL_BASE_NETWORK = dict(
    adm_in_channels=2816, num_classes="sequential", use_checkpoint=True, in_channels=4,
    out_channels=4, model_channels=320, attention_resolutions=[4, 2], num_res_blocks=2,
    channel_mult=[1, 2, 4], num_head_channels=64, use_spatial_transformer=True,
    use_linear_in_transformer=True, transformer_depth=[1, 2, 10], context_dim=2048,
    spatial_transformer_attn_type="softmax-xformers", legacy=False)
# Its parameter count, as loaded by diffusers (stabilityai/stable-diffusion-xl-base-1.0/unet).
SDXL_UNET_PARAMETERS = 2_567_463_684


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(BENCH))
    try:
        yield SimpleNamespace(**{name: importlib.import_module(name)
                                 for name in ("common", "doco_step", "gpu")})
    finally:
        sys.path.remove(str(BENCH))


def _listed(value):
    return list(value) if isinstance(value, tuple | list) else value


def test_the_sdxl_shaped_unet_is_sdxl_base(bench):
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import create_unet_diffusers_config_from_ldm

    original = {"model": {"params": {
        "network_config": {"params": SD_XL_BASE_NETWORK},
        "first_stage_config": {"params": {"ddconfig": {"ch_mult": [1, 2, 4, 4]}}}}}}
    with warnings.catch_warnings():  # image_size is deprecated there, and needs no checkpoint
        warnings.simplefilter("ignore")
        expected = create_unet_diffusers_config_from_ldm(original, {}, image_size=1024)
    with torch.device("meta"):  # full size, no memory
        unet = UNet2DConditionModel(**bench.common.SDXL_UNET_CONFIG)
    for key, value in expected.items():
        assert _listed(unet.config[key]) == _listed(value), key
    assert sum(p.numel() for p in unet.parameters()) == SDXL_UNET_PARAMETERS


def _spy(unet) -> list[dict]:
    """What the UNet's forward receives after conceptctl's SDXL hook (registered after it)."""
    seen = []
    unet.register_forward_pre_hook(lambda module, args, kwargs: seen.append(
        {"text": args[2] if len(args) > 2 else kwargs["encoder_hidden_states"],
         **kwargs["added_cond_kwargs"]}), with_kwargs=True)
    return seen


def test_the_narrowed_sdxl_model_is_initialised_and_conditioned_like_sdxl(bench):
    model = bench.common.sdxl_model(8, width=10)  # 64 px
    unet = model.backbone.unet
    assert model.backbone.is_sdxl and model.backbone.resolution == 64
    assert list(unet.config.transformer_layers_per_block) == [1, 2, 10]
    for name, p in unet.named_parameters():  # no tensor left as to_empty gave it
        assert torch.isfinite(p).all(), name
    assert unet.conv_in.weight.std() > 0
    text = model.random_text(2, torch.Generator().manual_seed(0))
    assert text.shape == (2, 78, 2048)  # 77 token rows and the pooled row, packed
    seen = _spy(unet)
    with torch.no_grad():
        out = unet(torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), text).sample
    assert out.shape == (2, 4, 8, 8)
    assert seen[0]["text"].shape == (2, 77, 2048)
    assert torch.equal(seen[0]["text_embeds"], text[:, -1, :1280])
    assert seen[0]["time_ids"].tolist() == [[64, 64, 0, 0, 64, 64]] * 2


def _tiny_sdxl_model(bench):
    """The tiny SDXL pipeline's UNet (conceptctl.testing) in the bench's stand-in backbone:
    the harness's code paths in a second each."""
    from conceptctl.testing import build_tiny_pipeline

    unet = build_tiny_pipeline("sdxl").unet
    return bench.common.Model("tiny-sdxl", bench.common.unet_backbone(unet, 8), 8, 77,
                              unet.config.cross_attention_dim,
                              unet.add_embedding.linear_1.in_features - 6 *
                              unet.config.addition_time_embed_dim)


def test_the_doco_step_harness_trains_the_sdxl_model_and_reports_its_parts(bench):
    model = _tiny_sdxl_model(bench)
    h = bench.doco_step.Harness(model, 2)
    before = {name: p.detach().clone() for name, p in h.training.params.items()}
    assert before and all(".attn2.to_k." in n or ".attn2.to_v." in n for n in before)
    seen = _spy(model.backbone.unet)
    result = bench.doco_step.measure(h, 1)
    for clock in ("wall", "cpu"):
        figures = result[clock]
        assert figures["doco_step_s"] > 0 and figures["floor_s"] > 0
        assert figures["ratio_doco_to_floor"] > 0 and figures["warmup_step_s"] > 0
        assert {"frozen forward", "surgery", "discriminator"} <= figures["breakdown_s"].keys()
    assert result["peak_rss_gb"] > 0
    # Every UNet call went through the SDXL hook with the packed text of the real shape.
    assert seen and all(s["text"].shape[1:] == (77, model.text_width) for s in seen)
    assert all(s["time_ids"][0].tolist() == [64, 64, 0, 0, 64, 64] for s in seen)
    assert any(not torch.equal(p, before[n]) for n, p in h.training.params.items())


def test_the_gpu_scripts_sdxl_part_measures_both_settings_and_survives_oom(bench,
                                                                          monkeypatch):
    records = []
    results = bench.gpu.sdxl_steps(_tiny_sdxl_model(bench), 1, 1, records)
    assert [r["gradient_checkpointing"] for r in records] == [False, True]
    assert all(r["wall"]["doco_step_s"] > 0 and r["peak_rss_gb"] > 0 for r in records)
    assert results["plain"] is records[0]

    measure = bench.doco_step.measure

    def no_memory_without_checkpointing(h, rounds):
        if not h.model.backbone.unet.is_gradient_checkpointing:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore")
        return measure(h, rounds)

    monkeypatch.setattr(bench.doco_step, "measure", no_memory_without_checkpointing)
    results = bench.gpu.sdxl_steps(_tiny_sdxl_model(bench), 1, 1, [])
    assert results["plain"]["out_of_memory"] == "CUDA out of memory. Tried to allocate 2.00 GiB"
    assert results["checkpointing"]["wall"]["doco_step_s"] > 0


def test_a_model_larger_than_free_memory_stops_with_one_line(bench, monkeypatch):
    monkeypatch.setattr(bench.common, "free_memory_bytes", lambda device: 2**30)
    with pytest.raises(SystemExit) as stop:
        bench.common.sdxl_model(128)
    message = str(stop.value)
    assert "need 9.6 GiB" in message and "1.0 GiB free" in message and "--width" in message


@pytest.mark.parametrize("argv, error", [
    (["--model", "sdxl", "--resolution", "100"], "--resolution must be a multiple of 8"),
    (["--model", "sdxl", "--width", "0"], "--width must be 1 or more"),
    (["--model", "toy", "--resolution", "256"], "--resolution and --width are for sd14 and sdxl"),
])
def test_doco_step_refuses_bad_sizes(bench, monkeypatch, capsys, argv, error):
    monkeypatch.setattr(sys, "argv", ["doco_step.py", *argv])
    with pytest.raises(SystemExit) as stop:
        bench.doco_step.main()
    assert stop.value.code == 2 and error in capsys.readouterr().err
