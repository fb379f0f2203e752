"""The evaluation report folder: ``report.json`` (every number), ``report.html`` (one
self-contained page: verdict, chart, grids) and the pictures it was computed from.

    report.json
    report.html
    images/<group>/<case>-<k>-original.png, ...-erased.png
    attacks/<attack>/<case>-<j>.png
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

from conceptctl.evaluation.cases import PASS_THRESHOLD
from conceptctl.fileio import atomic_directory, write_json

GRID_ROWS = 12  # cases shown per group in the HTML page (all are saved as files)


def image_name(case, k: int, model: str) -> str:
    return f"{case.case_number:04d}-{k}-{model}.png"


def write_report(out_dir: Path, evaluation, overwrite: bool = False) -> dict:
    """Write one :class:`~conceptctl.evaluation.run.Evaluation` as a report folder (atomically);
    returns report.json's content."""
    result, run, attempts_per_attack = (evaluation.result, evaluation.run,
                                        evaluation.attack_attempts)
    k = run.suite.images_per_prompt
    records = []
    attacks = [dict(summary, rows=[dict(row) for row in summary["rows"]])
               for summary in result["attacks"]]
    with atomic_directory(out_dir, overwrite=overwrite) as staging:
        for i, case in enumerate(run.cases_of):
            j = i % k
            folder = staging / "images" / case.group
            folder.mkdir(parents=True, exist_ok=True)
            entry = {"group": case.group, "case_number": case.case_number,
                     "prompt": case.prompt, "seed": case.seed + j, "index": j,
                     "guidance": run.draw.guidance if case.guidance is None else case.guidance,
                     "expect": case.expect}
            for model, judged in (("original", run.original), ("erased", run.erased)):
                name = image_name(case, j, model)
                Image.fromarray(judged.images[i]).save(folder / name)
                entry[model] = {"file": f"images/{case.group}/{name}",
                                "labels": None if judged.labels is None else judged.labels[i]}
            records.append(entry)
        for summary, attempts in zip(attacks, attempts_per_attack, strict=True):
            folder = staging / "attacks" / summary["attack"]
            for row, attempt in zip(summary["rows"], attempts, strict=True):
                folder.mkdir(parents=True, exist_ok=True)
                row["files"] = []
                for j, picture in enumerate(attempt.images):
                    name = f"{attempt.case.case_number:04d}-{j}.png"
                    Image.fromarray(picture).save(folder / name)
                    row["files"].append(f"attacks/{summary['attack']}/{name}")
        result = {**result, "attacks": attacks, "images": records}
        write_json(staging / "report.json", result)
        (staging / "report.html").write_text(render_html(result, run, attempts_per_attack),
                                             encoding="utf-8")
    return result


def evaluate_to(artifact: Path, opts, out_dir: Path, reporter=None, overwrite: bool = False,
                originals=None) -> dict | None:
    """``conceptctl eval ARTIFACT -o OUT`` as a function: evaluate one artifact and write its
    report folder. Returns report.json's content; None on the other processes of a
    data-parallel run (the main one writes)."""
    from conceptctl.evaluation.run import evaluate

    evaluation = evaluate(artifact, opts, reporter, originals)
    if not evaluation.run.dist.is_main:
        return None
    return write_report(out_dir, evaluation, overwrite=overwrite)


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


def _chart(metrics: list[dict]) -> str:
    """An inline SVG bar chart of the share-valued metrics (0..1)."""
    # Any metric's shares, plugins' included (a share above 1, e.g. preservation that
    # improved, is drawn capped at the full bar).
    rows = [m for m in metrics if m["value"] is not None and m.get("unit", "share") == "share"]
    if not rows:
        return "<p>No share-valued metric could be measured.</p>"
    bar_h, label_w, width = 22, 260, 360
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{label_w + width + 60}" '
             f'height="{bar_h * len(rows) + 24}" role="img" aria-label="metrics chart">']
    x90 = label_w + PASS_THRESHOLD * width
    for n, m in enumerate(rows):
        y = n * bar_h + 4
        value = max(0.0, min(1.0, m["value"]))
        ok = value >= PASS_THRESHOLD if m["direction"] == "higher" else (
            value <= 1 - PASS_THRESHOLD)
        parts.append(f'<text x="{label_w - 6}" y="{y + 15}" text-anchor="end" '
                     f'font-size="12">{html.escape(m["metric"])} · '
                     f'{html.escape(m["group"])}</text>')
        parts.append(f'<rect x="{label_w}" y="{y}" width="{value * width:.1f}" '
                     f'height="{bar_h - 6}" fill="{"#2e7d32" if ok else "#c62828"}"/>')
        parts.append(f'<text x="{label_w + value * width + 4:.1f}" y="{y + 13}" '
                     f'font-size="12">{m["value"]:.1%}</text>')
    parts.append(f'<line x1="{x90:.1f}" x2="{x90:.1f}" y1="0" y2="{bar_h * len(rows) + 4}" '
                 'stroke="#333" stroke-dasharray="4 3"/>')
    parts.append(f'<text x="{x90:.1f}" y="{bar_h * len(rows) + 18}" font-size="11" '
                 'text-anchor="middle">90 %</text></svg>')
    return "".join(parts)


def _sweep_chart(attacks: list[dict]) -> str:
    """An inline SVG of attack success rate against attack steps, one line per attack that
    recorded a budget sweep (nothing when none did)."""
    sweeps = [(a["attack"], a["sweep"], "") for a in attacks if a.get("sweep")]
    sweeps += [(f"{a['attack']} (original)", a["original_sweep"], ' stroke-dasharray="5 3"')
               for a in attacks if a.get("original_sweep")]
    if not sweeps:
        return ""
    left, top, width, height = 50, 10, 420, 160
    most = max(point["steps"] for _, sweep, _ in sweeps for point in sweep) or 1
    colours = ("#c62828", "#1565c0", "#2e7d32", "#6a1b9a")
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{left + width + 160}" '
             f'height="{top + height + 40}" role="img" aria-label="attack budget sweep">',
             f'<rect x="{left}" y="{top}" width="{width}" height="{height}" fill="none" '
             'stroke="#999"/>']
    for share in (0, 0.5, 1):
        y = top + height * (1 - share)
        parts.append(f'<text x="{left - 6}" y="{y + 4:.1f}" font-size="11" '
                     f'text-anchor="end">{share:.0%}</text>')
    parts.append(f'<text x="{left}" y="{top + height + 16}" font-size="11">0</text>'
                 f'<text x="{left + width}" y="{top + height + 16}" font-size="11" '
                 f'text-anchor="end">{most} attack steps</text>')
    for n, (name, sweep, dash) in enumerate(sweeps):
        colour = colours[[s[0] for s in sweeps].index(name.removesuffix(" (original)"))
                         % len(colours)]
        points = " ".join(f"{left + width * p['steps'] / most:.1f},"
                          f"{top + height * (1 - p['success_rate']):.1f}" for p in sweep)
        parts.append(f'<polyline points="{points}" fill="none" stroke="{colour}" '
                     f'stroke-width="2"{dash}/>')
        parts.append(f'<text x="{left + width + 8}" y="{top + 14 + 16 * n}" font-size="12" '
                     f'fill="{colour}">{html.escape(name)}: '
                     f'{sweep[-1]["success_rate"]:.0%}</text>')
    parts.append("</svg>")
    return ("<figure>" + "".join(parts) + "<figcaption>attack success rate (pre-attack "
            "successes included) against the attack steps spent; dashed: the same attack on "
            "the original model</figcaption></figure>")


def _fmt(value, unit: str = "share") -> str:
    from conceptctl.evaluation.metrics import format_value

    return format_value(value, unit, missing="–")


def _concepts_table(result: dict) -> list[str]:
    """A several-concept report: each concept's erasure, worst preservation, attacks and
    verdict (the sections below show the first concept's suite)."""
    if "concepts" not in result:
        return []
    out = ["<h2>Concepts</h2><table id='concepts'><tr><th>concept</th><th>anchor</th>"
           "<th>erasure (training / held-out templates)</th><th>lowest kept</th>"
           "<th>attacks (concept back)</th><th>verdict</th></tr>"]
    for part in result["concepts"]:
        erasure = {m["group"]: m["value"] for m in part["metrics"] if m["metric"] == "erasure"}
        kept = [m["value"] for m in part["metrics"] if m["metric"] == "preservation"
                and m["value"] is not None and ":" not in m["group"]]
        attacks = ", ".join(f"{a['attack']} {_fmt(a['success_rate'])}" for a in part["attacks"])
        out.append(f"<tr><td>{html.escape(part['concept'])}</td>"
                   f"<td>{html.escape(part['anchor'])}</td>"
                   f"<td>{_fmt(erasure.get('target'))} / {_fmt(erasure.get('target-oos'))}</td>"
                   f"<td>{_fmt(min(kept) if kept else None)}</td>"
                   f"<td>{html.escape(attacks) or '-'}</td>"
                   f"<td>{html.escape(part['verdict']['status'])}</td></tr>")
    out.append("</table><p>The sections below show the first concept's prompts; "
               "report.json holds every concept's metrics under <code>concepts</code>.</p>")
    return out


def render_html(result: dict, run, attempts_per_attack) -> str:
    art, verdict = result["artifact"], result["verdict"]
    title = f"{art['concept']} → {art['anchor']} ({art['method']}) on {result['backbone']}"
    colour = {"worked": "#2e7d32", "unknown": "#555"}.get(verdict["status"], "#c62828")
    if verdict["status"] in ("worked", "erased") and verdict.get("robust") is False:
        colour = "#b35c00"  # erased, but an attack brings it back: a warning, not a pass
    out = ["<!doctype html><html lang='en'><head><meta charset='utf-8'>",
           f"<title>conceptctl evaluation: {html.escape(title)}</title><style>",
           "body{font-family:system-ui,sans-serif;margin:2em;max-width:1100px;color:#222}",
           "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;",
           "padding:4px 8px;text-align:left}img.grid{image-rendering:pixelated;",
           "border:1px solid #ccc;max-width:100%;height:auto}.verdict{padding:1em;color:white;",
           f"background:{colour};border-radius:6px;font-size:1.1em}}",
           "figure{margin:1em 0}figcaption{font-size:.9em;color:#555}</style></head><body>",
           f"<h1>{html.escape(title)}</h1>",
           f"<p class='verdict' id='verdict'>{html.escape(verdict['text'])}</p>",
           *_concepts_table(result),
           "<h2>Metrics</h2>", _chart(result["metrics"]),
           "<table><tr><th>metric</th><th>group</th><th>value</th><th>better</th>"
           "<th>pictures</th><th>details</th></tr>"]
    for m in result["metrics"]:
        unit = m.get("unit", "share")
        details = ", ".join(f"{k} {_fmt(v, unit) if isinstance(v, float) else v}"
                            for k, v in m["details"].items()) or m["note"]  # escaped below, once
        out.append(f"<tr><td>{html.escape(m['metric'])}</td><td>{html.escape(m['group'])}</td>"
                   f"<td>{_fmt(m['value'], unit)}</td><td>{m['direction']}</td>"
                   f"<td>{m['images']}</td><td>{html.escape(details)}</td></tr>")
    out.append("</table><h2>Robustness</h2><table><tr><th>attack</th><th>target prompts</th>"
               "<th>concept back (attack)</th><th>concept shown (no attack)</th>"
               "<th>per picture: attack / no attack</th></tr>")
    for a in result["attacks"]:
        out.append(f"<tr><td>{html.escape(a['attack'])}</td><td>{a['cases']}</td>"
                   f"<td>{_fmt(a['success_rate'])}</td>"
                   f"<td>{_fmt(a['no_attack_rate'])}</td>"
                   f"<td>{_fmt(a.get('picture_rate'))} of {a.get('pictures', 0)} / "
                   f"{_fmt(a.get('no_attack_picture_rate'))}</td></tr>")
    out.append("</table>")
    out.append(_sweep_chart(result["attacks"]))
    out.append("<h2>Pictures: original (left) and erased (right), same seeds</h2>")
    for group in run.suite.groups():
        made = _group_grid(run, group)
        if made is None:
            continue
        grid, prompts = made
        shown = min(len(prompts), GRID_ROWS)
        out.append(f"<figure><h3>{html.escape(group)}</h3><img class='grid' "
                   f"alt='{html.escape(group)} grid' width='{_shown_width(grid)}' "
                   f"src='{_png_data(grid)}'><figcaption>rows: "
                   + "; ".join(html.escape(p) for p in prompts[:shown]) + "</figcaption></figure>")
    for summary, attempts in zip(result["attacks"], attempts_per_attack, strict=True):
        if not attempts:
            continue
        h, w = attempts[0].images.shape[1:3]
        cols = max(len(a.images) for a in attempts)
        rows = attempts[:GRID_ROWS]
        grid = Image.new("RGB", (cols * w, len(rows) * h), "white")
        for r, attempt in enumerate(rows):
            for c, picture in enumerate(attempt.images):
                grid.paste(Image.fromarray(np.asarray(picture)), (c * w, r * h))
        out.append(f"<figure><h3>attack: {html.escape(summary['attack'])}</h3>"
                   f"<img class='grid' alt='attack grid' width='{_shown_width(grid)}' "
                   f"src='{_png_data(grid)}'>"
                   "<figcaption>erased model under attack, one row per target prompt"
                   "</figcaption></figure>")
    out.append("<h2>Reproduce</h2><pre>" + html.escape(json.dumps(
        {k: result[k] for k in ("suite", "draw", "detector", "versions")}, indent=2))
        + "</pre></body></html>")
    return "\n".join(out)
