"""The toy world's renderer and captions: deterministic, distinct, and phrased many ways."""

import random
import re

import numpy as np
import pytest

from conceptctl.errors import UsageError
from conceptctl.toy.render import SIZE, render
from conceptctl.toy.world import (
    AXES,
    HELDOUT_ARTIST_TEMPLATES,
    HELDOUT_PLAIN_TEMPLATES,
    Concept,
    all_concepts,
    caption,
    normalise,
    prompt_set,
)


def test_render_is_deterministic_and_seed_dependent():
    concept = Concept("church", "van-gogh", "red")
    first = np.asarray(render(concept, 3))
    assert first.shape == (SIZE, SIZE, 3) and first.dtype == np.uint8
    assert np.array_equal(first, np.asarray(render(concept, 3)))
    assert not np.array_equal(first, np.asarray(render(concept, 4)))


def test_every_axis_value_changes_the_picture():
    base = Concept("house", "painting", "blue")
    reference = np.asarray(render(base, 0)).astype(int)
    for axis, values in AXES.items():
        for value in values:
            other = Concept(**{**base.__dict__, axis: value})
            if other == base:
                continue
            diff = np.abs(np.asarray(render(other, 0)).astype(int) - reference).mean()
            assert diff > 2, f"{axis}={value} looks like {base}"


def test_the_object_keeps_its_hue_in_every_style():
    """Colour is its own axis: the object's dominant saturated hue survives each style."""
    import colorsys

    expected = {"red": 0.0, "yellow": 0.14, "green": 0.33, "blue": 0.61, "purple": 0.79}
    for style in AXES["style"]:
        for color, hue in expected.items():
            pixels = np.asarray(render(Concept("boat", style, color), 1)).reshape(-1, 3) / 255
            hsv = np.array([colorsys.rgb_to_hsv(*p) for p in pixels[::3]])
            vivid = hsv[(hsv[:, 1] > 0.45) & (hsv[:, 2] > 0.35)]
            distance = np.minimum(np.abs(vivid[:, 0] - hue), 1 - np.abs(vivid[:, 0] - hue))
            assert (distance < 0.06).sum() > 15, f"{color} boat lost its hue in {style}"


def test_synonyms_normalise():
    assert normalise("style", "Vincent van Gogh") == "van-gogh"
    assert normalise("style", "van gogh") == "van-gogh"
    assert normalise("object", "Plane") == "airplane"
    assert normalise("color", "violet") == "purple"
    with pytest.raises(ValueError, match="unknown object 'castle'"):
        normalise("object", "castle")


def test_captions_name_every_axis_and_hold_out_templates():
    rng = random.Random(0)
    concept = Concept("parachute", "monet", "yellow")
    seen = {caption(concept, rng) for _ in range(200)}
    assert len(seen) > 30
    assert all("monet" in c.lower() for c in seen)
    held = {caption(concept, rng, held_out=True) for _ in range(50)}
    assert not held & seen
    no_colour = caption(concept, rng, with_color=False)
    assert "yellow" not in no_colour and "golden" not in no_colour


def test_fixed_prompt_sets_cover_every_concept_and_template():
    train, held = prompt_set(), prompt_set(held_out=True)
    assert [c for c, _ in train] == all_concepts() == [c for c, _ in held]
    for template in HELDOUT_ARTIST_TEMPLATES + HELDOUT_PLAIN_TEMPLATES:
        pattern = re.sub(r"\\{\w+\\}", ".+", re.escape(template)).replace("\\ a\\ ", "\\ an?\\ ")
        assert any(re.fullmatch(pattern, p) for _, p in held), template
    assert ("an oil painting showing a red house" in {p for _, p in held})
    assert "a painting of a red house" in {p for _, p in train}


def test_toy_suite_prompt_groups():
    from conceptctl.toy.eval_suite import prompt_groups

    style = {g.name: g for g in prompt_groups("Vincent van Gogh", "painting")}
    assert list(style) == ["target", "target_heldout", "anchor", "other:monet", "other:picasso"]
    assert all(len(g.prompts) == len(g.concepts) == 30 for g in style.values())
    assert all("Van Gogh" in p for p in style["target"].prompts)
    assert not set(style["target"].prompts) & set(style["target_heldout"].prompts)
    assert all(c.style == "monet" for c in style["other:monet"].concepts)
    objects = [g.name for g in prompt_groups("chapel", "house")]
    assert objects == ["target", "target_heldout", "anchor", "other:airplane",
                       "other:parachute", "other:tree", "other:boat"]
    with pytest.raises(UsageError, match="is a toy style but 'house' is a toy object"):
        prompt_groups("Monet", "house")
