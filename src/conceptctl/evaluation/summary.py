"""What an artifact remembers of its latest evaluation, so that its cards can show it.

``conceptctl eval ARTIFACT`` (:func:`record_evaluation`, after the report is in place) writes
``evaluation.json`` into the artifact folder, a folder conceptctl wrote: the verdict, every
measured figure (metric, group, value; each attack's success rate), the prompt suite and
detector, the date and where the full report is, and the sha256 of the ``weights.safetensors``
it measured. It then renders the artifact's ``README.md`` again with the summary, and every
later ``conceptctl export`` puts it in the exported model's card.

The weights are never touched (a stacked artifact's chain records its links' digests, and they
stay valid). A summary whose weights hash is not the current file's (the folder was erased
again in place) is ignored. An evaluation of a forced artifact (applied to a base whose tensors
differ from its record) measured another model: it is not recorded.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

EVALUATION = "evaluation.json"
FORMAT_VERSION = 1


def summarize(result: dict, report: Path) -> dict:
    """The summary of one report (``report.json``'s content, its ``report.html`` at
    ``report``): small enough for a card, with every measured value."""
    from conceptctl.evaluation.compare import tagged_rows

    metrics, attacks = tagged_rows(result)  # several concepts: groups tagged with the concept
    suite = result.get("suite") or {}
    return {
        "format_version": FORMAT_VERSION,
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "report": str(Path(report).resolve()),
        "weights_sha256": result["artifact"]["weights_sha256"],
        "backbone": result.get("backbone"),
        "suite": {"name": suite.get("name"), "cases": suite.get("cases"),
                  "images_per_prompt": suite.get("images_per_prompt")},
        "detector": (result.get("detector") or {}).get("name"),
        "verdict": {k: result["verdict"].get(k) for k in ("status", "text", "robust")},
        "metrics": [{"metric": m["metric"], "row": m["row"], "value": m["value"],
                     "unit": m.get("unit", "share"), "direction": m["direction"]}
                    for m in metrics],
        "attacks": [{"attack": a["attack"], "row": a["row"], "cases": a.get("cases"),
                     "success_rate": a["success_rate"],
                     "no_attack_rate": a.get("no_attack_rate")} for a in attacks],
    }


def read_evaluation(artifact_dir: Path, weights_sha256: str | None = None) -> dict | None:
    """The artifact's latest evaluation summary, if it has one that measured its current
    weights (anything else, an unreadable file included, is no summary). ``weights_sha256``:
    the weights file's hash when the caller has it (an evaluation just computed it: a full
    UNet's file is gigabytes to read again)."""
    from conceptctl.erasure.artifact import WEIGHTS
    from conceptctl.fingerprint import file_sha256

    artifact_dir = Path(artifact_dir)
    try:
        summary = json.loads((artifact_dir / EVALUATION).read_text(encoding="utf-8"))
        current = weights_sha256 or file_sha256(artifact_dir / WEIGHTS)
    except (OSError, ValueError):
        return None
    if not isinstance(summary, dict) or summary.get("format_version") != FORMAT_VERSION:
        return None
    return summary if summary.get("weights_sha256") == current else None


def record_evaluation(artifact_dir: Path, result: dict, report: Path) -> list[str]:
    """Keep the summary of ``result`` in the artifact folder and render its README.md again;
    returns notes for the user (what was not done, and why). The README is rewritten only if
    it is the card conceptctl wrote last (or missing): a card someone edited is left alone."""
    from conceptctl.cards import artifact_card
    from conceptctl.erasure.artifact import MANIFEST
    from conceptctl.fileio import staged_file, write_json

    artifact_dir = Path(artifact_dir)
    if result["artifact"].get("forced"):
        return [f"not recorded in {artifact_dir}: the evaluation was forced onto a base the "
                "artifact was not made from, so it measured another model"]
    summary = summarize(result, report)
    readme = artifact_dir / "README.md"
    try:
        manifest = json.loads((artifact_dir / MANIFEST).read_text(encoding="utf-8"))
        try:  # the card as conceptctl last wrote it, and as it is now
            written = artifact_card(manifest, read_evaluation(
                artifact_dir, result["artifact"]["weights_sha256"]))
            card = artifact_card(manifest, summary)
        except (KeyError, TypeError, ValueError):  # a record without what the card shows
            written = card = None
        with staged_file(artifact_dir / EVALUATION) as tmp:
            write_json(tmp, summary)
        if card is not None and (not readme.exists()
                                 or readme.read_text(encoding="utf-8") == written):
            with staged_file(readme) as tmp:
                tmp.write_text(card, encoding="utf-8")
            return []
    except (OSError, ValueError) as err:  # e.g. a read-only folder: the report is complete
        return [f"could not record the evaluation in {artifact_dir}: "
                f"{getattr(err, 'strerror', None) or err}"]
    if card is None:
        return [f"{artifact_dir / MANIFEST} lacks what the card shows, so {readme} was left "
                f"as it is; the summary is in {artifact_dir / EVALUATION}"]
    return [f"{readme} is not the card conceptctl wrote (edited, or from an older "
            f"conceptctl), so it was left as it is; the summary is in "
            f"{artifact_dir / EVALUATION} and in the card of every export (delete the "
            "README and evaluate again to have it rewritten)"]
