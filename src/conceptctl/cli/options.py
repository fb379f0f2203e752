"""Options shared by several commands, defined once so their names and help never drift."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

Backbone = Annotated[
    str | None,
    typer.Option(
        "--backbone",
        "-b",
        help="Known name (see 'conceptctl backbones'), local diffusers folder, .safetensors "
        "file or hub id. Default: the 'default-backbone' setting.",
        show_default=False,
    ),
]
BackboneConfig = Annotated[
    str | None,
    typer.Option(
        "--backbone-config",
        help="For a single-file checkpoint: the diffusers folder, known name or hub id whose "
        "config and tokenizer files describe it (no weights needed).",
        show_default=False,
    ),
]
AllowPickle = Annotated[
    bool,
    typer.Option(
        "--allow-pickle",
        help="Load .ckpt/.bin/.pt checkpoints. Pickles can run code: only for files you trust.",
    ),
]
Device = Annotated[
    str | None,
    typer.Option(
        "--device",
        help="auto, cpu, cuda, cuda:N or mps. Default: the 'device' setting (auto).",
        show_default=False,
    ),
]
Dtype = Annotated[
    str | None,
    typer.Option(
        "--dtype",
        help="auto, float32, float16 or bfloat16. Default: the 'dtype' setting (auto: float16 on "
        "GPUs, float32 on the CPU).",
        show_default=False,
    ),
]
Seed = Annotated[int, typer.Option("--seed", "-s", help="Random seed.", min=0)]
Json = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON to stdout.")]
Overwrite = Annotated[
    bool, typer.Option("--overwrite", help="Replace the output if it already exists.")
]
OutDir = Annotated[
    Path | None,
    typer.Option("--output", "--out", "-o", help="Output folder.", show_default=False,
                 file_okay=False),
]
