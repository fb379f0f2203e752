"""Anchor and target prompts: the reference's derivation rules, offline selectors, bad input."""

import pytest

from conceptctl.erasure.anchors import (
    derive_target,
    file_anchor_set,
    guess_type,
    template_anchor_set,
)
from conceptctl.errors import UsageError


def test_type_is_guessed_from_concept_and_anchor():
    assert guess_type("Van Gogh", "painting") == "style"
    assert guess_type("nudity", "clothed") == "nudity"
    assert guess_type("church", "house") == "object"


def test_targets_follow_the_reference_rules():
    assert derive_target("a painting of a river", "Van Gogh", "painting", "style") == (
        "a painting of a river, in the style of Van Gogh")
    assert derive_target("A photo of a House.", "airplane", "house", "object") == (
        "A photo of an airplane.")
    assert derive_target("a clothed man", "nude", "clothed", "nudity") == "a nude man"


def test_object_anchor_prompt_must_name_the_anchor():
    with pytest.raises(UsageError, match="does not contain the anchor word 'house'"):
        derive_target("a photo of a barn", "church", "house", "object")


@pytest.mark.parametrize("kind", ["style", "object", "nudity"])
def test_template_selector_pairs_every_prompt(kind):
    anchors = template_anchor_set("church", "house" if kind != "style" else "painting", kind)
    assert len(anchors.anchor) == len(anchors.target) >= 10
    assert len(set(anchors.anchor)) == len(anchors.anchor)
    assert all(a != t for a, t in zip(anchors.anchor, anchors.target, strict=True))


def test_prompt_file_selector(tmp_path):
    path = tmp_path / "anchors.txt"
    path.write_text("# my anchors\na house by a lake\n\nan old house\n")
    anchors = file_anchor_set(path, "church", "house", "object")
    assert anchors.anchor == ("a house by a lake", "an old house")
    assert anchors.target == ("a church by a lake", "an old church")
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n")
    with pytest.raises(UsageError, match="holds no anchor prompts"):
        file_anchor_set(empty, "church", "house", "object")
    with pytest.raises(UsageError, match="not found"):
        file_anchor_set(tmp_path / "missing.txt", "church", "house", "object")
