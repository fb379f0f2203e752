"""The erasure artifact: a folder that says exactly what it is.

    weights.safetensors   the trained tensors' new VALUES (not deltas), UNet parameter names;
                          the header carries the concept, anchor, method and base identity
    conceptctl.json       format version, base backbone identity and the content hash of the base
                          tensors it replaces, concept/anchor/type, component names with their
                          plugins and versions, every hyperparameter, seed, library versions,
                          timings, training summary
    README.md             a model card
    checkpoint-{step}/    resumable training state (rotated)

Applying an artifact to a base whose replaced tensors hash differently fails, naming both hashes,
unless forced: a delta applied to the wrong model must fail loudly.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from conceptctl.errors import ConceptctlError
from conceptctl.fingerprint import tensor_digest

FORMAT_VERSION = 1
WEIGHTS = "weights.safetensors"
MANIFEST = "conceptctl.json"


class BaseMismatchError(ConceptctlError):
    """The artifact was made from different base weights than the ones it is applied to."""


@dataclass(frozen=True)
class Artifact:
    path: Path
    manifest: dict
    weights: dict[str, torch.Tensor]

    @property
    def base(self) -> dict:
        return self.manifest["base"]


def _atomic_write(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def write_artifact(out_dir: Path, weights: dict[str, torch.Tensor], manifest: dict,
                   model_card: str) -> None:
    """Write the three artifact files, each atomically; the manifest last, so a folder with a
    manifest is always complete."""
    out_dir.mkdir(parents=True, exist_ok=True)
    header = {"conceptctl": json.dumps({k: manifest[k] for k in (
        "format_version", "concept", "anchor", "concept_type", "method", "base")})}
    tensors = {k: v.detach().cpu().contiguous() for k, v in weights.items()}
    _atomic_write(out_dir / WEIGHTS, lambda tmp: save_file(tensors, tmp, metadata=header))
    _atomic_write(out_dir / "README.md", lambda tmp: Path(tmp).write_text(model_card))
    _atomic_write(out_dir / MANIFEST,
                  lambda tmp: Path(tmp).write_text(json.dumps(manifest, indent=2) + "\n"))


def read_artifact(path: Path) -> Artifact:
    path = Path(path)
    manifest_file = path / MANIFEST
    if not manifest_file.is_file():
        raise ConceptctlError(f"{path} is not a conceptctl artifact (no {MANIFEST})",
                              hint="give the folder 'conceptctl erase' wrote")
    manifest = json.loads(manifest_file.read_text())
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ConceptctlError(f"{path} has artifact format {manifest.get('format_version')}; "
                              f"this conceptctl reads format {FORMAT_VERSION}")
    return Artifact(path, manifest, load_file(str(path / WEIGHTS)))


def base_digest(unet: torch.nn.Module, names) -> str:
    params = dict(unet.named_parameters())
    return tensor_digest((name, params[name]) for name in sorted(names))


def apply_artifact(backbone, artifact: Artifact, force: bool = False) -> list[str]:
    """Put the artifact's tensors into ``backbone.unet``; returns warnings (e.g. forced)."""
    params = dict(backbone.unet.named_parameters())
    missing = sorted(set(artifact.weights) - set(params))
    if missing:
        raise BaseMismatchError(
            f"the artifact changes {len(missing)} tensor(s) this backbone's UNet does not have "
            f"(first: {missing[0]}); it was made for {artifact.base.get('name')}")
    wrong_shape = [n for n, v in artifact.weights.items() if v.shape != params[n].shape]
    if wrong_shape:
        raise BaseMismatchError(
            f"the artifact's tensor {wrong_shape[0]} has shape "
            f"{tuple(artifact.weights[wrong_shape[0]].shape)}, this backbone's has "
            f"{tuple(params[wrong_shape[0]].shape)}: it was made for "
            f"{artifact.base.get('name')}, a different architecture (--force cannot help)")
    expected = artifact.base["tensors_digest"]
    actual = base_digest(backbone.unet, artifact.weights)
    notes = []
    if actual != expected:
        message = (f"the artifact was made from base {artifact.base.get('name')} ({expected}) "
                   f"but this backbone ({backbone.spec.name}) has {actual}")
        if not force:
            raise BaseMismatchError(message, hint="load the base it was made from, or pass "
                                    "--force to apply it anyway")
        notes.append(f"forced: {message}")
    with torch.no_grad():
        for name, value in artifact.weights.items():
            params[name].copy_(value.to(params[name]))
    return notes
