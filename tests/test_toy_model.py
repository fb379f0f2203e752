"""The shipped toy model and judge: default backbone, judge quality, CLI round trips, training."""

import json
from pathlib import Path

import numpy as np
import pytest

from conceptctl.backbones.loading import open_backbone
from conceptctl.settings import set_setting
from conceptctl.toy.judge import Judge
from conceptctl.toy.training import HELDOUT_SEED_BASE, judge_accuracy, render_dataset


@pytest.fixture(scope="module")
def judge():
    return Judge.load()


def test_toy_is_the_default_backbone_and_loads_through_the_registry():
    backbone = open_backbone(device="cpu")
    assert backbone.spec.name == "toy"
    assert (backbone.prediction_type, backbone.resolution, backbone.text_width) == (
        "epsilon", 64, 384)
    assert not any(p.requires_grad for p in backbone.text_encoder.parameters())
    assert backbone.encode_prompts(["a red church"]).shape == (1, 32, 384)


def test_the_shipped_weights_are_where_the_backbone_looks():
    from conceptctl.default_plugins.toy import TOY

    assert (Path(TOY.source) / "unet" / "diffusion_pytorch_model.safetensors").is_file()


def test_shipped_judge_is_accurate_on_fresh_renders(judge):
    images, index = render_dataset(2, HELDOUT_SEED_BASE + 500, workers=1)
    accuracy = judge_accuracy(judge, images, index)
    assert min(accuracy.values()) >= 0.98, accuracy


def test_sample_works_with_no_flags(cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = cli("sample", "a red church in the style of Van Gogh", "-n", "2", "--json")
    assert result.code == 0, result.err
    sidecar = json.loads((tmp_path / json.loads(result.out)["out"] / "samples.json").read_text())
    assert sidecar["backbone"]["name"] == "toy"
    assert sidecar["settings"]["steps"] == 20
    assert sidecar["settings"]["resolution"] == 64


def test_render_then_judge_round_trip(cli, tmp_path):
    out = tmp_path / "church.png"
    assert cli("toy", "render", "--object", "chapel", "--style", "Vincent van Gogh",
               "--color", "crimson", "--seed", "5", "-o", out).code == 0
    result = cli("toy", "judge", out, "--json")
    assert result.code == 0, result.err
    verdict = json.loads(result.out)
    assert (verdict["object"], verdict["style"], verdict["color"]) == (
        "church", "van-gogh", "red")
    assert verdict["path"] == str(out)
    assert abs(sum(verdict["probabilities"]["style"].values()) - 1) < 1e-3
    table = cli("toy", "judge", out)
    assert "church" in table.out and "van-gogh" in table.out


def test_render_and_judge_bad_input(cli, tmp_path):
    result = cli("toy", "render", "--object", "castle", "--style", "monet", "--color", "red",
                 "-o", tmp_path / "x.png")
    assert result.code == 2 and "unknown object 'castle'" in result.err
    assert not (tmp_path / "x.png").exists()
    result = cli("toy", "render", "--object", "boat", "--style", "monet", "--color", "red",
                 "-o", tmp_path / "x.jpg")
    assert result.code == 2 and ".png" in result.err
    not_an_image = tmp_path / "notes.txt"
    not_an_image.write_text("hello")
    result = cli("toy", "judge", not_an_image)
    assert result.code == 2 and "as an image" in result.err


@pytest.mark.slow
def test_train_command_smoke_run_and_use_of_its_result(cli, tmp_path):
    out = tmp_path / "retrained"
    result = cli("toy", "train", "-o", out, "--images-per-concept", "2", "--vae-steps", "2",
                 "--judge-steps", "2", "--unet-steps", "2", "--unet-batch", "4")
    assert result.code == 0, result.err
    report = json.loads((out / "training.json").read_text())
    assert report["config"]["unet_steps"] == 2
    assert set(report["judge_heldout_accuracy"]) == {"object", "style", "color"}
    set_setting("backbone-path.toy", str(out / "toy-model"))
    sampled = cli("sample", "a boat", "-n", "1", "--steps", "2", "-o", tmp_path / "s")
    assert sampled.code == 0, sampled.err
    picture = tmp_path / "s" / "000-a-boat-00.png"
    judged = cli("toy", "judge", picture, "--judge", out / "judge.safetensors", "--json")
    assert judged.code == 0 and json.loads(judged.out)["path"] == str(picture)


@pytest.mark.slow
def test_check_command_reports_every_axis(cli):
    result = cli("toy", "check", "--seeds", "1", "--steps", "2", "--json")
    assert result.code == 0, result.err
    report = json.loads(result.out)
    for name in ("training_templates", "held_out_templates"):
        assert report[name]["images"] == 120
        assert set(report[name]["accuracy"]) == {"object", "style", "color"}
        assert all(0 <= v <= 1 for v in report[name]["accuracy"].values())
    assert min(report["judge_accuracy"].values()) >= 0.98
    assert np.isclose(sum(report["held_out_templates"]["per_value"]["style"].values()) / 4,
                      report["held_out_templates"]["accuracy"]["style"])
