"""What every exported file says about itself: the safetensors header and the model card.

Each exported ``.safetensors`` file carries, under the header key ``conceptctl``, one JSON object
with the concept, anchor, concept type, method, the base's identity and the hash of the base
tensors the export was computed against, and how it was exported. It is the same key and shape
as the artifact's own ``weights.safetensors`` header, so one reader serves both.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path
from typing import Any

from conceptctl.erasure.artifact import HEADER_KEY, all_concepts

# safetensors: 8-byte little-endian header length, the JSON header, then the raw tensor bytes,
# whose offsets count from the end of the header — so the header can grow without touching them.
_LENGTH = struct.Struct("<Q")
_COPY_CHUNK = 16 * 2**20


def export_info(manifest: dict, *, kind: str, base: dict, export: dict) -> dict[str, Any]:
    """The JSON object stored under :data:`HEADER_KEY`."""
    return {
        "format_version": manifest.get("format_version"),
        "kind": kind,
        "concept": manifest.get("concept"),
        "anchor": manifest.get("anchor"),
        "concept_type": manifest.get("concept_type"),
        "concepts": all_concepts(manifest),  # a stacked artifact's whole chain
        "method": manifest.get("method"),
        "base": base,
        "export": export,
    }


def header(info: dict[str, Any]) -> dict[str, str]:
    """safetensors metadata (str -> str) holding ``info``."""
    return {HEADER_KEY: json.dumps(info, sort_keys=True)}


def stamp_safetensors(path: Path, metadata: dict[str, str]) -> None:
    """Add ``metadata`` to the header of the safetensors file at ``path``, keeping its own keys.

    Libraries that write whole folders (``save_pretrained``) take no header metadata, so the
    finished files are rewritten: new header, then the tensor bytes copied unchanged. The new
    file replaces the old one by rename, so a crash leaves the previous file intact.
    """
    from conceptctl.fileio import staged_file

    path = Path(path)
    with open(path, "rb") as src, staged_file(path) as tmp:
        (length,) = _LENGTH.unpack(src.read(_LENGTH.size))
        head = json.loads(src.read(length))
        head["__metadata__"] = {**head.get("__metadata__", {}), **metadata}
        blob = json.dumps(head, separators=(",", ":")).encode()
        # The format pads the header with spaces so the tensor data stays 8-byte aligned.
        blob += b" " * (-len(blob) % 8)
        with open(tmp, "wb") as dst:
            dst.write(_LENGTH.pack(len(blob)))
            dst.write(blob)
            shutil.copyfileobj(src, dst, _COPY_CHUNK)


def export_card(info: dict[str, Any], how_to_load: str, *, evaluation: dict | None = None,
                lora: bool = False, library: str | None = None,
                relation: str | None = None) -> str:
    """The model card of an export (a folder's README.md, a file's NAME.md): what was erased,
    from what, under which license, what ``conceptctl eval`` measured, and how to load it.
    ``lora``/``library``/``relation``: the front matter's ``lora`` tag, ``library_name`` and
    ``base_model_relation`` (:func:`conceptctl.cards.front_matter`)."""
    from conceptctl.cards import model_card

    base, export = info["base"], info["export"]
    forced = ("**Forced export**: the base's tensors differed from the ones the erasure was made "
              f"from ({export.get('artifact_base', {}).get('tensors_digest')}).\n\n"
              if export.get("forced") else "")
    rows = [("base tensors digest",
             f"`{base.get('tensors_digest')}` ({len(base.get('tensors', []))} tensors)"),
            ("method", info["method"]),
            ("exported", f"conceptctl {export.get('conceptctl')}, format "
                         f"`{export.get('format')}`, {export.get('dtype')}")]
    body = (f"{forced}## Loading\n\n{how_to_load}\n\nThe `conceptctl` entry of each "
            "`.safetensors` header (and a folder's `conceptctl.json`) holds the erasure's record.")
    return model_card(info, "Made with conceptctl", rows, body, evaluation=evaluation, lora=lora,
                      library=library, relation=relation)
