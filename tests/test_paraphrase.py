"""The paraphrase attack's rewordings: generic spellings, the toy vocabulary through the suite."""

import json

from conceptctl.evaluation.attacks import paraphrases
from conceptctl.text import fix_articles, swap_word
from conceptctl.toy.eval_suite import rephrase, toy_suite


def test_swap_word_replaces_the_longest_word_found_in_any_case():
    assert swap_word("A photo of VAN GOGH's garden", ["Gogh", "van Gogh", "Vincent"]) == [
        "A photo of Gogh's garden", "A photo of van Gogh's garden", "A photo of Vincent's garden"]
    assert swap_word("a photo of a house", ["church", "chapel"]) == []
    # User text is never a pattern: neither a group reference nor a wildcard.
    assert swap_word(r"a c\1 and a c.", [r"c\1", "x"]) == [r"a c\1 and a c.", "a x and a c."]


def test_fix_articles_after_a_swap():
    assert fix_articles("a airplane and an church") == "an airplane and a church"
    assert fix_articles("An tree beside A owl") == "A tree beside An owl"


def test_without_a_suite_vocabulary_only_the_concepts_spellings_are_tried():
    assert paraphrases("a photo of a Church", "church") == [
        "a photo of a church", "a photo of a Church"]
    assert paraphrases("a photo of a house", "church") == []  # the concept is not in it


def test_the_toy_vocabulary_gives_synonyms_and_every_held_out_template():
    out = rephrase("a photo of a red church", "church")
    assert "a photo of a red chapel" in out
    # Same object and colour, in each held-out template, with every synonym of both.
    assert "an oil painting showing a scarlet chapel" in out
    assert "artwork depicting a crimson church" in out
    assert len(out) == 2 + 2 * 3 * 2  # 2 synonyms + 2 templates x 3 colour words x 2 objects
    style = rephrase("a church in the style of Van Gogh", "Van Gogh")
    assert "a church in the style of Vincent van Gogh" in style


def test_the_toy_suite_hands_its_vocabulary_to_the_attack(tmp_path):
    manifest = {"concept": "church", "anchor": "house",
                "anchors": {"targets": ["a photo of a red church"]}}
    suite = toy_suite(json.loads(json.dumps(manifest)), 1, 0)
    assert suite.rephrase is rephrase
    prompt = suite.group("target")[0].prompt
    assert set(paraphrases(prompt, "church", suite.rephrase)) == set(rephrase(prompt, "church"))
