"""What a backbone is before it is loaded: a name, where its weights live, its known properties.

Specs are cheap (no torch import), so ``conceptctl backbones`` and ``conceptctl plugins`` can list
them instantly. Loading is :func:`conceptctl.backbones.loading.load_backbone`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from conceptctl.backbones.backbone import Backbone
    from conceptctl.backbones.loading import LoadOptions

# How the weights are stored: a diffusers folder or hub repo, or one original-layout file.
SourceFormat = Literal["diffusers", "single-file"]


# The spec fields an exported diffusers folder carries over from its base (its conceptctl.json
# 'backbone_defaults'), so that `--backbone FOLDER` samples, erases and judges as the base does.
FOLDER_DEFAULTS = ("family", "sample_steps", "sample_guidance", "anchor_selector", "detector",
                   "eval_suite", "erase_presets", "fixed_resolution")


@dataclass(frozen=True)
class BackboneSpec:
    """A text-to-image backbone that can be loaded by name.

    ``source`` is a hub id (``org/name``) or a local path. Known properties are informative until
    loading, when the loaded model's own configuration is authoritative. A plugin whose backbone
    is not a plain diffusers folder gives a ``loader(spec, options) -> Backbone``; it should load
    from ``spec.source`` when that is set, so that ``backbone-path.NAME`` can point it elsewhere.
    """

    name: str
    source: str | None = None
    format: SourceFormat = "diffusers"
    description: str = ""
    family: str = ""
    resolution: int | None = None
    # True: the model draws only at its native resolution (the toy world, made at 64 px), so the
    # picture sizes a prompt file asks for are not honoured; False: any multiple of 8 up to
    # sampling.MAX_RESOLUTION_SCALE times the native side.
    fixed_resolution: bool = False
    prediction_type: str | None = None
    text_width: int | None = None
    loader: Callable[[BackboneSpec, LoadOptions], Backbone] | None = None
    # Sampling defaults that suit this model (None: conceptctl's SD defaults, 30 steps, 7.5).
    sample_steps: int | None = None
    sample_guidance: float | None = None
    # The anchor-prompt selector that knows this model's vocabulary (None: "templates").
    anchor_selector: str | None = None
    # How `conceptctl evaluate` judges this model's pictures, and its default prompt suite
    # (None: no built-in detector; the suite falls back to "templates").
    detector: str | None = None
    eval_suite: str | None = None
    # This model's erase recipe over conceptctl's SD one (conceptctl.erasure.config.preset):
    # {concept type: settings, "methods": {method: settings}}, plain JSON (an exported folder
    # carries it). None: the SD recipe as it is.
    erase_presets: dict | None = None
    # The weights' license as a Hugging Face Hub license id (``creativeml-openrail-m``,
    # ``openrail++``, ``apache-2.0``): model cards of every erasure of this backbone pass it on,
    # since an erased model is a derivative of its weights. None: unknown (cards say so).
    license: str | None = None

    def properties(self) -> dict[str, Any]:
        """The spec as plain data (what ``conceptctl backbones --json`` prints)."""
        data = asdict(self)
        data["loader"] = None if self.loader is None else _qualname(self.loader)
        return data


def _qualname(fn: Callable) -> str:
    module = getattr(fn, "__module__", None) or "?"
    return f"{module}.{getattr(fn, '__qualname__', repr(fn))}"
