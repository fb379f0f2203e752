"""Backbones: what can be loaded (specs, cheap) and loaded models (heavy, imported on demand).

Import :mod:`conceptctl.backbones.loading` for ``open_backbone`` / ``load_backbone``; this package
itself stays free of torch so that listing backbones is instant.
"""

from conceptctl.backbones.spec import BackboneSpec

__all__ = ["BackboneSpec"]
