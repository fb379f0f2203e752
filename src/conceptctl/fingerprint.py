"""Content hashes of tensors: how artifacts and caches name the exact weights they depend on."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import torch


def tensor_digest(named: Iterable[tuple[str, torch.Tensor]]) -> str:
    """sha256 over names, shapes, dtypes and raw bytes, in the given order ("sha256:<hex>")."""
    h = hashlib.sha256()
    for name, tensor in named:
        t = tensor.detach().to("cpu").contiguous()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    return "sha256:" + h.hexdigest()


def module_digest(module: torch.nn.Module) -> str:
    """Digest of every parameter and buffer of ``module``."""
    return tensor_digest(sorted(module.state_dict().items()))


def file_sha256(path) -> str:
    """sha256 of a file's bytes, read in 1 MiB blocks (model files can be large)."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
