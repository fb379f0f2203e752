"""The weight change as a low-rank adapter (LoRA), by truncated SVD.

For every changed weight W of a Linear or Conv2d layer, the change ΔW = W_erased − W_base
(a conv kernel flattened to out × in·kh·kw) is factorised as ΔW ≈ up @ down with
up = U_r·√S_r and down = √S_r·V_rᵀ, the best rank-r approximation (Eckart–Young). Each adapter
loads with scale alpha / rank, where alpha is one value for the whole file (the most common
rank); a layer of another rank has its factors multiplied by √(rank / alpha) to compensate, so
loading at weight 1.0 adds exactly the approximation. One alpha, not one per layer, because
diffusers 0.42 drops per-layer alphas of kohya files (their alpha_pattern keys match no module)
and would silently scale those layers wrong.

The relative error reported per layer is ‖ΔW − up @ down‖_F / ‖ΔW‖_F, measured on the factors as
saved (after the cast to the export dtype); the overall figure is the same ratio over all layers
together. ``--rank auto --max-error E`` picks, per layer, the smallest rank whose truncation
error is at most E.

Two namings:

* ``kohya`` (the default): ``lora_unet_<module with _ for .>.lora_down.weight`` /
  ``.lora_up.weight`` / ``.alpha`` (``lora_te_…`` for the text encoder's), the names kohya's
  sd-scripts write for SD 1.x / 2.x and that Automatic1111 and ComfyUI map onto their own models
  (:mod:`conceptctl.export.kohya`); for SDXL, kohya's SDXL names (original-layout UNet modules,
  ``lora_te1_…`` / ``lora_te2_…``); diffusers' ``load_lora_weights`` reads them too. The header
  carries kohya's and ModelSpec's entries, and the alpha is stored in float32 whatever the
  export dtype: a bfloat16 alpha above 256 rounds (267 becomes 268), scaling every layer wrong.
* ``diffusers`` (peft): ``unet.<module>.lora_A.weight`` (down) / ``.lora_B.weight`` (up), and
  ``text_encoder.text_model.<module>…`` for a CLIP text encoder's layers (``--params
  text-encoder``; SDXL's second: ``text_encoder_2.text_model.…``), with each
  part's adapter configuration (rank, alpha, per-layer ranks) in the ``lora_adapter_metadata``
  header entry exactly as diffusers' ``save_lora_weights`` writes it — without it diffusers
  would guess alpha, and a wrong alpha scales the change silently. Only diffusers loads all of
  it: ComfyUI skips the UNet's keys (with a "lora key not loaded" warning each) and
  Automatic1111 matches none (said at debug level only).

Text-encoder names are transformers 4's ``CLIPTextModel``'s, with the ``text_model.`` level that
transformers >= 5.6 dropped: the files in the wild have it, and diffusers 0.42 strips it when
the installed encoder lacks it (checked, both namings). Readers rename text-encoder adapters the
CLIP way only (diffusers' converter knows q/k/v/out_proj and fc1/fc2), so a backbone with
another encoder (the toy's BERT) gets no LoRA of text-encoder changes: one clear error instead.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from conceptctl.backbones.backbone import TEXT_ENCODER_PREFIXES
from conceptctl.errors import ConceptctlError, UsageError
from conceptctl.export import kohya

LORA_FORMATS = ("kohya", "diffusers")
DEFAULT_LORA_FORMAT = "kohya"
DEFAULT_MAX_ERROR = 0.01
# diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY; spelled out so writing needs no diffusers.
ADAPTER_METADATA_KEY = "lora_adapter_metadata"


@dataclass(frozen=True)
class LayerFactors:
    """One layer's adapter: ``alpha / rank · up @ down`` approximates ``module``'s change."""

    module: str  # the UNet's module name, or a text encoder's under its TEXT_ENCODER_PREFIXES one
    up: torch.Tensor  # (out, r) for Linear, (out, r, 1, 1) for Conv2d
    down: torch.Tensor  # (r, in) for Linear, (r, in, kh, kw) for Conv2d
    alpha: float
    full_rank: int
    change_norm: float  # ‖ΔW‖_F
    residual_norm: float  # ‖ΔW − alpha / rank · up @ down‖_F

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def error(self) -> float:
        return self.residual_norm / self.change_norm


def check_options(options: dict[str, Any]) -> None:
    """Reject bad ``--rank`` / ``--max-error`` / ``--lora-format`` before anything is loaded."""
    parse_rank(options.get("rank"), options.get("max_error"))
    fmt = options.get("lora_format", DEFAULT_LORA_FORMAT)
    if fmt not in LORA_FORMATS:
        raise UsageError(f"unknown LoRA naming {fmt!r}; available: {', '.join(LORA_FORMATS)}")


def parse_rank(rank: Any, max_error: float | None) -> tuple[int | None, float | None]:
    """``(rank, None)`` for a fixed rank, ``(None, max_error)`` for ``auto`` (the default)."""
    if rank is None or str(rank).strip().lower() == "auto":
        error = DEFAULT_MAX_ERROR if max_error is None else float(max_error)
        if not 0 <= error < 1:
            raise UsageError(f"--max-error must be at least 0 and below 1, not {error}")
        return None, error
    if max_error is not None:
        raise UsageError("--max-error applies to --rank auto only",
                         hint="give either --rank N or --rank auto --max-error E")
    try:
        value = int(str(rank))
    except ValueError:
        raise UsageError(f"--rank must be a positive whole number or 'auto', not {rank!r}") \
            from None
    if value < 1:
        raise UsageError(f"--rank must be at least 1, not {value}")
    return value, None


@contextmanager
def _one_thread():
    """Run on one thread: on the 2-core development machine a float64 SVD of a cross-attention
    matrix (128 x 384 up to SD's 1280 x 768) took 5-20x longer, in CPU and in wall time, on two
    threads than on one (the helper threads mostly wait), and under load a whole LoRA export
    could spend half a minute there."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def factorize(matrix: torch.Tensor, rank: int | None,
              max_error: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Truncated SVD of one change (a float64 matrix): ``(up, down)`` with ``up @ down`` its best
    approximation of rank ``rank``, or, when ``rank`` is None, of the smallest rank whose
    relative error is at most ``max_error``. A rank above the matrix's own is its own."""
    with _one_thread():
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    full = int(s.numel())
    if rank is None:
        # Truncation error of rank k: sqrt(sum of the squared singular values from k on) / norm.
        energy = s.square()
        tail = energy.flip(0).cumsum(0).flip(0)
        errors = (tail / energy.sum()).sqrt().tolist() + [0.0]
        rank = next(k for k in range(1, full + 1) if errors[k] <= max_error)
    r = min(rank, full)
    root = s[:r].sqrt()
    return u[:, :r] * root, root[:, None] * vh[:r]


def _lora_module(backbone, name: str) -> str:
    """The module whose weight ``name`` is (named as the tensor: the text encoder's keep their
    prefix), if a LoRA can stand for its change; else raise."""
    root, inner = backbone.unet, name
    for prefix, encoder in zip(TEXT_ENCODER_PREFIXES, backbone.text_encoders, strict=False):
        if name.startswith(prefix):
            root, inner = encoder, name.removeprefix(prefix)
    module_name, _, leaf = inner.rpartition(".")
    module = root.get_submodule(module_name) if module_name else None
    linear = isinstance(module, torch.nn.Linear)
    conv = isinstance(module, torch.nn.Conv2d) and module.groups == 1
    if leaf != "weight" or not (linear or conv):
        raise ConceptctlError(
            f"the change of {name} cannot be written as a LoRA (only Linear and Conv2d weights "
            "can)",
            hint="export this artifact as 'diff' (exact, for Automatic1111 and ComfyUI), "
            "'delta', 'diffusers' or 'single-file' instead; LoRA exports need an erasure of "
            "weights only, e.g. --params cross-attn-kv (the default)")
    return name.removesuffix("." + leaf)


def build_factors(job, rank: int | None, max_error: float | None) -> list[LayerFactors]:
    """Adapters for every changed tensor of ``job``, in the artifact's order, in ``job.dtype``.

    The SVD runs in float64 on the exact change, so at full rank the only error left is the
    final cast; errors are measured on the cast factors, as a loader will use them.
    """
    changed = job.changed()
    if not changed:
        raise ConceptctlError("the artifact changes nothing relative to this base: there is no "
                              "weight change to write as a LoRA")
    pending = []
    for name in changed:
        module = _lora_module(job.backbone, name)
        change = job.erased[name].to(torch.float64) - job.base[name].to(torch.float64)
        matrix = change.reshape(change.shape[0], -1)
        pending.append((module, change.shape, matrix, *factorize(matrix, rank, max_error)))
    alpha = float(Counter(down.shape[0] for *_, down in pending).most_common(1)[0][0])
    layers = []
    for module, shape, matrix, up, down in pending:
        r = down.shape[0]
        gain = math.sqrt(r / alpha)  # the loader multiplies by alpha / r
        up, down = (up * gain).to(job.dtype), (down * gain).to(job.dtype)
        applied = (alpha / r) * (up.to(torch.float64) @ down.to(torch.float64))
        residual = float((matrix - applied).norm())
        if len(shape) == 4:  # conv: down keeps the kernel, up is a 1x1 conv
            down = down.reshape(r, *shape[1:])
            up = up.reshape(*up.shape, 1, 1)
        layers.append(LayerFactors(module, up.contiguous(), down.contiguous(), alpha,
                                   min(matrix.shape), float(matrix.norm()), residual))
    return layers


def overall_error(layers: list[LayerFactors]) -> float:
    """‖all changes − all adapters‖_F / ‖all changes‖_F."""
    residual = math.sqrt(sum(layer.residual_norm ** 2 for layer in layers))
    return residual / math.sqrt(sum(layer.change_norm ** 2 for layer in layers))


def _part(module: str) -> tuple[str, str]:
    """(the pipeline part diffusers loads it into, the module's name inside that part)."""
    for prefix in TEXT_ENCODER_PREFIXES:  # text_encoder., SDXL's text_encoder_2.
        if module.startswith(prefix):
            return prefix.removesuffix("."), module.removeprefix(prefix)
    return "unet", module


def diffusers_state_dict(layers: list[LayerFactors]) -> tuple[dict[str, torch.Tensor],
                                                               dict[str, str]]:
    """peft names under ``unet.`` / ``text_encoder.`` plus each part's adapter configuration,
    as diffusers reads them back."""
    tensors, ranks = {}, {}
    for layer in layers:
        part, module = _part(layer.module)
        key = f"{part}.{kohya.clip_module_name(module) if part != 'unet' else module}"
        tensors[f"{key}.lora_A.weight"] = layer.down
        tensors[f"{key}.lora_B.weight"] = layer.up
        # The configuration keeps the installed name: peft matches target modules by suffix,
        # so it finds them with or without the 'text_model.' level.
        ranks.setdefault(part, {})[module] = layer.rank
    packed = {}
    for part, part_ranks in ranks.items():
        common = Counter(part_ranks.values()).most_common(1)[0][0]
        # Keys carry the part's prefix, as diffusers' save_lora_weights writes them (it strips
        # it again when loading each part); the alpha is the same for every layer of the file
        # (see the module docstring).
        config = {"r": common, "lora_alpha": int(layers[0].alpha),
                  "rank_pattern": {m: r for m, r in part_ranks.items() if r != common},
                  "target_modules": sorted(part_ranks)}
        packed |= {f"{part}.{key}": value for key, value in config.items()}
    return tensors, {"format": "pt", ADAPTER_METADATA_KEY: json.dumps(packed, sort_keys=True)}


def kohya_state_dict(layers: list[LayerFactors],
                     module_key=kohya.module_key) -> dict[str, torch.Tensor]:
    """kohya's keys for ``layers``, each module named by ``module_key`` (SD 1.x / 2.x's by
    default; :func:`conceptctl.export.kohya.module_keys` gives a backbone's)."""
    tensors = {}
    for layer in layers:
        key = module_key(layer.module)
        tensors[f"{key}.lora_down.weight"] = layer.down
        tensors[f"{key}.lora_up.weight"] = layer.up
        # Every reader scales by alpha / rank (kohya's convention, kept by A1111 and ComfyUI).
        # float32 whatever the factors' dtype: integers above 256 do not survive bfloat16.
        tensors[f"{key}.alpha"] = torch.tensor(layer.alpha, dtype=torch.float32)
    return tensors


def kohya_metadata(job, layers: list[LayerFactors],
                   tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    """kohya's and ModelSpec's header entries for ``tensors`` (module docstring)."""
    conv_ranks = [layer.rank for layer in layers
                  if layer.down.dim() == 4 and tuple(layer.down.shape[2:]) != (1, 1)]
    header = kohya.lora_header(job, [layer.rank for layer in layers], layers[0].alpha,
                               conv_ranks)
    return kohya.with_hashes(tensors, header)


def _check_text_encoder(job, layers: list[LayerFactors]) -> None:
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    parts = {_part(layer.module)[0] for layer in layers}
    for part in sorted(parts - {"unet"}):
        encoder = getattr(job.backbone.pipeline, part)
        # SDXL's second encoder is CLIP with the pooled projection, a class of its own.
        if not isinstance(encoder, (CLIPTextModel, CLIPTextModelWithProjection)):
            raise ConceptctlError(
                "LoRA readers (diffusers, Automatic1111, ComfyUI) load text-encoder adapters "
                f"into CLIP text encoders only, and this backbone's is a "
                f"{type(encoder).__name__}",
                hint="export this artifact as 'delta' or 'diffusers' (a full pipeline folder)")


def export_lora(job, out: Path) -> dict[str, Any]:
    rank, max_error = parse_rank(job.options.get("rank"), job.options.get("max_error"))
    naming = job.options.get("lora_format", DEFAULT_LORA_FORMAT)
    layers = build_factors(job, rank, max_error)
    _check_text_encoder(job, layers)
    if naming == "kohya":
        tensors = kohya_state_dict(layers, kohya.module_keys(job.backbone))
        metadata = kohya_metadata(job, layers, tensors)
    else:
        tensors, metadata = diffusers_state_dict(layers)
    save_file(tensors, str(out), metadata={**metadata, **job.metadata})
    return {
        "lora_format": naming,
        "rank": "auto" if rank is None else rank,
        "max_error": max_error,
        "overall_error": overall_error(layers),
        "alpha": layers[0].alpha,
        "parameters": sum(layer.up.numel() + layer.down.numel() for layer in layers),
        "layers": [{"module": layer.module, "rank": layer.rank, "full_rank": layer.full_rank,
                    "error": layer.error} for layer in layers],
    }
