"""Did an erasure work on the toy world? Concept rates and preserved accuracy, before and after.

For an erased toy concept (a style or an object) this draws fixed prompt groups with the
original and the erased model (same seeds) and judges every image:

* ``target`` / ``target_heldout``: prompts naming the concept with training / held-out
  templates; the figure is the share judged as the concept (lower after erasure is better);
* ``anchor`` and one group per other value of the same axis (e.g. Monet, Picasso; or every
  other object): the share judged correctly on that axis, whose ratio after/before is the
  preservation figure.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from conceptctl.errors import UsageError
from conceptctl.toy.judge import Judge
from conceptctl.toy.world import (
    AXES,
    COLOR_WORDS,
    OBJECT_WORDS,
    OBJECTS,
    STYLE_WORDS,
    STYLES,
    Concept,
    all_concepts,
    axis_of,
)

CHECK_SEED = 20_000


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
    return PromptGroup(name, axis, value, _prompts_for(axis, value, held_out), concepts)


def _prompts_for(axis: str, value: str, held_out: bool) -> tuple[str, ...]:
    from conceptctl.toy.world import (
        ARTIST_TEMPLATES,
        HELDOUT_ARTIST_TEMPLATES,
        HELDOUT_PLAIN_TEMPLATES,
        PLAIN_TEMPLATES,
    )

    concepts = [c for c in all_concepts() if getattr(c, axis) == value]
    prompts = []
    for i, c in enumerate(concepts):
        if c.style == "painting":
            templates = HELDOUT_PLAIN_TEMPLATES if held_out else PLAIN_TEMPLATES
        else:
            templates = HELDOUT_ARTIST_TEMPLATES if held_out else ARTIST_TEMPLATES
        artist = STYLE_WORDS[c.style][0] if c.style != "painting" else ""
        prompts.append(_fill(templates[i % len(templates)], c, artist))
    return tuple(prompts)


def _fill(template: str, c: Concept, artist: str) -> str:
    from conceptctl.toy.world import _fix_articles

    text = template.format(color=COLOR_WORDS[c.color][0], object=OBJECT_WORDS[c.object][0],
                           artist=artist)
    return _fix_articles(" ".join(text.split()))


def prompt_groups(concept: str, anchor: str) -> list[PromptGroup]:
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
    for other in AXES[axis]:
        if other not in (target, anchor_value):
            groups.append(_group(f"other:{other}", axis, other, held_out=False))
    return groups


def judge_group(backbone, judge: Judge, group: PromptGroup, seeds: int) -> list[dict]:
    """Per image: the prompted concept and the judged labels."""
    from conceptctl.sampling import SampleSettings, sample_images

    settings = SampleSettings(prompts=group.prompts, images_per_prompt=seeds, seed=CHECK_SEED,
                              batch_size=32)
    pictures = np.stack([np.asarray(i.image.convert("RGB"))
                         for i in sample_images(backbone, settings)])
    verdicts = judge.judge(pictures)
    return [{"asked": group.concepts[k // seeds], "judged": v.labels}
            for k, v in enumerate(verdicts)]


def _rates(rows: list[dict], group: PromptGroup, target_value: str) -> dict:
    return {
        "correct": float(np.mean([r["judged"][group.axis] == group.value for r in rows])),
        "concept": float(np.mean([r["judged"][group.axis] == target_value for r in rows])),
        "images": len(rows),
    }


def _object_accuracy(rows: list[dict]) -> dict[str, float]:
    out = {}
    for value in AXES["object"]:
        mine = [r for r in rows if r["asked"].object == value]
        if mine:
            out[value] = float(np.mean([r["judged"]["object"] == value for r in mine]))
    return out


def erasure_report(original, erased, judge: Judge, concept: str, anchor: str,
                   seeds: int = 2) -> dict:
    """Judge every prompt group with both models; the figures of docs/erase.md.

    ``groups``: per group, the share judged as the group's value ("correct") and as the erased
    concept, before and after, and kept = after/before. ``objects``: for every object except an
    erased one, its judged accuracy over all non-target groups, before and after.
    """
    axis, target = _axis_value(concept)
    groups, before_rows, after_rows = {}, [], []
    for group in prompt_groups(concept, anchor):
        before = judge_group(original, judge, group, seeds)
        after = judge_group(erased, judge, group, seeds)
        b, a = _rates(before, group, target), _rates(after, group, target)
        groups[group.name] = {"before": b, "after": a,
                              "kept": a["correct"] / b["correct"] if b["correct"] else None}
        if not group.name.startswith("target"):
            before_rows += before
            after_rows += after
    objects_before, objects_after = _object_accuracy(before_rows), _object_accuracy(after_rows)
    objects = {o: {"before": objects_before[o], "after": objects_after[o],
                   "kept": objects_after[o] / objects_before[o] if objects_before[o] else None}
               for o in objects_before if not (axis == "object" and o == target)}
    return {"groups": groups, "objects": objects}
