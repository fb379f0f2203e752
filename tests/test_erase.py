"""DoCo and its baselines on the tiny SD1-/SD2-shaped pipelines: what changes, the artifact, the
anchor cache, resumption and bad input."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from huggingface_hub import ModelCard

from conceptctl.backbones.loading import open_backbone
from conceptctl.erasure.artifact import BaseMismatchError, apply_artifact, read_artifact
from conceptctl.erasure.params import select_parameters
from conceptctl.erasure.run import erase
from conceptctl.testing import tiny_erase_config


@pytest.mark.parametrize("fixture", ["tiny_sd1", "tiny_sd2"])
@pytest.mark.parametrize("method", ["doco", "ca", "esd-x", "ca-doco-recipe",
                                    "esd-x-doco-recipe"])
def test_only_the_chosen_parameters_change(request, tmp_path, fixture, method):
    base = request.getfixturevalue(fixture)
    before = {k: v.clone() for k, v in open_backbone(str(base), device="cpu").unet.state_dict()
              .items()}
    cfg = tiny_erase_config(base, method=method)
    # Each method's recipe: ESD-x trains every attn2 tensor, the others the keys and values.
    assert cfg.params == ("cross-attn" if method == "esd-x" else "cross-attn-kv")
    erase(cfg, tmp_path / "out")
    artifact = read_artifact(tmp_path / "out")
    chosen = set(select_parameters(open_backbone(str(base), device="cpu"), cfg.params))
    assert set(artifact.weights) == chosen
    assert all(".attn2." in n for n in chosen)
    changed = {n for n, v in artifact.weights.items() if not torch.equal(v, before[n])}
    assert changed == chosen  # every trained tensor moved, nothing else is in the artifact
    manifest = artifact.manifest
    assert manifest["method"] == method and manifest["kind"] == "values"
    assert manifest["base"]["prediction_type"] == (
        "v_prediction" if fixture == "tiny_sd2" else "epsilon")
    assert manifest["components"]["method"]["plugin"] == "builtin-erasure"
    assert {"torch", "diffusers", "conceptctl"} <= set(manifest["versions"])
    # A Hub-style card; the base, a folder given by path, is said to be unknown, not guessed.
    card = ModelCard((tmp_path / "out" / "README.md").read_text(encoding="utf-8"))
    assert card.text.lstrip().startswith("# church erased")
    assert card.data.base_model is None and card.data.license is None
    assert {"concept-erasure", method} <= set(card.data.tags)
    assert "cannot identify" in card.text


@pytest.mark.parametrize("group, rule", [
    ("cross-attn", lambda n: ".attn2." in n),
    ("full", lambda n: True),
])
def test_parameter_groups(tiny_sd1, group, rule):
    backbone = open_backbone(str(tiny_sd1), device="cpu")
    chosen = select_parameters(backbone, group)
    assert set(chosen) == {n for n, _ in backbone.unet.named_parameters() if rule(n)}


def test_artifact_applies_to_its_base_only(tiny_sd1, tiny_sd1_artifact, tmp_path):
    from conceptctl.testing import save_tiny_pipeline

    artifact = read_artifact(tiny_sd1_artifact)
    model = open_backbone(str(tiny_sd1), device="cpu")
    assert apply_artifact(model, artifact) == []
    params = dict(model.unet.named_parameters())
    assert all(torch.equal(params[n], v) for n, v in artifact.weights.items())
    other = open_backbone(str(save_tiny_pipeline(tmp_path / "other", "sd1", seed=1)),
                          device="cpu")
    with pytest.raises(BaseMismatchError, match="made from base"):
        apply_artifact(other, artifact)
    notes = apply_artifact(other, artifact, force=True)
    assert notes and notes[0].startswith("forced:")


def test_artifact_applies_to_its_base_loaded_in_half_precision(tiny_sd1, tiny_sd1_artifact,
                                                                tmp_path):
    """Erase trains float32; sampling on a GPU loads the base in float16 (dtype auto): the base
    is recognised in that dtype, and another base still is not."""
    from conceptctl.testing import save_tiny_pipeline

    artifact = read_artifact(tiny_sd1_artifact)
    assert set(artifact.base["tensors_digest_by_dtype"]) == {"float16", "bfloat16"}
    for dtype in ("bfloat16", "float16"):
        model = open_backbone(str(tiny_sd1), device="cpu", dtype=dtype)
        assert apply_artifact(model, artifact) == []
        params = dict(model.unet.named_parameters())
        assert all(torch.equal(params[n], v.to(params[n].dtype))
                   for n, v in artifact.weights.items())
    other = open_backbone(str(save_tiny_pipeline(tmp_path / "other", "sd1", seed=1)),
                          device="cpu", dtype="bfloat16")
    with pytest.raises(BaseMismatchError, match="made from base"):
        apply_artifact(other, artifact)
    del artifact.manifest["base"]["tensors_digest_by_dtype"]  # an older artifact
    with pytest.raises(BaseMismatchError) as older:
        apply_artifact(open_backbone(str(tiny_sd1), device="cpu", dtype="bfloat16"), artifact)
    assert "--dtype float32" in older.value.hint


def test_anchor_images_are_reused(tiny_sd1, tmp_path):
    first = erase(tiny_erase_config(tiny_sd1), tmp_path / "a")
    second = erase(tiny_erase_config(tiny_sd1, method="ca"), tmp_path / "b")
    third = erase(tiny_erase_config(tiny_sd1, seed=1), tmp_path / "c")
    assert (first.anchors_cached, second.anchors_cached, third.anchors_cached) == (
        False, True, False)


def test_checkpoints_rotate(tiny_sd1, tmp_path):
    erase(tiny_erase_config(tiny_sd1, steps=8, checkpointing_steps=2, checkpoints_total_limit=2),
          tmp_path / "out")
    kept = sorted(p.name for p in (tmp_path / "out").iterdir() if p.name.startswith("checkp"))
    assert kept == ["checkpoint-6", "checkpoint-8"]


@pytest.mark.slow
def test_killed_run_resumes_to_identical_weights(tiny_sd1, tmp_path):
    """A real subprocess is killed mid-run; '--resume latest' finishes bit for bit equal."""
    args = ["erase", "church", "--anchor", "house", "-b", str(tiny_sd1), "--steps", "120",
            "--warmup", "20", "--batch-size", "2", "--anchor-images", "1",
            "--anchor-prompt-count", "4",
            "--checkpointing-steps", "20", "--lr", "1e-3", "--d-lr", "1e-3"]
    env = os.environ | {"PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "conceptctl"]
    subprocess.run([*cmd, *args, "-o", str(tmp_path / "full")], env=env, check=True,
                   capture_output=True)

    killed = tmp_path / "killed"
    proc = subprocess.Popen([*cmd, *args, "-o", str(killed)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (killed / "checkpoint-40").exists() and proc.poll() is None:
        assert time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "conceptctl.json").exists(), "the run finished before it was killed"
    resumed = subprocess.run([*cmd, *args, "-o", str(killed), "--resume", "latest"], env=env,
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from checkpoint-" in resumed.stderr
    full, again = read_artifact(tmp_path / "full"), read_artifact(killed)
    assert full.weights.keys() == again.weights.keys()
    assert all(torch.equal(full.weights[k], again.weights[k]) for k in full.weights)


@pytest.mark.parametrize("args, message", [
    (["", "--anchor", "house"], "the concept to erase is empty"),
    (["church", "--anchor", "Church"], "the anchor equals the concept"),
    (["church", "--anchor", "house", "--method", "magic"],
     "unknown method 'magic'; available: doco, ca, esd-x, uce, ca-doco-recipe, "
     "esd-x-doco-recipe"),
    (["church", "--anchor", "house", "--discriminator", "big"],
     "unknown discriminator 'big'; available: patchgan, hinge-sn"),
    (["church", "--anchor", "house", "--surgery", "laser"],
     "unknown gradient-surgery 'laser'; available: doco, doco-reference, pcgrad, none"),
    (["church", "--anchor", "house", "--anchor-selector", "llm"], "unknown anchor-selector"),
    (["church", "--anchor", "house", "--type", "vibe"], "unknown concept type 'vibe'"),
    (["church", "--anchor", "house", "--steps", "5", "--warmup", "5"], "warm-up (5)"),
    (["church", "--anchor", "house", "--params", "lora"], "unknown parameter group 'lora'"),
])
def test_bad_input_is_one_clear_line(cli, tiny_sd1, tmp_path, args, message):
    result = cli("erase", "--steps", "2", "--warmup", "1", *args, "-b", tiny_sd1, "-o",
                 tmp_path / "out")
    assert result.code != 0
    assert result.err.splitlines()[0].startswith("error:")
    assert message in result.err.splitlines()[0]
    assert not (tmp_path / "out").exists()


def test_existing_output_is_refused(cli, tiny_sd1, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    result = cli("erase", "church", "--anchor", "house", "-b", tiny_sd1, "-o", out)
    assert result.code == 1 and "already exists" in result.err and "--overwrite" in result.err
    assert (out / "mine.txt").read_text() == "keep"


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(cli, tiny_sd1, tmp_path):
    from conceptctl.components import Component
    from conceptctl.erasure.methods import StepStats
    from conceptctl.hookspecs import hookimpl
    from conceptctl.plugins import register_plugin, unregister_plugin

    class Exploding:
        def __init__(self, context, config):
            self.params = list(context.params.values())

        def training_step(self, batch, step):
            for p in self.params:
                p.grad = torch.zeros_like(p)
            return StepStats(loss=1.0 if step < 4 else float("nan"))

    class Plugin:
        @hookimpl
        def register_methods(self, register):
            register(Component("exploding", Exploding, "test method that diverges"))

    register_plugin(Plugin(), "exploding-plugin")
    try:
        result = cli("erase", "church", "--anchor", "house", "-b", tiny_sd1, "-o",
                     tmp_path / "out", "--method", "exploding", "--steps", "6",
                     "--warmup", "0", "--checkpointing-steps", "2", "--anchor-images", "1",
                     "--anchor-prompt-count", "4")
    finally:
        unregister_plugin("exploding-plugin")
    assert result.code == 1
    assert "the loss became nan at step 4" in result.err
    assert (tmp_path / "out" / "checkpoint-2").is_dir()
    assert not (tmp_path / "out" / "conceptctl.json").exists()
    assert json.loads((tmp_path / "out" / "checkpoint-2" / "state.json").read_text())[
        "step"] == 2


def test_sample_with_model_and_compare(cli, tiny_sd1, tiny_sd1_artifact, tmp_path):
    result = cli("sample", "a church", "--model", tiny_sd1_artifact, "--compare", "-n", "2",
                 "--steps", "2", "-o", tmp_path / "s")
    assert result.code == 0, result.err
    sidecar = json.loads((tmp_path / "s" / "samples.json").read_text())
    assert sidecar["compare"] is True and sidecar["model"]["concept"] == "church"
    assert sidecar["backbone"]["name"] == str(tiny_sd1.resolve())
    assert sorted(p.name for p in (tmp_path / "s" / "original").iterdir()) == [
        "000-a-church-00.png", "000-a-church-01.png"]
    from PIL import Image

    assert Image.open(tmp_path / "s" / "grid.png").size == (4 * 16, 16)
    # the original half is the unmodified model: same pixels as sampling the base directly
    plain = cli("sample", "a church", "-b", tiny_sd1, "-n", "2", "--steps", "2", "-o",
                tmp_path / "plain")
    assert plain.code == 0
    assert (tmp_path / "plain" / "000-a-church-00.png").read_bytes() == (
        tmp_path / "s" / "original" / "000-a-church-00.png").read_bytes()


def test_sample_model_errors(cli, tiny_sd1, tiny_sd2, tiny_sd1_artifact, tmp_path):
    assert "--compare needs --model" in cli("sample", "x", "--compare", "-b", tiny_sd1).err
    assert "not a conceptctl artifact" in cli("sample", "x", "--model", tmp_path).err
    wrong = cli("sample", "x", "--model", tiny_sd1_artifact, "-b", tiny_sd2, "--force")
    assert wrong.code == 1 and "different architecture" in wrong.err


def test_concept_the_toy_never_learned_warns(cli, tmp_path):
    result = cli("erase", "Mickey Mouse", "--anchor", "cartoon character", "--steps", "2",
                 "--warmup", "1", "--anchor-images", "1", "--anchor-prompt-count", "4",
                 "-o", tmp_path / "out")
    assert result.code == 0, result.err
    assert "warning: the toy model never learned 'Mickey Mouse'" in result.err
    manifest = json.loads((tmp_path / "out" / "conceptctl.json").read_text())
    assert manifest["components"]["anchor_selector"]["name"] == "toy"
    assert manifest["base"]["name"] == "toy"


def test_toy_erase_uses_toy_prompts_and_reuses_anchor_images(cli, tmp_path):
    args = ["erase", "church", "--anchor", "house", "--steps", "2", "--warmup", "1",
            "--anchor-images", "1", "--json"]
    first = cli(*args, "-o", tmp_path / "a")
    assert first.code == 0, first.err
    assert json.loads(first.out)["anchors_cached"] is False
    second = cli(*args, "--method", "ca", "-o", tmp_path / "b")
    assert json.loads(second.out)["anchors_cached"] is True
    manifest = json.loads((tmp_path / "a" / "conceptctl.json").read_text())
    assert manifest["concept_type"] == "object"
    pairs = list(zip(manifest["anchors"]["prompts"], manifest["anchors"]["targets"],
                     strict=True))
    assert len(pairs) == 40
    assert all(any(w in a for w in ("house", "cottage", "home")) for a, _ in pairs)
    assert all(any(w in t for w in ("church", "chapel")) for _, t in pairs)


@pytest.mark.parametrize("mode", ["bf16", "fp16"])
def test_mixed_precision_trains_the_same_parameters_close_to_fp32(tiny_sd1, tiny_sd1_artifact,
                                                                   tmp_path, mode):
    erase(tiny_erase_config(tiny_sd1, mixed_precision=mode), tmp_path / mode)
    full, mixed = read_artifact(tiny_sd1_artifact), read_artifact(tmp_path / mode)
    assert set(full.weights) == set(mixed.weights)
    before = {k: v for k, v in open_backbone(str(tiny_sd1), device="cpu").unet.state_dict()
              .items()}
    for name, value in mixed.weights.items():
        assert value.dtype == torch.float32  # master weights stay fp32
        assert torch.isfinite(value).all()
        moved_full = (full.weights[name] - before[name]).norm()
        # Same direction of travel as the fp32 run, up to low-precision noise. bf16's rounding
        # depends on the CPU's kernels: measured cos 0.886 for one tensor on an AVX2-only EPYC
        # (2026-12-06), above 0.9 on the earlier machines; unrelated directions give about 0.
        cos = torch.nn.functional.cosine_similarity(
            (value - before[name]).flatten(), (full.weights[name] - before[name]).flatten(),
            dim=0)
        assert moved_full > 0 and cos > 0.8, (name, float(cos))
    precision = mixed.manifest["training"]["precision"]
    assert precision["mode"] == mode
    assert mixed.manifest["hyperparameters"]["mixed_precision"] == mode


def test_fp16_loss_scale_skips_overflowing_steps():
    from conceptctl.erasure.precision import Precision

    param = torch.nn.Parameter(torch.ones(3))
    precision = Precision("fp16", "cpu", init_scale=2.0**8)
    param.grad = None
    precision.backward((param * 2).sum())
    assert precision.finish([param]) and torch.equal(param.grad, torch.full((3,), 2.0))
    param.grad = None
    precision.backward((param * float("inf")).sum())
    assert not precision.finish([param])  # skipped, scale halved
    assert precision.scale == 2.0**7 and precision.skipped_steps == 1
    param.grad = None  # the trainer zeroes gradients before every step
    grads = precision.grad((param * 3).sum(), [param])
    assert torch.equal(grads[0], torch.full((3,), 3.0)) and precision.finish([param])


@pytest.mark.slow
def test_default_doco_erases_the_toy_style_and_keeps_the_anchor(tmp_path):
    """The toy's default DoCo preset, end to end (about 3 minutes on 2 cores): a flipped label,
    a sign error in the surgery or x_t at the wrong noise level cannot pass this."""
    import csv

    from conceptctl.erasure.config import EraseConfig
    from conceptctl.evaluation.run import EvalOptions, evaluate
    from conceptctl.toy.eval_suite import toy_suite

    # A bare config, as a Python caller writes it: erase() completes it to the toy's preset.
    erase(EraseConfig("Van Gogh", "painting", backbone="toy"), tmp_path / "art")
    # The default evaluation's own prompts (toy suite, toy judge), every third of the target,
    # held-out and anchor groups as a prompt file: a fifth of the drawing, the same verdict.
    manifest = json.loads((tmp_path / "art" / "conceptctl.json").read_text())
    suite = toy_suite(manifest, 1, 20_000)
    axes = ("object", "style", "color")
    with open(tmp_path / "prompts.csv", "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["prompt", "evaluation_seed", "case_number", "group",
                      *(f"expect_{a}" for a in axes)])
        for group in ("target", "target-oos", "anchor"):
            for case in suite.group(group)[::3]:
                out.writerow([case.prompt, case.seed, case.case_number, group,
                              *(case.expect.get(a, "") for a in axes)])
    result = evaluate(tmp_path / "art", EvalOptions(
        prompts=tmp_path / "prompts.csv", attacks=(), images_per_prompt=1,
        metrics=("erasure", "preservation"))).result
    score = {(m["metric"], m["group"]): m for m in result["metrics"]}
    assert score["erasure", "target"]["images"] >= 20
    target = score["erasure", "target"]["details"]
    assert target["concept_rate_before"] >= 0.9  # the toy draws Van Gogh when asked
    assert target["concept_rate_after"] <= 0.2
    assert score["erasure", "target-oos"]["details"]["concept_rate_after"] <= 0.2
    assert score["preservation", "anchor"]["value"] >= 0.9
