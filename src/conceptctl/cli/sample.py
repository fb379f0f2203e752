"""``conceptctl sample``: images from a backbone, a grid, and a JSON sidecar of every setting."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from conceptctl.cli import console, options
from conceptctl.errors import UsageError


def read_prompt_file(path: Path) -> list[str]:
    """One prompt per line; blank lines and lines starting with '#' are skipped."""
    if not path.is_file():
        raise UsageError(f"prompt file not found: {path}")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise UsageError(f"{path} is not UTF-8 text: {err}") from err
    prompts = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise UsageError(f"{path} holds no prompts (one prompt per line; '#' starts a comment)")
    return prompts


def sample(
    prompt: Annotated[
        list[str] | None,
        typer.Argument(help="Prompt(s) to draw. Quote each one.", show_default=False),
    ] = None,
    prompts_file: Annotated[
        Path | None,
        typer.Option("--prompts", help="File with one prompt per line.", show_default=False,
                     dir_okay=False),
    ] = None,
    n: Annotated[int, typer.Option("--num-images", "-n", help="Images per prompt.", min=1)] = 4,
    steps: Annotated[
        int | None,
        typer.Option("--steps", help="Denoising steps (default: the backbone's; SD: 30).", min=1,
                     show_default=False),
    ] = None,
    guidance: Annotated[
        float | None,
        typer.Option("--guidance", "-g", help="Classifier-free guidance scale (default: the "
                     "backbone's; SD: 7.5).", min=0.0, show_default=False),
    ] = None,
    negative_prompt: Annotated[
        str | None, typer.Option("--negative-prompt", help="What to steer away from.")
    ] = None,
    resolution: Annotated[
        int | None,
        typer.Option("--resolution", help="Image side in pixels (default: the backbone's).",
                     min=8, show_default=False),
    ] = None,
    batch_size: Annotated[
        int, typer.Option("--batch-size", help="Images per denoising batch.", min=1)
    ] = 8,
    seed: options.Seed = 0,
    model: Annotated[
        Path | None,
        typer.Option("--model", "-m", help="An erasure artifact folder, or a delta .safetensors "
                     "from 'conceptctl export': sample the erased model (its base is the default "
                     "--backbone).", show_default=False),
    ] = None,
    compare: Annotated[bool, typer.Option(
        "--compare", help="With --model: also draw the original; the grid shows both.")] = False,
    force: Annotated[bool, typer.Option(
        "--force", help="With --model: apply it even if the base weights differ.")] = False,
    backbone: options.Backbone = None,
    backbone_config: options.BackboneConfig = None,
    allow_pickle: options.AllowPickle = False,
    device: options.Device = None,
    dtype: options.Dtype = None,
    out: options.OutDir = None,
    overwrite: options.Overwrite = False,
    json_output: options.Json = False,
) -> None:
    """Draw images for prompts. Image k of each prompt uses seed + k, so reruns are identical."""
    from conceptctl.fileio import next_free_dir
    from conceptctl.outputs import check_output_free, claim_output
    from conceptctl.sampling import SampleSettings, slug

    prompts = list(prompt or [])
    if prompts_file is not None:
        prompts += read_prompt_file(prompts_file)
    if not prompts:
        raise UsageError("no prompt given", hint='conceptctl sample "a photo of a church"')
    settings = SampleSettings(
        prompts=tuple(prompts), images_per_prompt=n, seed=seed, steps=steps, guidance=guidance,
        negative_prompt=negative_prompt, resolution=resolution, batch_size=batch_size,
    )
    settings.check()
    target = out if out is not None else next_free_dir(Path("samples") / slug(prompts[0]))
    check_output_free(target, overwrite, "folder")  # fail before minutes of sampling

    if compare and model is None:  # before the output is claimed
        raise UsageError("--compare needs --model ARTIFACT (the erased model to compare)")
    with claim_output(target, overwrite, "folder"):  # one writer from here to the last file
        written = _run(settings, target, overwrite, backbone, backbone_config, allow_pickle,
                       device, dtype, model, compare, force)
    count = len(prompts) * n
    if json_output:
        console.out.print_json(data={"out": str(written), "images": count,
                                     "sidecar": str(written / "samples.json")})
    else:
        console.out.print(f"{count} image(s) in {written}  (grid: {written / 'grid.png'})")


def _run(settings, target, overwrite, backbone, backbone_config, allow_pickle, device, dtype,
         model_dir, compare, force):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    from conceptctl.sampling import sample_model

    columns = ("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn())
    progress = Progress(*columns, console=console.err, transient=True)
    task = None
    loading = console.err.status("loading backbone…")

    def on_step(n, total):  # the first step ends the loading spinner and starts the bar
        nonlocal task
        if task is None:
            loading.stop()
            progress.start()
            task = progress.add_task("sampling (image-steps)", total=total)
        progress.advance(task, n)

    def warn(note):
        console.err.print(f"[yellow]warning:[/] {note}", markup=True)

    loading.start()
    try:
        return sample_model(settings, target, backbone=backbone, artifact=model_dir,
                            compare=compare, force=force, backbone_config=backbone_config,
                            allow_pickle=allow_pickle, device=device, dtype=dtype,
                            overwrite=overwrite, on_step=on_step, message=warn)
    finally:
        loading.stop()
        progress.stop()
