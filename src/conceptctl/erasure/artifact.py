"""The erasure artifact: a folder that says exactly what it is.

    weights.safetensors   the trained tensors' new VALUES (not deltas), UNet parameter names
                          (the text encoder's under ``text_encoder.``, --params text-encoder);
                          the header carries the concept, anchor, method and base identity
    conceptctl.json       format version, base backbone identity and the content hash of the base
                          tensors it replaces, concept/anchor/type, component names with their
                          plugins and versions, every hyperparameter, seed, library versions,
                          timings, training summary
    README.md             a Hub-style model card (conceptctl.cards), with the latest
                          evaluation's summary once ``conceptctl eval`` has run
    losses.jsonl          every training step, written as the run goes (conceptctl.erasure.loss_log)
    evaluation.json       that summary (conceptctl.evaluation.summary), after an evaluation
    checkpoint-{step}/    resumable training state (rotated)

A *stacked* artifact (``conceptctl erase --base EARLIER``) holds only its own link's values; its
``chain`` lists the artifacts below it, base first, each with its path (relative to this folder),
the digest of its weights and the digest of the base tensors it replaced. Reading it reads every
link; applying it applies them in order, each checked against the model the one before left. A
link that is missing or changed is a broken chain, refused in one line.

Applying an artifact to a base whose replaced tensors hash differently fails, naming both hashes,
unless forced: a delta applied to the wrong model must fail loudly.

A *delta* (``conceptctl export --format delta``) is the same thing as one ``.safetensors`` file:
erased minus base for the changed tensors, with the record in its header (key ``conceptctl``,
``kind: "delta"``); :func:`read_artifact` reads both and :func:`apply_artifact` adds a delta where
it copies values.
"""

from __future__ import annotations

import json
import os
import platform
import stat
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from conceptctl.erasure.finite import NonFiniteWeightsError, first_non_finite
from conceptctl.errors import ConceptctlError, UsageError
from conceptctl.fileio import staged_file
from conceptctl.fingerprint import tensor_digest
from conceptctl.registry import get_registry

FORMAT_VERSION = 1
WEIGHTS = "weights.safetensors"
MANIFEST = "conceptctl.json"
HEADER_KEY = "conceptctl"  # safetensors header key of the record, in artifacts and exports
DELTA = "delta"


class BaseMismatchError(ConceptctlError):
    """The artifact was made from different base weights than the ones it is applied to."""


class BrokenChainError(ConceptctlError):
    """A stacked artifact's chain names an artifact that is missing, unreadable or changed."""


@dataclass(frozen=True)
class Artifact:
    path: Path
    manifest: dict
    weights: dict[str, torch.Tensor]
    # The artifacts this one is stacked on (``erase --base``), base first; () for most.
    chain: tuple[Artifact, ...] = ()

    @property
    def base(self) -> dict:
        return self.manifest["base"]

    @property
    def original_base(self) -> dict:
        """The base model the whole chain starts from (the first link's base)."""
        return (self.chain[0] if self.chain else self).base

    @property
    def changed_tensors(self) -> list[str]:
        """Every tensor the artifact and its chain change."""
        names = set(self.weights)
        for link in self.chain:
            names |= set(link.weights)
        return sorted(names)

    @property
    def is_delta(self) -> bool:
        return self.manifest.get("kind") == DELTA


def _atomic_write(path: Path, write) -> None:
    with staged_file(path) as tmp:  # a resumed run rewrites its files
        write(str(tmp))


def write_artifact(out_dir: Path, weights: dict[str, torch.Tensor], manifest: dict,
                   model_card: str) -> None:
    """Write the three artifact files, each atomically; the manifest last, so a folder with a
    manifest is always complete. Non-finite weights are refused: nothing could use them."""
    problem = first_non_finite(weights)
    if problem is not None:
        raise NonFiniteWeightsError(f"refusing to write {out_dir / WEIGHTS}: {problem}",
                                    hint=_NON_FINITE_HINT)
    out_dir.mkdir(parents=True, exist_ok=True)
    header = {HEADER_KEY: json.dumps({k: manifest[k] for k in (
        "format_version", "concept", "anchor", "concept_type", "concepts", "method", "base",
        "chain")
        if k in manifest})}
    tensors = {k: v.detach().cpu().contiguous() for k, v in weights.items()}
    _atomic_write(out_dir / WEIGHTS, lambda tmp: save_file(tensors, tmp, metadata=header))
    _atomic_write(out_dir / "README.md",
                  lambda tmp: Path(tmp).write_text(model_card, encoding="utf-8"))
    _atomic_write(out_dir / MANIFEST,
                  lambda tmp: Path(tmp).write_text(json.dumps(manifest, indent=2) + "\n"))


def read_artifact(path: Path, *, follow_chain: bool = True) -> Artifact:
    """An artifact folder written by ``conceptctl erase``, or a delta file from ``export``; a
    stacked one with every link of its chain (``follow_chain=False``: without)."""
    path = Path(path)
    if path.is_file():
        return _read_delta(path)
    manifest_file = path / MANIFEST
    if not manifest_file.is_file():
        raise ConceptctlError(f"{path} is not a conceptctl artifact (no {MANIFEST})",
                              hint="give the folder 'conceptctl erase' wrote, or a delta "
                              ".safetensors file from 'conceptctl export --format delta'")
    manifest = _read_manifest(manifest_file)
    _check_format_version(path, manifest)
    _check_fields(manifest_file, manifest)
    artifact = Artifact(path, manifest, _finite(path / WEIGHTS, _load_weights(path / WEIGHTS)))
    if follow_chain and manifest.get("chain"):
        artifact = replace(artifact, chain=_read_chain(artifact))
    return artifact


def read_stack_base(path: str | Path) -> Artifact:
    """The artifact ``conceptctl erase --base PATH`` erases on top of: a folder ``erase`` wrote,
    with every link of its chain intact (a delta file is a flattened export: its chain cannot
    be recorded link by link)."""
    path = Path(path)
    if path.is_file():
        raise UsageError(f"--base {path} is a file; stacking builds on an artifact folder",
                         hint="give the folder 'conceptctl erase' wrote (a delta export is "
                         "applied with 'conceptctl sample --model', not stacked on)")
    if not path.exists():
        raise UsageError(f"--base {path} does not exist",
                         hint="give the folder of an earlier 'conceptctl erase' run")
    return read_artifact(path)


def weights_digest(artifact: Artifact) -> str:
    """What a chain records of a link: the digest of its tensors (names, dtypes, values)."""
    return _digest(artifact.weights)


_CHAIN_HINT = ("put the artifact back where it was (folders of a chain move together), or erase "
               "again with --base on the artifact you have")


def _read_chain(artifact: Artifact) -> tuple[Artifact, ...]:
    """The links ``artifact``'s manifest lists, each read from its recorded place and checked
    against its recorded digest: a stacked model is only what it was made on."""
    links = artifact.manifest["chain"]
    file = artifact.path / MANIFEST
    if not isinstance(links, list) or not all(
            isinstance(link, dict) and isinstance(link.get("path"), str)
            and isinstance(link.get("weights_digest"), str) for link in links):
        raise ConceptctlError(f"{file}: 'chain' must be a list of links with 'path' and "
                              "'weights_digest'", hint=_REBUILD_HINT)
    read = []
    for number, link in enumerate(links, 1):
        where = chain_location(artifact.path, link["path"])
        name = f"{artifact.path} is stacked on {where} (link {number} of {len(links)})"
        if not where.exists():
            raise BrokenChainError(f"{name}, which is missing", hint=_CHAIN_HINT)
        try:
            linked = read_artifact(where, follow_chain=False)
        except ConceptctlError as err:
            raise BrokenChainError(f"{name}, which cannot be read: {err}",
                                   hint=_CHAIN_HINT) from None
        found = weights_digest(linked)
        if found != link["weights_digest"]:
            raise BrokenChainError(
                f"{name}, which has changed since (weights {found}, recorded "
                f"{link['weights_digest']})", hint=_CHAIN_HINT)
        read.append(linked)
    return tuple(read)


def chain_location(artifact_dir: Path, recorded: str) -> Path:
    """Where a chain's recorded path points: relative paths count from the artifact's folder."""
    where = Path(recorded)
    return where if where.is_absolute() else Path(os.path.normpath(Path(artifact_dir) / where))


def chain_links(base: Artifact, out_dir: Path) -> list[dict]:
    """The ``chain`` of an artifact written to ``out_dir`` on top of ``base``: the base's own
    links, then the base itself, each with its path relative to ``out_dir`` where one exists
    (so the folders can move together), its weights' digest, its base digest and concepts."""

    def relative(path: Path) -> str:
        target = os.path.abspath(path)
        try:
            return os.path.relpath(target, os.path.abspath(out_dir))
        except ValueError:  # another drive (Windows): no relative path exists
            return target

    return [{"path": relative(link.path), "weights_digest": weights_digest(link),
             "base_tensors_digest": link.base["tensors_digest"],
             "method": link.manifest.get("method"),
             "concepts": concepts_of(link.manifest)}
            for link in (*base.chain, base)]


_REBUILD_HINT = "this artifact is damaged: erase again, or restore the folder from a copy"

# The manifest fields every reader relies on, with their JSON types (format version 1).
_FIELDS = {"concept": str, "anchor": str, "concept_type": str, "method": str, "base": dict}


def _read_manifest(file: Path) -> dict:
    """The artifact's record, or one clear error naming the file and what is wrong."""
    try:
        # utf-8-sig: an editor's byte-order mark does not make the record unreadable.
        record = json.loads(file.read_bytes().decode("utf-8-sig"))
    except OSError as err:
        raise ConceptctlError(f"cannot read {file}: {err.strerror}") from None
    except (UnicodeDecodeError, ValueError) as err:  # ValueError: bad JSON, 5000-digit numbers
        raise ConceptctlError(f"{file} is not valid JSON ({err})", hint=_REBUILD_HINT) from None
    if not isinstance(record, dict):
        raise ConceptctlError(f"{file} holds a JSON {type(record).__name__}, not an object",
                              hint=_REBUILD_HINT)
    return record


def _check_fields(file: Path, record: dict) -> None:
    for name, kind in _FIELDS.items():
        if name not in record:
            raise ConceptctlError(f"{file} has no {name!r} field", hint=_REBUILD_HINT)
        if not isinstance(record[name], kind):
            expected = {str: "a string", dict: "an object"}[kind]
            raise ConceptctlError(f"{file}: {name!r} must be {expected}, not "
                                  f"{type(record[name]).__name__}", hint=_REBUILD_HINT)
    tensors = record["base"].get("tensors")
    if not isinstance(tensors, list) or not all(isinstance(t, str) for t in tensors):
        raise ConceptctlError(f"{file}: 'base.tensors' must be a list of tensor names",
                              hint=_REBUILD_HINT)


def _load_weights(file: Path) -> dict[str, torch.Tensor]:
    """The weights file's tensors; a missing, special (FIFO, device) or broken file is one
    clear error, never a hang or a crash."""
    try:
        mode = file.stat().st_mode
    except FileNotFoundError:
        raise ConceptctlError(f"{file} is missing", hint=_REBUILD_HINT) from None
    except OSError as err:
        raise ConceptctlError(f"cannot read {file}: {err.strerror}") from None
    if not stat.S_ISREG(mode):  # opening a FIFO would wait forever for a writer
        raise ConceptctlError(f"{file} is not a regular file", hint=_REBUILD_HINT)
    try:
        return load_file(str(file))
    except (SafetensorError, OSError) as err:
        raise ConceptctlError(f"cannot read {file} as safetensors: {err}",
                              hint=_REBUILD_HINT) from None


# A NaN or infinite weight makes every picture NaN (black): training diverged, or the file broke.
_NON_FINITE_HINT = ("erase again (with a lower --lr or --d-lr if its training diverged) and use "
                    "that artifact")


def _finite(file: Path, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``weights`` read from ``file``, if every value is finite."""
    problem = first_non_finite(dict(sorted(weights.items())))
    if problem is not None:
        raise NonFiniteWeightsError(f"{file} is unusable: {problem}", hint=_NON_FINITE_HINT)
    return weights


def _check_format_version(path: Path, record: dict) -> None:
    if record.get("format_version") != FORMAT_VERSION:
        raise ConceptctlError(f"{path} has artifact format {record.get('format_version')}; "
                              f"this conceptctl reads format {FORMAT_VERSION}")


def _read_delta(path: Path) -> Artifact:
    not_delta = "give an artifact folder, or a file written by 'conceptctl export --format delta'"
    if path.suffix.lower() != ".safetensors":
        raise ConceptctlError(f"{path} is not a conceptctl artifact (a folder) or delta "
                              "(.safetensors)", hint=not_delta)
    try:
        with safe_open(str(path), "pt") as f:
            raw = (f.metadata() or {}).get(HEADER_KEY)
    except (SafetensorError, OSError) as err:
        raise ConceptctlError(f"cannot read {path} as safetensors: {err}", hint=not_delta) from err
    try:
        record = json.loads(raw) if raw else None
    except ValueError:
        record = None
    if not isinstance(record, dict):
        raise ConceptctlError(f"{path} is not a conceptctl delta (its header has no "
                              f"{HEADER_KEY!r} record)", hint=not_delta)
    if record.get("kind") is None:  # the header write_artifact puts on weights.safetensors
        raise ConceptctlError(f"{path} is the weights file of an artifact, not a delta",
                              hint=f"give the folder that holds it ({path.parent})")
    if record.get("kind") != DELTA:
        raise ConceptctlError(f"{path} is a conceptctl {record.get('kind')} export, not a delta",
                              hint="see docs/export.md for how to load each format; "
                              + not_delta)
    _check_format_version(path, record)
    return Artifact(path, record, _finite(path, load_file(str(path))))


# Dtypes a base may be loaded in to sample from an artifact trained in float32 (``--dtype auto``
# is float16 on GPUs): the manifest records the base's digest as cast to each.
SAMPLING_DTYPES = ("float16", "bfloat16")


def _digest(tensors: dict[str, torch.Tensor], dtype: str | None = None) -> str:
    cast = getattr(torch, dtype) if dtype else None
    return tensor_digest((name, tensors[name] if cast is None else tensors[name].to(cast))
                         for name in sorted(tensors))


def base_digest(backbone, names) -> str:
    """Digest of the base's ``names`` tensors as they are (dtype included)."""
    params = backbone.named_tensors()
    return _digest({name: params[name] for name in names})


def base_record(tensors: dict[str, torch.Tensor]) -> dict[str, object]:
    """How a manifest or header names the base tensors an artifact replaces: their digest as
    they are, and as they read when the base is loaded in each sampling dtype (casting the same
    float32 weights rounds the same way whenever it happens, so a float16 load matches)."""
    return {"tensors_digest": _digest(tensors),
            "tensors_digest_by_dtype": {d: _digest(tensors, d) for d in SAMPLING_DTYPES}}


def _expected_digest(artifact: Artifact, dtype: torch.dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    by_dtype = artifact.base.get("tensors_digest_by_dtype") or {}
    return by_dtype.get(name, artifact.base["tensors_digest"])


def apply_artifact(backbone, artifact: Artifact, force: bool = False) -> list[str]:
    """Put the artifact's tensors into the backbone (UNet, and text encoder for names under
    ``text_encoder.``; a delta's: add them), after every link of its chain in order, each
    checked against what the one before left; returns warnings (e.g. forced)."""
    notes = []
    for number, link in enumerate(artifact.chain, 1):
        notes += _apply_one(backbone, link, force,
                            f"link {number} of {artifact.path}'s chain ({link.path})")
    return notes + _apply_one(backbone, artifact, force, None)


def _apply_one(backbone, artifact: Artifact, force: bool, link: str | None) -> list[str]:
    params = backbone.named_tensors()
    missing = sorted(set(artifact.weights) - set(params))
    if missing:
        raise BaseMismatchError(
            f"the artifact changes {len(missing)} tensor(s) this backbone does not have "
            f"(first: {missing[0]}); it was made for {artifact.base.get('name')}")
    wrong_shape = [n for n, v in artifact.weights.items() if v.shape != params[n].shape]
    if wrong_shape:
        raise BaseMismatchError(
            f"the artifact's tensor {wrong_shape[0]} has shape "
            f"{tuple(artifact.weights[wrong_shape[0]].shape)}, this backbone's has "
            f"{tuple(params[wrong_shape[0]].shape)}: it was made for "
            f"{artifact.base.get('name')}, a different architecture (--force cannot help)")
    dtype = params[next(iter(artifact.weights))].dtype
    actual = base_digest(backbone, artifact.weights)
    expected = artifact.base["tensors_digest"]
    if actual != expected:  # loaded in float16/bfloat16: compare with the base cast the same way
        expected = _expected_digest(artifact, dtype)
    notes = []
    if actual != expected:
        what = link or ("delta" if artifact.is_delta else "artifact")
        message = (f"the {what} was made from base {artifact.base.get('name')} ({expected}) "
                   f"but this backbone ({backbone.spec.name}) has {actual}")
        if not force:
            hint = "load the base it was made from, or pass --force to apply it anyway"
            if dtype != torch.float32 and not artifact.base.get("tensors_digest_by_dtype"):
                # Artifacts written before the per-dtype digests can only be checked in float32.
                hint = "this artifact records its base in float32 only: pass --dtype float32"
            raise BaseMismatchError(message, hint=hint)
        notes.append(f"forced: {message}")
    with torch.no_grad():
        for name, value in artifact.weights.items():
            if artifact.is_delta:
                params[name].add_(value.to(params[name]))
            else:
                params[name].copy_(value.to(params[name]))
    return notes


def _component_info(kind: str, name: str) -> dict:
    from conceptctl.plugins import plugin_infos

    entry = get_registry(kind).entry(name)
    info = {i.name: i for i in plugin_infos()}.get(entry.plugin)
    return {"name": name, "plugin": entry.plugin,
            "package": info.package if info else None, "version": info.version if info else None}


def _summary(history: list[dict]) -> dict:
    trained = [h for h in history if h.get("generator_step")]
    last = trained[-50:]

    def mean(key: str):
        values = [h[key] for h in last if h.get(key) is not None]
        return sum(values) / len(values) if values else None

    fired = [h["surgery_fired"] for h in trained if h.get("surgery_fired") is not None]
    return {"final_loss": mean("loss"), "final_preserve_loss": mean("preserve_loss"),
            "final_d_accuracy": mean("d_accuracy"),
            "surgery_fired_share": sum(fired) / len(fired) if fired else None}


def build_manifest(cfg, backbone, base, params, groups, samplings, cache_files, selector,
                   seconds, peak, history, versions, chain: list[dict] | None = None) -> dict:
    """conceptctl.json of a finished run: what was erased (``concepts``: every concept with its
    anchor and type; ``concept``/``anchor``/``concept_type``: the first), from which base, with
    which components (and their plugins' versions), every setting, the anchors (per erasure),
    the training summary, time, memory, machine and library versions; ``chain``: the links of a
    stacked run (:func:`chain_links`)."""
    from dataclasses import asdict

    from conceptctl.erasure.anchors import merge_anchor_sets

    anchors = merge_anchor_sets([group for _, group in groups])
    files = [f.name for f in cache_files] or [None] * len(groups)
    stacked = {"chain": chain} if chain else {}
    return {
        "format_version": FORMAT_VERSION,
        "kind": "values",  # weights.safetensors holds new values of the listed tensors
        "concept": cfg.concept,
        "anchor": cfg.anchor,
        "concept_type": cfg.concept_type,
        "concepts": [{"concept": e.concept, "anchor": e.anchor, "concept_type": e.concept_type}
                     for e in cfg.erasures()],
        "method": cfg.method,
        "base": {**backbone.describe(), **base, "tensors": sorted(params)},
        **stacked,
        "components": {
            "method": _component_info("method", cfg.method),
            "discriminator": _component_info("discriminator", cfg.discriminator),
            "gradient_surgery": _component_info("gradient-surgery", cfg.surgery),
            "anchor_selector": _component_info("anchor-selector", selector.name),
        },
        "hyperparameters": cfg.as_dict(),
        "seed": cfg.seed,
        "anchors": {"prompts": list(anchors.anchor), "targets": list(anchors.target),
                    # The first erasure's sampler; every erasure's prompts are drawn alike.
                    "sampler": asdict(samplings[0]) | {"prompts": len(samplings[0].prompts)},
                    "cache_file": files[0],
                    "per_concept": [{"concept": e.concept, "prompts": len(group.anchor),
                                     "images_per_prompt": sampling.images_per_prompt,
                                     "cache_file": file}
                                    for (e, group), sampling, file in zip(
                                        groups, samplings, files, strict=True)]},
        "training": _summary(history),
        "seconds": seconds,
        "peak_memory_mb": round(peak, 1),
        "machine": {"platform": platform.platform(), "device": str(backbone.device),
                    "torch_threads": torch.get_num_threads()},
        "versions": versions,
    }


def concepts_of(record: dict) -> list[dict]:
    """Every concept a manifest or header records as erased by its own run (``concept``,
    ``anchor``, ``concept_type`` each): its ``concepts`` list, or the one concept of a record
    without it (written before several concepts per run existed)."""
    listed = record.get("concepts")
    if isinstance(listed, list) and listed:
        return listed
    return [{k: record.get(k) for k in ("concept", "anchor", "concept_type")}]


def all_concepts(record: dict) -> list[dict]:
    """Every concept the model of a manifest has forgotten: those of the artifacts it is stacked
    on (its ``chain``, base first), then its own."""
    chained = [c for link in record.get("chain") or () for c in link.get("concepts") or ()]
    return chained + concepts_of(record)
