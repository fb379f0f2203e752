"""Anchor and target prompts: the reference's derivation rules, offline selectors, bad input."""

import json
import re
from collections import Counter

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


@pytest.mark.parametrize(("kind", "concept", "anchor"), [
    ("style", "Van Gogh", "painting"), ("object", "church", "house"),
    ("object", "church", "airplane"), ("nudity", "nude", "clothed"),
])
def test_templates_give_200_varied_prompts_naming_the_anchor(kind, concept, anchor):
    """As the reference's ~200 captions per concept: 200 distinct prompts, each naming the anchor
    (objects and nudity: exactly once, since the target replaces it), in many phrasings."""
    anchors = template_anchor_set(concept, anchor, kind)
    assert len(set(anchors.anchor)) == len(anchors.anchor) == 200
    assert len(set(anchors.target)) == 200
    word = re.compile(rf"\b{anchor}\b")
    counts = [len(word.findall(a)) for a in anchors.anchor]
    assert all(c == 1 for c in counts) if kind != "style" else all(c >= 1 for c in counts)
    if kind == "style":
        assert all(t == f"{a}, in the style of {concept}"
                   for a, t in zip(anchors.anchor, anchors.target, strict=True))
    else:
        assert all(concept in t and not word.search(t) for t in anchors.target)
        assert not any(re.search(r"\ba [aeiou]", a) for a in anchors.anchor)  # "an airplane"
    # Varied phrasings: many different openings and endings, no single one dominating.
    starts = Counter(" ".join(a.split()[:3]) for a in anchors.anchor)
    ends = Counter(" ".join(a.split()[-2:]) for a in anchors.anchor)
    assert len(starts) >= 8 and len(ends) >= 5
    assert max(starts.values()) <= 50


def test_a_shorter_template_set_still_varies_every_part():
    anchors = template_anchor_set("church", "house", "object", count=20)
    assert len(set(anchors.anchor)) == 20
    assert len({a.split(" house ")[1] for a in anchors.anchor}) == 20  # 20 settings
    assert len({a.split(" house ")[0] for a in anchors.anchor}) == 10  # all 10 framings


def test_templates_skip_prompts_naming_an_object_anchor_twice():
    anchors = template_anchor_set("church", "sea", "object")  # a setting says "by the sea"
    assert len(anchors.anchor) == 200
    assert all(len(re.findall(r"\bsea\b", a)) == 1 for a in anchors.anchor)


def test_erasure_draws_anchor_images_with_dpm_solver_from_distinct_noise(tiny_sd1, tmp_path):
    """The run's anchor settings: DPM-Solver (the tiny SD1's own sampler is PNDM), steps and
    guidance from the config, and every image of the set seeded differently."""
    from safetensors import safe_open

    from conceptctl.erasure.run import erase
    from conceptctl.testing import tiny_erase_config

    prompts = tmp_path / "anchors.txt"
    prompts.write_text("a house\na photo of a house\nan old house\na house at night\n")
    cfg = tiny_erase_config(tiny_sd1, anchor_selector="prompt-file", anchor_prompts=str(prompts),
                            anchor_images_per_prompt=3, seed=11, steps=2)
    erase(cfg, tmp_path / "out")
    manifest = json.loads((tmp_path / "out" / "conceptctl.json").read_text())
    sampler = manifest["anchors"]["sampler"]
    assert sampler["sampler"] == "dpm-solver"
    assert (sampler["steps"], sampler["guidance"]) == (cfg.anchor_steps, cfg.anchor_guidance)
    assert sampler["prompt_seeds"] == [11, 14, 17, 20]  # image (p, k): seed + 3p + k
    [cache] = (tmp_path / "conceptctl-home").rglob("anchors/*.safetensors")
    with safe_open(str(cache), "pt") as f:
        assert json.loads(f.metadata()["conceptctl"])["settings"]["sampler"] == "dpm-solver"
        latents = f.get_tensor("latents").flatten(1)
    assert len(latents) == 12
    assert all((latents[i] - latents[j]).abs().max() > 1e-3
               for i in range(len(latents)) for j in range(i))


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
