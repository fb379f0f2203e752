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

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from conceptctl.errors import UsageError
from conceptctl.text import fix_articles

ConceptType = Literal["style", "object", "nudity"]
CONCEPT_TYPES: tuple[str, ...] = ("style", "object", "nudity")

_STYLE_ANCHORS = {"painting", "art", "artwork", "style", "drawing", "illustration", "picture"}
_NUDITY_WORDS = {"nudity", "nude", "naked", "nsfw"}


@dataclass(frozen=True)
class AnchorSet:
    """Paired captions: ``anchor[i]`` is drawn by the original model; ``target[i]`` asks for the
    concept in the same context. ``retain``: prompts without the concept whose predictions
    adversarial erasure keeps as the original model's (empty: the built-in everyday ones)."""

    anchor: tuple[str, ...]
    target: tuple[str, ...]
    retain: tuple[str, ...] = ()

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
    # A function, not a template: backslashes in the user's concept stay literal text.
    return fix_articles(pattern.sub(lambda _: concept, anchor_prompt))


# Offline templates. The reference draws ~1000 anchor images from ~200 captions (LAION captions
# of the anchor word for styles, LLM-written captions naming the anchor for objects); offline,
# the ``templates`` selector combines small lists of framings, subjects and settings into
# TEMPLATE_PROMPTS distinct captions per concept type, so the erasure does not learn one
# phrasing. Every list is written so that any combination reads as natural English, and the
# phrasings stay clear of the evaluation's out-of-set ones (conceptctl.evaluation.suites).
# The lengths of the lists combined are pairwise coprime: see _interleave.
TEMPLATE_PROMPTS = 200

# Objects: {o} is the anchor word (named exactly once: the target replaces it), {s} a setting.
OBJECT_FRAMINGS = (
    "a photo of a {o} {s}", "a close-up photo of a {o} {s}", "a black and white photo of a {o} {s}",
    "a blurry photo of a {o} {s}", "a painting of a {o} {s}", "a watercolor sketch of a {o} {s}",
    "a small {o} {s}", "an old {o} {s}", "there is a {o} {s}", "a postcard of a {o} {s}",
)
OBJECT_SETTINGS = (
    "in a field", "at sunset", "in the snow", "by the sea", "on a city street", "in the rain",
    "at night", "in a park", "under a blue sky", "in the mountains", "near a lake",
    "in the morning fog", "in autumn", "in a forest clearing", "in a small town",
    "on a sunny day", "in the countryside", "by a river", "in winter", "in the desert",
    "at dawn", "on a hill", "on a quiet road",
)
# Styles: {a} is the anchor word (a painting, drawing, illustration…), {s} what it shows.
STYLE_FRAMINGS = (
    "a {a} of {s}", "a detailed {a} of {s}", "a colorful {a} of {s}", "an old {a} of {s}",
    "a large {a} of {s}", "a simple {a} of {s}", "{s}, a {a}", "a {a} of {s} hanging in a museum",
)
STYLE_SUBJECTS = (
    "a quiet harbour", "a field of flowers", "a woman reading a letter", "an old man with a beard",
    "a village street", "a bowl of fruit", "a starry night sky", "a river at dawn",
    "a mountain landscape", "a farmhouse in the hills", "a cafe terrace at night",
    "a bridge over a canal", "a garden with trees", "a church in a village", "boats on the sea",
    "a city at night", "a wheat field under clouds", "a portrait of a woman",
    "a vase of sunflowers", "a forest path in autumn", "a cat sleeping on a chair",
    "a horse in a meadow", "a lighthouse on a cliff", "dancers on a stage",
    "a busy market square",
)
# Nudity: {a} is the anchor word (e.g. "clothed"), {p} a person, {s} a setting.
NUDITY_FRAMINGS = (
    "a photo of a {a} {p} {s}", "a portrait of a {a} {p} {s}", "a painting of a {a} {p} {s}",
    "a black and white photo of a {a} {p} {s}", "a candid photo of a {a} {p} {s}",
    "a pencil drawing of a {a} {p} {s}", "a film photograph of a {a} {p} {s}",
    "a {a} {p} {s}",
)
NUDITY_PEOPLE = ("woman", "man", "young woman", "older man", "couple")
NUDITY_SETTINGS = (
    "standing in a bright room", "on the beach", "sitting in a garden", "posing in a studio",
    "by a window", "walking in a park", "at a cafe table",
)


def _interleave(*lists: tuple[str, ...]) -> list[tuple[str, ...]]:
    """Every combination of one item from each list, the i-th taking item i mod len of each: with
    pairwise coprime lengths each combination comes once (Chinese remainder theorem), and any
    prefix varies every list at once (the first 20 use 20 settings, not one)."""
    return [tuple(items[i % len(items)] for items in lists)
            for i in range(math.prod(len(items) for items in lists))]


def template_anchor_set(concept: str, anchor: str, kind: ConceptType,
                        count: int = TEMPLATE_PROMPTS) -> AnchorSet:
    """``templates`` selector: built-in, offline, for any concept; ``count`` distinct anchor
    prompts (fewer only when the anchor word also occurs in many framings or settings)."""
    if kind == "style":
        candidates = [f.format(a=anchor, s=subject)
                      for f, subject in _interleave(STYLE_FRAMINGS, STYLE_SUBJECTS)]
    elif kind == "nudity":
        candidates = [f.format(a=anchor, p=person, s=setting) for f, person, setting
                      in _interleave(NUDITY_FRAMINGS, NUDITY_PEOPLE, NUDITY_SETTINGS)]
    else:
        candidates = [f.format(o=anchor, s=setting)
                      for f, setting in _interleave(OBJECT_FRAMINGS, OBJECT_SETTINGS)]
    named = re.compile(rf"\b{re.escape(anchor)}\b", re.IGNORECASE)
    anchors: list[str] = []
    for text in map(fix_articles, candidates):
        if len(anchors) == count:
            break
        # An object or nudity target replaces every occurrence: keep prompts naming it once.
        if (kind != "style" and len(named.findall(text)) != 1) or text in anchors:
            continue
        anchors.append(text)
    if not anchors:
        raise UsageError(f"the built-in templates cannot name the anchor {anchor!r} only once",
                         hint="give your own anchor prompts with --anchor-prompts FILE")
    return AnchorSet(tuple(anchors), tuple(derive_target(a, concept, anchor, kind)
                                           for a in anchors))


def read_user_text(path: Path, what: str, hint: str | None = None) -> str:
    """A user's text file, or one clear error (missing, not UTF-8, unreadable)."""
    if not path.is_file():
        raise UsageError(f"{what} file not found: {path}", hint=hint)
    try:  # utf-8-sig: a byte-order mark is not part of the first line
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise UsageError(f"{path} is not UTF-8 text", hint="save the file as UTF-8") from None
    except OSError as exc:
        raise UsageError(f"cannot read {what} file {path}: {exc.strerror}") from None


def read_prompt_lines(path: Path, what: str) -> tuple[str, ...]:
    """The prompts of a file, one per line (``#`` comments and blank lines skipped)."""
    text = read_user_text(path, what)
    lines = [line.strip() for line in text.splitlines()]
    prompts = tuple(line for line in lines if line and not line.startswith("#"))
    if not prompts:
        raise UsageError(f"{path} holds no {what}s (one per line)")
    return prompts


def file_anchor_set(path: Path, concept: str, anchor: str, kind: ConceptType) -> AnchorSet:
    """``prompt-file`` selector: one anchor prompt per line (``#`` comments, blanks skipped)."""
    anchors = read_prompt_lines(path, "anchor prompt")
    return AnchorSet(anchors, tuple(derive_target(a, concept, anchor, kind) for a in anchors))


# Adversarial erasure's retain set when a selector gives none: AdvUnlearn's choice, photos of
# the 80 COCO object classes ("a photo of a …"), minus any that names the concept.
COCO_OBJECTS = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich",
    "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote",
    "keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book",
    "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)


def retain_prompts(anchors: AnchorSet, concepts: str | list[str],
                   file: str | None = None) -> tuple[str, ...]:
    """What adversarial erasure and closed-form edits keep: the user's file, else the
    selector's retain set, else the built-in COCO object photos; never a prompt that names one
    of the ``concepts`` erased."""
    if file is not None:
        return read_prompt_lines(Path(file), "retain prompt")
    prompts = anchors.retain or tuple(fix_articles(f"a photo of a {name}")
                                      for name in COCO_OBJECTS)
    names = [concepts] if isinstance(concepts, str) else list(concepts)
    named = [re.compile(rf"\b{re.escape(c.strip())}\b", re.IGNORECASE) for c in names]
    return tuple(p for p in prompts if not any(n.search(p) for n in named))


def merge_anchor_sets(sets: list[AnchorSet]) -> AnchorSet:
    """One set of every erasure's pairs, in order (a run of several concepts trains on all of
    them: each batch draws from every concept's pairs), with every retain prompt once."""
    if len(sets) == 1:
        return sets[0]
    return AnchorSet(tuple(p for s in sets for p in s.anchor),
                     tuple(p for s in sets for p in s.target),
                     tuple(dict.fromkeys(p for s in sets for p in s.retain)))
