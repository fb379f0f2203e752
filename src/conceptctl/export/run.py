"""``export_artifact()``: one export from an artifact to a target, as a library function.

The order: resolve the format and check its options, read the artifact, check the target (all
before any model is loaded), load the base in the artifact's precision, keep the base values of
the tensors the artifact sets, apply it (hash-checked; ``force`` overrides and is recorded), then
let the exporter write into a staging path that becomes the target only when it succeeds. A
one-file format's model card (and Automatic1111's metadata for a LoRA or checkpoint) is written
beside it (:mod:`conceptctl.export.sidecars`), checked with the target before any loading.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from conceptctl.errors import UsageError
from conceptctl.registry import get_registry


@dataclass
class ExportResult:
    format: str
    out: Path
    bytes: int
    seconds: dict[str, float]
    report: dict[str, Any]
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"format": self.format, "out": str(self.out), "bytes": self.bytes,
                "seconds": self.seconds, "report": self.report, "notes": self.notes}


def default_target(artifact_path: Path, fmt: str, writes: str) -> Path:
    """``exported/<artifact name>-<format>``, plus ``.safetensors`` for single-file formats."""
    artifact_path = Path(artifact_path)
    name = artifact_path.stem if artifact_path.is_file() else artifact_path.resolve().name
    target = Path("exported") / f"{name}-{fmt}"
    return target.with_name(target.name + ".safetensors") if writes == "file" else target


def _check_target(target: Path, writes: str, fmt: str, overwrite: bool) -> None:
    from conceptctl.outputs import check_output_free

    if writes == "file" and target.suffix.lower() != ".safetensors":
        raise UsageError(f"the {fmt} format writes one .safetensors file; {target} does not end "
                         "in .safetensors", hint=f"e.g. --out {target.name}.safetensors")
    if writes == "file" and target.is_dir():
        raise UsageError(f"{target} is a folder; the {fmt} format writes one file")
    if writes == "folder" and target.is_file():
        raise UsageError(f"{target} is a file; the {fmt} format writes a folder")
    check_output_free(target, overwrite, writes)  # fail before minutes of loading, not after


def check_request(fmt: str, options: dict[str, Any]):
    """The exporter for ``fmt`` after checking ``options`` against it (no model is loaded)."""
    exporter = get_registry("exporter").get(fmt)  # unknown: lists the available formats
    foreign = [key for key in options if key not in exporter.options]
    if foreign:
        flag = "--" + foreign[0].replace("_", "-")
        readers = [e.name for e in get_registry("exporter") if foreign[0] in e.value.options]
        raise UsageError(f"{flag} does not apply to the {fmt} format",
                         hint=f"{flag} is read by: {', '.join(readers)}" if readers
                         else f"leave {flag} out")
    if exporter.check is not None:
        exporter.check(options)
    return exporter


def export_artifact(
    artifact_path: Path,
    fmt: str,
    out: Path | None = None,
    *,
    options: dict[str, Any] | None = None,
    backbone: str | None = None,
    backbone_config: str | None = None,
    allow_pickle: bool = False,
    dtype: str | None = None,
    force: bool = False,
    overwrite: bool = False,
) -> ExportResult:
    """Export the artifact (folder or delta file) at ``artifact_path`` as ``fmt`` to ``out``."""
    from conceptctl.erasure.artifact import read_artifact
    from conceptctl.export.sidecars import check_sidecars
    from conceptctl.outputs import claim_output
    from conceptctl.runtime import DTYPE_NAMES

    started = time.time()
    if dtype is not None and dtype not in DTYPE_NAMES:
        raise UsageError(f"unknown dtype {dtype!r}; use {', '.join(DTYPE_NAMES)}")
    options = {key: value for key, value in (options or {}).items() if value is not None}
    exporter = check_request(fmt, options)
    artifact = read_artifact(Path(artifact_path))
    target = Path(out) if out is not None else default_target(artifact_path, fmt,
                                                                 exporter.writes)
    _check_target(target, exporter.writes, fmt, overwrite)
    if exporter.writes == "file":  # its model card (and UI metadata) beside it
        check_sidecars(target, fmt, overwrite)

    with claim_output(target, overwrite, exporter.writes):  # one writer from load to last file
        job, notes = _prepare(artifact, fmt, options, backbone, backbone_config, allow_pickle,
                              dtype, force)
        loaded = time.time()
        report = _write(exporter, job, target, overwrite)
        finished = time.time()
    seconds = {"load": round(loaded - started, 2), "write": round(finished - loaded, 2),
               "total": round(finished - started, 2)}
    return ExportResult(fmt, target, _size(target), seconds, report, notes)


def _prepare(artifact, fmt, options, backbone, backbone_config, allow_pickle, dtype, force):
    from conceptctl import __version__
    from conceptctl.backbones.loading import open_backbone
    from conceptctl.erasure.artifact import apply_artifact, base_record, concepts_of
    from conceptctl.evaluation.summary import read_evaluation
    from conceptctl.export import ExportJob
    from conceptctl.export.metadata import export_info
    from conceptctl.runtime import torch_dtype

    # The base must be loaded in the precision the artifact was made in: its recorded hash
    # covers the tensors' dtype, and the change erased - base must not pick up rounding.
    model = open_backbone(backbone or artifact.base["name"], device="cpu",
                          dtype=artifact.base.get("dtype"), config=backbone_config,
                          allow_pickle=allow_pickle)
    params = model.named_tensors()
    # A stacked artifact exports flattened: the change of its whole chain against the base.
    changed = artifact.changed_tensors
    base = {n: params[n].detach().clone() for n in changed if n in params}
    notes = apply_artifact(model, artifact, force=force)
    erased = {n: params[n].detach().clone() for n in changed}

    out_dtype = torch_dtype(dtype) if dtype else model.dtype
    if out_dtype != model.dtype:
        model.pipeline.to(dtype=out_dtype)
        model.dtype = out_dtype
    export = {"format": fmt, "conceptctl": __version__, "dtype": str(out_dtype).removeprefix(
        "torch."), "options": options, "forced": bool(notes)}  # notes: only a forced mismatch
    if artifact.chain:  # what the flattened files were made from, link by link
        export["chain"] = [*artifact.manifest["chain"],
                           {"path": str(artifact.path), "concepts": concepts_of(
                               artifact.manifest), "method": artifact.manifest["method"]}]
    if export["forced"]:
        # The files describe the base they were computed against; the artifact's own base is
        # kept beside it so the mismatch stays visible downstream.
        base_info = {**model.describe(), **base_record(base), "tensors": sorted(base)}
        export["artifact_base"] = {"name": artifact.base.get("name"),
                                   "tensors_digest": artifact.base["tensors_digest"]}
    elif artifact.chain:  # the chain's first base, with the digest of every changed tensor
        base_info = {**artifact.original_base, **base_record(base), "tensors": sorted(base)}
    else:
        base_info = dict(artifact.base)
    info = export_info(artifact.manifest, kind=fmt, base=base_info, export=export)
    # What 'conceptctl eval' measured on this artifact goes into the cards (a delta file,
    # which eval does not take, has none; a forced export is another model).
    evaluation = None if artifact.path.is_file() or export["forced"] else read_evaluation(
        artifact.path)
    job = ExportJob(artifact=artifact, backbone=model, base=base, erased=erased,
                    dtype=out_dtype, info=info, options=options, evaluation=evaluation)
    return job, notes


def _write(exporter, job, target: Path, overwrite: bool) -> dict[str, Any]:
    import torch

    from conceptctl.export.sidecars import write_sidecars
    from conceptctl.fileio import atomic_directory, atomic_file

    staging = atomic_file if exporter.writes == "file" else atomic_directory
    with staging(target, overwrite=overwrite) as path, torch.no_grad():
        report = exporter.export(job, path) or {}
        if exporter.writes == "file":  # in place just before the file itself
            write_sidecars(exporter, job, report, target, overwrite)
        return report


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
