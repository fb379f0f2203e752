"""The erased model as a complete diffusers pipeline folder, loadable without conceptctl.

``save_pretrained`` writes every part (UNet with the artifact applied, VAE, text encoder and
tokenizer, SDXL's two of each, scheduler) and ``model_index.json``; the folder then gets a model
card (``README.md``, :mod:`conceptctl.cards`), the erasure's record (``conceptctl.json``, with
the latest evaluation's summary) and the record in the header of every weights file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from conceptctl.backbones.spec import FOLDER_DEFAULTS
from conceptctl.export.metadata import export_card, stamp_safetensors
from conceptctl.fileio import make_shareable, write_json


def how_to_load(job) -> str:
    pipeline = job.backbone.pipeline
    cls = type(pipeline).__name__
    text_encoder = type(job.backbone.text_encoder).__name__
    lines = ["```python",
             f"from diffusers import {cls}",
             "",
             f'pipe = {cls}.from_pretrained("PATH/TO/THIS/FOLDER")',
             'image = pipe("a prompt").images[0]',
             "```"]
    if text_encoder != "CLIPTextModel":
        # Honest about what happens: diffusers builds each part from the class model_index.json
        # names, so a non-CLIP encoder loads, with a type warning, and works.
        lines += ["",
                  f"The text encoder is a transformers `{text_encoder}`, not CLIP: "
                  f"`{cls}.from_pretrained` builds it from the class `model_index.json` names "
                  "and logs that it expected a `CLIPTextModel` (transformers may also report "
                  "weights the pipeline never uses, such as a BERT pooler, as newly "
                  "initialised); the pipeline only uses the encoder's last hidden states, so it "
                  "works unchanged. Tools that expect an "
                  "SD 1.x / 2.x checkpoint (Automatic1111, ComfyUI) cannot load this model."]
    if job.backbone.is_sdxl:
        # diffusers stamps SDXL's pictures when invisible-watermark is installed; conceptctl
        # never does (conceptctl.backbones.loading), so its pixels need the stamp off.
        lines += ["",
                  "conceptctl draws SDXL without its invisible watermark: where the "
                  "`invisible-watermark` package is installed, pass `add_watermarker=False` to "
                  "`from_pretrained` for the same pictures."]
    spec = job.backbone.spec
    if spec.sample_steps or spec.sample_guidance is not None:
        lines += ["",
                  f"conceptctl samples this base with {spec.sample_steps} steps and guidance "
                  f"{spec.sample_guidance}: pass `num_inference_steps={spec.sample_steps}, "
                  f"guidance_scale={spec.sample_guidance}` for the same pictures."]
    return "\n".join(lines)


def export_diffusers(job, out: Path) -> dict[str, Any]:
    job.backbone.pipeline.save_pretrained(out, safe_serialization=True)
    weights = sorted(out.rglob("*.safetensors"))
    for path in weights:
        stamp_safetensors(path, job.metadata)
    (out / "README.md").write_text(export_card(
        job.info, how_to_load(job), evaluation=job.evaluation, library="diffusers",
        relation="finetune"), encoding="utf-8")
    spec = job.backbone.spec
    # A stacked artifact's chain holds paths relative to its folder: the export is flattened,
    # so it lists every concept instead (the links stay in export.chain).
    record = {k: v for k, v in job.artifact.manifest.items() if k != "chain"}
    write_json(out / "conceptctl.json", {
        **record, "concepts": job.info["concepts"], "export": job.info["export"],
        # What 'conceptctl eval' measured on the artifact (as the card shows it), if it ran.
        **({"evaluation": job.evaluation} if job.evaluation else {}),
        # What `--backbone THIS_FOLDER` should keep of the base (sampling steps and guidance,
        # presets, anchor selector, judge): conceptctl.backbones.resolve reads it back.
        "backbone_defaults": {key: getattr(spec, key) for key in FOLDER_DEFAULTS}})
    for path in out.rglob("*"):
        if path.is_file():
            make_shareable(path)
    return {"weights_files": [str(p.relative_to(out)) for p in weights],
            "text_encoder": type(job.backbone.text_encoder).__name__}
