"""The toy world's evaluation suite: every group of :mod:`conceptctl.evaluation.cases`, with what
each prompt asks for on every axis, so the toy judge can grade it.

``target`` holds the erasure's own target prompts (from the artifact); ``target-oos`` asks for
the concept with held-out templates only; ``anchor`` asks for the anchor with the training
templates, ``hard-negative`` for each other value of the erased axis (e.g. Monet and Picasso, or
every other object); ``general`` is a fixed draw of captions over the whole world without the
concept.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from conceptctl.errors import UsageError
from conceptctl.evaluation.cases import Case, Suite
from conceptctl.text import fix_articles, swap_word
from conceptctl.toy.world import (
    AXES,
    COLOR_WORDS,
    HELDOUT_ARTIST_TEMPLATES,
    HELDOUT_PLAIN_TEMPLATES,
    OBJECT_WORDS,
    OBJECTS,
    STYLE_WORDS,
    STYLES,
    Concept,
    all_concepts,
    axis_of,
    caption,
    fixed_caption,
)

GENERAL_PROMPTS = 40


@dataclass(frozen=True)
class PromptGroup:
    name: str
    axis: str  # the axis judged for this group
    value: str  # the value the prompts ask for on that axis
    prompts: tuple[str, ...]
    concepts: tuple[Concept, ...]  # what each prompt asks for on every axis


def _axis_value(word: str) -> tuple[str, str]:
    found = axis_of(word, ("style", "object"))
    if found is None:
        raise UsageError(f"{word!r} is not a style or object of the toy world, so the toy suite "
                         "cannot judge it", hint=f"the toy knows the styles {', '.join(STYLES)} "
                         f"and the objects {', '.join(OBJECTS)}; for another concept evaluate "
                         "with --prompts FILE.csv and a detector that knows it")
    return found


def _group(name: str, axis: str, value: str, held_out: bool) -> PromptGroup:
    concepts = tuple(c for c in all_concepts() if getattr(c, axis) == value)
    prompts = tuple(fixed_caption(c, i, held_out) for i, c in enumerate(concepts))
    return PromptGroup(name, axis, value, prompts, concepts)


def prompt_groups(concept: str, anchor: str, also_erased: tuple[str, ...] = ()
                  ) -> list[PromptGroup]:
    """The toy suite's groups for one erased concept; ``also_erased``: the artifact's other
    concepts, which are no hard negatives (the model was meant to forget them too)."""
    axis, target = _axis_value(concept)
    anchor_axis, anchor_value = _axis_value(anchor)
    if anchor_axis != axis:
        raise UsageError(f"{concept!r} is a toy {axis} but {anchor!r} is a toy {anchor_axis}",
                         hint="erase a style into a style, or an object into an object")
    groups = [
        _group("target", axis, target, held_out=False),
        _group("target_heldout", axis, target, held_out=True),
        _group("anchor", axis, anchor_value, held_out=False),
    ]
    gone = {value for found_axis, value in map(_axis_value, also_erased) if found_axis == axis}
    for other in AXES[axis]:
        if other not in (target, anchor_value) and other not in gone:
            groups.append(_group(f"other:{other}", axis, other, held_out=False))
    return groups


def _expect(concept) -> dict:
    return {axis: getattr(concept, axis) for axis in AXES}


def toy_suite(manifest: dict, images_per_prompt: int, seed: int) -> Suite:
    also = tuple(c for c in manifest.get("erased_concepts", ()) if c != manifest["concept"])
    groups = prompt_groups(manifest["concept"], manifest["anchor"], also)
    target, held_out, anchor, others = groups[0], groups[1], groups[2], groups[3:]
    erased = list(map(_axis_value, (manifest["concept"], *also)))
    axis, value = target.axis, target.value
    cases: list[Case] = []

    def add(prompt: str, group: str, expect: dict, **extra) -> None:
        cases.append(Case(prompt, seed, len(cases), group, expect, extra))

    # The erase's own target prompts, once each; the judge checks the erased axis only.
    for prompt in dict.fromkeys(manifest["anchors"]["targets"]):
        add(prompt, "target", {axis: value})
    for prompt, concept in zip(held_out.prompts, held_out.concepts, strict=True):
        add(prompt, "target-oos", _expect(concept))
    def kept(concept) -> bool:  # names no concept the model forgot, on any axis
        return all(getattr(concept, a) != v for a, v in erased)

    # What must be kept leaves out the points of the world that name another erased concept on
    # another axis ("a painting of a church" once church is erased too): every axis is judged.
    for prompt, concept in zip(anchor.prompts, anchor.concepts, strict=True):
        if kept(concept):
            add(prompt, "anchor", _expect(concept))
    for group in others:
        for prompt, concept in zip(group.prompts, group.concepts, strict=True):
            if kept(concept):
                add(prompt, "hard-negative", _expect(concept), subgroup=group.value)
    rng = random.Random(seed)
    # Everyday captions of the world without any concept the model forgot.
    pool = [c for c in all_concepts() if kept(c)]
    for concept in rng.sample(pool, GENERAL_PROMPTS):
        add(caption(concept, rng), "general", _expect(concept))
    return Suite(name="toy", cases=tuple(cases), images_per_prompt=images_per_prompt,
                 source={"suite": "toy", "concept": manifest["concept"],
                         "anchor": manifest["anchor"], "axis": axis}, rephrase=rephrase)


def rephrase(prompt: str, concept: str) -> list[str]:
    """The toy vocabulary's rewordings of ``prompt``: every synonym of ``concept`` in place of
    the one used, and the same object, colour and style in every held-out template with every
    synonym (phrasings neither the toy model nor the erasure trained on)."""
    return swap_word(prompt, _synonyms(concept)) + _held_out_rephrasings(prompt)


def _synonyms(concept: str) -> list[str]:
    found = axis_of(concept, ("style", "object", "color"))
    if found is None:
        return []
    words = {"style": STYLE_WORDS, "object": OBJECT_WORDS, "color": COLOR_WORDS}[found[0]]
    return list(dict.fromkeys([*words[found[1]], *(w.lower() for w in words[found[1]])]))


def _held_out_rephrasings(prompt: str) -> list[str]:
    lower = prompt.lower()

    def find(table):
        hits = [(len(w), v) for v, ws in table.items() for w in ws if w.lower() in lower]
        return max(hits)[1] if hits else None

    obj, color, style = find(OBJECT_WORDS), find(COLOR_WORDS), find(STYLE_WORDS)
    if obj is None or color is None:
        return []
    templates = HELDOUT_ARTIST_TEMPLATES if style else HELDOUT_PLAIN_TEMPLATES
    return [fix_articles(" ".join(template.format(color=color_word, object=obj_word,
                                                  artist=artist).split()))
            for template in templates
            for artist in (STYLE_WORDS[style] if style else ("",))
            for color_word in COLOR_WORDS[color]
            for obj_word in OBJECT_WORDS[obj]]
