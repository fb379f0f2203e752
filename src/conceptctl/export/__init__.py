"""Export formats for erased models: what an exporter is and what it is given.

An exporter turns an erasure artifact applied to its base into files other tools load (a
diffusers folder, a LoRA, an original-layout checkpoint, a weight delta). Exporters are
registered through the ``register_exporters`` hook; :func:`conceptctl.export.run.export_artifact`
prepares an :class:`ExportJob`, hands the exporter a staging path and renames it into place only
when the exporter returns, so no exporter has to care about half-written targets.

This module stays free of torch: the CLI and the registry import it to list formats.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    import torch

    from conceptctl.backbones.backbone import Backbone
    from conceptctl.erasure.artifact import Artifact

Writes = Literal["file", "folder"]


@dataclass(frozen=True)
class Exporter:
    """One export format.

    ``export(job, out)`` writes the format to ``out`` and returns figures worth reporting (a
    JSON-serialisable dict, may be empty). ``writes`` says whether ``out`` is a file path
    (``.safetensors``) or an empty folder. ``options`` names the export options this format reads
    (``rank``, ``max_error``, ``lora_format``); the CLI refuses the others for this format, so an
    option never silently does nothing. ``check(options)``, when given, rejects bad option values
    (raise :class:`conceptctl.errors.UsageError`) before any model is loaded.

    A ``"file"`` format's file gets a model card beside it (``NAME.md`` for ``NAME.safetensors``,
    :mod:`conceptctl.export.sidecars`); ``how_to_load(job, report, file_name)``, when given,
    returns the card's Markdown on loading the file (``report``: what ``export`` returned). A
    ``"folder"`` format writes its own card (see ``export_diffusers``).
    """

    name: str
    export: Callable[[ExportJob, Path], dict[str, Any]]
    description: str = ""
    writes: Writes = "file"
    options: tuple[str, ...] = ()
    check: Callable[[dict[str, Any]], None] | None = None
    how_to_load: Callable[[ExportJob, dict[str, Any], str], str] | None = None


@dataclass
class ExportJob:
    """Everything an exporter needs, prepared once by ``export_artifact``.

    ``backbone`` is the base model with the artifact already applied (the erased model), in the
    export's ``dtype``. ``base`` and ``erased`` hold, for every tensor the artifact sets, the base
    and the erased values in the precision the artifact was made in (named as
    ``Backbone.named_tensors``: UNet parameter names, ``text_encoder.``-prefixed ones, SDXL's
    second encoder's ``text_encoder_2.``-prefixed), so
    differences are exact. ``info`` is the record every exported file carries (concept, anchor,
    method, base identity and tensor hash, how it was exported); ``metadata`` is that record as a
    safetensors header. ``evaluation`` is the summary of the latest ``conceptctl eval`` of the
    artifact (:mod:`conceptctl.evaluation.summary`), for model cards; None if there is none.
    """

    artifact: Artifact
    backbone: Backbone
    base: dict[str, torch.Tensor]
    erased: dict[str, torch.Tensor]
    dtype: torch.dtype
    info: dict[str, Any]
    options: dict[str, Any] = field(default_factory=dict)
    evaluation: dict[str, Any] | None = None

    @property
    def metadata(self) -> dict[str, str]:
        from conceptctl.export.metadata import header

        return header(self.info)

    def changed(self) -> list[str]:
        """Names of the tensors whose erased value differs from the base, in the artifact's
        order."""
        import torch

        return [name for name in self.erased
                if not torch.equal(self.erased[name], self.base[name])]


__all__ = ["ExportJob", "Exporter", "Writes"]
