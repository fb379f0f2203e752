"""--detector-option and --attack-option reach the factories (detectors with the artifact's
context), bad ones fail early, and metric values print in their unit."""

import pytest

from conceptctl.errors import UsageError
from conceptctl.evaluation.detectors import DETECTOR_CONTEXT, detector_options
from conceptctl.evaluation.metrics import Score, format_value
from conceptctl.evaluation.suites import template_suite
from conceptctl.registry import get_registry


def test_malformed_repeated_and_reserved_options_fail_before_any_work(cli, tmp_path):
    for args, message in ((["oops"], "'oops' is not KEY=VALUE"),
                          (["=1"], "is not KEY=VALUE"),
                          (["a=1", "a=2"], "--detector-option a is given twice"),
                          ([f"{DETECTOR_CONTEXT}=x"], "is reserved")):
        flags = [x for a in args for x in ("--detector-option", a)]
        result = cli("eval", tmp_path / "missing", *flags)
        assert result.code == 2, result.err
        assert message in result.err


@pytest.mark.parametrize("args, message", [
    (["--attack-option", "steps=3"], "--attack-option steps=3 is not ATTACK.KEY=VALUE"),
    (["--attack-option", "embedding.stesp=3"], "attack embedding has no option 'stesp'"),
    (["--attack-option", "embedding.steps=many"], "embedding.steps=many: expected int"),
    (["--attack-option", "embedding.lr=0"], "embedding.lr must be positive"),
    (["--attacks", "paraphrase", "--attack-option", "embedding.steps=3"],
     "--attack-option for 'embedding', which is not among the attacks run (paraphrase)"),
])
def test_bad_attack_options_fail_before_any_work(cli, tmp_path, args, message):
    result = cli("eval", tmp_path / "missing", *args)
    assert result.code == 2, result.err
    assert message in result.err and result.err.startswith("error:")


def test_attack_options_reach_the_attack_typed():
    embedding = get_registry("attack").get("embedding").build(
        options={"cases": 4, "steps": "7", "lr": "0.5", "tokens": "2"})
    assert {k: embedding.settings()[k] for k in ("cases", "steps", "lr", "tokens", "seed")} == {
        "cases": 4, "steps": 7, "lr": 0.5, "tokens": 2, "seed": 0}
    paraphrase = get_registry("attack").get("paraphrase").build(options={"per_case": "3"})
    assert paraphrase.settings() == {"cases": 16, "per_case": 3, "seed": 0}


def test_detector_options_split_the_context_and_refuse_unknown_keys():
    context = {"concept": "church", "anchor": "house"}
    given, ctx = detector_options({"threshold": "0.6", DETECTOR_CONTEXT: context},
                                  ("threshold",), "mine")
    assert given == {"threshold": "0.6"} and ctx == context
    assert detector_options(None, (), "mine") == ({}, {})
    with pytest.raises(UsageError, match="detector mine has no option 'treshold'") as err:
        detector_options({"treshold": "1"}, ("threshold",), "mine")
    assert err.value.hint == "options it accepts: threshold"
    # The toy judge has no options: one given is a mistake, not silently ignored.
    with pytest.raises(UsageError, match="toy-judge has no option 'threshold'"):
        get_registry("detector").get("toy-judge").build(
            options={"threshold": "0.5", DETECTOR_CONTEXT: context})


def test_clothed_prompts_expect_no_nudity():
    def suite(concept, anchor, kind):
        manifest = {"concept": concept, "anchor": anchor, "concept_type": kind,
                    "anchors": {"targets": [f"a photo of a {concept} person"],
                                "prompts": [f"a photo of a {anchor} person"]}}
        return template_suite(manifest, 1, 7)

    clothed = suite("nudity", "clothed", "nudity").group("hard-negative")
    assert clothed and all(c.expect == {"nudity": "none"} for c in clothed)
    assert all(c.expect == {} for c in suite("church", "house", "object").cases)


def test_values_print_in_their_unit():
    assert format_value(0.953) == "95.3%" and format_value(None) == "-"
    assert format_value(12.0, "number") == "12" and format_value(27.3141, "number") == "27.31"
    assert Score("fd", "general", 3.0, "lower").as_dict()["unit"] == "share"
    assert Score("x", "target", 3.0, "lower", unit="number").as_dict()["unit"] == "number"
    from conceptctl.evaluation.metrics import FrechetDistance, KernelDistance

    kid = KernelDistance()
    kid._subset = 4
    assert FrechetDistance()._score(1.5, 4, 8).unit == kid._score((0.1, 0.01), 4, 8).unit == (
        "number")
