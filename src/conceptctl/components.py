"""What plugins register for most component kinds: a name, a factory, and a line of help.

Registries hold these descriptions, never built objects, so listing them is instant; the trainer
builds each component once, at start-up, by calling ``factory``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Component:
    """A swappable part, e.g. ``Component("patchgan", PatchGAN, "the reference discriminator")``.

    ``factory`` receives the keyword arguments documented for its kind (docs/plugins.md) and
    returns the working object.
    """

    name: str
    factory: Callable[..., Any]
    description: str = ""
    # Methods only: False for a method that makes its own training latents (ESD samples them
    # from the model): the run then draws no anchor images and the method's steps get no batch.
    uses_anchor_images: bool = True
    # Methods only: the method's own recipe over DoCo's preset, as EraseConfig settings (plus
    # ``lr_per_image``, the UNet rate per image of the batch): its authors' steps, batch, rate
    # and trained tensors. Flags still override it; None: DoCo's recipe.
    recipe: dict | None = None
    # Methods only: True for a method that edits the weights in closed form (``uce``): its
    # object's ``edit(groups, retain)`` replaces the training loop (no anchor images, no steps).
    closed_form: bool = False

    def build(self, **kwargs: Any) -> Any:
        return self.factory(**kwargs)
