"""``conceptctl erase``: make a model forget a concept (DoCo by default) and write an artifact."""

from __future__ import annotations

import os
import shlex
from pathlib import Path
from typing import Annotated

import typer

from conceptctl.cli import console, options
from conceptctl.errors import UsageError


def erase(
    concepts: Annotated[list[str] | None, typer.Argument(
        help="What to erase, e.g. 'Van Gogh' or 'church'; several (\"Van Gogh\" Monet) are "
        "erased together, in one run, each towards --anchor.", show_default=False)] = None,
    anchor: Annotated[str | None, typer.Option(
        "--anchor", "-a", help="What the concepts should become instead, e.g. 'painting' or "
        "'house'.", show_default=False)] = None,
    concepts_file: Annotated[Path | None, typer.Option(
        "--concepts", help="File of concepts to erase in the same run, one a line: concept, "
        "anchor[, type] (each its own anchor).", dir_okay=False, show_default=False)] = None,
    base: Annotated[Path | None, typer.Option(
        "--base", help="Erase on top of this earlier artifact folder (stacking; repeatable "
        "run after run): its chain is applied first and recorded in the new artifact.",
        show_default=False)] = None,
    concept_type: Annotated[
        str | None,
        typer.Option("--type", help="style, object or nudity (default: guessed from concept and "
                     "anchor).", show_default=False),
    ] = None,
    backbone: options.Backbone = None,
    method: Annotated[str, typer.Option(help="Erasure method: doco, ca, esd-x (each with its "
                                        "authors' recipe), … (see 'conceptctl plugins').")
                      ] = "doco",
    discriminator: Annotated[str, typer.Option(help="DoCo discriminator.")] = "patchgan",
    surgery: Annotated[str, typer.Option(help="Gradient surgery.")] = "doco",
    anchor_selector: Annotated[
        str | None,
        typer.Option(help="Anchor-prompt selector (default: the backbone's, else templates).",
                     show_default=False),
    ] = None,
    anchor_prompts: Annotated[
        Path | None,
        typer.Option(help="File of anchor prompts, one per line (selects 'prompt-file').",
                     dir_okay=False, show_default=False),
    ] = None,
    anchor_prompt_count: Annotated[int | None, typer.Option(
        help="Use the first N built-in template anchor prompts (all 200 by default, the "
        "reference's count; fewer is quicker).", min=1, show_default=False)] = None,
    params: Annotated[str | None, typer.Option(
        help="Trained parameters: cross-attn-kv, cross-attn, full (UNet) or text-encoder "
        "(preset: the method's).",
        show_default=False)] = None,
    steps: Annotated[int | None, typer.Option(help="Training steps (preset).", min=1,
                                              show_default=False)] = None,
    warmup: Annotated[int | None, typer.Option(help="Discriminator-only warm-up steps (preset).",
                                               min=0, show_default=False)] = None,
    batch_size: Annotated[int | None, typer.Option(help="Anchor images per step (preset).",
                                                   min=1, show_default=False)] = None,
    lr: Annotated[float | None, typer.Option(help="UNet learning rate (preset).",
                                             show_default=False)] = None,
    d_lr: Annotated[float | None, typer.Option(help="Discriminator learning rate (preset).",
                                               show_default=False)] = None,
    surgery_strength: Annotated[float | None, typer.Option(
        help="λ: share of the conflicting component removed (1).", show_default=False)] = None,
    anchor_images: Annotated[int | None, typer.Option(
        help="Anchor images per anchor prompt (preset).", min=1, show_default=False)] = None,
    adversarial: Annotated[bool, typer.Option(
        "--adversarial", help="Robust erasure: attack the target prompts during training (soft "
        "tokens, as AdvUnlearn) and erase on the attacked prompts too.")] = False,
    adversarial_steps: Annotated[int | None, typer.Option(
        help="--adversarial: attack steps per refresh (4).", min=1, show_default=False)] = None,
    adversarial_every: Annotated[int | None, typer.Option(
        help="--adversarial: refresh the attack every N generator steps (1).", min=1,
        show_default=False)] = None,
    adversarial_tokens: Annotated[int | None, typer.Option(
        help="--adversarial: soft tokens put in each target prompt (3).", min=1,
        show_default=False)] = None,
    adversarial_lr: Annotated[float | None, typer.Option(
        help="--adversarial: the attack's Adam rate (0.01).", show_default=False)] = None,
    adversarial_rows: Annotated[str | None, typer.Option(
        help="--adversarial: 'added' (the attacked prompts as extra rows next to the plain "
        "ones) or 'replaced' (in their place, as AdvUnlearn's outer loss) (added).",
        show_default=False)] = None,
    adversarial_retain: Annotated[float | None, typer.Option(
        help="--adversarial: weight of the retain loss that keeps the original's predictions "
        "for prompts without the concept (1; 0: off).", show_default=False)] = None,
    retain_prompts: Annotated[Path | None, typer.Option(
        help="--adversarial, --retain-refine, uce: file of retain prompts, one per line "
        "(default: the anchor selector's, else photos of the 80 COCO objects).", dir_okay=False,
        show_default=False)] = None,
    retain_refine: Annotated[float | None, typer.Option(
        help="After training, pull the key/value edit back on the retain prompts' token "
        "states with this weight (0: off; 0.05 stacked, 0.1 with --adversarial; docs/erase.md).",
        show_default=False)] = None,
    uce_lambda: Annotated[float | None, typer.Option(
        help="uce: λ, how strongly every projection stays as it was (0.5).",
        show_default=False)] = None,
    uce_erase_scale: Annotated[float | None, typer.Option(
        help="uce: weight of the concepts' edit (1).", show_default=False)] = None,
    uce_preserve_scale: Annotated[float | None, typer.Option(
        help="uce: weight of each retain prompt (0.1).", show_default=False)] = None,
    seed: options.Seed = 0,
    output: Annotated[Path | None, typer.Option(
        "--output", "--out", "-o", help="Artifact folder (default: erased/<concept>-<method>).",
        file_okay=False, show_default=False)] = None,
    resume: Annotated[str | None, typer.Option(help="'latest' or a checkpoint-N folder name in "
                                               "--output.", show_default=False)] = None,
    checkpointing_steps: Annotated[int | None, typer.Option(
        help="Save a checkpoint every N steps (preset).", min=1, show_default=False)] = None,
    checkpoints_total_limit: Annotated[int | None, typer.Option(
        help="Keep only the newest N checkpoints (2).", min=1, show_default=False)] = None,
    mixed_precision: Annotated[str | None, typer.Option(
        help="Autocast the UNet passes: no, fp16 (with loss scaling) or bf16; weights stay "
        "fp32. Default: accelerate's (accelerate launch --mixed_precision or its config), "
        "else no.", show_default=False)] = None,
    report_to: Annotated[str | None, typer.Option(
        help="Also write the per-step losses as TensorBoard scalars: tensorboard (needs the "
        "tensorboard package). losses.jsonl is always written.", show_default=False)] = None,
    gradient_checkpointing: Annotated[bool, typer.Option(
        "--gradient-checkpointing", help="Recompute UNet activations in the backward pass: less "
        "memory, more time; same result.")] = False,
    compile_unet: Annotated[bool, typer.Option(
        "--compile", help="torch.compile the UNets (the first steps pay the compilation).")
    ] = False,
    tf32: Annotated[bool, typer.Option(
        "--tf32/--no-tf32", help="CUDA: TF32 tensor cores for fp32 matmuls and convolutions.")
    ] = True,
    overwrite: options.Overwrite = False,
    device: options.Device = None,
    dtype: options.Dtype = None,
    json_output: options.Json = False,
) -> None:
    """Erase CONCEPTS: prompts asking for them should give ANCHOR instead; the rest keeps
    working."""
    from conceptctl.erasure.config import plan
    from conceptctl.erasure.distributed import is_main_launched_process
    from conceptctl.erasure.loss_log import check_report_to
    from conceptctl.erasure.run import check_config
    from conceptctl.fileio import next_free_dir
    from conceptctl.outputs import check_output_free
    from conceptctl.sampling import slug

    selector = anchor_selector or ("prompt-file" if anchor_prompts else None)
    erasures = _erasures(concepts or [], anchor, concept_type, concepts_file)
    cfg = plan(erasures, None, backbone, method=method,
               discriminator=discriminator, surgery=surgery, anchor_selector=selector,
               anchor_prompts=str(anchor_prompts) if anchor_prompts else None,
               anchor_prompt_count=anchor_prompt_count, params=params,
               mixed_precision=mixed_precision, gradient_checkpointing=gradient_checkpointing,
               compile=compile_unet, tf32=tf32, seed=seed,
               steps=steps, warmup=warmup, batch_size=batch_size, lr=lr, d_lr=d_lr,
               surgery_strength=surgery_strength, anchor_images_per_prompt=anchor_images,
               checkpointing_steps=checkpointing_steps,
               checkpoints_total_limit=checkpoints_total_limit, adversarial=adversarial,
               adversarial_steps=adversarial_steps, adversarial_every=adversarial_every,
               adversarial_tokens=adversarial_tokens, adversarial_lr=adversarial_lr,
               adversarial_retain=adversarial_retain, adversarial_rows=adversarial_rows,
               uce_lambda=uce_lambda,
               uce_erase_scale=uce_erase_scale, uce_preserve_scale=uce_preserve_scale,
               retain_prompts=str(retain_prompts) if retain_prompts else None,
               retain_refine=retain_refine,
               base_artifact=os.path.abspath(base) if base is not None else None)
    if resume is not None and output is None:
        raise UsageError("--resume needs --output: the folder of the run to continue")
    names = [e.concept for e in cfg.erasures()]
    out = output or next_free_dir(Path("erased") / f"{slug('-'.join(names))}-{cfg.method}")
    # Settle bad input before any progress display starts, so the error is the first line.
    check_config(cfg)
    check_report_to(report_to)
    if resume is None and is_main_launched_process():  # only the main process writes
        check_output_free(out, overwrite, "folder")
    result = _run(cfg, out, resume, overwrite, device, dtype, report_to)
    if not result.main_process:
        return  # a data-parallel run reports once, from its main process
    summary = {"output": str(result.out_dir), "steps": result.steps, "seconds": result.seconds,
               "peak_memory_mb": round(result.peak_memory_mb, 1),
               "anchors_cached": result.anchors_cached, "processes": result.processes,
               "warnings": result.warnings}
    if json_output:
        console.out.print_json(data=summary)
        return
    processes = f" on {result.processes} processes" if result.processes > 1 else ""
    what = ", ".join(f"{e.concept!r} -> {e.anchor!r}" for e in cfg.erasures())
    how = "closed form" if result.closed_form else f"{result.steps} steps"
    console.out.print(
        f"erased {what} ({cfg.method}, {how}) in "
        f"{result.seconds['total']:.0f} s{processes}, peak memory "
        f"{result.peak_memory_mb:.0f} MB\n"
        f"artifact: {result.out_dir}\n"
        f"try: conceptctl sample {shlex.quote(cfg.concept)} --model "
        f"{shlex.quote(str(result.out_dir))} --compare")


def _erasures(concepts: list[str], anchor: str | None, concept_type: str | None,
              concepts_file: Path | None):
    """The run's concepts: those named on the command line (each towards --anchor, of --type),
    then those of --concepts FILE (each with its own anchor)."""
    from conceptctl.erasure.concept_file import read_concept_file
    from conceptctl.erasure.config import Erasure

    if concepts and anchor is None:
        raise UsageError("--anchor is missing: what should the concept become instead?",
                         hint='e.g. conceptctl erase "Van Gogh" --anchor painting')
    if not concepts and concepts_file is None:
        raise UsageError("name a concept to erase, or give --concepts FILE",
                         hint='e.g. conceptctl erase "Van Gogh" --anchor painting')
    if not concepts and anchor is not None:
        raise UsageError("--anchor applies to the concepts named on the command line; "
                         "--concepts FILE gives each of its concepts its own anchor",
                         hint="leave --anchor out, or name the concepts it is for")
    listed = [Erasure(c.strip(), anchor.strip(), concept_type) for c in concepts]
    return listed + (read_concept_file(concepts_file) if concepts_file is not None else [])


def _run(cfg, out, resume, overwrite, device, dtype, report_to):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from conceptctl.erasure.run import EraseReporter
    from conceptctl.erasure.run import erase as run_erase

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TextColumn("{task.fields[info]}"))
    with Progress(*columns, console=console.err, transient=False) as progress:
        tasks: dict[str, int] = {}
        fired: list[float] = []

        def bar(name: str, total: int) -> int:
            if name not in tasks:
                tasks[name] = progress.add_task(name, total=total, info="")
            return tasks[name]

        def on_step(step: int, total: int, stats) -> None:
            info = f"D loss {stats.d_loss:.3f} acc {stats.d_accuracy:.0%}" if (
                stats.d_loss is not None) else ""
            if stats.generator_step:
                info = f"loss {stats.loss:.4f} " + info
                if stats.preserve_loss is not None:
                    info += f" prior {stats.preserve_loss:.4f}"
                if stats.surgery_fired is not None:
                    fired.append(stats.surgery_fired)
                    info += f" surgery {sum(fired) / len(fired):.0%}"
            else:
                info = "warm-up " + info
            progress.update(bar("training", total), completed=step, info=info)

        reporter = EraseReporter(
            message=lambda text: progress.console.print(text, markup=False),
            anchor_progress=lambda done, total: progress.update(
                bar("anchor images (image-steps)", total), completed=done),
            step=on_step,
        )
        return run_erase(cfg, out, resume=resume, overwrite=overwrite, device=device,
                         dtype=dtype, reporter=reporter, report_to=report_to)
