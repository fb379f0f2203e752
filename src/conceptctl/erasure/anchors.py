"""Anchor prompts and target prompts: what the erased concept should turn into, and how users ask
for the concept.

DoCo (like Ablating Concepts before it) learns from pairs: an *anchor* caption, whose images the
original model generates, and the *target* caption derived from it that asks for the concept.
The reference derives targets by concept type: a style is appended ("…, in the style of Van
Gogh"); an object or nudity replaces the anchor word ("a photo of a house" -> "a photo of a
church"). Selectors here make the anchor captions offline: from templates, from a user's file,
or from the toy world's own caption templates.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from conceptctl.errors import UsageError

ConceptType = Literal["style", "object", "nudity"]
CONCEPT_TYPES: tuple[str, ...] = ("style", "object", "nudity")

_STYLE_ANCHORS = {"painting", "art", "artwork", "style", "drawing", "illustration", "picture"}
_NUDITY_WORDS = {"nudity", "nude", "naked", "nsfw"}


@dataclass(frozen=True)
class AnchorSet:
    """Paired captions: ``anchor[i]`` is drawn by the original model; ``target[i]`` asks for the
    concept in the same context."""

    anchor: tuple[str, ...]
    target: tuple[str, ...]

    def __post_init__(self) -> None:
        if len(self.anchor) != len(self.target) or not self.anchor:
            raise ValueError("an anchor set needs as many target prompts as anchor prompts (>0)")


def guess_type(concept: str, anchor: str) -> ConceptType:
    """The concept type a user most likely means when ``--type`` is not given."""
    if concept.strip().lower() in _NUDITY_WORDS:
        return "nudity"
    if anchor.strip().lower() in _STYLE_ANCHORS:
        return "style"
    return "object"


def derive_target(anchor_prompt: str, concept: str, anchor: str, kind: ConceptType) -> str:
    """The target caption for one anchor caption (the reference's rules)."""
    if kind == "style":
        return f"{anchor_prompt.rstrip(' .')}, in the style of {concept}"
    pattern = re.compile(rf"\b{re.escape(anchor)}\b", re.IGNORECASE)
    if not pattern.search(anchor_prompt):
        raise UsageError(
            f"anchor prompt {anchor_prompt!r} does not contain the anchor word {anchor!r}",
            hint="every anchor prompt of an object or nudity erasure must name the anchor, "
            "so the target prompt can name the concept in its place",
        )
    return _article_fix(pattern.sub(concept, anchor_prompt))


# Offline templates: varied contexts, so the erasure does not learn one phrasing.
OBJECT_TEMPLATES = (
    "a photo of a {}", "a picture of a {}", "a painting of a {}", "a {} in the city",
    "a {} in a field", "a {} at sunset", "a {} in the snow", "a close-up photo of a {}",
    "a drawing of a {}", "a {} under a blue sky", "an old {}", "a small {}", "a large {}",
    "a {} in the rain", "a watercolor of a {}", "a {} at night", "a {} by the sea",
    "a {} in a park", "a black and white photo of a {}", "a {} on a sunny day",
)
STYLE_SUBJECTS = (
    "a quiet harbour", "a field of flowers", "a portrait of a woman", "a portrait of a man",
    "a village street", "a bowl of fruit", "a starry night sky", "a river at dawn",
    "a mountain landscape", "a farmhouse", "a cafe terrace", "a bridge over a canal",
    "a garden with trees", "a church in a village", "boats on the sea", "a city at night",
    "a wheat field", "a self-portrait", "a vase of sunflowers", "a forest path",
)
NUDITY_TEMPLATES = (
    "a photo of a {} person", "a {} woman standing in a room", "a {} man on the beach",
    "a painting of a {} figure", "a {} person lying on a bed", "a portrait of a {} woman",
    "a {} couple in a garden", "a {} model in a studio", "a {} person in a forest",
    "a classical statue of a {} body",
)


def template_anchor_set(concept: str, anchor: str, kind: ConceptType) -> AnchorSet:
    """``templates`` selector: built-in, offline, for any concept."""
    if kind == "style":
        anchors = tuple(f"a {anchor} of {subject}" for subject in STYLE_SUBJECTS)
    elif kind == "nudity":
        anchors = tuple(t.format(anchor) for t in NUDITY_TEMPLATES)
    else:
        anchors = tuple(_article_fix(t.format(anchor)) for t in OBJECT_TEMPLATES)
    return AnchorSet(anchors, tuple(derive_target(a, concept, anchor, kind) for a in anchors))


def file_anchor_set(path: Path, concept: str, anchor: str, kind: ConceptType) -> AnchorSet:
    """``prompt-file`` selector: one anchor prompt per line (``#`` comments, blanks skipped)."""
    if not path.is_file():
        raise UsageError(f"anchor prompt file not found: {path}")
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    anchors = tuple(line for line in lines if line and not line.startswith("#"))
    if not anchors:
        raise UsageError(f"{path} holds no anchor prompts (one per line)")
    return AnchorSet(anchors, tuple(derive_target(a, concept, anchor, kind) for a in anchors))


def _article_fix(text: str) -> str:
    """'a airplane' -> 'an airplane', 'an church' -> 'a church' (after a word swap)."""
    text = re.sub(r"\b([Aa]) ([aeiouAEIOU])", r"\1n \2", text)
    return re.sub(r"\b([Aa])n ([b-df-hj-np-tv-zB-DF-HJ-NP-TV-Z])", r"\1 \2", text)
