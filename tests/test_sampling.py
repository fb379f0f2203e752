"""``conceptctl sample`` end to end on both tiny pipelines: files, sidecar, determinism, errors."""

import json
import os

import pytest
from PIL import Image


def _sample(cli, backbone, out, *extra):
    return cli("sample", "a red church", "a boat", "-b", backbone, "-n", "2", "--steps", "3",
               "-o", out, *extra)


@pytest.mark.parametrize("fixture", ["tiny_sd1", "tiny_sd2"])
def test_sample_writes_images_grid_and_sidecar(request, cli, tmp_path, fixture):
    result = _sample(cli, request.getfixturevalue(fixture), tmp_path / "out", "--seed", "7")
    assert result.code == 0, result.err
    out = tmp_path / "out"
    sidecar = json.loads((out / "samples.json").read_text())
    files = [record["file"] for record in sidecar["images"]]
    assert files == ["000-a-red-church-00.png", "000-a-red-church-01.png",
                     "001-a-boat-00.png", "001-a-boat-01.png"]
    assert [record["seed"] for record in sidecar["images"]] == [7, 8, 7, 8]
    assert all(Image.open(out / f).size == (16, 16) for f in files)
    assert Image.open(out / "grid.png").size == (2 * 16, 2 * 16)
    assert sidecar["settings"]["steps"] == 3 and sidecar["settings"]["guidance"] == 7.5
    expected = "v_prediction" if fixture == "tiny_sd2" else "epsilon"
    assert sidecar["backbone"]["prediction_type"] == expected
    assert {"torch", "diffusers", "conceptctl"} <= set(sidecar["versions"])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no staging left


def test_same_seed_gives_identical_images_whatever_the_batch(cli, tiny_sd2, tmp_path):
    assert _sample(cli, tiny_sd2, tmp_path / "a").code == 0
    assert _sample(cli, tiny_sd2, tmp_path / "b", "--batch-size", "1").code == 0
    assert _sample(cli, tiny_sd2, tmp_path / "c", "--seed", "1").code == 0
    # Same starting noise, so the same images up to float rounding: CPU kernels sum in another
    # order for another batch size (measured on an AVX2-only EPYC: one pixel of 3072 one level
    # apart), so a pixel may land on the other side of a rounding step, never further.
    for name in ("000-a-red-church-00.png", "001-a-boat-01.png", "grid.png"):
        assert _pixels(tmp_path / "a" / name, tmp_path / "b" / name).max() <= 1
    # Another seed is another image, not a rounding step away.
    assert _pixels(tmp_path / "a" / "grid.png", tmp_path / "c" / "grid.png").mean() > 5


def _pixels(a, b):
    import numpy as np

    return np.abs(np.asarray(Image.open(a), dtype=int) - np.asarray(Image.open(b), dtype=int))


def test_prompt_file_and_negative_prompt(cli, tiny_sd1, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# comment\na house\n\nan airplane\n")
    result = cli("sample", "--prompts", prompts, "-b", tiny_sd1, "-n", "1", "--steps", "2",
                 "--negative-prompt", "blurry", "-o", tmp_path / "out", "--json")
    assert result.code == 0, result.err
    assert json.loads(result.out)["images"] == 2
    sidecar = json.loads((tmp_path / "out" / "samples.json").read_text())
    assert [r["prompt"] for r in sidecar["images"]] == ["a house", "an airplane"]
    assert sidecar["settings"]["negative_prompt"] == "blurry"


def test_default_output_folder_never_clobbers(cli, tiny_sd1, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for _ in range(2):
        assert cli("sample", "a tree", "-b", tiny_sd1, "-n", "1", "--steps", "1").code == 0
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == ["a-tree", "a-tree-2"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["-n", "0"], "--num-images"),
        (["--steps", "0"], "--steps"),
        (["--guidance", "-1"], "--guidance"),
        (["--resolution", "20"], "multiple of 8"),
        (["--seed", "-3"], "--seed"),
        (["--prompts", "missing.txt"], "prompt file not found"),
        (["--device", "gpu"], "unknown device"),
        (["--dtype", "float8"], "unknown dtype"),
        (["--backbone", "sd-9"], "unknown backbone 'sd-9'"),
        (["--backbone", "./nowhere"], "no such file or folder"),
    ],
)
def test_bad_input_is_one_clear_line(cli, tiny_sd1, tmp_path, args, message):
    argv = ["sample", "x", "-o", tmp_path / "out"]
    if "--backbone" not in args:
        argv += ["-b", tiny_sd1]
    result = cli(*argv, *args)
    assert result.code != 0
    first = result.err.strip().splitlines()[0]
    assert first.startswith("error:") and message in first
    assert not (tmp_path / "out").exists()


def test_no_prompt_and_empty_prompt_file(cli, tiny_sd1, tmp_path):
    assert "no prompt given" in cli("sample", "-b", tiny_sd1).err
    empty = tmp_path / "empty.txt"
    empty.write_text("# only a comment\n\n")
    assert "holds no prompts" in cli("sample", "--prompts", empty, "-b", tiny_sd1).err


def test_existing_output_is_refused_before_sampling(cli, tiny_sd1, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = cli("sample", "x", "-b", tiny_sd1, "-o", out)
    assert result.code == 1 and "already exists" in result.err and "--overwrite" in result.err
    assert (out / "keep.txt").read_text() == "mine"
    # --overwrite replaces only what conceptctl wrote: a user's folder stays as it is.
    result = cli("sample", "x", "-b", tiny_sd1, "-n", "1", "--steps", "1", "-o", out,
                 "--overwrite")
    assert result.code == 1 and "conceptctl did not write" in result.err
    assert (out / "keep.txt").read_text() == "mine" and sorted(os.listdir(out)) == ["keep.txt"]
    ours = tmp_path / "ours"
    args = ("sample", "x", "-b", tiny_sd1, "-n", "1", "--steps", "1", "-o", ours)
    assert cli(*args).code == 0
    (ours / "000-x-00.png").unlink()
    assert cli(*args, "--overwrite").code == 0
    assert (ours / "000-x-00.png").exists() and (ours / "samples.json").exists()
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # no staging, no lock


def test_output_folder_gets_ordinary_permissions(cli, tiny_sd1, tmp_path):
    import os

    assert cli("sample", "x", "-b", tiny_sd1, "-n", "1", "--steps", "1", "-o",
               tmp_path / "out").code == 0
    mask = os.umask(0)
    os.umask(mask)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o777 & ~mask


def test_single_file_checkpoint_samples_like_its_folder(cli, tiny_sd2, tmp_path):
    from conceptctl.backbones.loading import load_backbone
    from conceptctl.backbones.resolve import resolve_backbone
    from conceptctl.interop.original_layout import save_single_file

    checkpoint = tmp_path / "model.safetensors"
    save_single_file(load_backbone(resolve_backbone(str(tiny_sd2))).pipeline, checkpoint)
    assert _sample(cli, tiny_sd2, tmp_path / "folder").code == 0
    result = _sample(cli, checkpoint, tmp_path / "file", "--backbone-config", tiny_sd2)
    assert result.code == 0, result.err
    sidecar = json.loads((tmp_path / "file" / "samples.json").read_text())
    assert sidecar["backbone"]["format"] == "single-file"
    assert sidecar["backbone"]["prediction_type"] == "v_prediction"
    for name in ("000-a-red-church-00.png", "001-a-boat-01.png"):
        assert (tmp_path / "file" / name).read_bytes() == (tmp_path / "folder" / name).read_bytes()

    without_config = _sample(cli, checkpoint, tmp_path / "none")
    assert without_config.code == 1
    assert "cannot load single-file checkpoint" in without_config.err
    assert "--backbone-config" in without_config.err


# --- samplers other than the backbone's own, per-prompt seeds (what anchor images use) ---------

ANCHOR_LIKE = dict(prompts=("a photo of a house", "an old house at night", "a house"),
                   images_per_prompt=2, seed=5, steps=3, guidance=6.0, batch_size=6,
                   sampler="dpm-solver", prompt_seeds=(5, 7, 9))


def _open(path):
    from conceptctl.backbones.loading import open_backbone

    return open_backbone(str(path), device="cpu", dtype="float32")


def test_dpm_solver_sampler_is_deterministic_and_puts_the_own_scheduler_back(tiny_sd1):
    import torch

    from conceptctl.sampling import SampleSettings, sample_images, sample_latents

    backbone = _open(tiny_sd1)
    own, own_config = backbone.scheduler, dict(backbone.scheduler.config)
    recorded = backbone.pipeline.config["scheduler"]
    assert type(own).__name__ == "PNDMScheduler"
    used = []
    settings = SampleSettings(**ANCHOR_LIKE)
    first = sample_latents(backbone, settings,
                           on_step=lambda n: used.append(type(backbone.scheduler).__name__))
    assert set(used) == {"DPMSolverMultistepScheduler"}
    # The backbone's own scheduler is back: the same object, class and config.
    assert backbone.scheduler is own and dict(own.config) == own_config
    assert backbone.pipeline.config["scheduler"] == recorded
    # Same settings, same images; whatever the batch size, the same up to float rounding: batch 1
    # runs other CPU kernels (measured: 2.5e-5 at latents of magnitude 16, a relative 1.5e-6,
    # on an AVX2-only EPYC).
    assert torch.equal(sample_latents(backbone, settings), first)
    for batch in (1, 4):
        assert torch.allclose(sample_latents(backbone, SampleSettings(
            **ANCHOR_LIKE | {"batch_size": batch})), first, rtol=1e-5, atol=1e-4)
    # Not the backbone's own sampler's images.
    own_sampler = sample_latents(backbone, SampleSettings(**ANCHOR_LIKE | {"sampler": None}))
    assert (own_sampler - first).abs().max() > 1e-3
    # Every image of the set starts from its own noise: distinct seeds, distinct images.
    seeds = [image.seed for image in sample_images(backbone, settings)]
    assert seeds == [5, 6, 7, 8, 9, 10]
    flat = first.flatten(1)
    assert all((flat[i] - flat[j]).abs().max() > 1e-3
               for i in range(len(flat)) for j in range(i))


def test_own_scheduler_is_put_back_when_sampling_fails(tiny_sd1):
    from conceptctl.sampling import SampleSettings, sample_latents

    backbone = _open(tiny_sd1)
    own, recorded = backbone.scheduler, backbone.pipeline.config["scheduler"]

    def interrupt(n):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        sample_latents(backbone, SampleSettings(**ANCHOR_LIKE), on_step=interrupt)
    assert backbone.scheduler is own and backbone.pipeline.config["scheduler"] == recorded


def test_unknown_sampler_and_bad_prompt_seeds_are_refused():
    from conceptctl.errors import UsageError
    from conceptctl.sampling import SampleSettings

    with pytest.raises(UsageError, match="unknown sampler 'euler-x'"):
        SampleSettings(**ANCHOR_LIKE | {"sampler": "euler-x"}).check()
    with pytest.raises(UsageError, match="one seed per prompt"):
        SampleSettings(**ANCHOR_LIKE | {"prompt_seeds": (1, 2)}).check()
    with pytest.raises(UsageError, match="prompt seeds must be between"):
        SampleSettings(**ANCHOR_LIKE | {"prompt_seeds": (1, 2, 2**64 - 1)}).check()


def test_anchor_cache_key_of_settings_without_new_fields_is_unchanged():
    """Keys computed before ``sampler`` existed: caches drawn then stay valid."""
    from dataclasses import replace

    from conceptctl.erasure.anchor_data import cache_key
    from conceptctl.sampling import SampleSettings

    digest = "sha256:" + "ab" * 32
    settings = SampleSettings(prompts=("a photo of a house", "a house at night"),
                              images_per_prompt=5, seed=3, steps=25, guidance=6.0,
                              resolution=512, batch_size=32)
    assert cache_key(digest, settings) == "de03e99c1f50a419379cf672"
    assert cache_key(digest, replace(settings, prompt_seeds=(3, 8))) == "a49e9ff0bbce1ea22d07b054"
    assert cache_key(digest, replace(settings, sampler="dpm-solver")) not in (
        "de03e99c1f50a419379cf672", "a49e9ff0bbce1ea22d07b054")


def test_toy_sample_draws_what_a_bare_diffusers_pipeline_draws(cli, tmp_path):
    # The default backbone's command, with its defaults (64 px, DPM-Solver, 20 steps, guidance
    # 3), against diffusers' own classes and pipeline: conceptctl adds nothing to the picture.
    import torch

    from conceptctl.testing import bare_toy_pipeline

    prompt = "a red church in the style of Van Gogh"
    result = cli("sample", prompt, "-n", "1", "--seed", "3", "-o", tmp_path / "out")
    assert result.code == 0, result.err
    pipe = bare_toy_pipeline()
    latents = torch.randn((1, 4, 16, 16), generator=torch.Generator("cpu").manual_seed(3))
    expected = pipe(prompt, height=64, width=64, num_inference_steps=20, guidance_scale=3.0,
                    latents=latents).images[0]
    drawn = Image.open(tmp_path / "out" / "000-a-red-church-in-the-style-of-van-gogh-00.png")
    assert drawn.tobytes() == expected.tobytes()
