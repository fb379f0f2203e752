"""conceptctl export on the tiny SD1-/SD2-shaped pipelines: every format loads back in the tool it
is meant for and draws what the erased model draws; bad input fails in one line; writes are
atomic."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from conceptctl.backbones.backbone import TEXT_ENCODER_PREFIX
from conceptctl.backbones.loading import open_backbone
from conceptctl.erasure.artifact import apply_artifact, read_artifact, write_artifact
from conceptctl.export import Exporter
from conceptctl.export.run import export_artifact
from conceptctl.hookspecs import hookimpl
from conceptctl.plugins import register_plugin
from conceptctl.registry import get_registry
from conceptctl.testing import save_tiny_pipeline, write_test_artifact

NO_CHECKER = dict(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
PROMPT = "a red church"


@pytest.fixture(scope="module")
def artifacts(tiny_sd1, tiny_sd2, tmp_path_factory):
    """flavor -> (base folder, artifact folder): the cross-attention k/v tensors perturbed
    ("sd1", "sd2"), or the text encoder's layers, as --params text-encoder trains them
    ("sd1-te", "sd2-te")."""
    from conceptctl.erasure.params import select_parameters

    made = {}
    for flavor, base in (("sd1", tiny_sd1), ("sd2", tiny_sd2), ("sd1-te", tiny_sd1),
                         ("sd2-te", tiny_sd2)):
        model = open_backbone(str(base), device="cpu", dtype="float32")
        names = sorted(select_parameters(model, "text-encoder")) if "-te" in flavor else None
        made[flavor] = base, write_test_artifact(model, tmp_path_factory.mktemp(flavor) / "art",
                                                 names=names)
    return made


def _named(pipe) -> dict[str, torch.Tensor]:
    """A pipeline's tensors named as artifacts name them (the text encoder's prefixed)."""
    return {**dict(pipe.unet.named_parameters()),
            **{TEXT_ENCODER_PREFIX + k: v for k, v in pipe.text_encoder.named_parameters()}}


def _erased(base, artifact):
    model = open_backbone(str(base), device="cpu", dtype="float32")
    apply_artifact(model, read_artifact(artifact))
    return model.pipeline


def _draw(pipe, output_type="np", steps=3, guidance=7.5, seed=0):
    """What 'conceptctl sample' draws, with diffusers alone: image k starts from CPU noise seeded
    with seed + k, shaped (channels, side, side) (conceptctl.sampling)."""
    pipe.set_progress_bar_config(disable=True)
    side = pipe.unet.config.sample_size
    noise = torch.randn((pipe.unet.config.in_channels, side, side),
                        generator=torch.Generator("cpu").manual_seed(seed))
    size = side * pipe.vae_scale_factor
    images = pipe(PROMPT, latents=noise[None], height=size, width=size,
                  num_inference_steps=steps, guidance_scale=guidance,
                  output_type=output_type).images
    return np.asarray(images[0]) if output_type == "pil" else images[0]


def _header(path):
    with safe_open(str(path), "pt") as f:
        return json.loads(f.metadata()["conceptctl"])


def _sampled(cli, out, *args):
    result = cli("sample", PROMPT, "-n", "1", "--steps", "3", "-o", out, *args)
    assert result.code == 0, result.err
    return np.asarray(Image.open(next(out.glob("000-*.png"))))


# --- diffusers folder ------------------------------------------------------------------------


@pytest.mark.parametrize("flavor", ["sd1", "sd2", "sd1-te", "sd2-te"])
def test_diffusers_folder_draws_what_sample_model_draws(artifacts, flavor, tmp_path, cli):
    base, artifact = artifacts[flavor]
    out = tmp_path / "folder"
    result = cli("export", artifact, "--format", "diffusers", "--out", out)
    assert result.code == 0, result.err

    # Plain diffusers, no conceptctl code: the same pixels as 'conceptctl sample --model'.
    plain = StableDiffusionPipeline.from_pretrained(out, **NO_CHECKER)
    expected = _sampled(cli, tmp_path / "sampled", "--model", artifact)
    np.testing.assert_array_equal(_draw(plain, "pil"), expected)
    original = _draw(StableDiffusionPipeline.from_pretrained(base, **NO_CHECKER), "pil")
    assert not np.array_equal(original, expected), "the test artifact must change the images"

    record = json.loads((out / "conceptctl.json").read_text())
    assert (record["concept"], record["export"]["format"]) == ("church", "diffusers")
    assert "StableDiffusionPipeline.from_pretrained" in (out / "README.md").read_text()
    weights = sorted(out.rglob("*.safetensors"))
    assert len(weights) == 3  # unet, vae, text encoder
    for path in weights:
        info = _header(path)
        assert (info["concept"], info["anchor"], info["method"]) == (
            "church", "house", "test-perturbation")
        assert info["base"]["tensors_digest"] == read_artifact(artifact).base["tensors_digest"]
        assert info["base"]["name"] == str(base)
        assert load_file(path)  # the rewritten header leaves a readable file


# --- LoRA ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("flavor", "naming"), [("sd1", "diffusers"), ("sd1", "kohya"),
                                                ("sd2", "diffusers"), ("sd2", "kohya"),
                                                ("sd1-te", "diffusers"), ("sd1-te", "kohya"),
                                                ("sd2-te", "diffusers"), ("sd2-te", "kohya")])
def test_full_rank_lora_draws_the_erased_images(artifacts, flavor, naming, tmp_path):
    base, artifact = artifacts[flavor]
    out = tmp_path / "lora.safetensors"
    result = export_artifact(artifact, "lora", out, options={"rank": "1000",
                                                             "lora_format": naming})
    assert result.report["overall_error"] < 1e-6

    pipe = StableDiffusionPipeline.from_pretrained(base, **NO_CHECKER)
    pipe.load_lora_weights(str(out))
    np.testing.assert_allclose(_draw(pipe), _draw(_erased(base, artifact)), atol=1e-5)
    keys = set(load_file(out))
    if naming == "kohya":
        assert all(k.startswith("lora_te_" if "-te" in flavor else "lora_unet_") for k in keys)
        # The text encoder's names as A1111 and kohya's scripts write them (CLIP's 'text_model.').
        assert ("lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha" if "-te" in flavor
                else "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.alpha"
                ) in keys
    else:
        part = "text_encoder.text_model." if "-te" in flavor else "unet."
        assert all(k.startswith(part) and ".lora_" in k for k in keys)
    assert _header(out)["kind"] == "lora"


def _loaded_errors(base, artifact, lora_file):
    """Relative error of each changed weight after diffusers loads and fuses the LoRA."""
    pipe = StableDiffusionPipeline.from_pretrained(base, **NO_CHECKER)
    original = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    pipe.load_lora_weights(str(lora_file))
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    fused = pipe.unet.state_dict()
    errors = {}
    for name, erased in read_artifact(artifact).weights.items():
        change = (erased - original[name]).double()
        errors[name.removesuffix(".weight")] = float(
            (fused[name].double() - erased.double()).norm() / change.norm())
    return errors


@pytest.mark.parametrize("naming", ["diffusers", "kohya"])
def test_lora_error_shrinks_with_rank_and_is_what_diffusers_applies(artifacts, naming,
                                                                    tmp_path):
    base, artifact = artifacts["sd2"]
    overall = []
    for rank in ("1", "2", "4", "8", "1000"):
        report = export_artifact(artifact, "lora", tmp_path / f"r{rank}.safetensors",
                                 options={"rank": rank, "lora_format": naming}).report
        overall.append(report["overall_error"])
    assert all(a > b for a, b in zip(overall, overall[1:], strict=False)), overall
    assert overall[0] > 0.5 and overall[-1] < 1e-6  # the perturbation is full-rank noise

    # rank auto gives layers different ranks: each must still load at its reported error.
    out = tmp_path / "auto.safetensors"
    report = export_artifact(artifact, "lora", out, options={
        "rank": "auto", "max_error": 0.3, "lora_format": naming}).report
    ranks = [layer["rank"] for layer in report["layers"]]
    assert len(set(ranks)) > 1, ranks
    loaded = _loaded_errors(base, artifact, out)
    for layer in report["layers"]:
        assert layer["error"] <= 0.3
        assert loaded[layer["module"]] == pytest.approx(layer["error"], abs=1e-5)


def test_rank_auto_picks_the_smallest_rank_within_the_bound(artifacts, tmp_path):
    base, artifact = artifacts["sd1"]
    report = export_artifact(artifact, "lora", tmp_path / "l.safetensors",
                             options={"max_error": 0.2}).report
    assert report["rank"] == "auto"
    model = open_backbone(str(base), device="cpu", dtype="float32")
    params = dict(model.unet.named_parameters())
    erased = read_artifact(artifact).weights
    for layer in report["layers"]:
        name = layer["module"] + ".weight"
        s = torch.linalg.svdvals((erased[name] - params[name].detach()).double())
        # The error of rank r - 1 (what the next smaller choice would give) exceeds the bound.
        smaller = float(s[layer["rank"] - 1:].square().sum().sqrt() / s.square().sum().sqrt())
        assert layer["error"] <= 0.2 + 1e-9 < smaller


def test_lora_refuses_changes_it_cannot_represent(tiny_sd1, tmp_path, cli):
    model = open_backbone(str(tiny_sd1), device="cpu", dtype="float32")
    artifact = write_test_artifact(model, tmp_path / "art", names=[
        "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_out.0.bias"])
    result = cli("export", artifact, "--format", "lora", "--out", tmp_path / "l.safetensors")
    assert result.code == 1
    assert "attn2.to_out.0.bias cannot be written as a LoRA" in result.err
    assert "'diff'" in result.err and "delta" in result.err  # the formats that can
    assert not (tmp_path / "l.safetensors").exists()


def test_conv_weights_become_conv_adapters(tiny_sd1, tmp_path):
    model = open_backbone(str(tiny_sd1), device="cpu", dtype="float32")
    names = ["down_blocks.0.resnets.0.conv1.weight",
             "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v.weight"]
    artifact = write_test_artifact(model, tmp_path / "art", names=names)
    for naming in ("diffusers", "kohya"):
        out = tmp_path / f"{naming}.safetensors"
        report = export_artifact(artifact, "lora", out, options={
            "rank": "1000", "lora_format": naming}).report
        assert report["overall_error"] < 1e-6
        loaded = _loaded_errors(tiny_sd1, artifact, out)
        assert max(loaded.values()) < 1e-5, loaded


# --- single file -----------------------------------------------------------------------------


@pytest.mark.parametrize("flavor", ["sd1", "sd2", "sd1-te", "sd2-te"])
def test_single_file_loads_back_with_the_erased_model(artifacts, flavor, tmp_path, cli):
    base, artifact = artifacts[flavor]
    out = tmp_path / "model.safetensors"
    result = cli("export", artifact, "--format", "single-file", "--out", out)
    assert result.code == 0, result.err

    # config= names the base folder: from_single_file would otherwise ask the hub (offline).
    loaded = StableDiffusionPipeline.from_single_file(str(out), config=str(base), **NO_CHECKER)
    params = _named(loaded)
    for name, value in read_artifact(artifact).weights.items():
        assert torch.equal(params[name], value), name
    np.testing.assert_array_equal(_draw(loaded), _draw(_erased(base, artifact)))
    info = _header(out)
    assert (info["kind"], info["concept"]) == ("single-file", "church")


# --- delta -----------------------------------------------------------------------------------


def test_delta_holds_only_changed_tensors_and_samples_like_the_artifact(tiny_sd1, tmp_path,
                                                                        cli):
    model = open_backbone(str(tiny_sd1), device="cpu", dtype="float32")
    artifact = write_test_artifact(model, tmp_path / "art")
    # One trained tensor that did not move: a delta leaves it out.
    record = read_artifact(artifact)
    still = sorted(record.weights)[0]
    weights = dict(record.weights)
    weights[still] = dict(model.unet.named_parameters())[still].detach().clone()
    write_artifact(artifact, weights, record.manifest, "# test\n")

    out = tmp_path / "church.delta.safetensors"
    result = cli("export", artifact, "--format", "delta", "--out", out, "--json")
    assert result.code == 0, result.err
    report = json.loads(result.out)["report"]
    assert (report["skipped_unchanged"], report["max_reapply_error"]) == (1, 0.0)
    delta = load_file(out)
    assert set(delta) == set(weights) - {still}
    info = _header(out)
    assert info["kind"] == "delta" and info["base"]["tensors"] == sorted(delta)
    # Its base record covers exactly those tensors, also as a base loaded in bfloat16 reads them.
    half = open_backbone(str(tiny_sd1), device="cpu", dtype="bfloat16")
    assert apply_artifact(half, read_artifact(out)) == []

    from_delta = _sampled(cli, tmp_path / "a", "--model", out)
    np.testing.assert_array_equal(from_delta, _sampled(cli, tmp_path / "b", "--model", artifact))

    # A delta is an artifact too: exporting it again gives the same delta, bit for bit.
    again = tmp_path / "again.safetensors"
    export_artifact(out, "delta", again)
    assert all(torch.equal(v, delta[k]) for k, v in load_file(again).items())
    assert _header(again)["base"]["tensors_digest"] == info["base"]["tensors_digest"]


def test_a_text_encoder_delta_samples_like_its_artifact(artifacts, tmp_path, cli):
    base, artifact = artifacts["sd1-te"]
    out = tmp_path / "te.delta.safetensors"
    result = cli("export", artifact, "--format", "delta", "--out", out)
    assert result.code == 0, result.err
    delta = load_file(out)
    assert set(delta) == set(read_artifact(artifact).weights)
    assert all(k.startswith(TEXT_ENCODER_PREFIX) for k in delta)
    from_delta = _sampled(cli, tmp_path / "a", "--model", out)
    np.testing.assert_array_equal(from_delta, _sampled(cli, tmp_path / "b", "--model", artifact))
    assert not np.array_equal(from_delta, _sampled(cli, tmp_path / "c", "-b", base))


def test_a_toy_text_encoder_lora_or_diff_is_refused_in_one_line(tmp_path, cli):
    # The toy's encoder is a BERT: LoRA readers rename text-encoder adapters the CLIP way only,
    # and the UIs a diff is for load no such model.
    from conceptctl.erasure.params import select_parameters

    model = open_backbone("toy", device="cpu", dtype="float32")
    artifact = write_test_artifact(model, tmp_path / "art", names=sorted(
        select_parameters(model, "text-encoder")))
    for naming in ("diffusers", "kohya"):
        out = tmp_path / f"{naming}.safetensors"
        result = cli("export", artifact, "--format", "lora", "--lora-format", naming, "--out",
                     out)
        assert result.code == 1 and "into CLIP text encoders only" in result.err
        assert "delta" in result.err and not out.exists()
    out = tmp_path / "toy.diff.safetensors"
    result = cli("export", artifact, "--format", "diff", "--out", out)
    assert result.code == 1 and result.err.startswith("error: the diff format is unsupported "
                                                      "for backbone toy")
    assert "delta" in result.err and "Traceback" not in result.err and not out.exists()


def test_delta_and_artifact_refuse_another_base_unless_forced(artifacts, tmp_path, cli):
    base, artifact = artifacts["sd1"]
    other = save_tiny_pipeline(tmp_path / "other", "sd1", seed=1)
    delta = tmp_path / "d.safetensors"
    assert cli("export", artifact, "--format", "delta", "--out", delta).code == 0
    expected = read_artifact(artifact).base["tensors_digest"]

    for model in (delta, artifact):
        result = cli("sample", PROMPT, "-n", "1", "--steps", "2", "--model", model, "-b", other,
                     "-o", tmp_path / "refused")
        assert result.code == 1
        assert "made from base" in result.err and expected in result.err
        assert result.err.count("sha256:") == 2  # names both hashes
        forced = cli("sample", PROMPT, "-n", "1", "--steps", "2", "--model", model, "-b",
                     other, "--force", "-o", tmp_path / f"forced-{model.stem}")
        assert forced.code == 0, forced.err
        assert "forced:" in forced.err

    # Exporting onto another base: refused, then forced and recorded in the file.
    out = tmp_path / "forced.safetensors"
    refused = cli("export", artifact, "--format", "delta", "-b", other, "--out", out)
    assert refused.code == 1 and "made from base" in refused.err and not out.exists()
    forced = cli("export", artifact, "--format", "delta", "-b", other, "--force", "--out", out)
    assert forced.code == 0 and "forced:" in forced.err
    info = _header(out)
    assert info["export"]["forced"] is True
    assert info["export"]["artifact_base"]["tensors_digest"] == expected
    assert info["base"]["tensors_digest"] != expected


# --- bad input -------------------------------------------------------------------------------


def test_bad_input_is_one_clear_line(artifacts, tmp_path, cli):
    _, artifact = artifacts["sd1"]
    cases = [
        (("export", artifact, "--format", "onnx"),
         "unknown exporter 'onnx'; available: diffusers, lora, single-file, delta, diff"),
        (("export", artifact), "choose a format with --format: diffusers, lora"),
        (("export", tmp_path, "--format", "delta"), "is not a conceptctl artifact"),
        (("export", artifact, "--format", "delta", "--rank", "4"),
         "--rank does not apply to the delta format"),
        (("export", artifact, "--format", "lora", "--rank", "four"),
         "--rank must be a positive whole number or 'auto'"),
        (("export", artifact, "--format", "lora", "--rank", "4", "--max-error", "0.1"),
         "--max-error applies to --rank auto only"),
        (("export", artifact, "--format", "lora", "--lora-format", "a1111"),
         "unknown LoRA naming 'a1111'"),
        (("export", artifact, "--format", "lora", "--out", tmp_path / "x.pt"),
         "writes one .safetensors file"),
        (("export", artifact, "--format", "diffusers", "--dtype", "float8"),
         "unknown dtype 'float8'"),
    ]
    for args, message in cases:
        result = cli(*args)
        assert result.code != 0, args
        assert result.err.startswith("error: "), result.err
        assert message in " ".join(result.err.split()), (args, result.err)
        assert "Traceback" not in result.err


def test_files_that_are_not_deltas_are_refused(artifacts, tmp_path, cli):
    base, artifact = artifacts["sd1"]
    lora = tmp_path / "l.safetensors"
    export_artifact(artifact, "lora", lora)
    plain = tmp_path / "plain.safetensors"
    shutil.copy(base / "unet" / "diffusion_pytorch_model.safetensors", plain)
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    for path, message in ((lora, "is a conceptctl lora export, not a delta"),
                          (plain, "is not a conceptctl delta"),
                          (text, "is not a conceptctl artifact"),
                          (artifact / "weights.safetensors", "is the weights file of an artifact")):
        result = cli("sample", PROMPT, "--model", path, "-o", tmp_path / "s")
        assert result.code == 1 and message in " ".join(result.err.split()), result.err


# --- atomic writes, plugins ------------------------------------------------------------------


class _Failing:
    """An exporter plugin that dies half-way through writing."""

    def __init__(self, error):
        self.error = error

    @hookimpl
    def register_exporters(self, register):
        def half_file(job, out):
            out.write_bytes(b"half a file")
            raise self.error

        def half_folder(job, out):
            (out / "model_index.json").write_text("{}")
            raise self.error

        register(Exporter("half-file", half_file, "fails", writes="file"))
        register(Exporter("half-folder", half_folder, "fails", writes="folder"))


@pytest.mark.parametrize("error", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_interrupted_export_leaves_no_target(artifacts, tmp_path, error):
    _, artifact = artifacts["sd1"]
    register_plugin(_Failing(error), "failing")
    out_dir = tmp_path / "out"
    for fmt, target in (("half-file", out_dir / "m.safetensors"), ("half-folder", out_dir / "f")):
        with pytest.raises(type(error)):
            export_artifact(artifact, fmt, target)
        assert not target.exists()
        # No temporary or lock left behind either, nor the folder the export made for it.
        assert not out_dir.exists()


def test_existing_target_needs_overwrite(artifacts, tmp_path, cli):
    _, artifact = artifacts["sd1"]
    out = tmp_path / "d.safetensors"
    out.write_bytes(b"keep me")
    result = cli("export", artifact, "--format", "delta", "--out", out)
    assert result.code == 1 and "already exists" in result.err
    assert out.read_bytes() == b"keep me"
    # --overwrite replaces only a file conceptctl wrote (its header says so), never the user's.
    result = cli("export", artifact, "--format", "delta", "--out", out, "--overwrite")
    assert result.code == 1 and "conceptctl did not write" in result.err
    assert out.read_bytes() == b"keep me"
    ours = tmp_path / "ours.safetensors"
    assert cli("export", artifact, "--format", "delta", "--out", ours).code == 0
    assert cli("export", artifact, "--format", "delta", "--out", ours, "--overwrite").code == 0
    assert _header(ours)["kind"] == "delta"


def test_exporters_are_plugins(cli):
    registry = get_registry("exporter")
    assert registry.names()[:5] == ["diffusers", "lora", "single-file", "delta", "diff"]
    assert {entry.plugin for entry in registry} == {"builtin-export"}
    listed = {p["name"]: p for p in json.loads(cli("plugins", "--json").out)["plugins"]}
    assert listed["builtin-export"]["registers"]["exporter"] == [
        "diffusers", "lora", "single-file", "delta", "diff"]
    assert "export" in listed["builtin-commands"]["registers"]["command"]


@pytest.mark.slow
def test_real_erasure_artifact_exports(tiny_sd1, tmp_path, cli):
    """An artifact from a (short) real DoCo run, not a perturbation, through the CLI."""
    from conceptctl.erasure.run import erase
    from conceptctl.testing import tiny_erase_config

    erase(tiny_erase_config(tiny_sd1, steps=3, checkpointing_steps=3), tmp_path / "art")
    lora = tmp_path / "l.safetensors"
    result = cli("export", tmp_path / "art", "-f", "lora", "--rank", "1000", "--lora-format",
                 "kohya", "-o", lora)
    assert result.code == 0, result.err
    assert "overall relative error" in result.out
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd1, **NO_CHECKER)
    pipe.load_lora_weights(str(lora))
    np.testing.assert_allclose(_draw(pipe), _draw(_erased(tiny_sd1, tmp_path / "art")),
                               atol=1e-5)
    assert _header(lora)["method"] == "doco"


def test_forced_export_model_card_names_the_artifacts_base():
    from conceptctl.export.metadata import export_card

    info = {"concept": "church", "anchor": "house", "concept_type": "object", "method": "doco",
            "base": {"name": "other", "tensors_digest": "sha256:new", "tensors": ["a"]},
            "export": {"format": "diffusers", "forced": True,
                       "artifact_base": {"name": "sd", "tensors_digest": "sha256:old"}}}
    card = export_card(info, "load it")
    assert "**Forced export**" in card and "(sha256:old)" in card


def _two_concept_artifact(cli, tiny_sd1, tmp_path, how: str):
    """church and airplane erased by uce: in one run ("several"), or airplane on top of church
    ("stacked", erase --base)."""
    if how == "several":
        steps = [("two", ["church", "airplane", "--anchor", "house", "-b", tiny_sd1])]
    else:
        steps = [("A", ["church", "--anchor", "house", "-b", tiny_sd1]),
                 ("two", ["airplane", "--anchor", "house", "--base", tmp_path / "A"])]
    for name, args in steps:
        made = cli("erase", *args, "--method", "uce", "-o", tmp_path / name)
        assert made.code == 0, made.err
    return tmp_path / "two"


@pytest.mark.parametrize("how", ["several", "stacked"])
def test_two_concept_artifacts_export_as_delta_lora_and_diffusers(tiny_sd1, tmp_path, cli, how):
    """Both concepts in every export: the delta samples like the artifact and lists both in its
    header, the kohya LoRA reproduces the erased UNet in diffusers, the diffusers folder's card
    names both. A stacked artifact exports flattened: the delta is the whole chain's change
    against the original base (applied alone), the folder's record keeps no chain paths."""
    from conceptctl.erasure.artifact import base_digest

    art = _two_concept_artifact(cli, tiny_sd1, tmp_path, how)
    delta = tmp_path / "two.delta.safetensors"
    assert cli("export", art, "--format", "delta", "-o", delta).code == 0
    assert [c["concept"] for c in _header(delta)["concepts"]] == ["church", "airplane"]
    np.testing.assert_array_equal(_sampled(cli, tmp_path / "a", "--model", delta),
                                  _sampled(cli, tmp_path / "b", "--model", art))
    lora = tmp_path / "two.lora.safetensors"
    result = cli("export", art, "-f", "lora", "--rank", "1000", "--lora-format", "kohya",
                 "-o", lora)
    assert result.code == 0, result.err
    assert [c["concept"] for c in _header(lora)["concepts"]] == ["church", "airplane"]
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd1, **NO_CHECKER)
    pipe.load_lora_weights(str(lora))
    np.testing.assert_allclose(_draw(pipe), _draw(_erased(tiny_sd1, art)), atol=1e-5)
    folder = tmp_path / "folder"
    assert cli("export", art, "-f", "diffusers", "-o", folder).code == 0
    card = (folder / "README.md").read_text()
    assert "**church**" in card and "**airplane**" in card
    record = json.loads((folder / "conceptctl.json").read_text())
    assert "chain" not in record
    assert [c["concept"] for c in record["concepts"]] == ["church", "airplane"]
    if how == "stacked":
        header = _header(delta)
        assert "chain" not in header and len(header["export"]["chain"]) == 2
        flat = read_artifact(delta)
        assert not flat.chain
        model = open_backbone(str(tiny_sd1), device="cpu", dtype="float32")
        assert base_digest(model, flat.weights) == flat.base["tensors_digest"]  # original's
