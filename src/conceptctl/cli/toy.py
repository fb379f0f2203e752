"""``conceptctl toy``: render the toy world, judge images, retrain the toy model and judge."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from conceptctl.cli import console, options
from conceptctl.errors import UsageError

app = typer.Typer(
    help="The embedded toy world: render its concepts, judge images, retrain its model.",
    no_args_is_help=True,
)


def _axis_value(axis: str, word: str) -> str:
    from conceptctl.toy.world import normalise

    try:
        return normalise(axis, word)
    except ValueError as err:
        raise UsageError(str(err)) from None


@app.command("render")
def render(
    object_: Annotated[str, typer.Option("--object", help="house, church, airplane, parachute, "
                                          "tree or boat (synonyms such as 'plane' work).")],
    style: Annotated[str, typer.Option("--style", help="painting, Van Gogh, Monet or Picasso.")],
    color: Annotated[str, typer.Option("--color", help="red, green, blue, yellow or purple.")],
    out: Annotated[Path, typer.Option("--output", "--out", "-o", help="PNG file to write.",
                                      dir_okay=False)],
    seed: options.Seed = 0,
    overwrite: options.Overwrite = False,
) -> None:
    """Render one picture of the toy world (64x64 PNG); the same seed gives the same pixels."""
    from PIL.PngImagePlugin import PngInfo

    from conceptctl import __version__
    from conceptctl.fileio import atomic_file
    from conceptctl.outputs import PNG_MARK
    from conceptctl.toy.render import render as draw
    from conceptctl.toy.world import Concept

    concept = Concept(_axis_value("object", object_), _axis_value("style", style),
                      _axis_value("color", color))
    if out.suffix.lower() != ".png":
        raise UsageError(f"--out must be a .png file, not {out.name!r}",
                         hint=f"e.g. --out {out.stem or 'picture'}.png")
    # The mark lets a later --overwrite know this file is conceptctl's to replace.
    mark = PngInfo()
    mark.add_text(PNG_MARK, f"conceptctl {__version__} toy render, seed {seed}")
    with atomic_file(out, overwrite) as tmp:
        draw(concept, seed).save(tmp, format="PNG", pnginfo=mark)
    console.out.print(str(out))


@app.command("judge")
def judge(
    images: Annotated[list[Path], typer.Argument(help="Image files to judge.", exists=True,
                                                 dir_okay=False)],
    judge_file: Annotated[
        Path | None,
        typer.Option("--judge", help="A judge.safetensors from 'conceptctl toy train' (default: "
                     "the shipped one).", dir_okay=False, show_default=False),
    ] = None,
    json_output: Annotated[bool, typer.Option("--json", help="One JSON object per line and "
                                              "image: path, object, style, color, "
                                              "probabilities.")] = False,
) -> None:
    """Say which object, style and colour each image shows, with the judge's confidence."""
    from rich.table import Column, Table

    from conceptctl.toy.judge import JUDGE_FILE, Judge, load_images

    pixels = load_images(images)  # an unreadable file is a UsageError naming it
    verdicts = Judge.load(judge_file or JUDGE_FILE).judge(pixels)
    if json_output:
        for path, verdict in zip(images, verdicts, strict=True):
            console.out.print(json.dumps({"path": str(path), **verdict.as_dict()}),
                              markup=False, soft_wrap=True)
        return
    table = Table(Column("image", overflow="fold"), "object", "style", "color")
    for path, verdict in zip(images, verdicts, strict=True):
        cells = [f"{verdict.labels[a]} ({verdict.probabilities[a][verdict.labels[a]]:.0%})"
                 for a in ("object", "style", "color")]
        table.add_row(str(path), *cells)
    console.out.print(table)


@app.command("train")
def train(
    out: Annotated[Path, typer.Option("--output", "--out", "-o", help="Folder for toy-model/, "
                                      "judge.safetensors and training.json.", file_okay=False)],
    images_per_concept: Annotated[int, typer.Option(help="Rendered pictures per concept.",
                                                    min=2)] = 200,
    vae_steps: Annotated[int, typer.Option(help="VAE optimiser steps.", min=1)] = 1500,
    judge_steps: Annotated[int, typer.Option(help="Judge optimiser steps.", min=1)] = 1500,
    unet_steps: Annotated[int, typer.Option(help="UNet optimiser steps.", min=1)] = 3000,
    unet_batch: Annotated[int, typer.Option(help="UNet batch size.", min=1)] = 64,
    seed: options.Seed = 0,
    overwrite: options.Overwrite = False,
) -> None:
    """Train the toy VAE, judge and UNet from scratch (defaults: about an hour on 2 CPU cores).

    Use the result with 'conceptctl config set backbone-path.toy OUT/toy-model' and
    'conceptctl toy judge --judge OUT/judge.safetensors'.
    """
    from conceptctl.fileio import atomic_directory
    from conceptctl.toy.training import ToyTrainConfig, train_toy

    with atomic_directory(out, overwrite=overwrite) as staging:
        cfg = ToyTrainConfig(out=staging, images_per_concept=images_per_concept,
                             vae_steps=vae_steps, judge_steps=judge_steps, unet_steps=unet_steps,
                             unet_batch=unet_batch, seed=seed)
        report = train_toy(cfg, log_fn=lambda line: console.err.print(line, markup=False))
    console.out.print_json(data={"out": str(out), "seconds": report["seconds"],
                                 "judge_heldout_accuracy": report["judge_heldout_accuracy"]})


@app.command("check")
def check(
    backbone: options.Backbone = "toy",
    judge_file: Annotated[
        Path | None,
        typer.Option("--judge", help="Judge to use (default: the shipped one).", dir_okay=False,
                     show_default=False),
    ] = None,
    seeds: Annotated[int, typer.Option(help="Images per prompt.", min=1)] = 4,
    steps: Annotated[int | None, typer.Option(help="Denoising steps (default: the "
                                              "backbone's).", min=1, show_default=False)] = None,
    guidance: Annotated[float | None, typer.Option(help="Guidance scale (default: the "
                                                   "backbone's).", min=0.0,
                                                   show_default=False)] = None,
    json_output: options.Json = False,
) -> None:
    """Measure the judge's accuracy on fresh renders and the model's prompt-following."""
    from rich.progress import Progress

    from conceptctl.backbones.loading import open_backbone
    from conceptctl.toy.judge import JUDGE_FILE, Judge
    from conceptctl.toy.quality import fresh_judge_accuracy, prompt_following
    from conceptctl.toy.world import all_concepts

    judge_model = Judge.load(judge_file or JUDGE_FILE)
    model = open_backbone(backbone, device="cpu")
    report = {"judge_accuracy": fresh_judge_accuracy(judge_model)}
    with Progress(console=console.err, transient=True) as progress:
        for held_out in (False, True):
            name = "held_out_templates" if held_out else "training_templates"
            task = progress.add_task(name.replace("_", " "),
                                     total=len(all_concepts()) * seeds * (steps or 20))
            report[name] = prompt_following(
                model, judge_model, held_out=held_out, seeds=seeds, steps=steps,
                guidance=guidance, on_step=lambda n, t=task: progress.advance(t, n))
    if json_output:
        console.out.print_json(data=report)
        return
    from rich.table import Table

    table = Table("measure", "object", "style", "color")
    table.add_row("judge on fresh renders",
                  *(f"{report['judge_accuracy'][a]:.1%}" for a in ("object", "style", "color")))
    for name in ("training_templates", "held_out_templates"):
        acc = report[name]["accuracy"]
        table.add_row(f"prompt-following, {name.replace('_', ' ')}",
                      *(f"{acc[a]:.1%}" for a in ("object", "style", "color")))
    console.out.print(table)
