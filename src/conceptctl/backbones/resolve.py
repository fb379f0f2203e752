"""Turn what the user typed after ``--backbone`` into a :class:`BackboneSpec`, without loading.

Accepted, in this order: a registered name (``sd-1.5``), an existing local diffusers folder, an
existing single ``.safetensors`` checkpoint, or a hub id (``org/name``). Pickle checkpoints are
refused unless the caller opts in, since unpickling runs arbitrary code. A folder or checkpoint
of SDXL's architecture gets SDXL's defaults (conceptctl.backbones.architecture).
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

from conceptctl.backbones.architecture import SDXL_DEFAULTS, is_sdxl_source
from conceptctl.backbones.spec import FOLDER_DEFAULTS, BackboneSpec
from conceptctl.errors import BackboneError, UnknownComponentError, UnsafeFileError
from conceptctl.registry import get_registry
from conceptctl.settings import Settings, load_settings

PICKLE_SUFFIXES = frozenset({".ckpt", ".bin", ".pt", ".pth", ".pkl"})
HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _looks_like_path(ref: str) -> bool:
    return ref.startswith((".", "/", "~")) or "\\" in ref or Path(ref).suffix.lower() in (
        PICKLE_SUFFIXES | {".safetensors"}
    )


def _from_path(path: Path, allow_pickle: bool) -> BackboneSpec:
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise BackboneError(
                f"{path} is not a diffusers pipeline folder (it has no model_index.json)",
                hint="point --backbone at the folder that holds model_index.json, unet/, vae/ …",
            )
        return BackboneSpec(name=str(path), source=str(path),
                            **{**_architecture_defaults(path), **_exported_defaults(path)})
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return BackboneSpec(name=str(path), source=str(path), format="single-file",
                            **_architecture_defaults(path))
    if suffix in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise UnsafeFileError(
                f"refusing to load {path}: {suffix} files are pickles, which can run arbitrary "
                "code when loaded",
                hint="convert it to .safetensors, or pass --allow-pickle if you trust its source",
            )
        return BackboneSpec(name=str(path), source=str(path), format="single-file")
    raise BackboneError(
        f"{path} is neither a diffusers folder nor a .safetensors checkpoint",
        hint="give a folder with model_index.json, a .safetensors file, a hub id or a known name",
    )


def _architecture_defaults(path: Path) -> dict:
    """The defaults that suit the architecture a folder or checkpoint holds (SDXL's; none for
    SD 1.x / 2.x, whose defaults are conceptctl's own)."""
    return dict(SDXL_DEFAULTS) if is_sdxl_source(path) else {}


def _exported_defaults(folder: Path) -> dict:
    """The base's defaults a ``conceptctl export --format diffusers`` folder recorded (none for
    any other folder; an unreadable record only loses the defaults)."""
    try:
        record = json.loads((folder / "conceptctl.json").read_text(encoding="utf-8"))
        defaults = record["backbone_defaults"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    if not isinstance(defaults, dict):
        return {}
    return {key: defaults[key] for key in FOLDER_DEFAULTS if defaults.get(key) is not None}


def _with_local_copy(spec: BackboneSpec, settings: Settings) -> BackboneSpec:
    local = settings.backbone_paths.get(spec.name)
    if local is None:
        return spec
    path = Path(local).expanduser()
    if not path.exists():
        raise BackboneError(
            f"the settings say backbone {spec.name!r} is at {path}, but nothing is there",
            hint=f"fix it with 'conceptctl config set backbone-path.{spec.name} FOLDER', "
            f"or remove it with 'conceptctl config unset backbone-path.{spec.name}'",
        )
    if spec.loader is not None:  # the plugin's loader knows its own folder layout
        return dataclasses.replace(spec, source=str(path))
    return dataclasses.replace(spec, source=str(path), format=_from_path(path, False).format)


def resolve_backbone(
    ref: str, *, settings: Settings | None = None, allow_pickle: bool = False
) -> BackboneSpec:
    """Find the backbone ``ref`` names. Raises a :class:`ConceptctlError` saying how to fix it."""
    settings = settings or load_settings()
    ref = ref.strip()
    if not ref:
        raise BackboneError("the backbone name is empty", hint="run 'conceptctl backbones'")
    registry = get_registry("backbone")
    if ref in registry:
        return _with_local_copy(registry.get(ref), settings)
    path = Path(ref).expanduser()
    if path.exists():
        return _from_path(path.resolve(), allow_pickle)
    if _looks_like_path(ref):
        raise BackboneError(f"no such file or folder: {ref}",
                            hint="check the path, or give a known name (conceptctl backbones)")
    if HUB_ID_RE.match(ref):
        return BackboneSpec(name=ref, source=ref)
    err = UnknownComponentError("backbone", ref, registry.names())
    err.hint = "or give a local diffusers folder, a .safetensors file, or a hub id (org/name)"
    raise err
