"""The files written beside a one-file export: its model card, and what Automatic1111 reads.

``NAME.safetensors`` gets ``NAME.md``, its Hub-style model card (:mod:`conceptctl.cards`;
upload it to a Hub repository as ``README.md``). A LoRA and a single-file checkpoint also get
``NAME.json``: the user metadata Automatic1111 reads beside every LoRA and checkpoint (its
``extra_networks.get_user_metadata``: ``os.path.splitext(file)[0] + ".json"``), shown on the
model's card in the UI and editable there: ``description``, ``notes`` and, for a LoRA,
``sd version`` and ``preferred weight``. The SD version matters: Automatic1111 calls any LoRA
whose header has metadata SD1 unless a kohya ``ss_v2`` or ``ss_base_model_version`` entry says
otherwise, and hides LoRAs of another version than the loaded checkpoint's, so without it an
SD 2.x LoRA would not be listed under an SD 2.x checkpoint (nor an SDXL one under SDXL).

Both are written with the export, staged beside it and renamed into place just before the
exported file (so an exported file always has its card). Each carries conceptctl's mark (the
card's ``conceptctl`` tag, the JSON's ``conceptctl`` key): ``--overwrite`` replaces only files
with that mark, never a card or metadata file someone else wrote.
"""

from __future__ import annotations

import json
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from conceptctl.errors import OutputExistsError
from conceptctl.outputs import MARK  # the JSON key (and card tag) that says conceptctl wrote it

CARD_SUFFIX = ".md"
UI_METADATA_SUFFIX = ".json"
# The formats Automatic1111 lists (its Lora and Checkpoints pages), and how it calls them.
A1111_KINDS = {"lora": "LoRA", "single-file": "checkpoint"}


def sidecar_paths(target: Path, fmt: str) -> dict[str, Path]:
    """What an export of ``fmt`` to the file ``target`` writes beside it, by kind."""
    target = Path(target)
    paths = {"card": target.with_suffix(CARD_SUFFIX)}
    if fmt in A1111_KINDS:
        paths["ui_metadata"] = target.with_suffix(UI_METADATA_SUFFIX)
    return paths


def check_sidecars(target: Path, fmt: str, overwrite: bool) -> None:
    """Refuse, before any model is loaded, a sidecar path that may not be written."""
    from conceptctl.outputs import check_output_free

    what = {"card": "its model card", "ui_metadata": "Automatic1111's metadata"}
    for kind, path in sidecar_paths(target, fmt).items():
        try:
            check_output_free(path, overwrite, "file")
        except OutputExistsError as err:
            raise OutputExistsError(f"{err.message} (the {fmt} export writes {what[kind]} "
                                    f"there, beside {Path(target).name})",
                                    hint=err.hint) from None


def write_sidecars(exporter, job, report: dict[str, Any], target: Path,
                   overwrite: bool) -> None:
    """Write the sidecars of ``target`` (whose file is still being staged), each atomically;
    all are in place when this returns, or none of the new ones is."""
    from conceptctl.fileio import atomic_file

    target = Path(target)
    paths = sidecar_paths(target, exporter.name)
    texts = {"card": card_text(exporter, job, report, target)}
    if "ui_metadata" in paths:
        texts["ui_metadata"] = json.dumps(
            a1111_metadata(exporter.name, job, target, paths["card"].name), indent=2,
            ensure_ascii=False) + "\n"
    with ExitStack() as stack:
        for kind, path in paths.items():
            tmp = stack.enter_context(atomic_file(path, overwrite=overwrite))
            tmp.write_text(texts[kind], encoding="utf-8")


def card_text(exporter, job, report: dict[str, Any], target: Path) -> str:
    from conceptctl.export.metadata import export_card

    if exporter.how_to_load is not None:
        loading = exporter.how_to_load(job, report, Path(target).name)
    else:
        what = exporter.description or "a plugin's format"
        loading = (f"Written by the `{exporter.name}` exporter ({what}); its plugin's "
                   "documentation says how to load it.")
    lora = exporter.name == "lora"
    relation = "adapter" if lora else "finetune" if exporter.name == "single-file" else None
    return export_card(job.info, loading, evaluation=job.evaluation, lora=lora,
                       library="diffusers" if lora else None, relation=relation)


def a1111_sd_version(job) -> str:
    """Automatic1111's name for the base's architecture (its ``SdVersion``): SD1, SD2, SDXL or
    Unknown (from the backbone's family, else from its text encoders as kohya's header entries
    decide it)."""
    from conceptctl.export.kohya import sd_version

    family = job.info["base"].get("family")
    if family in ("sd1", "sd2", "sdxl"):
        return family.upper()
    version = sd_version(job.backbone)
    if version is None:
        return "Unknown"
    if job.backbone.is_sdxl:
        return "SDXL"
    return "SD2" if version[0] else "SD1"


def a1111_metadata(fmt: str, job, target: Path, card_name: str) -> dict[str, Any]:
    """Automatic1111's user metadata for the exported LoRA or checkpoint."""
    from conceptctl.cards import identify_base
    from conceptctl.erasure.artifact import all_concepts

    info = job.info
    identity = identify_base(info["base"])
    concepts = all_concepts(info)
    base = identity.hub_id or info["base"].get("name")
    asks = "; ".join(f"prompts asking for {c['concept']} give {c['anchor']} instead"
                     for c in concepts)
    description = (f"{A1111_KINDS[fmt]}: {', '.join(c['concept'] for c in concepts)} erased "
                   f"from {base} by conceptctl ({info['method']}): {asks}. License: "
                   f"{identity.license or 'unknown (the base could not be identified)'}. "
                   f"Model card: {card_name}.")
    evaluation = job.evaluation
    notes = (f"conceptctl eval ({evaluation.get('date')}): {evaluation['verdict'].get('text')}"
             if evaluation else "Not evaluated before export (conceptctl eval ARTIFACT).")
    data: dict[str, Any] = {"description": description, "notes": notes}
    if fmt == "lora":
        # The adapter is the erased model's change at strength 1: <lora:NAME:1>.
        data |= {"sd version": a1111_sd_version(job), "preferred weight": 1.0,
                 "activation text": ""}  # the erasure needs no trigger word
    data[MARK] = {"file": Path(target).name, "card": card_name, "format": fmt}
    return data


# --- how each built-in file format is loaded (the card's "Loading" section) -----------------


def _base_ref(job) -> tuple[str, str]:
    """What to write where a snippet needs the base, and (when that is no Hub id) a sentence
    saying what to put there."""
    from conceptctl.cards import identify_base

    hub = identify_base(job.info["base"]).hub_id
    if hub:
        return hub, ""
    return "PATH/TO/BASE", (f"`PATH/TO/BASE` is a diffusers folder of the base "
                            f"({job.info['base'].get('name')}).")


def _pipeline_class(job) -> str:
    """The diffusers pipeline class the snippets load the base with (the backbone's own:
    ``StableDiffusionXLPipeline`` for SDXL)."""
    return type(job.backbone.pipeline).__name__


def lora_how_to_load(job, report: dict[str, Any], name: str) -> str:
    base, base_note = _base_ref(job)
    stem = Path(name).stem
    cls = _pipeline_class(job)
    lines = ["```python", f"from diffusers import {cls}", "",
             f'pipe = {cls}.from_pretrained("{base}")',
             f'pipe.load_lora_weights("{name}")  # needs: pip install peft',
             'image = pipe("a prompt").images[0]', "```", "",
             "At weight 1.0 the adapter is the erased model's change (`pipe.fuse_lora()` bakes "
             "it in)."]
    if base_note:
        lines += ["", base_note]
    if report.get("lora_format") == "kohya":
        lines += ["", f"Automatic1111: copy `{name}` (and `{stem}.json`, which tells it the SD "
                      f"version) to `models/Lora/` and add `<lora:{stem}:1>` to the prompt. "
                      f"ComfyUI: copy it to `models/loras/` and add a LoraLoader at strength "
                      "1.0."]
    return "\n".join(lines)


def single_file_how_to_load(job, report: dict[str, Any], name: str) -> str:
    base, base_note = _base_ref(job)
    cls = _pipeline_class(job)
    lines = ["```python", f"from diffusers import {cls}", "",
             f'pipe = {cls}.from_single_file("{name}", config="{base}")',
             'image = pipe("a prompt").images[0]', "```", "",
             "`config=` names the base's configuration (a local diffusers folder of it works "
             "offline). Automatic1111: copy the file to `models/Stable-diffusion/`; ComfyUI: to "
             "`models/checkpoints/`."]
    if base_note:
        lines += ["", base_note]
    if report.get("prediction_type") == "v_prediction":
        lines += ["", "The UNet predicts v (`v_prediction`), which the file itself does not say: "
                      "a tool that guesses the configuration from the keys may have to be told."]
    return "\n".join(lines)


def delta_how_to_load(job, report: dict[str, Any], name: str) -> str:
    return "\n".join([
        "```bash", f'conceptctl sample "a prompt" --model {name}', "```", "",
        "The file holds erased − base for the changed tensors; conceptctl adds it to the base "
        "its header names after checking that base's tensors hash as recorded (`--backbone` "
        "points at another copy). `conceptctl export "
        f"{name} --format diffusers` turns it into a pipeline folder."])
