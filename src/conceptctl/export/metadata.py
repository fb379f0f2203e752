"""What every exported file says about itself: the safetensors header and the model card.

Each exported ``.safetensors`` file carries, under the header key ``conceptctl``, one JSON object
with the concept, anchor, concept type, method, the base's identity and the hash of the base
tensors the export was computed against, and how it was exported. It is the same key and shape
as the artifact's own ``weights.safetensors`` header, so one reader serves both.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path
from typing import Any

from conceptctl.erasure.artifact import HEADER_KEY

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
    path = Path(path)
    tmp = path.with_name(f".{path.name}.stamp.tmp")
    try:
        with open(path, "rb") as src:
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
        os.chmod(tmp, path.stat().st_mode & 0o777)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def model_card(info: dict[str, Any], how_to_load: str) -> str:
    """A README for an exported folder: what was erased, from what, and how to load it."""
    base = info["base"]
    export = info["export"]
    source = base.get("source") or ""
    front = ["---", "library_name: diffusers", "pipeline_tag: text-to-image",
             "tags: [conceptctl, concept-erasure, stable-diffusion]"]
    if source.count("/") == 1 and not Path(source).exists():  # a hub id, not a local path
        front.append(f"base_model: {source}")
    front.append("---")
    forced = ("\n**Forced export**: the base's tensors differed from the ones the erasure was made "
              f"from ({export.get('artifact_base', {}).get('tensors_digest')}).\n"
              if export.get("forced") else "")
    return "\n".join(front) + f"""

# {info['concept']} erased from {base.get('name')} ({info['method']})

Made with conceptctl: prompts asking for **{info['concept']}** ({info['concept_type']}) should
now give **{info['anchor']}** instead.

| | |
| --- | --- |
| base model | {base.get('name')} (`{source}`) |
| base tensors digest | `{base.get('tensors_digest')}` ({len(base.get('tensors', []))} tensors) |
| method | {info['method']} |
| exported | conceptctl {export.get('conceptctl')}, format `{export.get('format')}`, \
{export.get('dtype')} |
{forced}
## Loading

{how_to_load}

`conceptctl.json` holds the erasure's full record (every setting, component and library version).
"""
