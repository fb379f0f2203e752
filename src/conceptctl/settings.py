"""User settings and where conceptctl keeps its files.

Settings live in ``config.toml`` in the user config folder (platformdirs), caches in the user
cache folder. ``CONCEPTCTL_HOME`` moves both under one folder (``$CONCEPTCTL_HOME/config.toml``,
``$CONCEPTCTL_HOME/cache``), which is what tests and shared machines use.

The file is flat TOML plus one table mapping backbone names to local folders::

    default-backbone = "sd-1.5"
    device = "auto"
    dtype = "auto"

    [backbone-paths]
    "sd-1.5" = "/models/stable-diffusion-v1-5"
"""

from __future__ import annotations

import json
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import platformdirs

from conceptctl.errors import ConceptctlError, UsageError

ENV_HOME = "CONCEPTCTL_HOME"
APP_NAME = "conceptctl"

DTYPES = ("auto", "float32", "float16", "bfloat16")

# key -> (default, allowed values or None for free text)
SCALAR_KEYS: dict[str, tuple[str, tuple[str, ...] | None]] = {
    "default-backbone": ("toy", None),
    "device": ("auto", None),  # checked by resolve_device: auto, cpu, cuda, cuda:N, mps
    "dtype": ("auto", DTYPES),
    "cache-dir": ("", None),
}
PATHS_TABLE = "backbone-paths"


def config_dir() -> Path:
    home = os.environ.get(ENV_HOME)
    return Path(home).expanduser() if home else Path(platformdirs.user_config_dir(APP_NAME))


def config_file() -> Path:
    return config_dir() / "config.toml"


def default_cache_dir() -> Path:
    home = os.environ.get(ENV_HOME)
    if home:
        return Path(home).expanduser() / "cache"
    return Path(platformdirs.user_cache_dir(APP_NAME))


@dataclass(frozen=True)
class Settings:
    default_backbone: str = SCALAR_KEYS["default-backbone"][0]
    device: str = "auto"
    dtype: str = "auto"
    cache_dir: Path = field(default_factory=default_cache_dir)
    backbone_paths: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {
            "default-backbone": self.default_backbone,
            "device": self.device,
            "dtype": self.dtype,
            "cache-dir": str(self.cache_dir),
            PATHS_TABLE: dict(self.backbone_paths),
        }


DEVICE_RE = r"auto|cpu|mps|cuda(:\d+)?"


def _check_value(key: str, value: str, where: str) -> str:
    if key == "device" and not re.fullmatch(DEVICE_RE, value):
        raise UsageError(f"{where}: unknown device {value!r}; use auto, cpu, cuda, cuda:N or mps")
    allowed = SCALAR_KEYS[key][1]
    if allowed is not None and value not in allowed:
        raise UsageError(f"{where}: {key} must be one of {', '.join(allowed)}, not {value!r}")
    return value


def _read_raw(path: Path) -> dict:
    if not path.exists():
        return {}
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise ConceptctlError(
            f"cannot read settings file {path}: {err}",
            hint="fix the file by hand, or delete it to return to the defaults",
        ) from err


def load_settings() -> Settings:
    """Read the settings file (missing file = defaults)."""
    path = config_file()
    raw = _read_raw(path)
    values: dict[str, str] = {}
    for key, value in raw.items():
        if key == PATHS_TABLE:
            continue
        if key not in SCALAR_KEYS:
            raise ConceptctlError(
                f"{path}: unknown setting {key!r}; known: {', '.join([*SCALAR_KEYS, PATHS_TABLE])}"
            )
        values[key] = _check_value(key, str(value), str(path))
    paths = raw.get(PATHS_TABLE, {})
    if not isinstance(paths, dict):
        raise ConceptctlError(f"{path}: [{PATHS_TABLE}] must be a table of name = \"folder\"")
    cache = values.get("cache-dir") or ""
    return Settings(
        default_backbone=values.get("default-backbone", SCALAR_KEYS["default-backbone"][0]),
        device=values.get("device", "auto"),
        dtype=values.get("dtype", "auto"),
        cache_dir=Path(cache).expanduser() if cache else default_cache_dir(),
        backbone_paths={str(k): str(v) for k, v in paths.items()},
    )


def _toml_string(value: str) -> str:
    # JSON string escapes are valid TOML basic-string escapes.
    return json.dumps(value, ensure_ascii=False)


def _dump(raw: dict) -> str:
    lines = [f"{key} = {_toml_string(str(value))}"
             for key, value in raw.items() if key != PATHS_TABLE]
    paths = raw.get(PATHS_TABLE) or {}
    if paths:
        lines += ["", f"[{PATHS_TABLE}]"]
        lines += [f"{_toml_string(k)} = {_toml_string(str(v))}" for k, v in paths.items()]
    return "\n".join(lines) + "\n"


def set_setting(key: str, value: str | None) -> Path:
    """Set (or with ``value=None`` remove) one setting and write the file atomically.

    Keys are the scalar keys, or ``backbone-path.NAME`` for an entry of ``[backbone-paths]``.
    """
    path = config_file()
    raw = _read_raw(path)
    if key.startswith("backbone-path."):
        name = key.removeprefix("backbone-path.")
        paths = dict(raw.get(PATHS_TABLE) or {})
        if value is None:
            paths.pop(name, None)
        else:
            paths[name] = str(Path(value).expanduser().resolve())
        raw[PATHS_TABLE] = paths
    elif key in SCALAR_KEYS:
        if value is None:
            raw.pop(key, None)
        else:
            raw[key] = _check_value(key, value, "conceptctl config set")
    else:
        raise UsageError(
            f"unknown setting {key!r}; known: {', '.join(SCALAR_KEYS)}, backbone-path.NAME"
        )
    from conceptctl.fileio import staged_file

    with staged_file(path) as tmp:
        tmp.write_text(_dump(raw), encoding="utf-8")
    return path


def resolve_device(setting: str) -> str:
    """Turn ``auto`` into the best available device; check an explicit one exists."""
    import torch

    if setting == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    if not re.fullmatch(DEVICE_RE, setting):
        raise UsageError(f"unknown device {setting!r}; use auto, cpu, cuda, cuda:N or mps")
    if setting.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"device {setting!r} was asked for but torch sees no CUDA GPU",
                         hint="use --device cpu, or install a CUDA build of torch")
    if setting == "mps" and not torch.backends.mps.is_available():
        raise UsageError("device 'mps' was asked for but it is not available here",
                         hint="use --device cpu")
    return setting


def resolve_dtype(setting: str, device: str) -> str:
    """``auto`` is float16 on GPUs (what SD ships in) and float32 on the CPU."""
    if setting == "auto":
        return "float32" if device == "cpu" else "float16"
    return setting
