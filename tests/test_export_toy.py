"""conceptctl export on the toy backbone (MiniLM text encoder): the diffusers folder loads in plain
diffusers, the LoRA and the delta reproduce the erased model, the single file says it cannot."""

from __future__ import annotations

import json

import numpy as np
import pytest
from diffusers import StableDiffusionPipeline
from huggingface_hub import ModelCard
from PIL import Image
from safetensors import safe_open

from conceptctl.backbones.loading import open_backbone
from conceptctl.erasure.artifact import apply_artifact, read_artifact
from conceptctl.export.run import export_artifact
from conceptctl.testing import write_test_artifact

pytestmark = pytest.mark.slow  # each export loads the toy model and MiniLM (seconds each)

NO_CHECKER = dict(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
PROMPT = "a red church in the style of Van Gogh"
STEPS, GUIDANCE = 20, 3.0  # the toy backbone's sampling defaults


@pytest.fixture(scope="module")
def toy_artifact(tmp_path_factory):
    model = open_backbone("toy", device="cpu", dtype="float32")
    return write_test_artifact(model, tmp_path_factory.mktemp("toy") / "art", scale=0.2)


def _draw(pipe, output_type="np"):
    """'conceptctl sample' seeding (image 0: CPU noise seeded 0), with diffusers alone."""
    import torch

    pipe.set_progress_bar_config(disable=True)
    side = pipe.unet.config.sample_size
    noise = torch.randn((pipe.unet.config.in_channels, side, side),
                        generator=torch.Generator("cpu").manual_seed(0))
    size = side * pipe.vae_scale_factor
    image = pipe(PROMPT, latents=noise[None], height=size, width=size, num_inference_steps=STEPS,
                 guidance_scale=GUIDANCE, output_type=output_type).images[0]
    return np.asarray(image)


def test_toy_diffusers_folder_loads_in_plain_diffusers(toy_artifact, tmp_path, cli):
    out = tmp_path / "toy-folder"
    assert export_artifact(toy_artifact, "diffusers", out).format == "diffusers"
    index = json.loads((out / "model_index.json").read_text())
    assert index["text_encoder"] == ["transformers", "BertModel"]

    # StableDiffusionPipeline builds the MiniLM encoder from model_index.json, no conceptctl.
    plain = StableDiffusionPipeline.from_pretrained(out, **NO_CHECKER)
    assert type(plain.text_encoder).__name__ == "BertModel"
    assert plain.text_encoder.config.use_attention_mask is True  # else padding changes states
    result = cli("sample", PROMPT, "-n", "1", "--model", toy_artifact, "-o", tmp_path / "s")
    assert result.code == 0, result.err
    expected = np.asarray(Image.open(next((tmp_path / "s").glob("000-*.png"))))
    np.testing.assert_array_equal(_draw(plain, "pil"), expected)
    assert "BertModel" in (out / "README.md").read_text()

    # The folder keeps the toy's defaults: `--backbone FOLDER` draws the same picture as
    # `--model ARTIFACT` with no --steps / --guidance (not SD's 30 steps at 7.5).
    from conceptctl.backbones.resolve import resolve_backbone

    spec = resolve_backbone(str(out))
    assert (spec.family, spec.sample_steps, spec.sample_guidance) == ("toy", STEPS, GUIDANCE)
    assert (spec.detector, spec.eval_suite, spec.anchor_selector) == ("toy-judge", "toy", "toy")
    assert spec.erase_presets == resolve_backbone("toy").erase_presets  # erases as the toy
    result = cli("sample", PROMPT, "-n", "1", "--backbone", out, "-o", tmp_path / "f")
    assert result.code == 0, result.err
    again = np.asarray(Image.open(next((tmp_path / "f").glob("000-*.png"))))
    np.testing.assert_array_equal(again, expected)


def test_toy_lora_and_delta_reproduce_the_erased_model(toy_artifact, tmp_path):
    erased = open_backbone("toy", device="cpu", dtype="float32")
    apply_artifact(erased, read_artifact(toy_artifact))
    expected = _draw(erased.pipeline)

    lora = tmp_path / "toy-lora.safetensors"
    report = export_artifact(toy_artifact, "lora", lora, options={"rank": "1000"}).report
    assert report["overall_error"] < 1e-6
    base = open_backbone("toy", device="cpu", dtype="float32").pipeline
    base.load_lora_weights(str(lora))  # kohya names, the default
    np.testing.assert_allclose(_draw(base), expected, atol=1e-4)
    with safe_open(str(lora), "pt") as f:  # no SD 1.x / 2.x base for kohya's entries to name
        assert [k for k in f.metadata() if k.startswith(("ss_", "sshs_", "modelspec."))] == []

    # The toy is conceptctl's own model: its license is passed on, and it has no Hub id.
    card = ModelCard((tmp_path / "toy-lora.md").read_text(encoding="utf-8"))
    assert (card.data.license, card.data.base_model) == ("apache-2.0", None)
    assert {"concept-erasure", "lora"} <= set(card.data.tags)

    delta = tmp_path / "toy.delta.safetensors"
    export_artifact(toy_artifact, "delta", delta)
    patched = open_backbone("toy", device="cpu", dtype="float32")
    apply_artifact(patched, read_artifact(delta))
    np.testing.assert_allclose(_draw(patched.pipeline), expected, atol=1e-6)


def test_toy_single_file_is_unsupported(toy_artifact, tmp_path, cli):
    out = tmp_path / "toy.safetensors"
    result = cli("export", toy_artifact, "--format", "single-file", "-o", out)
    assert result.code == 1
    message = " ".join(result.err.split())
    assert "single-file format is unsupported for backbone toy" in message
    assert "BertModel" in message
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary
