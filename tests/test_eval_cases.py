"""Prompt files in the common CSV layout and the built-in suites."""

import pytest

from conceptctl.errors import UsageError
from conceptctl.evaluation.cases import read_prompt_csv


def test_reads_the_common_layout_and_keeps_extra_columns(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text('prompt,evaluation_seed,case_number,group,expect_style,artist\n'
                    '"a house, in the style of Monet",7,0,hard-negative,monet,Monet\n'
                    'a church in the style of Van Gogh,3,1,,,Van Gogh\n')
    suite = read_prompt_csv(path, images_per_prompt=2)
    first, second = suite.cases
    assert first.prompt == "a house, in the style of Monet" and first.seed == 7
    assert first.group == "hard-negative" and first.expect == {"style": "monet"}
    assert first.extra == {"artist": "Monet"}
    assert second.group == "target" and second.expect == {} and second.case_number == 1
    assert len(suite.source["sha256"]) == 64 and suite.images_per_prompt == 2


@pytest.mark.parametrize("body, message", [
    ("prompt,case_number\na,1\n", "p.csv:1: missing column(s) evaluation_seed"),
    ("prompt,evaluation_seed,case_number\na,1,0\nb,x,1\n",
     "p.csv:3: evaluation_seed must be a whole number"),
    ("prompt,evaluation_seed,case_number\na,1,0\nb,2\n", "p.csv:3: expected 3 fields"),
    ("prompt,evaluation_seed,case_number\na,1,0,extra\n", "p.csv:2: expected 3 fields"),
    ("prompt,evaluation_seed,case_number\n ,1,0\n", "p.csv:2: empty prompt"),
    ("prompt,evaluation_seed,case_number,group\na,1,0,targets\n", "p.csv:2: unknown group"),
    ("prompt,evaluation_seed,case_number\n", "has a header but no prompts"),
])
def test_malformed_csv_names_the_line(tmp_path, body, message):
    path = tmp_path / "p.csv"
    path.write_text(body)
    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace(")", r"\)")):
        read_prompt_csv(path, 1)


def test_toy_suite_has_every_group_and_expectations():
    from conceptctl.toy.eval_suite import toy_suite

    manifest = {"concept": "Van Gogh", "anchor": "painting",
                "anchors": {"targets": ["a red house in the style of Van Gogh"] * 2}}
    suite = toy_suite(manifest, images_per_prompt=2, seed=5)
    assert suite.groups() == ["target", "target-oos", "anchor", "hard-negative", "general"]
    assert len(suite.group("target")) == 1  # the erase's prompts, once each
    assert all(c.seed == 5 for c in suite.cases)
    assert {c.extra["subgroup"] for c in suite.group("hard-negative")} == {"monet", "picasso"}
    assert all(c.expect["style"] != "van-gogh" for c in suite.group("general"))
    assert all(c.expect["style"] == "van-gogh" for c in suite.group("target-oos"))
