"""The reference's resize augmentation (``augment="rescale"``), held against a transcription of
concept-ablation's ``CustomDiffusionDataset.preprocess`` and its caption rule."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conceptctl.erasure.augment import PREFIXES, Draw, draw, rescale
from conceptctl.erasure.run import erase
from conceptctl.testing import tiny_erase_config


def reference_preprocess(image: Image.Image, size: int, scale: int, top: int, left: int):
    """concept-ablation diffusers/utils.py ``CustomDiffusionDataset.preprocess``, with the
    random top/left passed in (the original draws them with np.random.randint)."""
    inner = size if scale > size else scale  # (the original also takes ``outer`` for top/left)
    image = image.resize((scale, scale), resample=Image.BILINEAR)
    image = np.array(image).astype(np.uint8)
    image = (image / 127.5 - 1.0).astype(np.float32)
    instance_image = np.zeros((size, size, 3), dtype=np.float32)
    if scale > size:
        instance_image = image[top: top + inner, left: left + inner, :]
    else:
        instance_image[top: top + inner, left: left + inner, :] = image
    return instance_image


def reference_prefix(scale: int, size: int) -> tuple[str, ...]:
    """The words the reference may put before the target caption at this side."""
    if scale < 0.6 * size:
        return ("a far away ", "very small ")
    if scale > size:
        return ("zoomed in ", "close up ")
    return ("",)


@pytest.mark.parametrize("scale, top, left", [(21, 0, 0), (40, 13, 5), (64, 0, 0), (80, 9, 15),
                                              (89, 25, 0)])
def test_rescale_matches_the_reference_preprocess(scale, top, left):
    size = 64
    g = torch.Generator().manual_seed(scale)
    # A smooth picture, so that PIL's 8-bit resize and torch's float one agree closely.
    x = torch.linspace(-1, 1, size)
    picture = torch.stack([x[None, :].expand(size, size), x[:, None].expand(size, size),
                           (x[None, :] * x[:, None])]) * 0.8
    picture = picture + 0.05 * torch.randn(3, size, size, generator=g)
    as_uint8 = ((picture.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    image = Image.fromarray(as_uint8.permute(1, 2, 0).numpy())
    want = torch.from_numpy(reference_preprocess(image, size, scale, top, left)).permute(2, 0, 1)
    got = rescale(as_uint8.float() / 127.5 - 1, Draw(scale, top, left, 0))
    assert got.shape == want.shape == (3, size, size)
    blank = want == 0  # the canvas: exactly blank in both
    assert torch.equal(got[blank & (got == 0)], want[blank & (got == 0)])
    # PIL rounds to 8 bits and filters a little differently: within a few levels on average.
    assert (got - want).abs().mean() < 4 / 127.5
    if scale <= size:
        outside = torch.ones(size, size, dtype=torch.bool)
        outside[top:top + scale, left:left + scale] = False
        assert torch.count_nonzero(got[:, outside]) == 0


def test_draws_follow_the_reference_distribution():
    size, g = 64, torch.Generator().manual_seed(0)
    draws = [draw(size, g) for _ in range(3000)]
    small = [d for d in draws if d.scale <= size]
    assert 0.62 < len(small) / len(draws) < 0.70  # p = 0.66 of zooming out
    assert all(size // 3 <= d.scale <= size for d in small)
    assert all(int(1.2 * size) <= d.scale < int(1.4 * size) for d in draws if d.scale > size)
    for d in draws:
        outer, inner = max(d.scale, size), min(d.scale, size)
        assert 0 <= d.top <= outer - inner and 0 <= d.left <= outer - inner
        assert PREFIXES[d.prefix] in reference_prefix(d.scale, size)
    assert {d.prefix for d in draws} == set(range(len(PREFIXES)))


def test_an_augmented_batch_has_new_latents_and_prefixed_target_captions(tiny_sd1):
    from conceptctl.backbones.loading import open_backbone
    from conceptctl.erasure.augment import Rescale, to_pixels
    from conceptctl.erasure.trainer import TrainingData

    backbone = open_backbone(str(tiny_sd1), device="cpu", dtype="float32")
    side = backbone.resolution // backbone.vae_scale_factor
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(6, 4, side, side, generator=g)
    targets = ["a church", "a church at dusk"]
    data = TrainingData(
        latents=latents, prompt_index=torch.tensor([0, 0, 0, 1, 1, 1]),
        anchor_text=backbone.encode_prompts(["a house", "a house at dusk"]),
        target_text=backbone.encode_prompts(targets),
        empty_text=backbone.encode_prompts([""]),
        augment=Rescale(backbone, to_pixels(backbone, latents),
                        torch.stack([backbone.encode_prompts([p + t for t in targets])
                                     for p in PREFIXES])))
    plain = TrainingData(latents, data.prompt_index, data.anchor_text, data.target_text,
                         data.empty_text)
    a = data.batch(4, torch.Generator().manual_seed(1), "cpu", torch.float32)
    b = plain.batch(4, torch.Generator().manual_seed(1), "cpu", torch.float32)
    # The same images, timesteps, noise and prior batch are chosen; only the pictures change.
    assert torch.equal(a.timesteps, b.timesteps) and torch.equal(a.noise, b.noise)
    assert torch.equal(a.prior.latents, b.prior.latents)
    assert a.latents.shape == b.latents.shape and not torch.allclose(a.latents, b.latents)
    variants = data.augment.target_variants
    prefixed = [any(torch.equal(row, variants[v, p]) for v in range(len(PREFIXES))
                    for p in range(2)) for row in a.target_text]
    assert all(prefixed)
    again = data.batch(4, torch.Generator().manual_seed(1), "cpu", torch.float32)
    assert torch.equal(a.latents, again.latents)  # every random number from the generator


def test_an_augmented_erase_is_recorded_and_resumes_bit_identical(tiny_sd1, tmp_path):
    full = erase(tiny_erase_config(tiny_sd1, augment="rescale", steps=6), tmp_path / "full")
    erase(tiny_erase_config(tiny_sd1, augment="rescale", steps=3), tmp_path / "part")
    erase(tiny_erase_config(tiny_sd1, augment="rescale", steps=6), tmp_path / "part",
          resume="latest")
    a = load_file(str(tmp_path / "full" / "weights.safetensors"))
    b = load_file(str(tmp_path / "part" / "weights.safetensors"))
    assert full.steps == 6 and all(torch.equal(a[k], b[k]) for k in a)
    manifest = json.loads((tmp_path / "full" / "conceptctl.json").read_text())
    assert manifest["hyperparameters"]["augment"] == "rescale"
    plain = erase(tiny_erase_config(tiny_sd1, steps=6), tmp_path / "plain")
    c = load_file(str(plain.out_dir / "weights.safetensors"))
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_an_unknown_augmentation_is_refused():
    from conceptctl.erasure.config import EraseConfig
    from conceptctl.erasure.run import check_config
    from conceptctl.errors import UsageError

    with pytest.raises(UsageError, match="unknown augmentation 'flip'; use none, rescale"):
        check_config(EraseConfig(concept="church", anchor="house", augment="flip"))
