"""``conceptctl evaluate`` (alias ``eval``): did the erasure work? Numbers, pictures, robustness."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Annotated

import typer

from conceptctl.cli import console, options
from conceptctl.errors import UsageError


def _names(text: str | None) -> tuple[str, ...] | None:
    if text is None:
        return None
    if text.strip().lower() == "none":
        return ()
    return tuple(n.strip() for n in text.split(",") if n.strip())


def _key_values(pairs: list[str], option: str, example: str) -> dict[str, str]:
    """``["a=1", "b=x=y"]`` -> ``{"a": "1", "b": "x=y"}``; malformed or repeated keys fail."""
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UsageError(f"{option} {pair!r} is not KEY=VALUE",
                             hint=f"e.g. {option} {example}")
        if key in out:
            raise UsageError(f"{option} {key} is given twice")
        out[key] = value.strip()
    return out


def _attack_options(pairs: list[str]) -> dict[str, dict[str, str]]:
    """``["embedding.steps=20"]`` -> ``{"embedding": {"steps": "20"}}``."""
    out: dict[str, dict[str, str]] = {}
    for key, value in _key_values(pairs, "--attack-option", "embedding.steps=20").items():
        attack, dot, name = key.partition(".")
        if not dot or not attack or not name:
            raise UsageError(f"--attack-option {key}={value} is not ATTACK.KEY=VALUE",
                             hint="e.g. --attack-option embedding.steps=20")
        out.setdefault(attack, {})[name] = value
    return out


def evaluate(
    artifacts: Annotated[list[Path], typer.Argument(
        help="Artifact folder(s) written by 'conceptctl erase'.", file_okay=False)],
    compare: Annotated[bool, typer.Option(
        "--compare", help="Several artifacts: one side-by-side table (and compare.json/html).")
    ] = False,
    prompts: Annotated[Path | None, typer.Option(
        "--prompts", help="CSV prompt file as ESD and I2P publish them: prompt, "
        "evaluation_seed or sd_seed [, case_number, evaluation_guidance or sd_guidance_scale, "
        "sd_image_width, sd_image_height, group, expect_AXIS, ...] (default: the backbone's "
        "built-in suite).", dir_okay=False, show_default=False)] = None,
    group: Annotated[str | None, typer.Option(
        "--group", help="Group of every row of a --prompts file without a group column "
        "(target, target-oos, anchor, hard-negative, general; default: target).",
        show_default=False)] = None,
    suite: Annotated[str | None, typer.Option(
        help="Built-in suite (default: the backbone's, else 'templates').",
        show_default=False)] = None,
    detector: Annotated[str | None, typer.Option(
        help="Concept detector (default: the backbone's; toy: toy-judge).",
        show_default=False)] = None,
    detector_option: Annotated[list[str] | None, typer.Option(
        "--detector-option", help="KEY=VALUE for the detector, repeatable (e.g. threshold=0.6 "
        "for nudenet).", show_default=False)] = None,
    metrics: Annotated[str | None, typer.Option(
        help="Comma-separated metric names (default: all registered).",
        show_default=False)] = None,
    attacks: Annotated[str, typer.Option(
        help="Comma-separated attacks, or 'none'.")] = "embedding,paraphrase",
    attack_cases: Annotated[int, typer.Option(
        help="Target prompts each attack works on.", min=1)] = 16,
    attack_option: Annotated[list[str] | None, typer.Option(
        "--attack-option", help="ATTACK.KEY=VALUE, repeatable (e.g. embedding.steps=20).",
        show_default=False)] = None,
    images_per_prompt: Annotated[int, typer.Option(
        "--images-per-prompt", "-n", help="Pictures per prompt and model.", min=1)] = 2,
    seed: Annotated[int, typer.Option(
        "--seed", "-s", help="Seed of built-in suites' cases (CSV rows carry their own).",
        min=0)] = 20_000,
    steps: Annotated[int | None, typer.Option(
        help="Sampling steps (backbone default).", min=1, show_default=False)] = None,
    guidance: Annotated[float | None, typer.Option(
        help="Guidance scale (backbone default); CSV rows with their own keep it.",
        show_default=False)] = None,
    batch_size: Annotated[int, typer.Option(help="Pictures per sampling batch.", min=1)] = 32,
    backbone: options.Backbone = None,
    force: Annotated[bool, typer.Option(
        "--force", help="Apply artifacts even if the base weights' hash differs.")] = False,
    output: Annotated[Path | None, typer.Option(
        "--output", "--out", "-o", help="Report folder (default: evaluations/<artifact>, or "
        "evaluations/compare).", file_okay=False, show_default=False)] = None,
    overwrite: options.Overwrite = False,
    device: options.Device = None,
    dtype: options.Dtype = None,
    json_output: options.Json = False,
) -> None:
    """Judge whether an erasure worked: numbers, pictures and robustness in one report.

    Draws fixed prompt groups (target, out-of-set target, anchor, hard negatives, general) with
    the original and the erased model from the same seeds, judges every picture, attacks the
    erased model, and writes report.json and report.html.
    """
    from conceptctl.erasure.distributed import is_main_launched_process
    from conceptctl.evaluation.run import EvalOptions, check_options
    from conceptctl.fileio import next_free_dir
    from conceptctl.outputs import check_output_free, claim_output

    if len(artifacts) > 1 and not compare:
        raise UsageError("several artifacts need --compare",
                         hint="conceptctl evaluate A B C --compare")
    opts = EvalOptions(
        prompts=prompts, group=group, suite=suite, detector=detector,
        detector_options=_key_values(detector_option or [], "--detector-option",
                                     "threshold=0.6"),
        metrics=_names(metrics),
        attacks=_names(attacks) or (), attack_cases=attack_cases,
        attack_options=_attack_options(attack_option or []),
        images_per_prompt=images_per_prompt, seed=seed, steps=steps, guidance=guidance,
        batch_size=batch_size, backbone=backbone, force=force, device=device, dtype=dtype)
    check_options(opts)
    for path in artifacts:
        if not (path / "conceptctl.json").is_file():
            raise UsageError(f"{path} is not a conceptctl artifact (no conceptctl.json)",
                             hint="give the folder 'conceptctl erase' wrote")
    if compare:
        out = output or next_free_dir(Path("evaluations") / "compare")
    else:
        out = output or next_free_dir(Path("evaluations") / artifacts[0].resolve().name)
    # One writer per report folder; in a data-parallel run only the main process writes, so only
    # it checks and holds the output (the others would find its lock).
    main = is_main_launched_process()
    if main:
        check_output_free(out, overwrite, "folder")
    with claim_output(out, overwrite, "folder") if main else nullcontext():
        results = _run(artifacts, opts, out, compare, overwrite)
    if not results:
        return  # another process of a data-parallel run: the main one reports
    if json_output:
        console.out.print_json(data=results if compare else results[0])
        return
    if compare:
        console.out.print(_compare_table(results))
        console.out.print(f"reports: {out}/compare.html, {out}/<artifact>/report.html")
    else:
        console.out.print(_table(results[0]))
        console.out.print(results[0]["verdict"]["text"])
        console.out.print(f"report: {out}/report.html")


def _run(artifacts, opts, out, compare, overwrite) -> list[dict]:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from conceptctl.evaluation.compare import compare_artifacts
    from conceptctl.evaluation.report import evaluate_to
    from conceptctl.evaluation.run import EvalReporter

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn())
    # The bar starts with the first picture, so errors found while loading (a wrong base, a bad
    # prompt file) stay the first line on stderr.
    progress: Progress | None = None
    tasks: dict[str, int] = {}

    def on_progress(stage, done, total):
        nonlocal progress
        if progress is None:
            progress = Progress(*columns, console=console.err, transient=True)
            progress.start()
        if stage not in tasks:
            tasks[stage] = progress.add_task(f"{stage} (image-steps)", total=total)
        progress.update(tasks[stage], completed=done)

    def message(text):
        (progress.console if progress else console.err).print(text, markup=False)

    reporter = EvalReporter(message=message, progress=on_progress, begin=lambda path: tasks.clear())
    try:
        if compare:
            return compare_artifacts(artifacts, opts, out, reporter, overwrite=overwrite)
        result = evaluate_to(artifacts[0], opts, out, reporter, overwrite=overwrite)
        return [] if result is None else [result]
    finally:
        if progress is not None:
            progress.stop()


def _table(result: dict):
    from rich.markup import escape
    from rich.table import Table

    from conceptctl.evaluation.compare import tagged_rows

    parts = result.get("concepts") or [result["artifact"]]
    what = ", ".join(f"{p['concept']} -> {p['anchor']}" for p in parts)
    table = Table(title=f"{what} ({result['artifact']['method']})")
    for column in ("metric", "group", "value", "better", "pictures", "note"):
        table.add_column(column)
    metrics, attacks = tagged_rows(result)  # a several-concept report: group [concept]
    for m in metrics:
        table.add_row(escape(m["metric"]), escape(m["row"]),
                      _fmt(m["value"], m.get("unit", "share")), m["direction"],
                      str(m["images"]), escape(m["note"]))
    for a in attacks:
        tag = a["row"].removeprefix("target")
        table.add_row(escape(f"attack {a['attack']}"),
                      escape(f"{a['cases']} target prompts{tag}"),
                      _fmt(a["success_rate"]), "lower", "",
                      f"no attack: {_fmt(a['no_attack_rate'])}; per picture: "
                      f"{_fmt(a.get('picture_rate'))} vs {_fmt(a.get('no_attack_picture_rate'))}")
    return table


def _compare_table(results: list[dict]):
    from rich.markup import escape
    from rich.table import Table

    from conceptctl.evaluation.compare import compare_rows

    header, rows = compare_rows(results)
    table = Table(title="comparison")
    for column in header:
        table.add_column(escape(column))
    for row in rows:  # plugin metric names and concepts are text, not rich markup
        table.add_row(*map(escape, row))
    return table


def _fmt(value, unit: str = "share") -> str:
    from conceptctl.evaluation.metrics import format_value

    return format_value(value, unit)
