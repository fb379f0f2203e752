"""``evaluate A B C --compare``: one table, a column per artifact (e.g. doco vs ca vs esd-x)."""

from __future__ import annotations

from pathlib import Path

from conceptctl.evaluation.metrics import format_value
from conceptctl.fileio import atomic_directory, write_json


def compare_artifacts(artifacts: list[Path], opts, out: Path, reporter=None,
                      overwrite: bool = False) -> list[dict]:
    """``conceptctl eval A B C --compare -o OUT`` as a function: every artifact evaluated with
    the same options (the original model's pictures drawn once when they share a base), each
    report in ``OUT/<name>/``, the side-by-side table in ``OUT/compare.json`` and
    ``compare.html``, all written atomically, and each artifact's summary recorded in it
    (:mod:`conceptctl.evaluation.summary`). Returns the reports (report.json's content);
    an empty list on the other processes of a data-parallel run (the main one writes)."""
    from conceptctl.erasure.distributed import is_main_launched_process
    from conceptctl.evaluation.report import write_report
    from conceptctl.evaluation.run import EvalReporter, OriginalCache, evaluate
    from conceptctl.evaluation.summary import record_evaluation

    reporter = reporter or EvalReporter()
    cache = OriginalCache()
    if not is_main_launched_process():
        for path in artifacts:  # draw its share of every artifact's pictures; write nothing
            reporter.begin(path)
            evaluate(path, opts, reporter, cache)
        return []
    results = []
    names = unique_names(artifacts)
    with atomic_directory(out, overwrite=overwrite) as staging:
        for path, name in zip(artifacts, names, strict=True):
            reporter.begin(path)
            result = write_report(staging / name, evaluate(path, opts, reporter, cache))
            results.append({**result, "report": f"{name}/report.html"})
        write_compare(staging, results, names)
    # Each artifact's cards show its own report, once the reports are in place.
    for path, name, result in zip(artifacts, names, results, strict=True):
        for note in record_evaluation(path, result, out / name / "report.html"):
            reporter.message(f"note: {note}")
    return results


def unique_names(paths: list[Path]) -> list[str]:
    """A report folder name per artifact: its folder's name, numbered when two are alike."""
    names: list[str] = []
    for path in paths:
        base = path.resolve().name or "artifact"
        name, n = base, 1
        while name in names:
            n += 1
            name = f"{base}-{n}"
        names.append(name)
    return names


def tagged_rows(result: dict) -> tuple[list[dict], list[dict]]:
    """A report's metrics and attacks, each with the group a comparison row shows: a
    several-concept report's carry their concept's name (``target [Monet]``)."""
    if "concepts" not in result:
        return ([{**m, "row": m["group"]} for m in result["metrics"]],
                [{**a, "row": "target"} for a in result["attacks"]])
    metrics, attacks = [], []
    for part in result["concepts"]:
        tag = f" [{part['concept']}]"
        metrics += [{**m, "row": m["group"] + tag} for m in part["metrics"]]
        attacks += [{**a, "row": "target" + tag} for a in part["attacks"]]
    return metrics, attacks


def compare_rows(results: list[dict], names: list[str] | None = None):
    names = names or [_column_name(r) for r in results]
    parts = [tagged_rows(r) for r in results]
    keys: list[tuple[str, str, str]] = []
    for metrics, _ in parts:
        for m in metrics:
            key = (m["metric"], m["row"], m["direction"])
            if key not in keys:
                keys.append(key)
    rows = []
    for metric, group, direction in keys:
        cells = []
        for metrics, _ in parts:
            found = [m for m in metrics if (m["metric"], m["row"]) == (metric, group)]
            cells.append(format_value(found[0]["value"], found[0].get("unit", "share"))
                         if found else "-")
        rows.append([metric, group, direction, *cells])
    attacks = list(dict.fromkeys((a["attack"], a["row"]) for _, found in parts for a in found))
    for attack, group in attacks:
        for field, label in (("success_rate", f"attack {attack}"),
                             ("no_attack_rate", f"no attack ({attack} prompts)"),
                             ("picture_rate", f"attack {attack}, per picture"),
                             ("no_attack_picture_rate", "no attack, per picture")):
            cells = []
            for _, found_attacks in parts:
                found = [a for a in found_attacks if (a["attack"], a["row"]) == (attack, group)]
                cells.append(format_value(found[0].get(field)) if found else "-")
            rows.append([label, group, "lower", *cells])
    rows.append(["verdict", "", "", *[_verdict_cell(r["verdict"]) for r in results]])
    return ["metric", "group", "better", *names], rows


def _column_name(result: dict) -> str:
    name, method = Path(result["artifact"]["path"]).name, result["artifact"]["method"]
    return name if name == method else f"{name} ({method})"


def _verdict_cell(verdict: dict) -> str:
    return verdict["status"] + (", not robust" if verdict.get("robust") is False else "")


def write_compare(folder: Path, results: list[dict], names: list[str]) -> None:
    """compare.json and compare.html (from templates/compare.html) into ``folder``."""
    from conceptctl.evaluation.pages import render_page

    header, rows = compare_rows(results, names)
    write_json(folder / "compare.json", {"artifacts": names, "header": header, "rows": rows,
                                         "reports": [f"{n}/report.json" for n in names]})
    page = render_page("compare.html", header=header[:3], names=names, rows=rows,
                       verdicts=[{"name": n, "text": r["verdict"]["text"]}
                                 for n, r in zip(names, results, strict=True)])
    (folder / "compare.html").write_text(page, encoding="utf-8")
