"""Hub-style model cards: the artifact's ``README.md`` and every export's card.

A card is Markdown with YAML front matter built with ``huggingface_hub.ModelCardData``:

* ``license``: the base's, passed on (an erased model is a derivative of its weights; SD 1.x's
  CreativeML Open RAIL-M and SD 2.x's Open RAIL++-M require their use restrictions to travel
  with derivatives), from the known backbone's ``BackboneSpec.license``;
* ``base_model``: the base's Hub id, also when it was loaded from a local copy of a known
  backbone (``backbone-path.NAME``) or from the Hub cache; a base conceptctl cannot identify gets
  no ``base_model`` and the card says so instead of guessing;
* ``tags``: ``conceptctl``, ``concept-erasure``, the method, ``lora`` for an adapter.

Then a title, what the model now does instead, a table, the measured evaluation summary when
``conceptctl eval`` has run on the artifact (:mod:`conceptctl.evaluation.summary`), and how to
use the files. Nothing here reaches the network: the card is built from the records alone.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

# What a license id means for whoever receives the model (shown in the card's table).
_LICENSE_NOTES = {
    "creativeml-openrail-m": "the base's CreativeML Open RAIL-M: its use-based restrictions "
                             "(Attachment A) apply to this model and to everyone you share it with",
    "openrail++": "the base's CreativeML Open RAIL++-M: its use-based restrictions (Attachment A) "
                  "apply to this model and to everyone you share it with",
}
# A folder of the Hugging Face Hub cache: .../models--ORG--NAME/snapshots/REVISION
_HUB_CACHE = re.compile(r"(?:^|[/\\])models--([^/\\]+?)--([^/\\]+)[/\\]snapshots[/\\]"
                        r"[^/\\]+[/\\]?$")


@dataclass(frozen=True)
class BaseIdentity:
    """What a card can say about the base model: its Hub id and license where known, and one
    sentence on how it was identified (or why it could not be)."""

    hub_id: str | None
    license: str | None
    family: str
    described: str


def _hub_id(text: str | None) -> str | None:
    """``text`` if it is a Hub id (``org/name``), not a local path."""
    from conceptctl.backbones.resolve import HUB_ID_RE

    if not text or not HUB_ID_RE.match(text) or Path(text).is_absolute():
        return None
    return text


def identify_base(base: dict) -> BaseIdentity:
    """Identify the base a record (``conceptctl.json``'s or an export header's ``base``) names:
    a known backbone by name (its registered Hub id and license, even when the weights came
    from a local copy), a Hub id, or a folder of the Hub cache; anything else is unknown."""
    from conceptctl.registry import get_registry

    name, source = base.get("name") or "", base.get("source") or ""
    specs = {entry.name: entry.value for entry in get_registry("backbone")}
    spec = specs.get(name)
    if spec is not None:
        hub = _hub_id(spec.source)
        where = f"; loaded from the local copy `{source}`" if source and source != spec.source \
            else ""
        if hub:
            described = f"{name}, the Hub model `{hub}`{where}"
        else:
            described = (f"{name} ({spec.description or 'a plugin backbone'}); it is not on "
                         f"the Hugging Face Hub{where}")
        return BaseIdentity(hub, spec.license, spec.family, described)
    hub, how = _hub_id(name) or _hub_id(source), ""
    if hub is None:
        cached = _HUB_CACHE.search(source)
        if cached:
            hub, how = f"{cached[1]}/{cached[2]}", f", from the local Hub cache `{source}`"
    if hub is not None:
        # A known backbone's Hub id typed as such still carries that backbone's license.
        known = next((s for s in specs.values() if s.source == hub), None)
        return BaseIdentity(hub, known.license if known else None,
                            known.family if known else base.get("family") or "",
                            f"the Hub model `{hub}`{how}")
    what = "file" if base.get("format") == "single-file" else "folder"
    return BaseIdentity(None, None, base.get("family") or "",
                        f"`{source or name}`, a local {what} conceptctl cannot identify as a "
                        "published model, so this card names no base_model (set "
                        "`backbone-path.NAME` to a known backbone's local copy and use its name "
                        "to have it named)")


def license_note(identity: BaseIdentity) -> str:
    if identity.license is None:
        return ("unknown: the base could not be identified, and this model is a derivative of "
                "it, so the base's license applies; check it before sharing this model")
    return f"{identity.license}, " + _LICENSE_NOTES.get(identity.license, "the base's license")


def front_matter(identity: BaseIdentity, method: str, *, lora: bool = False,
                 library: str | None = None, relation: str | None = None):
    """The card's ``huggingface_hub.ModelCardData``. ``relation``: ``base_model_relation``
    (``adapter`` for a LoRA, ``finetune`` for complete weights; None: left to the Hub)."""
    from huggingface_hub import ModelCardData

    tags = ["conceptctl", "concept-erasure", method]
    if lora:
        tags.append("lora")
    if identity.family in ("sd1", "sd2"):
        tags.append("stable-diffusion")
    elif identity.family == "sdxl":  # the Hub's tag for SDXL models
        tags.append("stable-diffusion-xl")
    extra = {"base_model_relation": relation} if relation and identity.hub_id else {}
    return ModelCardData(license=identity.license, base_model=identity.hub_id,
                         library_name=library, pipeline_tag="text-to-image",
                         tags=[*tags, "text-to-image"], **extra)


def evaluation_section(summary: dict | None) -> str:
    """The measured figures of the latest ``conceptctl eval`` on the artifact, as Markdown
    (empty without one)."""
    if not summary:
        return ""
    from conceptctl.evaluation.metrics import format_value

    suite, verdict = summary.get("suite") or {}, summary.get("verdict") or {}
    judged = f"judged by {summary['detector']}" if summary.get("detector") else "no detector"
    lines = ["## Evaluation", "",
             f"Measured with `conceptctl eval` on {summary.get('date', '?')}: the "
             f"{suite.get('name', '?')} prompt suite ({suite.get('cases', '?')} prompts; per "
             f"prompt {suite.get('images_per_prompt', '?')} from the original and as many from "
             f"the erased model, same seeds), {judged}.", "",
             f"**Verdict: {verdict.get('status', '?')}.** {verdict.get('text', '')}", ""]
    rows = [(m["metric"], m["row"], format_value(m["value"], m.get("unit", "share")),
             m.get("direction", "")) for m in summary.get("metrics", ())
            if m.get("value") is not None]
    rows += [(f"attack {a['attack']}", f"{a['row']}: concept back", format_value(
        a["success_rate"]), "lower") for a in summary.get("attacks", ())
        if a.get("success_rate") is not None]
    if rows:
        lines += ["| metric | group | value | better |", "| --- | --- | --- | --- |",
                  *(f"| {m} | {g} | {v} | {d} |" for m, g, v, d in rows), ""]
    lines += [f"Full report: `{summary.get('report', '?')}` (on the machine that ran it).", ""]
    return "\n".join(lines) + "\n"


def model_card(record: dict, intro: str, rows: list[tuple[str, object]], body: str, *,
               evaluation: dict | None = None, lora: bool = False, library: str | None = None,
               relation: str | None = None) -> str:
    """The one model-card layout (the artifact's README, every export's card): front matter,
    a title, what the model now does instead (every concept), a table (the base and license
    first), the evaluation summary, then ``body``."""
    from huggingface_hub import ModelCard

    from conceptctl.erasure.artifact import all_concepts

    identity = identify_base(record["base"])
    data = front_matter(identity, record["method"], lora=lora, library=library,
                        relation=relation)
    rows = [("base model", identity.described), ("license", license_note(identity)), *rows]
    table = "\n".join(["| | |", "| --- | --- |", *(f"| {k} | {v} |" for k, v in rows)])
    concepts = all_concepts(record)
    names = ", ".join(c["concept"] for c in concepts)
    asks = "; ".join(f"prompts asking for **{c['concept']}** ({c['concept_type']}) should now "
                     f"give **{c['anchor']}** instead" for c in concepts)
    text = (f"---\n{data.to_yaml()}\n---\n\n# {names} erased from {record['base'].get('name')} "
            f"({record['method']})\n\n{intro}: {asks}.\n\n{table}\n\n"
            f"{evaluation_section(evaluation)}{body}\n")
    return str(ModelCard(text))  # parsed back: the front matter is valid card metadata


def _anchor_line(m: dict) -> str:
    if "edit" in m:
        return "none (closed-form edit)"
    if m["anchors"]["cache_file"] is None:
        return "none (the method samples its own training latents)"
    per_prompt = m["anchors"]["sampler"]["images_per_prompt"]  # shared by several concepts
    return f"{len(m['anchors']['prompts'])} prompts x {per_prompt}"


def _edit_rows(m: dict) -> list[tuple[str, object]]:
    """A closed-form method's rows (no steps or rates): what it edited, with its scales."""
    h, edit = m["hyperparameters"], m["edit"]
    pairs = ", ".join(f"{old} → {new}" for old, new in edit.get("edited_prompts", []))
    rows: list[tuple[str, object]] = [
        ("edit", f"closed form: {pairs or 'see conceptctl.json'}; "
                 f"{edit.get('retain_prompts', '?')} retain prompts"
                 + (f"; aligned from the {edit['aligned_from']}" if "aligned_from" in edit
                    else ""))]
    if m["method"] == "uce":
        rows.append(("scales", f"λ {h['uce_lambda']}, erase {h['uce_erase_scale']}, "
                               f"preserve {h['uce_preserve_scale']}"))
    return rows


def artifact_card(m: dict, evaluation: dict | None = None) -> str:
    """The artifact's README.md (:func:`model_card` with the training settings), with the
    latest evaluation's summary when there is one."""
    h = m["hyperparameters"]
    rows = [
        ("base tensors replaced",
         f"{len(m['base']['tensors'])}, digest `{m['base']['tensors_digest']}`"),
        ("method", m["method"] if m["method"] != "doco" else
         f"doco (discriminator {h['discriminator']}, surgery {h['surgery']})"),
        ("trained parameters", h["params"]),
        *(_edit_rows(m) if "edit" in m else [
            ("steps / warm-up / batch", f"{h['steps']} / {h['warmup']} / {h['batch_size']}"),
            ("learning rates", f"generator {h['lr']}, discriminator {h['d_lr']}")]),
        *([("retain refinement", f"S {m['refine']['scale']}, "
                                 f"{m['refine']['retain_prompts']} retain prompts")]
          if "refine" in m else []),
        ("seed", h["seed"]),
        ("anchor images", _anchor_line(m)),
        ("time", f"{m['seconds']['total']} s ({m['machine']['device']})"),
        *([("stacked on", "; ".join(
            f"`{link['path']}` ({', '.join(c['concept'] for c in link['concepts'])}, "
            f"{link['method']})" for link in m["chain"]))] if m.get("chain") else []),
    ]
    return model_card(m, "This folder is a conceptctl erasure artifact", rows, (
        "`weights.safetensors` holds the new values of the replaced tensors (UNet, and text "
        "encoder under `text_encoder.`); "
        "`conceptctl.json` holds every setting, component version and library version. Use it "
        'with `conceptctl sample "PROMPT" --model THIS_FOLDER` (add `--compare` to see the '
        "original beside it). `conceptctl export THIS_FOLDER --format FORMAT` ships it as a "
        "diffusers folder, a LoRA or one checkpoint file, each with this card's metadata."),
        evaluation=evaluation)
