"""Backbones: resolving what users type, loading SD1-/SD2-shaped pipelines, model facts."""

import pytest
import torch

from conceptctl.backbones.loading import LoadOptions, load_backbone, open_backbone
from conceptctl.backbones.resolve import resolve_backbone
from conceptctl.errors import BackboneError, UnknownComponentError, UnsafeFileError
from conceptctl.settings import set_setting


def test_known_name_resolves_to_its_hub_id():
    spec = resolve_backbone("sd-2.1")
    assert (spec.source, spec.prediction_type, spec.resolution) == (
        "stabilityai/stable-diffusion-2-1", "v_prediction", 768)


def test_local_folder_and_hub_id(tiny_sd1):
    assert resolve_backbone(str(tiny_sd1)).source == str(tiny_sd1.resolve())
    assert resolve_backbone("someone/some-model").source == "someone/some-model"


def test_settings_point_a_name_at_a_local_copy(tiny_sd1):
    set_setting("backbone-path.sd-1.5", str(tiny_sd1))
    spec = resolve_backbone("sd-1.5")
    assert (spec.name, spec.source, spec.format) == ("sd-1.5", str(tiny_sd1), "diffusers")


def test_settings_path_that_vanished_is_reported(tmp_path):
    set_setting("backbone-path.sd-1.4", str(tmp_path / "gone"))
    with pytest.raises(BackboneError, match="nothing is there"):
        resolve_backbone("sd-1.4")


@pytest.mark.parametrize("ref", ["./missing-folder", "/no/such/model", "model.safetensors"])
def test_missing_paths_are_reported(ref):
    with pytest.raises(BackboneError, match="no such file or folder"):
        resolve_backbone(ref)


def test_unknown_name_lists_known_ones():
    with pytest.raises(UnknownComponentError, match="sd-1.4, sd-1.5"):
        resolve_backbone("stable-diffusion")


def test_folder_without_model_index_is_refused(tmp_path):
    with pytest.raises(BackboneError, match="no model_index.json"):
        resolve_backbone(str(tmp_path))


@pytest.mark.parametrize("suffix", [".ckpt", ".bin", ".pt", ".pth"])
def test_pickle_checkpoints_need_explicit_opt_in(tmp_path, suffix):
    path = tmp_path / f"model{suffix}"
    path.write_bytes(b"not really a pickle")
    with pytest.raises(UnsafeFileError, match="pickles"):
        resolve_backbone(str(path))
    assert resolve_backbone(str(path), allow_pickle=True).format == "single-file"


def test_hub_backbone_offline_says_how_to_use_a_local_copy():
    spec = resolve_backbone("sd-1.4")
    with pytest.raises(BackboneError) as info:
        load_backbone(spec)
    assert "not in the local Hugging Face cache" in info.value.message
    assert "--backbone DIR" in info.value.hint
    assert "backbone-path.sd-1.4" in info.value.hint


@pytest.mark.parametrize(
    "fixture, prediction, width", [("tiny_sd1", "epsilon", 32), ("tiny_sd2", "v_prediction", 64)]
)
def test_tiny_pipelines_load_through_the_registry_path(request, fixture, prediction, width):
    backbone = open_backbone(str(request.getfixturevalue(fixture)), device="cpu", dtype="auto")
    assert backbone.prediction_type == prediction
    assert backbone.text_width == width
    assert backbone.resolution == 16
    assert backbone.dtype == torch.float32
    embeds = backbone.encode_prompts(["a church", "a boat"])
    assert embeds.shape == (2, backbone.tokenizer.model_max_length, width)


def test_default_backbone_comes_from_settings(tiny_sd2):
    set_setting("default-backbone", str(tiny_sd2))
    assert open_backbone(device="cpu").prediction_type == "v_prediction"


@pytest.mark.parametrize("fixture", ["tiny_sd1", "tiny_sd2"])
def test_predicted_original_inverts_the_forward_process(request, fixture):
    """x̂0 from the exact training target recovers x0, for epsilon and v-prediction alike."""
    backbone = load_backbone(resolve_backbone(str(request.getfixturevalue(fixture))))
    gen = torch.Generator().manual_seed(0)
    clean = torch.randn(3, 4, 2, 2, generator=gen)
    noise = torch.randn(3, 4, 2, 2, generator=gen)
    t = torch.tensor([10, 500, 990])
    noisy = backbone.add_noise(clean, noise, t)
    target = backbone.training_target(clean, noise, t)
    torch.testing.assert_close(backbone.predicted_original(noisy, target, t), clean,
                               atol=1e-4, rtol=1e-4)


def test_images_round_trip_through_the_vae_shapes(tiny_sd1):
    backbone = load_backbone(resolve_backbone(str(tiny_sd1)))
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    latents = backbone.encode_images(images)
    assert latents.shape == (2, 4, 8, 8)
    decoded = backbone.decode_latents(latents)
    assert decoded.shape == images.shape and decoded.abs().max() <= 1


def test_bad_device_and_dtype_are_usage_errors(tiny_sd1):
    from conceptctl.errors import UsageError

    with pytest.raises(UsageError, match="unknown device"):
        open_backbone(str(tiny_sd1), device="gpu")
    with pytest.raises(UsageError, match="unknown dtype"):
        open_backbone(str(tiny_sd1), device="cpu", dtype="float8")


def test_load_options_dtype_is_applied(tiny_sd1):
    backbone = load_backbone(resolve_backbone(str(tiny_sd1)), LoadOptions(dtype="bfloat16"))
    assert next(backbone.unet.parameters()).dtype == torch.bfloat16
    assert backbone.describe()["dtype"] == "bfloat16"
