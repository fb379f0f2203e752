"""Issue 12: non-finite numbers are never reported as success, and '--resume' continues only the
run its checkpoint belongs to. Every refusal is one error line plus a hint, with no traceback,
and leaves the disk as it should be."""

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conceptctl.backbones.loading import open_backbone
from conceptctl.erasure.checkpoints import save_checkpoint
from conceptctl.erasure.finite import NonFiniteWeightsError, all_finite, first_non_finite
from conceptctl.erasure.run import erase
from conceptctl.testing import save_tiny_pipeline, tiny_erase_config, write_test_artifact


def _refused(result, *phrases):
    """One 'error:' line (holding every phrase), one 'hint:' line, no traceback."""
    lines = result.err.strip().splitlines()
    assert result.code != 0, result.err
    assert "Traceback" not in result.err + result.out
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1, result.err
    assert any(line.startswith("hint:") for line in lines), result.err
    for phrase in phrases:
        assert phrase in errors[0], (phrase, errors[0])
    return errors[0]


def _finite_folder(folder):
    return all(all_finite(load_file(str(f)).values()) for f in folder.glob("*.safetensors"))


# --- impossible numbers: refused before any work ----------------------------------------------


@pytest.mark.parametrize("flag, value, message", [
    ("--lr", "inf", "lr must be a finite number above 0, not inf"),
    ("--lr", "nan", "lr must be a finite number above 0, not nan"),
    ("--d-lr", "-inf", "d-lr must be a finite number above 0, not -inf"),
    ("--surgery-strength", "nan", "surgery-strength must be a finite number, 0 or more, not nan"),
    ("--surgery-strength", "-1", "surgery-strength must be a finite number, 0 or more"),
])
def test_erase_refuses_impossible_numbers_before_any_work(cli, tiny_sd1, tmp_path, isolated_home,
                                                          flag, value, message):
    result = cli("erase", "church", "-a", "house", "--steps", "4", flag, value, "-b", tiny_sd1,
                 "-o", tmp_path / "out")
    assert _refused(result, message).startswith("error:")
    assert not (tmp_path / "out").exists()
    assert not (isolated_home / "cache").exists()  # no anchor image was drawn


def test_every_float_setting_is_checked():
    """Library callers reach settings the CLI has no flag for; a float added later is covered."""
    from dataclasses import fields

    from conceptctl.erasure.config import EraseConfig
    from conceptctl.erasure.run import check_config
    from conceptctl.errors import UsageError

    floats = [f.name for f in fields(EraseConfig) if f.type in ("float", "float | None")]
    assert {"lr", "d_lr", "weight_decay", "max_grad_norm", "surgery_strength", "prior_weight",
            "esd_eta", "anchor_guidance"} <= set(floats)
    for name in floats:
        for bad in (float("nan"), float("inf"), float("-inf")):
            with pytest.raises(UsageError, match=f"{name.replace('_', '-')} must be a finite"):
                check_config(EraseConfig("church", "house", **{name: bad}))


@pytest.mark.parametrize("value", ["nan", "inf"])
def test_sample_and_evaluate_refuse_non_finite_guidance(cli, tmp_path, value):
    result = cli("sample", "a church", "--guidance", value, "-o", tmp_path / "s")
    _refused(result, "guidance")  # NaN already fails the option's own range check (min 0)
    assert not (tmp_path / "s").exists()
    result = cli("evaluate", tmp_path / "art", "--guidance", value, "-o", tmp_path / "e")
    _refused(result, f"guidance must be a finite number, 0 or more, not {value}")
    assert not (tmp_path / "e").exists()


# --- weights checked after every step -----------------------------------------------------------


class _Poisoning:
    """A test method whose losses stay finite while its step 4 makes a weight NaN: through the
    gradient (the UNet's tensors) or directly (its own module, like DoCo's discriminator)."""

    target = "params"

    def __init__(self, context, config):
        self.params = list(context.params.values())
        self.critic = torch.nn.Linear(2, 1)
        self.state_modules = {"critic": self.critic}

    def training_step(self, batch, step):
        from conceptctl.erasure.methods import StepStats

        for p in self.params:
            p.grad = torch.zeros_like(p)
        if step == 4:
            if self.target == "params":
                self.params[0].grad[0] = float("nan")
            else:
                with torch.no_grad():
                    self.critic.weight[0, 0] = float("inf")
        return StepStats(loss=1.0)


@pytest.fixture
def poisoning():
    from conceptctl.components import Component
    from conceptctl.hookspecs import hookimpl
    from conceptctl.plugins import register_plugin, unregister_plugin

    class Plugin:
        @hookimpl
        def register_methods(self, register):
            register(Component("poisoning", _Poisoning, "test method whose weights go NaN"))

    register_plugin(Plugin(), "poisoning-plugin")
    yield _Poisoning
    unregister_plugin("poisoning-plugin")
    _Poisoning.target = "params"


@pytest.mark.parametrize("target, named", [("params", ".attn2.to_k.weight holds NaN"),
                                           ("module", "critic.weight holds inf")])
def test_non_finite_weights_stop_before_their_checkpoint(cli, tiny_sd1, tmp_path, poisoning,
                                                         target, named):
    """The losses were finite, so the loss check never fired: the step's update made the weights
    NaN, and neither its checkpoint nor an artifact is written; the last finite one stays."""
    poisoning.target = target
    out = tmp_path / "out"
    result = cli("erase", "church", "-a", "house", "-b", tiny_sd1, "-o", out, "--method",
                 "poisoning", "--steps", "6", "--warmup", "0", "--checkpointing-steps", "2",
                 "--anchor-images", "1", "--anchor-prompt-count", "4")
    _refused(result, "the weights became non-finite at step 4", named)
    assert not (out / "conceptctl.json").exists()
    assert not (out / "weights.safetensors").exists()
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]
    assert _finite_folder(out / "checkpoint-2")


def test_the_check_is_one_cheap_reduction():
    """SD 1.x's cross-attention k/v: 32 tensors, 19 M values; one sync, a NaN anywhere found."""
    import time

    tensors = {f"t{i}": torch.randn(640, 768) for i in range(32)}
    started = time.perf_counter()
    assert all_finite(tensors.values())
    assert time.perf_counter() - started < 1.0  # ~30 ms here; a CPU step of SD 1.x takes seconds
    tensors["t17"][5, 5] = float("nan")
    tensors["t30"][0, 0] = float("-inf")
    assert not all_finite(tensors.values())
    assert first_non_finite(tensors) == "t17 holds NaN"
    assert first_non_finite({"a": torch.ones(2), "b": torch.tensor([float("inf")])}) == \
        "b holds inf"
    assert all_finite([torch.ones(3, dtype=torch.bfloat16), torch.arange(3), torch.empty(0)])


def test_save_checkpoint_and_write_artifact_refuse_non_finite_tensors(tmp_path):
    from conceptctl.erasure.artifact import write_artifact

    weights = {"a": torch.ones(3), "b": torch.tensor([1.0, float("nan")])}
    with pytest.raises(NonFiniteWeightsError, match="checkpoint-3: b holds NaN"):
        save_checkpoint(tmp_path, 3, trainable=weights, optimizers={}, modules={},
                        generator=torch.Generator(), history=[], keep=2)
    with pytest.raises(NonFiniteWeightsError, match="weights.safetensors: b holds NaN"):
        write_artifact(tmp_path / "art", weights, {}, "# x\n")
    assert list(tmp_path.iterdir()) == []


# --- non-finite artifacts and deltas are refused where they are read ---------------------------


def _poison(file, name):
    with safe_open(str(file), "pt") as f:
        metadata = f.metadata()
    tensors = load_file(str(file))
    tensors[name][0, 0] = float("nan")
    save_file(tensors, str(file), metadata=metadata)


def test_sample_evaluate_and_export_refuse_non_finite_artifacts_and_deltas(cli, tiny_sd1,
                                                                           tmp_path):
    art = write_test_artifact(open_backbone(str(tiny_sd1), device="cpu"), tmp_path / "art")
    delta = tmp_path / "church.delta.safetensors"
    assert cli("export", art, "--format", "delta", "-o", delta).code == 0
    name = sorted(load_file(str(art / "weights.safetensors")))[0]
    _poison(art / "weights.safetensors", name)
    _poison(delta, name)

    for path, shown in ((art, art / "weights.safetensors"), (delta, delta)):
        runs = {"sample": ("sample", "a church", "--model", path, "-n", "1", "--steps", "2",
                           "-o", tmp_path / "s"),
                "export": ("export", path, "--format", "delta", "-o", tmp_path / "d.safetensors")}
        if path == art:  # evaluate takes artifact folders only
            runs["evaluate"] = ("evaluate", path, "-o", tmp_path / "e")
        for command, args in runs.items():
            line = _refused(cli(*args), f"{shown} is unusable: {name} holds NaN")
            assert line, command
        assert not any((tmp_path / p).exists() for p in ("s", "d.safetensors", "e"))


# --- resume: only the run its checkpoint belongs to -------------------------------------------

RUN = ["--warmup", "1", "--batch-size", "2", "--anchor-images", "1", "--anchor-prompt-count", "4",
       "--lr", "1e-4", "--d-lr", "1e-3", "--checkpointing-steps", "2",
       "--checkpoints-total-limit", "5"]


def _killed_run(cli, base, out, steps="6", *extra):
    """A church run stopped right after its checkpoint at step ``steps``, before its artifact
    (what a kill at that moment leaves)."""
    result = cli("erase", "church", "-a", "house", "-b", base, "-o", out, "--steps", steps, *RUN,
                 *extra)
    assert result.code == 0, result.err
    for name in ("conceptctl.json", "weights.safetensors", "README.md"):
        (out / name).unlink()
    return {p.name: (p / "state.json").read_bytes() for p in out.glob("checkpoint-*")}


def _untouched(out, checkpoints):
    assert {p.name: (p / "state.json").read_bytes() for p in out.glob("checkpoint-*")} == \
        checkpoints
    assert not (out / "conceptctl.json").exists()


def test_resume_with_other_settings_names_each_difference(cli, tiny_sd1, tmp_path,
                                                          isolated_home):
    out = tmp_path / "out"
    checkpoints = _killed_run(cli, tiny_sd1, out)
    cached = sorted((isolated_home / "cache").rglob("*.safetensors"))
    result = cli("erase", "boat", "-a", "house", "-b", tiny_sd1, "-o", out, "--steps", "6",
                 *RUN, "--lr", "0.5", "--batch-size", "4", "--mixed-precision", "bf16",
                 "--resume", "latest")
    line = _refused(result, "checkpoint-6 was trained with other settings: concept 'church' != "
                    "'boat'", "mixed-precision 'no' != 'bf16'", "batch-size 2 != 4",
                    "lr 0.0001 != 0.5")
    assert "--output" in result.err and "--overwrite" in result.err  # the hint's two ways on
    assert "anchor images" not in line  # the settings alone refused it, before anything loaded
    assert "resumed from" not in result.err and "generated" not in result.err
    assert sorted((isolated_home / "cache").rglob("*.safetensors")) == cached
    _untouched(out, checkpoints)


def test_resume_refuses_other_base_weights_and_dtype_before_the_anchor_images(
        cli, tmp_path, isolated_home):
    """Same command, but the backbone folder now holds other weights: the settings agree, the
    base weights and anchor images (their cache hashes the backbone) do not."""
    base = save_tiny_pipeline(tmp_path / "base", "sd1", seed=0)
    out = tmp_path / "out"
    checkpoints = _killed_run(cli, base, out, "4")
    result = cli("erase", "church", "-a", "house", "-b", base, "-o", out, "--steps", "4", *RUN,
                 "--resume", "latest", "--dtype", "bfloat16")
    _refused(result, "checkpoint-4 was trained with other settings: dtype 'float32' != "
             "'bfloat16'")
    shutil.rmtree(base)
    save_tiny_pipeline(base, "sd1", seed=1)
    cached = sorted((isolated_home / "cache").rglob("*.safetensors"))
    result = cli("erase", "church", "-a", "house", "-b", base, "-o", out, "--steps", "4", *RUN,
                 "--resume", "latest")
    line = _refused(result, "checkpoint-4 was trained with other settings: base weights "
                    "'sha256:", "anchor cache file '")
    assert "dtype" not in line and "concept" not in line
    assert "generated" not in result.err  # refused before the new base drew anchor images
    assert sorted((isolated_home / "cache").rglob("*.safetensors")) == cached
    _untouched(out, checkpoints)


def test_resume_refuses_a_checkpoint_without_settings_or_past_steps(cli, tiny_sd1, tmp_path):
    out = tmp_path / "out"
    checkpoints = _killed_run(cli, tiny_sd1, out)
    args = ["erase", "church", "-a", "house", "-b", tiny_sd1, "-o", out, *RUN]
    _refused(cli(*args, "--steps", "4", "--resume", "latest"),
             "checkpoint-6 is already past --steps 4")
    _refused(cli(*args, "--steps", "6", "--resume", "checkpoint-5"),
             "no checkpoint 'checkpoint-5'", "checkpoint-4, checkpoint-6")
    name = sorted(load_file(str(out / "checkpoint-4" / "trainable.safetensors")))[0]
    _poison(out / "checkpoint-4" / "trainable.safetensors", name)  # damaged since
    _refused(cli(*args, "--steps", "6", "--resume", "checkpoint-4"),
             f"refusing to resume from {out / 'checkpoint-4'}: {name} holds NaN")
    (out / "checkpoint-6" / "config.json").unlink()  # as an older conceptctl wrote them
    result = cli(*args, "--steps", "6", "--resume", "checkpoint-6")
    _refused(result, "checkpoint-6 records no settings (written by an older conceptctl)")
    assert "--overwrite" in result.err
    _untouched(out, checkpoints)


def test_resume_may_change_steps_and_checkpointing_and_ends_bit_identical(tiny_sd1, tmp_path):
    """4 steps, then resumed to 8 with other checkpointing and gradient checkpointing: the same
    weights, bit for bit, as 8 steps in one go (no schedule depends on the total)."""
    full = erase(tiny_erase_config(tiny_sd1, steps=8, method="doco"), tmp_path / "full")
    part = tiny_erase_config(tiny_sd1, steps=4)
    erase(part, tmp_path / "part")
    record = json.loads((tmp_path / "part" / "checkpoint-4" / "config.json").read_text())
    assert record["config"] == part.as_dict()
    assert record["dtype"] == "float32" and record["anchor_images"] > 0
    assert record["base_tensors_digest"].startswith("sha256:")
    resumed = erase(tiny_erase_config(tiny_sd1, steps=8, checkpointing_steps=3,
                                      checkpoints_total_limit=4, gradient_checkpointing=True),
                    tmp_path / "part", resume="latest")
    assert (full.steps, resumed.steps) == (8, 8)
    a = load_file(str(tmp_path / "full" / "weights.safetensors"))
    b = load_file(str(tmp_path / "part" / "weights.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert sorted(p.name for p in (tmp_path / "part").glob("checkpoint-*")) == [
        "checkpoint-2", "checkpoint-4", "checkpoint-6"]
    manifest = json.loads((tmp_path / "part" / "conceptctl.json").read_text())
    assert manifest["hyperparameters"]["steps"] == 8


def test_a_refusal_on_the_main_process_stops_every_process():
    """Data-parallel: only the main process reads the checkpoint; the others raise what it
    refused instead of waiting for it at the next collective."""
    from conceptctl.erasure.distributed import SingleProcess
    from conceptctl.erasure.resume import ResumeError, on_main
    from conceptctl.errors import ConceptctlError

    class Other(SingleProcess):
        is_main = False

        def __init__(self, told):
            self.told = told

        def broadcast_object(self, value):
            assert value is None  # a non-main process has nothing to tell
            return self.told

    def refuse():
        raise ResumeError("checkpoint-6 was trained with other settings: lr 1 != 2", hint="h")

    with pytest.raises(ResumeError, match="lr 1 != 2"):
        on_main(SingleProcess(), refuse)
    with pytest.raises(ConceptctlError, match="lr 1 != 2") as other:
        on_main(Other(("checkpoint-6 was trained with other settings: lr 1 != 2", "h")), refuse)
    assert other.value.hint == "h"
    assert on_main(Other(None), refuse) is None  # only the main process does the work
    assert on_main(SingleProcess(), lambda: 7) == 7


@pytest.mark.slow
def test_two_processes_refuse_a_mismatched_resume_and_continue_a_matching_one(cli, tiny_sd1,
                                                                              tmp_path):
    """accelerate launch, 2 CPU processes: only the main one reads the checkpoint, yet both stop
    at a refusal (no process waits forever), and a matching resume continues the run."""
    import os
    import subprocess

    from test_distributed import _launcher

    prompts = tmp_path / "anchors.txt"
    prompts.write_text("a photo of a house\na house by a lake\n")
    args = ["erase", "church", "-a", "house", "-b", str(tiny_sd1), "--anchor-prompts",
            str(prompts), "--warmup", "1", "--batch-size", "2", "--anchor-images", "1",
            "--checkpointing-steps", "2", "--lr", "1e-3", "--d-lr", "1e-3", "-o",
            str(tmp_path / "out")]
    assert cli(*args, "--steps", "4").code == 0
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}

    def launched(*extra):
        return subprocess.run([*_launcher(), "-m", "conceptctl", *args, *extra], env=env,
                              capture_output=True, text=True, timeout=300)

    refused = launched("--steps", "6", "--lr", "0.5", "--resume", "latest")
    assert refused.returncode != 0
    assert "checkpoint-4 was trained with other settings: lr 0.001 != 0.5" in refused.stderr
    # Both stopped (none waits: the run returned); the launcher then adds its own report.
    ours = refused.stderr.split("torch/distributed/elastic")[0]
    assert "error: checkpoint-4" in ours and "Traceback" not in ours
    resumed = launched("--steps", "6", "--resume", "latest")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from checkpoint-4" in resumed.stderr
    assert json.loads((tmp_path / "out" / "conceptctl.json").read_text())[
        "hyperparameters"]["steps"] == 6
