"""Process-wide runtime helpers for the heavy libraries (imported only inside commands)."""

from __future__ import annotations

import os

DTYPE_NAMES = ("float32", "float16", "bfloat16")


def quiet_libraries() -> None:
    """Silence diffusers/transformers chatter (progress bars, optional-dependency notices).

    conceptctl draws its own progress on stderr; the libraries' bars and warnings about, e.g., a
    missing torchvision would bury it. Set the variables yourself to see them again.
    """
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog

    dlog.disable_progress_bar()
    tlog.disable_progress_bar()


def torch_dtype(name: str):
    """``"bfloat16"`` -> ``torch.bfloat16``."""
    import torch

    if name not in DTYPE_NAMES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPE_NAMES)}, not {name!r}")
    return getattr(torch, name)
