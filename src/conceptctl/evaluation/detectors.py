"""Concept detectors: what reads the pictures in an evaluation.

A detector labels each picture (any JSON-able dict: the toy judge gives object / style /
colour, NudeNet gives exposed classes) and answers two questions about a label: does it show a
concept (erasure success, attack success), and does it show what its prompt asked for
(preservation). It may also give feature vectors (Fréchet distance, KID). ``info()`` is written
into the report: whatever someone needs to reproduce the numbers (model file hash, threshold,
class set, version).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np

from conceptctl.errors import UsageError

DETECTOR_CONTEXT = "context"


def detector_options(options: dict | None, known: tuple[str, ...],
                     detector: str) -> tuple[dict[str, str], dict]:
    """(the user's options, the context); an option not in ``known`` is a UsageError."""
    given = dict(options or {})
    context = given.pop(DETECTOR_CONTEXT, None) or {}
    unknown = sorted(set(given) - set(known))
    if unknown:
        accepted = ", ".join(known) if known else "none"
        raise UsageError(f"detector {detector} has no option {', '.join(map(repr, unknown))}",
                         hint=f"options it accepts: {accepted}")
    return given, context


@runtime_checkable
class Detector(Protocol):
    name: str

    def info(self) -> dict: ...

    def judge(self, images: np.ndarray) -> list[dict]:
        """uint8 pictures (N, H, W, 3) -> one label dict each."""

    def shows(self, labels: dict, concept: str) -> bool | None:
        """Whether a picture with these labels shows ``concept``; None if this detector cannot
        tell for that concept."""

    def matches(self, labels: dict, expect: dict) -> bool | None:
        """Whether it shows what its prompt asked for (``Case.expect``); None if it cannot tell."""

    def concept_keys(self, concept: str) -> set[str]:
        """Label keys that are *about* the concept: retention compares every other key."""

    def features(self, images: np.ndarray):
        """(N, D) float tensor of features, or None when the detector has none."""
