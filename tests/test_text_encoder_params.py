"""``--params text-encoder`` (AdvUnlearn's module): which tensors it trains, that the student's
prompts go through the encoder being trained while the frozen model keeps the original
encoder's, that every method trains it (plain and adversarial), and that the artifact carries
the encoder's tensors into ``sample --model`` and ``eval`` (exports: tests/test_export.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from conceptctl.backbones.backbone import TEXT_ENCODER_PREFIX
from conceptctl.backbones.loading import open_backbone
from conceptctl.backbones.soft_prompt import PromptEncoder
from conceptctl.erasure.artifact import apply_artifact, read_artifact
from conceptctl.erasure.params import select_parameters
from conceptctl.erasure.run import erase, prepare_training
from conceptctl.erasure.trainer import StudentPrompts, TrainingData
from conceptctl.errors import UsageError
from conceptctl.testing import tiny_erase_config, write_test_artifact

PROMPTS = ["a photo of a church", "a church at night", ""]


def _backbone(path):
    return open_backbone(str(path), device="cpu", dtype="float32")


@pytest.mark.parametrize("fixture", ["tiny_sd1", "tiny_sd2", "toy"])
def test_the_group_is_the_encoder_layers_matrices(request, fixture):
    backbone = _backbone(request.getfixturevalue(fixture) if fixture != "toy" else "toy")
    chosen = select_parameters(backbone, "text-encoder")
    inner = {name.removeprefix(TEXT_ENCODER_PREFIX): p for name, p in chosen.items()}
    assert all(name.startswith(TEXT_ENCODER_PREFIX) for name in chosen)
    # Every Linear weight of the transformer layers, nothing else: no embedding table, no norm,
    # no bias, nothing of the UNet.
    linear = {f"{name}.weight" for name, module in backbone.text_encoder.named_modules()
              if isinstance(module, torch.nn.Linear) and "pooler" not in name
              and "projection" not in name}
    assert set(inner) == linear and linear
    assert all(p.dim() == 2 for p in chosen.values())
    assert not any("embeddings" in name or "norm" in name.lower() for name in chosen)


@pytest.mark.parametrize("fixture", ["tiny_sd1", "tiny_sd2", "toy"])
def test_the_prompt_encoder_gives_what_sampling_encodes(request, fixture):
    backbone = _backbone(request.getfixturevalue(fixture) if fixture != "toy" else "toy")
    encoded = PromptEncoder(backbone, PROMPTS)
    assert torch.equal(encoded(), backbone.encode_prompts(PROMPTS))
    assert torch.equal(encoded(torch.tensor([2, 0])), backbone.encode_prompts(
        [PROMPTS[2], PROMPTS[0]]))


def test_the_student_reads_the_trained_encoder_and_the_frozen_model_the_original(tiny_sd1):
    backbone = _backbone(tiny_sd1)
    cfg = tiny_erase_config(tiny_sd1, params="text-encoder")
    original = backbone.encode_prompts(PROMPTS[:2])
    training = prepare_training(backbone, cfg, prompts=PROMPTS[:2])
    assert training.context.trains_text_encoder
    assert all(p.requires_grad for p in training.params.values())
    assert not any(p.requires_grad for p in backbone.unet.parameters())
    with torch.no_grad():  # the encoder moves, as training moves it
        for p in training.params.values():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.2)
    data = TrainingData(latents=torch.randn(2, 4, 8, 8), prompt_index=torch.tensor([0, 1]),
                        anchor_text=original, target_text=original,
                        empty_text=backbone.encode_prompts([""]),
                        student=StudentPrompts(backbone, PROMPTS[:2], PROMPTS[:2]))
    batch = data.batch(4, torch.Generator().manual_seed(0), "cpu", torch.float32)
    student = batch.for_student()
    rows = batch.prompts
    assert torch.equal(batch.target_text, original[rows])  # the frozen model's: original
    with torch.no_grad():
        now = backbone.encode_prompts(PROMPTS[:2])
    assert not torch.allclose(now, original)
    torch.testing.assert_close(student.target_text, now[rows])
    # The student's embeddings carry the gradient to the encoder's weights.
    student.target_text.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in training.params.values())


@pytest.mark.parametrize("method, adversarial", [("doco", False), ("ca", False),
                                                 ("esd-x", False), ("doco", True),
                                                 ("ca", True), ("esd-x", True)])
def test_every_method_trains_the_text_encoder_and_nothing_else(tiny_sd1, tmp_path, method,
                                                               adversarial):
    before = _backbone(tiny_sd1)
    base = {name: p.detach().clone() for name, p in before.named_tensors().items()}
    cfg = tiny_erase_config(tiny_sd1, method=method, params="text-encoder",
                            adversarial=adversarial, steps=3)
    erase(cfg, tmp_path / "out")
    artifact = read_artifact(tmp_path / "out")
    chosen = set(select_parameters(before, "text-encoder"))
    assert set(artifact.weights) == chosen
    changed = {n for n, v in artifact.weights.items() if not torch.equal(v, base[n])}
    assert changed == chosen
    assert artifact.manifest["hyperparameters"]["params"] == "text-encoder"
    assert artifact.manifest["base"]["tensors"] == sorted(chosen)


def test_a_text_encoder_run_resumes_bit_identically(tiny_sd1, tmp_path):
    # The frozen model's embeddings are encoded before a checkpoint's encoder weights load: a
    # resumed run must still condition the frozen model on the original encoder's.
    cfg = tiny_erase_config(tiny_sd1, params="text-encoder", adversarial=True, steps=5,
                            checkpointing_steps=3)
    erase(cfg, tmp_path / "a")
    erase(cfg.with_overrides(steps=3), tmp_path / "b")
    erase(cfg, tmp_path / "b", resume="latest")
    a, b = read_artifact(tmp_path / "a"), read_artifact(tmp_path / "b")
    for name, tensor in a.weights.items():
        assert torch.equal(tensor, b.weights[name]), name


def test_augmentation_with_the_text_encoder_is_refused_before_any_work(tiny_sd1, tmp_path):
    # The augmentation's prefixed captions are encoded once, by the original encoder.
    cfg = tiny_erase_config(tiny_sd1, params="text-encoder", augment="rescale")
    with pytest.raises(UsageError, match="cannot be combined with --params text-encoder"):
        erase(cfg, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def _text_encoder_artifact(base, out):
    model = _backbone(base)
    names = sorted(select_parameters(model, "text-encoder"))
    return write_test_artifact(model, out, names=names, scale=0.3)


def test_sample_model_applies_the_text_encoder(cli, tiny_sd1, tmp_path):
    artifact = _text_encoder_artifact(tiny_sd1, tmp_path / "art")
    drawn = {}
    for name, extra in (("erased", ["--model", artifact]), ("original", [])):
        result = cli("sample", "a red church", "-n", "1", "--steps", "3", "-b", tiny_sd1,
                     "-o", tmp_path / name, *extra)
        assert result.code == 0, result.err
        drawn[name] = np.asarray(Image.open(next((tmp_path / name).glob("000-*.png"))))
    assert not np.array_equal(drawn["erased"], drawn["original"])
    # What 'sample --model' drew is the base with the artifact's encoder tensors put in.
    model = _backbone(tiny_sd1)
    apply_artifact(model, read_artifact(artifact))
    weights = read_artifact(artifact).weights
    encoder = dict(model.text_encoder.named_parameters())
    for name, value in weights.items():
        assert torch.equal(encoder[name.removeprefix(TEXT_ENCODER_PREFIX)], value)


def test_eval_draws_the_erased_model_with_its_text_encoder(cli, tiny_sd1, tmp_path):
    artifact = tmp_path / "art"
    erase(tiny_erase_config(tiny_sd1, params="text-encoder", steps=3, lr=1e-2), artifact)
    out = tmp_path / "report"
    result = cli("evaluate", artifact, "--steps", "3", "-n", "1", "--attacks", "none", "-o",
                 out, "--json")
    assert result.code == 0, result.err
    report = json.loads(result.out)
    differ = [not np.array_equal(np.asarray(Image.open(out / row["original"]["file"])),
                                 np.asarray(Image.open(out / row["erased"]["file"])))
              for row in report["images"]]
    assert differ and all(differ)
