"""Anchor and target prompts from the toy world's own caption templates.

Erasing a style (Van Gogh -> painting) pairs, for every object and colour, a caption of the
anchor style with a caption of the concept style; erasing an object (church -> house) pairs the
same caption (same template, same style and colour) about the anchor object and about the
concept. Only training templates are used: held-out ones stay unseen for evaluation.
"""

from __future__ import annotations

import random
import warnings

from conceptctl.erasure.anchors import AnchorSet, template_anchor_set
from conceptctl.toy.world import COLORS, OBJECTS, STYLES, Concept, all_concepts, axis_of, caption


class UnknownToyConceptWarning(UserWarning):
    """The concept or anchor is not part of the toy world; generic templates are used."""


def toy_anchor_set(concept: str, anchor: str, kind: str, per_pair: int = 2,
                   seed: int = 0, fallback: dict | None = None,
                   also_erased: tuple[str, ...] = ()) -> AnchorSet:
    """Paired toy captions; ``per_pair`` captions for each (object or style, colour) pair.
    For a concept the toy never learned: the built-in templates (``fallback``: their options).
    ``also_erased``: the run's other concepts and those its --base has forgotten, named by no
    pair and kept out of the retain set."""
    found_concept, found_anchor = axis_of(concept), axis_of(anchor)
    if found_concept is None or found_anchor is None or found_concept[0] != found_anchor[0]:
        missing = concept if found_concept is None else anchor
        warnings.warn(UnknownToyConceptWarning(
            f"the toy model never learned {missing!r} as an object or style matching "
            f"{concept!r} -> {anchor!r}; using generic templates, expect little effect"),
            stacklevel=2)
        return template_anchor_set(concept, anchor, kind, **(fallback or {}))
    axis, target_value = found_concept
    anchor_value = found_anchor[1]
    rng = random.Random(seed)
    anchors, targets = [], []
    erased = [(axis, target_value)] + [found for found in map(axis_of, also_erased) if found]
    # Several concepts in one run, or a stacked run: no pair names another erased concept on the
    # other axis. "a painting of a church" is an anchor image of Van Gogh -> painting, so with
    # church erased too the discriminator would learn churches as the real domain (and church ->
    # house's "a house in the style of Van Gogh" teaches it Van Gogh): each erasure undid the
    # other. On a base without Van Gogh, that pair trains on what the base draws instead.
    other_axis = "object" if axis == "style" else "style"
    others = [o for o in (OBJECTS if axis == "style" else STYLES)
              if (other_axis, o) not in erased]
    for other in others:
        for color in COLORS:
            for _ in range(per_pair):
                state = rng.getstate()
                make = (lambda v, o=other, c=color: Concept(o, v, c)) if axis == "style" else (
                    lambda v, o=other, c=color: Concept(v, o, c))
                anchors.append(caption(make(anchor_value), rng))
                rng.setstate(state)  # same template and synonyms for the paired target
                targets.append(caption(make(target_value), rng))
    # Retain set (adversarial erasure): one caption of every point of the world without the
    # concept, the anchor's included, in the training templates.
    # Several concepts in one run: none of them is retained (by any of its synonyms).
    retain = tuple(caption(c, rng) for c in all_concepts()
                   if all(getattr(c, a) != value for a, value in erased))
    return AnchorSet(tuple(anchors), tuple(targets), retain)
