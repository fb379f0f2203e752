"""Load a :class:`BackboneSpec` into a :class:`Backbone` (diffusers folder, hub id, single file)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from conceptctl.backbones.spec import BackboneSpec
from conceptctl.errors import BackboneError, UsageError
from conceptctl.runtime import DTYPE_NAMES, quiet_libraries, torch_dtype

# Stable Diffusion ships a safety checker; erasure must see (and evaluate) the raw model output,
# and the checker needs CLIP-image weights that are not always available, so it is never loaded.
NO_SAFETY_CHECKER = dict(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
# SDXL has no safety checker but stamps an invisible watermark into the pixels when the
# invisible-watermark package is installed: the raw output again, whatever is installed.
NO_WATERMARK = dict(add_watermarker=False)
# A diffusers folder or hub repo is built as the class its model_index.json names, so it gets
# both; each pipeline class ignores the other's keywords.
RAW_OUTPUT = NO_SAFETY_CHECKER | NO_WATERMARK
REQUIRED_PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


@dataclass(frozen=True)
class LoadOptions:
    """Where and how to load. ``config`` is the diffusers folder or hub id whose configuration
    files describe a single-file checkpoint (it needs no weights)."""

    device: str = "cpu"
    dtype: str = "float32"
    config: str | None = None


def _offline_hint(spec: BackboneSpec) -> str:
    name = spec.name
    return (
        f"download it where there is network (e.g. 'hf download {spec.source} --local-dir "
        f"DIR'), then pass --backbone DIR"
        + (f" or run 'conceptctl config set backbone-path.{name} DIR'" if "/" not in name else "")
    )


def single_file_is_sdxl(source: str, config: str | None) -> bool:
    """Whether a single-file checkpoint is to be built as an SDXL pipeline: as the
    ``--backbone-config`` folder's model_index.json says, else as the checkpoint's own keys
    say (an original-layout file names no pipeline class)."""
    from conceptctl.backbones.architecture import file_is_sdxl, folder_is_sdxl

    if config is not None and (Path(config) / "model_index.json").is_file():
        return folder_is_sdxl(config)
    return file_is_sdxl(source)


def _load_pipeline(spec: BackboneSpec, options: LoadOptions):
    quiet_libraries()
    from diffusers import DiffusionPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

    dtype = torch_dtype(options.dtype)
    source = spec.source
    if source is None:
        raise BackboneError(f"backbone {spec.name!r} has neither a source nor a loader")
    if spec.format == "single-file":
        xl = single_file_is_sdxl(source, options.config)
        cls = StableDiffusionXLPipeline if xl else StableDiffusionPipeline
        kwargs = dict(NO_WATERMARK if xl else NO_SAFETY_CHECKER, dtype=dtype)
        if options.config:
            kwargs["config"] = options.config
        try:
            return cls.from_single_file(source, **kwargs)
        except (OSError, ValueError) as err:
            hint = (
                "pass --backbone-config with the matching diffusers folder (configs and tokenizer "
                "are enough), e.g. the sd-1.5, sd-2.1 or sdxl-1.0 folder"
                if not options.config
                else "check that --backbone-config matches the checkpoint's architecture"
            )
            raise BackboneError(f"cannot load single-file checkpoint {source}: {err}",
                                hint=hint) from err
    is_local = Path(source).exists()
    try:
        return DiffusionPipeline.from_pretrained(source, dtype=dtype, **RAW_OUTPUT)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        # A local folder's broken or foreign configs (a '{}' model_index.json: KeyError) are the
        # folder's problem, not a bug: say which folder and what diffusers found.
        if is_local:
            raise BackboneError(
                f"cannot load the diffusers folder {source}: {type(err).__name__}: {err}",
                hint="check its model_index.json and the components' config.json files "
                "(a pipeline folder as save_pretrained writes it)") from err
        raise BackboneError(
            f"backbone {spec.name!r} ({source}) is not in the local Hugging Face cache and the "
            "hub cannot be reached",
            hint=_offline_hint(spec),
        ) from err


def load_backbone(spec: BackboneSpec, options: LoadOptions | None = None):
    """Load ``spec`` and place it on ``options.device`` in ``options.dtype``."""
    quiet_libraries()
    options = options or LoadOptions()
    if spec.loader is not None:
        return spec.loader(spec, options)
    pipeline = _load_pipeline(spec, options)
    missing = [part for part in REQUIRED_PARTS if getattr(pipeline, part, None) is None]
    if missing:
        raise BackboneError(
            f"{spec.source} is a {type(pipeline).__name__}, not a Stable-Diffusion-shaped "
            f"pipeline (missing: {', '.join(missing)})",
            hint="conceptctl supports SD 1.x / 2.x and SDXL layouts: UNet, VAE, text encoder, "
            "tokenizer",
        )
    return wrap_pipeline(spec, pipeline, options)


def wrap_pipeline(spec: BackboneSpec, pipeline, options: LoadOptions):
    """Place an already-built pipeline per ``options`` and wrap it (for plugin loaders too)."""
    import torch

    from conceptctl.backbones.backbone import Backbone

    pipeline.set_progress_bar_config(disable=True)
    dtype = torch_dtype(options.dtype)
    pipeline.to(device=options.device, dtype=dtype)
    return Backbone(spec=spec, pipeline=pipeline, device=torch.device(options.device), dtype=dtype)


def open_backbone(
    ref: str | None = None,
    *,
    device: str | None = None,
    dtype: str | None = None,
    config: str | None = None,
    allow_pickle: bool = False,
):
    """Resolve what the user typed and load it, filling gaps from the settings.

    ``ref`` and ``config`` accept everything ``--backbone`` does; ``device`` and ``dtype`` accept
    ``auto``. This is the one path every command takes to a loaded backbone.
    """
    from conceptctl.backbones.resolve import resolve_backbone
    from conceptctl.settings import load_settings, resolve_device, resolve_dtype

    settings = load_settings()
    spec = resolve_backbone(ref or settings.default_backbone, settings=settings,
                            allow_pickle=allow_pickle)
    config_source = None
    if config is not None:
        config_source = resolve_backbone(config, settings=settings).source
    resolved_device = resolve_device(device or settings.device)
    resolved_dtype = resolve_dtype(dtype or settings.dtype, resolved_device)
    if resolved_dtype not in DTYPE_NAMES:
        raise UsageError(f"unknown dtype {resolved_dtype!r}; use auto, {', '.join(DTYPE_NAMES)}")
    options = LoadOptions(device=resolved_device, dtype=resolved_dtype, config=config_source)
    return load_backbone(spec, options)
