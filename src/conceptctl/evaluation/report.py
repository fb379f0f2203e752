"""The evaluation report folder: ``report.json`` (every number), ``report.html`` (one
self-contained page: verdict, chart, grids) and the pictures it was computed from.

    report.json
    report.html
    images/<group>/<case>-<k>-original.png, ...-erased.png
    attacks/<attack>/<case>-<j>.png

An artifact of several concepts: ``images/<n>-<concept>/<group>/…`` and
``attacks/<n>-<concept>/<attack>/…``, every concept's.
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

from conceptctl.evaluation.cases import PASS_THRESHOLD
from conceptctl.fileio import atomic_directory, write_json
from conceptctl.sampling import slug

GRID_ROWS = 12  # cases shown per group in the HTML page (all are saved as files)


def image_name(case, k: int, model: str) -> str:
    return f"{case.case_number:04d}-{k}-{model}.png"


def write_report(out_dir: Path, evaluation, overwrite: bool = False) -> dict:
    """Write one :class:`~conceptctl.evaluation.run.Evaluation` as a report folder (atomically);
    returns report.json's content. An artifact of several concepts gets every concept's pictures,
    each concept's in folders of its own (``images/<n>-<concept>/``, ``attacks/<n>-<concept>/``)
    and listed under its entry of ``concepts``; the top-level ``images`` and attack files stay
    the first concept's, as the top-level metrics are."""
    result = evaluation.result
    with atomic_directory(out_dir, overwrite=overwrite) as staging:
        if evaluation.concept_runs:
            parts = []
            for n, (part, (run, attempts)) in enumerate(
                    zip(result["concepts"], evaluation.concept_runs, strict=True), 1):
                images, attacks = _write_pictures(staging, f"{n}-{slug(part['concept'])}/", run,
                                                  part["attacks"], attempts)
                parts.append({**part, "attacks": attacks, "images": images})
            result = {**result, "concepts": parts, "attacks": parts[0]["attacks"],
                      "images": parts[0]["images"]}
        else:
            images, attacks = _write_pictures(staging, "", evaluation.run, result["attacks"],
                                              evaluation.attack_attempts)
            result = {**result, "attacks": attacks, "images": images}
        write_json(staging / "report.json", result)
        (staging / "report.html").write_text(
            render_html(result, evaluation.run, evaluation.attack_attempts,
                        evaluation.concept_runs), encoding="utf-8")
    return result


def _write_pictures(staging: Path, sub: str, run, summaries: list[dict],
                    attempts_per_attack) -> tuple[list[dict], list[dict]]:
    """Save one concept's pictures under ``images/<sub>`` and its attacks' under
    ``attacks/<sub>``; (picture records, attack summaries with each row's files)."""
    k = run.suite.images_per_prompt
    records = []
    for i, case in enumerate(run.cases_of):
        j = i % k
        where = f"images/{sub}{case.group}"
        (staging / where).mkdir(parents=True, exist_ok=True)
        entry = {"group": case.group, "case_number": case.case_number,
                 "prompt": case.prompt, "seed": case.seed + j, "index": j,
                 "guidance": run.draw.guidance if case.guidance is None else case.guidance,
                 "expect": case.expect}
        for model, judged in (("original", run.original), ("erased", run.erased)):
            name = image_name(case, j, model)
            Image.fromarray(judged.images[i]).save(staging / where / name)
            entry[model] = {"file": f"{where}/{name}",
                            "labels": None if judged.labels is None else judged.labels[i]}
        records.append(entry)
    attacks = [dict(summary, rows=[dict(row) for row in summary["rows"]])
               for summary in summaries]
    for summary, attempts in zip(attacks, attempts_per_attack, strict=True):
        where = f"attacks/{sub}{summary['attack']}"
        for row, attempt in zip(summary["rows"], attempts, strict=True):
            (staging / where).mkdir(parents=True, exist_ok=True)
            row["files"] = []
            for j, picture in enumerate(attempt.images):
                name = f"{attempt.case.case_number:04d}-{j}.png"
                Image.fromarray(picture).save(staging / where / name)
                row["files"].append(f"{where}/{name}")
    return records, attacks


def evaluate_to(artifact: Path, opts, out_dir: Path, reporter=None, overwrite: bool = False,
                originals=None) -> dict | None:
    """``conceptctl eval ARTIFACT -o OUT`` as a function: evaluate one artifact, write its
    report folder and record the summary in the artifact (its ``evaluation.json`` and
    ``README.md``). Returns report.json's content; None on the other processes of a
    data-parallel run (the main one writes)."""
    from conceptctl.evaluation.run import EvalReporter, evaluate
    from conceptctl.evaluation.summary import record_evaluation

    evaluation = evaluate(artifact, opts, reporter, originals)
    if not evaluation.run.dist.is_main:
        return None
    result = write_report(out_dir, evaluation, overwrite=overwrite)
    # The artifact's cards show what was measured (after the report is in place, which the
    # summary points to).
    for note in record_evaluation(artifact, result, out_dir / "report.html"):
        (reporter or EvalReporter()).message(f"note: {note}")
    return result


def _png_data(picture: Image.Image) -> str:
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _group_grid(run, group: str) -> tuple[Image.Image, list[str]] | None:
    """Rows: cases; columns: original pictures | gap | erased pictures."""
    k = run.suite.images_per_prompt
    idx = run.indices(group)
    if not idx:
        return None
    cases = list(dict.fromkeys(i // k for i in idx))[:GRID_ROWS]
    h, w = run.original.images.shape[1:3]
    gap = max(4, w // 8)
    grid = Image.new("RGB", (2 * k * w + gap, len(cases) * h), "white")
    prompts = []
    for r, c in enumerate(cases):
        for j in range(k):
            grid.paste(Image.fromarray(run.original.images[c * k + j]), (j * w, r * h))
            grid.paste(Image.fromarray(run.erased.images[c * k + j]),
                       (k * w + gap + j * w, r * h))
        prompts.append(run.suite.cases[c].prompt)
    return grid, prompts


def _shown_width(grid: Image.Image) -> int:
    """Pixels doubled for legibility, never wider than the page column."""
    return min(640, 2 * grid.width)


def _chart(metrics: list[dict]) -> dict | None:
    """The bar chart of the share-valued metrics (0..1), as the template draws it (inline SVG);
    None when there is none."""
    # Any metric's shares, plugins' included (a share above 1, e.g. preservation that
    # improved, is drawn capped at the full bar).
    rows = [m for m in metrics if m["value"] is not None and m.get("unit", "share") == "share"]
    if not rows:
        return None
    bar_h, label_w, width = 22, 260, 360
    bars = []
    for n, m in enumerate(rows):
        value = max(0.0, min(1.0, m["value"]))
        ok = value >= PASS_THRESHOLD if m["direction"] == "higher" else (
            value <= 1 - PASS_THRESHOLD)
        bars.append({"y": n * bar_h + 4, "label": f"{m['metric']} · {m['group']}",
                     "length": round(value * width, 1), "fill": "#2e7d32" if ok else "#c62828",
                     "text": f"{m['value']:.1%}"})
    return {"width": label_w + width + 60, "height": bar_h * len(rows) + 24,
            "label_w": label_w, "bar_h": bar_h, "bars": bars,
            "threshold_x": round(label_w + PASS_THRESHOLD * width, 1),
            "threshold": f"{PASS_THRESHOLD * 100:.0f} %"}


def _sweep_chart(attacks: list[dict]) -> dict | None:
    """The chart of attack success rate against attack steps, one line per attack that
    recorded a budget sweep (dashed: the same attack on the original); None when none did."""
    sweeps = [(a["attack"], a["sweep"], False) for a in attacks if a.get("sweep")]
    sweeps += [(f"{a['attack']} (original)", a["original_sweep"], True)
               for a in attacks if a.get("original_sweep")]
    if not sweeps:
        return None
    left, top, width, height = 50, 10, 420, 160
    most = max(point["steps"] for _, sweep, _ in sweeps for point in sweep) or 1
    colours = ("#c62828", "#1565c0", "#2e7d32", "#6a1b9a")
    attacks_drawn = [name for name, _, dashed in sweeps if not dashed]
    lines = []
    for name, sweep, dashed in sweeps:
        # An attack and its run on the original share a colour.
        own = name.removesuffix(" (original)") if dashed else name
        colour = colours[(attacks_drawn.index(own) if own in attacks_drawn
                          else len(attacks_drawn)) % len(colours)]
        points = " ".join(f"{left + width * p['steps'] / most:.1f},"
                          f"{top + height * (1 - p['success_rate']):.1f}" for p in sweep)
        lines.append({"name": name, "points": points, "colour": colour, "dashed": dashed,
                      "last": f"{sweep[-1]['success_rate']:.0%}"})
    return {"left": left, "top": top, "width": width, "height": height, "most": most,
            "ticks": [{"y": round(top + height * (1 - share), 1), "label": f"{share:.0%}"}
                      for share in (0, 0.5, 1)],
            "lines": lines}


def _fmt(value, unit: str = "share") -> str:
    from conceptctl.evaluation.metrics import format_value

    return format_value(value, unit, missing="–")


def _concept_rows(result: dict) -> list[dict]:
    """A several-concept report: each concept's erasure, worst preservation, attacks and
    verdict (the metrics below are the first concept's, the pictures every concept's); none
    for one concept."""
    rows = []
    for part in result.get("concepts", []):
        erasure = {m["group"]: m["value"] for m in part["metrics"] if m["metric"] == "erasure"}
        kept = [m["value"] for m in part["metrics"] if m["metric"] == "preservation"
                and m["value"] is not None and ":" not in m["group"]]
        attacks = ", ".join(f"{a['attack']} {_fmt(a['success_rate'])}" for a in part["attacks"])
        rows.append({"concept": part["concept"], "anchor": part["anchor"],
                     "erasure": f"{_fmt(erasure.get('target'))} / "
                                f"{_fmt(erasure.get('target-oos'))}",
                     "kept": _fmt(min(kept) if kept else None), "attacks": attacks or "-",
                     "verdict": part["verdict"]["status"]})
    return rows


def _metric_rows(metrics: list[dict]) -> list[dict]:
    rows = []
    for m in metrics:
        unit = m.get("unit", "share")
        details = ", ".join(f"{k} {_fmt(v, unit) if isinstance(v, float) else v}"
                            for k, v in m["details"].items()) or m["note"]
        rows.append({"metric": m["metric"], "group": m["group"], "value": _fmt(m["value"], unit),
                     "direction": m["direction"], "images": m["images"], "details": details})
    return rows


def _attack_rows(attacks: list[dict]) -> list[dict]:
    return [{"attack": a["attack"], "cases": a["cases"], "success": _fmt(a["success_rate"]),
             "no_attack": _fmt(a["no_attack_rate"]),
             "per_picture": f"{_fmt(a.get('picture_rate'))} of {a.get('pictures', 0)} / "
                            f"{_fmt(a.get('no_attack_picture_rate'))}"}
            for a in attacks]


def _grids(run) -> list[dict]:
    """Each prompt group's grid of original | erased pictures, with its rows' prompts."""
    grids = []
    for group in run.suite.groups():
        made = _group_grid(run, group)
        if made is None:
            continue
        grid, prompts = made
        grids.append({"group": group, "width": _shown_width(grid), "src": _png_data(grid),
                      "prompts": prompts[:GRID_ROWS]})
    return grids


def _attack_grids(attacks: list[dict], attempts_per_attack) -> list[dict]:
    """Each attack's pictures, one row per attacked target prompt."""
    grids = []
    for summary, attempts in zip(attacks, attempts_per_attack, strict=True):
        if not attempts:
            continue
        h, w = attempts[0].images.shape[1:3]
        cols = max(len(a.images) for a in attempts)
        rows = attempts[:GRID_ROWS]
        grid = Image.new("RGB", (cols * w, len(rows) * h), "white")
        for r, attempt in enumerate(rows):
            for c, picture in enumerate(attempt.images):
                grid.paste(Image.fromarray(np.asarray(picture)), (c * w, r * h))
        grids.append({"attack": summary["attack"], "width": _shown_width(grid),
                      "src": _png_data(grid)})
    return grids


def _picture_sections(result: dict, run, attempts_per_attack, concept_runs) -> list[dict]:
    """The pictures' sections: one per concept of a several-concept artifact (titled with the
    concept), else one untitled."""
    if not concept_runs:
        return [{"concept": None, "grids": _grids(run),
                 "attack_grids": _attack_grids(result["attacks"], attempts_per_attack)}]
    return [{"concept": f"{part['concept']} → {part['anchor']}", "grids": _grids(part_run),
             "attack_grids": _attack_grids(part["attacks"], attempts)}
            for part, (part_run, attempts) in zip(result["concepts"], concept_runs, strict=True)]


def render_html(result: dict, run, attempts_per_attack, concept_runs=()) -> str:
    """report.html: the page of one evaluation, from templates/report.html; ``concept_runs``:
    each concept's (run, attack attempts) of a several-concept artifact, whose pictures are
    shown concept by concept."""
    from conceptctl.evaluation.pages import render_page

    art, verdict = result["artifact"], result["verdict"]
    colour = {"worked": "#2e7d32", "unknown": "#555"}.get(verdict["status"], "#c62828")
    if verdict["status"] in ("worked", "erased") and verdict.get("robust") is False:
        colour = "#b35c00"  # erased, but an attack brings it back: a warning, not a pass
    return render_page(
        "report.html",
        title=f"{art['concept']} → {art['anchor']} ({art['method']}) on {result['backbone']}",
        colour=colour, verdict=verdict["text"], concepts=_concept_rows(result),
        chart=_chart(result["metrics"]), metrics=_metric_rows(result["metrics"]),
        attacks=_attack_rows(result["attacks"]), sweep=_sweep_chart(result["attacks"]),
        pictures=_picture_sections(result, run, attempts_per_attack, concept_runs),
        reproduce=json.dumps({k: result[k] for k in ("suite", "draw", "detector", "versions")},
                             indent=2))
