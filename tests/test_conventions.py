"""Issue 17's conventions: accelerate's mixed precision reaches training, every step goes to the
artifact's losses.jsonl (and TensorBoard) consistently across a resume, --output and --out on
every command that writes, and diffusers' underscore spellings as hidden options."""

import json

import pytest
import torch
import typer

from conceptctl.cli import build_app
from conceptctl.cli.aliases import RENAMES, SHARED
from conceptctl.erasure.artifact import read_artifact
from conceptctl.erasure.config import plan
from conceptctl.erasure.loss_log import LOSS_LOG, TENSORBOARD_DIR, log_line, read_log
from conceptctl.erasure.run import erase
from conceptctl.testing import tiny_erase_config

ENV = "ACCELERATE_MIXED_PRECISION"
WRITERS = ("erase", "evaluate", "eval", "sample", "export", "toy render", "toy train")


def _manifest(out):
    return json.loads((out / "conceptctl.json").read_text())


def _commands():
    root = typer.main.get_command(build_app())
    found = {}
    for name, command in root.commands.items():
        for sub, leaf in getattr(command, "commands", {None: command}).items():
            found[name if sub is None else f"{name} {sub}"] = leaf
    return found


# --- mixed precision: --mixed-precision, else accelerate's, else no ---------------------------


@pytest.mark.parametrize("env, given, expected", [
    (None, None, ("no", "default")),
    ("bf16", None, ("bf16", "accelerate")),
    ("FP16", None, ("fp16", "accelerate")),  # accelerate lower-cases its flag too
    ("no", None, ("no", "accelerate")),  # what 'accelerate launch' exports when nothing says
    ("bf16", "no", ("no", "option")),  # conceptctl's own option comes first
])
def test_mixed_precision_precedence(monkeypatch, env, given, expected):
    if env is not None:
        monkeypatch.setenv(ENV, env)
    cfg = plan("church", "house", mixed_precision=given)
    assert (cfg.mixed_precision, cfg.mixed_precision_source) == expected


def test_accelerate_mixed_precision_reaches_training(tiny_sd1, tiny_sd1_artifact, tmp_path,
                                                     monkeypatch):
    """What 'accelerate launch --mixed_precision bf16' exports trains in bf16: the run's
    Precision says so and the weights are not the fp32 run's (same settings otherwise)."""
    monkeypatch.setenv(ENV, "bf16")
    erase(tiny_erase_config(tiny_sd1), tmp_path / "bf16")
    mixed, full = read_artifact(tmp_path / "bf16"), read_artifact(tiny_sd1_artifact)
    assert mixed.manifest["training"]["precision"]["mode"] == "bf16"
    assert mixed.manifest["hyperparameters"]["mixed_precision_source"] == "accelerate"
    assert full.manifest["hyperparameters"]["mixed_precision"] == "no"
    assert any(not torch.equal(mixed.weights[k], full.weights[k]) for k in full.weights)


def test_an_unknown_accelerate_precision_is_one_line(cli, tiny_sd1, tmp_path, monkeypatch):
    monkeypatch.setenv(ENV, "fp8")
    result = cli("erase", "church", "--anchor", "house", "-b", tiny_sd1, "-o", tmp_path / "o")
    assert result.code == 2 and result.err.startswith("error: accelerate asks for mixed "
                                                      "precision 'fp8'")
    assert not (tmp_path / "o").exists()


# --- the loss log -------------------------------------------------------------------------------


def _numbers(lines):
    """The logged figures without the wall-clock ones (which differ run to run)."""
    return [{k: v for k, v in line.items() if k not in ("time", "seconds")} for line in lines]


def _board(folder, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder / TENSORBOARD_DIR))
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


def test_loss_log_is_the_history_and_continues_across_a_resume(tiny_sd1, tmp_path):
    # 4 steps in one go (warm-up 1, checkpoint every 2).
    full = tmp_path / "full"
    erase(tiny_erase_config(tiny_sd1), full, report_to="tensorboard")
    lines = read_log(full / LOSS_LOG)
    history = json.loads((full / "checkpoint-4" / "state.json").read_text())["history"]
    assert lines == [log_line(entry) for entry in history]
    assert [line["step"] for line in lines] == [1, 2, 3, 4]
    warm_up, trained = lines[0], lines[1:]
    # JSON has no NaN: the warm-up step's generator loss (NaN by design) is left out.
    assert not warm_up["generator_step"] and "loss" not in warm_up and "d_loss" in warm_up
    for line in trained:
        assert line["generator_step"] and {"loss", "preserve_loss", "d_loss",
                                           "d_accuracy"} <= set(line)
    assert all(line["lr"] == 1e-3 and line["seconds"] > 0 for line in lines)
    assert _manifest(full)["training"]["loss_log"] == LOSS_LOG
    board = _board(full, "train/loss")  # float32 scalars
    assert [step for step, _ in board] == [line["step"] for line in trained]
    assert [value for _, value in board] == pytest.approx([line["loss"] for line in trained])

    # The same run stopped after step 3 (its last checkpoint: step 2) by a kill that cut the
    # log's next line short, then resumed from checkpoint-2 to step 4.
    part = tmp_path / "part"
    erase(tiny_erase_config(tiny_sd1, steps=3), part, report_to="tensorboard")
    with (part / LOSS_LOG).open("a") as log:
        log.write('{"step": 4, "lo')
    erase(tiny_erase_config(tiny_sd1), part, resume="checkpoint-2", report_to="tensorboard")
    resumed = read_log(part / LOSS_LOG)
    assert _numbers(resumed) == _numbers(lines)  # each step once, as in the one-go run
    assert _board(part, "train/loss") == _board(full, "train/loss")  # step 3's first go purged
    assert _board(part, "train/d_loss") == _board(full, "train/d_loss")


def test_report_to_is_checked_before_any_work(cli, tiny_sd1, tmp_path, monkeypatch):
    import importlib.util

    args = ["erase", "church", "--anchor", "house", "-b", tiny_sd1, "-o", tmp_path / "o"]
    unknown = cli(*args, "--report-to", "wandb")
    assert unknown.code == 2 and "unknown tracker 'wandb'" in unknown.err
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *rest: None if name == "tensorboard" else real(name, *rest))
    missing = cli(*args, "--report-to", "tensorboard")
    assert missing.code == 2 and missing.err.startswith(
        "error: --report-to tensorboard needs the tensorboard package, which is not installed")
    assert "pip install 'conceptctl[tensorboard]'" in missing.err
    assert not (tmp_path / "o").exists()


# --- option names ---------------------------------------------------------------------------------


def test_every_command_that_writes_takes_output_and_out():
    commands = _commands()
    for name in WRITERS:
        opts = {o for p in commands[name].params for o in p.opts}
        assert {"--output", "--out", "-o"} <= opts, name


def test_every_diffusers_spelling_names_an_option_of_its_command():
    commands = _commands()
    for name, renames in RENAMES.items():
        opts = {o for p in commands[name].params for o in p.opts}
        for ours in {**SHARED, **renames}.values():
            assert f"--{ours}" in opts, (name, ours)


def test_diffusers_spellings_work_and_stay_out_of_help(cli, tiny_sd1, tmp_path, monkeypatch):
    monkeypatch.setenv(ENV, "fp16")
    out = tmp_path / "out"
    result = cli("erase", "church", "--anchor", "house", "--pretrained_model_name_or_path",
                 tiny_sd1, "--max_train_steps", "2", "--warmup", "1", "--train_batch_size", "2",
                 "--learning_rate", "1e-3", "--d_lr", "1e-3", "--anchor_images", "1",
                 "--anchor_prompt_count", "1", "--checkpointing_steps", "2",
                 "--mixed_precision=no", "--output_dir", out, "--json")
    assert result.code == 0, result.err
    settings = _manifest(out)["hyperparameters"]
    assert (settings["backbone"], settings["steps"], settings["batch_size"], settings["lr"],
            settings["anchor_images_per_prompt"]) == (str(tiny_sd1), 2, 2, 1e-3, 1)
    # The option, in any spelling, comes before accelerate's choice.
    assert (settings["mixed_precision"], settings["mixed_precision_source"]) == ("no", "option")
    shown = cli("erase", "--help").out
    assert "--output_dir" not in shown and "--learning_rate" not in shown
    assert "--output" in shown and "--lr" in shown
