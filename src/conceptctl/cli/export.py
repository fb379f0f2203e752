"""``conceptctl export``: an erased model in the formats other tools load."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from conceptctl.cli import console, options
from conceptctl.errors import UsageError


def export(
    artifact: Annotated[Path, typer.Argument(
        help="An erasure artifact folder (from 'conceptctl erase') or a delta .safetensors.",
        show_default=False)],
    fmt: Annotated[str | None, typer.Option(
        "--format", "-f", help="diffusers, lora, single-file, delta, diff, or a plugin's (see "
        "'conceptctl plugins').", show_default=False)] = None,
    out: Annotated[Path | None, typer.Option(
        "--output", "--out", "-o", help="Target folder (diffusers) or .safetensors file (default: "
        "exported/<artifact>-<format>).", show_default=False)] = None,
    rank: Annotated[str | None, typer.Option(
        "--rank", help="lora: adapter rank, or 'auto' (default): per layer the smallest rank "
        "within --max-error.", show_default=False)] = None,
    max_error: Annotated[float | None, typer.Option(
        "--max-error", help="lora with --rank auto: largest relative error of each layer's "
        "change (default 0.01).", show_default=False)] = None,
    lora_format: Annotated[str | None, typer.Option(
        "--lora-format", help="lora: 'kohya' (default; loads in Automatic1111, ComfyUI, kohya's "
        "scripts and diffusers) or 'diffusers' (peft names: diffusers' load_lora_weights only; "
        "Automatic1111 and ComfyUI skip its UNet layers).", show_default=False)] = None,
    backbone: Annotated[str | None, typer.Option(
        "--backbone", "-b", help="The base to apply the artifact to (default: the artifact's "
        "own base; its tensors must hash as recorded).", show_default=False)] = None,
    backbone_config: options.BackboneConfig = None,
    allow_pickle: options.AllowPickle = False,
    dtype: Annotated[str | None, typer.Option(
        "--dtype", help="float32, float16 or bfloat16: precision of the exported weights "
        "(default: the artifact's).", show_default=False)] = None,
    force: Annotated[bool, typer.Option(
        "--force", help="Export even if the base's tensors differ from the artifact's record "
        "(said in the output and recorded in the files).")] = False,
    overwrite: options.Overwrite = False,
    json_output: options.Json = False,
) -> None:
    """Export an erased model: a diffusers folder, a LoRA, one original-layout file, a delta or
    a UI diff."""
    from conceptctl.export.run import export_artifact
    from conceptctl.registry import get_registry

    if fmt is None:
        raise UsageError("choose a format with --format: " + ", ".join(
            get_registry("exporter").names()), hint="see docs/export.md for what each one is")

    lora_options = {"rank": rank, "max_error": max_error, "lora_format": lora_format}
    with console.err.status("loading the base and applying the artifact…"):
        result = export_artifact(artifact, fmt, out, options=lora_options, backbone=backbone,
                                 backbone_config=backbone_config, allow_pickle=allow_pickle,
                                 dtype=dtype, force=force, overwrite=overwrite)
    for note in result.notes:
        console.err.print(f"[yellow]warning:[/] {escape(note)}")
    if json_output:
        console.out.print_json(data=result.as_dict())
        return
    _print_report(result)


def _print_report(result) -> None:
    from rich.table import Table

    report = result.report
    if "layers" in report:  # a LoRA: how well each layer's change is approximated
        table = Table(title=f"LoRA ({report['lora_format']} naming), rank {report['rank']}"
                      + (f", max error {report['max_error']}" if report["max_error"] is not None
                         else ""), title_justify="left")
        for column in ("layer", "rank", "of", "relative error"):
            table.add_column(column, justify="left" if column == "layer" else "right")
        for layer in report["layers"]:
            table.add_row(escape(layer["module"]), str(layer["rank"]), str(layer["full_rank"]),
                          f"{layer['error']:.2e}")
        console.out.print(table)
        console.out.print(f"overall relative error {report['overall_error']:.2e} "
                          f"({report['parameters']:,} adapter parameters)")
    if "max_reapply_error" in report:
        console.out.print(f"{report['tensors']} changed tensor(s), {report['parameters']:,} "
                          f"values; re-applied to the base, largest deviation from the erased "
                          f"values {report['max_reapply_error']:.1e}")
    size = result.bytes / 2**20
    console.out.print(f"{result.format} export in {result.out} ({size:.1f} MiB) in "
                      f"{result.seconds['total']:.1f} s (loading {result.seconds['load']:.1f} s)")
