"""The toy world's evaluation suite: every group of :mod:`conceptctl.evaluation.cases`, with what
each prompt asks for on every axis, so the toy judge can grade it.

``target`` holds the erasure's own target prompts (from the artifact); ``target-oos`` asks for
the concept with held-out templates only; ``anchor`` and ``hard-negative`` (the other values of
the erased axis) are the prompt groups of :mod:`conceptctl.toy.erasure_check`; ``general`` is a
fixed draw of captions over the whole world without the concept.
"""

from __future__ import annotations

import random

from conceptctl.evaluation.cases import Case, Suite
from conceptctl.toy.erasure_check import prompt_groups
from conceptctl.toy.world import AXES, all_concepts, caption

GENERAL_PROMPTS = 40


def _expect(concept) -> dict:
    return {axis: getattr(concept, axis) for axis in AXES}


def toy_suite(manifest: dict, images_per_prompt: int, seed: int) -> Suite:
    groups = prompt_groups(manifest["concept"], manifest["anchor"])
    target, held_out, anchor, others = groups[0], groups[1], groups[2], groups[3:]
    axis, value = target.axis, target.value
    cases: list[Case] = []

    def add(prompt: str, group: str, expect: dict, **extra) -> None:
        cases.append(Case(prompt, seed, len(cases), group, expect, extra))

    # The erase's own target prompts, once each; the judge checks the erased axis only.
    for prompt in dict.fromkeys(manifest["anchors"]["targets"]):
        add(prompt, "target", {axis: value})
    for prompt, concept in zip(held_out.prompts, held_out.concepts, strict=True):
        add(prompt, "target-oos", _expect(concept))
    for prompt, concept in zip(anchor.prompts, anchor.concepts, strict=True):
        add(prompt, "anchor", _expect(concept))
    for group in others:
        for prompt, concept in zip(group.prompts, group.concepts, strict=True):
            add(prompt, "hard-negative", _expect(concept), subgroup=group.value)
    rng = random.Random(seed)
    pool = [c for c in all_concepts() if getattr(c, axis) != value]
    for concept in rng.sample(pool, GENERAL_PROMPTS):
        add(caption(concept, rng), "general", _expect(concept))
    return Suite(name="toy", cases=tuple(cases), images_per_prompt=images_per_prompt,
                 source={"suite": "toy", "concept": manifest["concept"],
                         "anchor": manifest["anchor"], "axis": axis})
