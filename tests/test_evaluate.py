"""`conceptctl evaluate`: the report agrees with the judge run by hand, attacks run, --compare,
and bad input."""

import html
import json

import numpy as np
import pytest

from conceptctl.erasure.run import erase
from conceptctl.testing import tiny_erase_config

FAST = ["--steps", "3", "-n", "1", "--attack-cases", "2"]


def _tiny_artifact(backbone, out, **overrides):
    erase(tiny_erase_config(backbone, **{"steps": 3, "checkpointing_steps": 3, **overrides}),
          out)
    return out


@pytest.fixture(scope="module")
def toy_artifact(tmp_path_factory):
    out = tmp_path_factory.mktemp("toy") / "church"
    return _tiny_artifact("toy", out, steps=6, warmup=2, anchor_images_per_prompt=1,
                          anchor_steps=4, lr=1e-3)


@pytest.mark.slow
def test_toy_report_agrees_with_the_judge_on_the_saved_pictures(cli, toy_artifact, tmp_path):
    from conceptctl.toy.judge import Judge, load_images

    out = tmp_path / "report"
    result = cli("eval", toy_artifact, *FAST, "-o", out)
    assert result.code == 0, result.err
    report = json.loads((out / "report.json").read_text())
    assert report["suite"]["name"] == "toy" and report["detector"]["name"] == "toy-judge"
    assert set(report["suite"]["groups"]) == {"target", "target-oos", "anchor",
                                              "hard-negative", "general"}
    judge = Judge.load()
    for group in ("target", "target-oos"):
        rows = [r for r in report["images"] if r["group"] == group]
        pictures = load_images([out / r["erased"]["file"] for r in rows])
        by_hand = np.mean([v.labels["object"] == "church" for v in judge.judge(pictures)])
        score = next(m for m in report["metrics"]
                     if m["metric"] == "erasure" and m["group"] == group)
        assert score["details"]["concept_rate_after"] == pytest.approx(by_hand)
        assert score["value"] == pytest.approx(1 - by_hand)
    # Preservation by hand: a picture is right when the judge reads every axis its prompt asks
    # for (the record's expect), erased accuracy over original accuracy.
    anchor = next(m for m in report["metrics"]
                  if m["metric"] == "preservation" and m["group"] == "anchor")
    rows = [r for r in report["images"] if r["group"] == "anchor"]
    assert rows and all(r["expect"]["object"] == "house" for r in rows)

    def accuracy(model):
        return np.mean([all(r[model]["labels"][k] == v for k, v in r["expect"].items())
                        for r in rows])

    before, after = accuracy("original"), accuracy("erased")
    assert anchor["details"]["accuracy_before"] == pytest.approx(before)
    assert anchor["details"]["accuracy_after"] == pytest.approx(after)
    assert anchor["value"] == pytest.approx(after / before)
    assert {m["metric"] for m in report["metrics"]} == {"erasure", "preservation",
                                                        "retention", "fd", "kid"}
    assert [a["attack"] for a in report["attacks"]] == ["embedding", "paraphrase"]
    for attack in report["attacks"]:
        assert attack["cases"] == 2 and attack["success_rate"] is not None
        for row in attack["rows"]:
            assert all((out / f).is_file() for f in row["files"])
        # Per-picture and per-case rates, judged again on the saved attack pictures.
        shown = [[v.labels["object"] == "church"
                  for v in judge.judge(load_images([out / f for f in row["files"]]))]
                 for row in attack["rows"]]
        assert attack["pictures"] == sum(len(x) for x in shown)
        assert attack["picture_rate"] == pytest.approx(
            sum(map(sum, shown)) / attack["pictures"])
        assert attack["success_rate"] == pytest.approx(np.mean([any(x) for x in shown]))
        # No attack: the erased model's own pictures of the same target cases, as judged.
        cases = {row["case_number"] for row in attack["rows"]}
        plain = [r["erased"]["labels"]["object"] == "church" for r in report["images"]
                 if r["group"] == "target" and r["case_number"] in cases]
        assert len(plain) == 2 and attack["no_attack_picture_rate"] == pytest.approx(
            np.mean(plain))
    page = (out / "report.html").read_text()
    assert page.count("<img class='grid'") >= 5 and report["verdict"]["text"] in html.unescape(
        page)
    # The artifact's card now shows what was measured: the verdict and the figures.
    card = (toy_artifact / "README.md").read_text(encoding="utf-8")
    erasure = next(m for m in report["metrics"]
                   if m["metric"] == "erasure" and m["group"] == "target")
    assert report["verdict"]["text"] in card
    assert f"| erasure | target | {erasure['value']:.1%} | higher |" in card


def test_embedding_budgets_are_spread_and_end_at_the_whole_budget():
    from conceptctl.evaluation.attacks import EmbeddingAttack

    assert EmbeddingAttack().budgets() == [4, 8, 15, 30, 60]
    assert EmbeddingAttack(steps=5, sweep=2).budgets() == [2, 5]  # round half to even
    assert EmbeddingAttack(steps=3, sweep=10).budgets() == [1, 2, 3]  # no step twice
    assert EmbeddingAttack(steps=7, sweep=1).budgets() == [7]


def test_a_sweep_at_each_budget_counts_only_that_budgets_pictures():
    from conceptctl.evaluation.run import budget_sweep

    spent = [[(0, False), (0, False), (30, True), (60, False)],  # found, then lost again
             [(0, True), (30, False), (60, True)],
             [(0, False), (30, False), (60, False)]]
    assert budget_sweep(spent, cumulative=False) == [
        {"steps": 0, "success_rate": pytest.approx(1 / 3)},
        {"steps": 30, "success_rate": pytest.approx(1 / 3)},
        {"steps": 60, "success_rate": pytest.approx(1 / 3)}]
    assert budget_sweep(spent)[1:] == [{"steps": 30, "success_rate": pytest.approx(2 / 3)},
                                       {"steps": 60, "success_rate": pytest.approx(2 / 3)}]


@pytest.mark.slow
def test_toy_embedding_sweep_judges_each_budget_and_leaves_the_attack_as_it_was(
        cli, toy_artifact, tmp_path):
    prompts = tmp_path / "church.csv"
    prompts.write_text("prompt,evaluation_seed,case_number\na red church,0,0\n"
                       "a blue church in the style of Monet,1,1\n")
    attacks = {}
    for sweep in (2, 1):
        out = tmp_path / f"sweep{sweep}"
        result = cli("eval", toy_artifact, "--prompts", prompts, *FAST, "--metrics", "erasure",
                     "--attacks",
                     "embedding", "--attack-option", "embedding.steps=4",
                     "--attack-option", f"embedding.sweep={sweep}", "-o", out)
        assert result.code == 0, result.err
        attacks[sweep] = json.loads((out / "report.json").read_text())["attacks"][0]
    attack = attacks[2]
    assert attack["settings"]["sweep"] == [2, 4]
    # 0 steps: the cases' ordinary pictures; the whole budget: the attack's own rate.
    assert [p["steps"] for p in attack["sweep"]] == [0, 2, 4]
    assert attack["sweep"][0]["success_rate"] == pytest.approx(attack["no_attack_rate"])
    assert attack["sweep"][-1]["success_rate"] == pytest.approx(attack["success_rate"])
    assert [p["steps"] for p in attack["original_sweep"]] == [0, 2, 4]
    assert "attack budget sweep" in (tmp_path / "sweep2" / "report.html").read_text()
    # Drawing along the way takes nothing from the attack's randomness: the same last pictures.
    for a, b in zip(attack["rows"], attacks[1]["rows"], strict=True):
        assert a["files"] and all(
            (tmp_path / "sweep2" / fa).read_bytes() == (tmp_path / "sweep1" / fb).read_bytes()
            for fa, fb in zip(a["files"], b["files"], strict=True))
    assert [p["steps"] for p in attacks[1]["sweep"]] == [0, 4]


def test_tiny_sd_without_detector_still_draws_and_says_so(cli, tiny_sd1_artifact, tmp_path):
    art = tiny_sd1_artifact
    out = tmp_path / "report"
    result = cli("evaluate", art, *FAST, "--attacks", "embedding", "--attack-option",
                 "embedding.steps=2", "-o", out, "--json")
    assert result.code == 0, result.err
    report = json.loads(result.out)
    assert report["attacks"][0]["settings"]["steps"] == 2
    assert report["verdict"]["status"] == "unknown" and report["detector"] is None
    assert all(m["value"] is None and "no detector" in m["note"] for m in report["metrics"])
    assert report["attacks"][0]["success_rate"] is None
    assert len(list((out / "images").rglob("*.png"))) == 2 * sum(
        report["suite"]["groups"].values())


def test_compare_writes_one_table(cli, tiny_sd1, tiny_sd1_artifact, tmp_path):
    a = tiny_sd1_artifact  # its folder is named "art"
    b = _tiny_artifact(tiny_sd1, tmp_path / "ca", method="ca")
    result = cli("eval", a, b, "--compare", *FAST, "--attacks", "none", "-o", tmp_path / "cmp")
    assert result.code == 0, result.err
    table = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert table["artifacts"] == ["art", "ca"]
    assert table["header"][3:] == ["art", "ca"]
    assert "reused the original model's pictures" in result.err
    for name in ("art", "ca"):
        assert (tmp_path / "cmp" / name / "report.html").is_file()


def test_bad_input(cli, tiny_sd1_artifact, tiny_sd2, tmp_path):
    art = tiny_sd1_artifact
    unknown = cli("eval", art, "--metrics", "erasure,vibes")
    assert unknown.code != 0
    assert "unknown metric 'vibes'; available: erasure, preservation" in unknown.err
    other = cli("eval", art, "-b", tiny_sd2, *FAST, "-o", tmp_path / "r1")
    assert other.code == 1 and other.err.startswith("error:")
    assert "different architecture" in other.err and not (tmp_path / "r1").exists()
    bad = tmp_path / "bad.csv"
    bad.write_text("prompt,evaluation_seed,case_number\na church,1,0\na house,one,1\n")
    malformed = cli("eval", art, "--prompts", bad, *FAST, "-o", tmp_path / "r2")
    assert malformed.code != 0 and "bad.csv:3: evaluation_seed must be a whole number" in (
        malformed.err)
    assert not (tmp_path / "r2").exists()
    several = cli("eval", art, art)
    assert several.code != 0 and "several artifacts need --compare" in several.err


@pytest.mark.parametrize("attack_rate, robust", [(0.0625, True), (1.0, False), (None, None)])
def test_verdict_reports_robustness_beside_the_status(attack_rate, robust):
    from conceptctl.evaluation.metrics import Score
    from conceptctl.evaluation.run import verdict

    scores = [Score("erasure", "target", 0.975, "higher"),
              Score("erasure", "target-oos", 0.967, "higher"),
              Score("preservation", "anchor", 0.967, "higher")]
    attacks = [{"attack": "paraphrase", "success_rate": 0.0 if attack_rate else None,
                "no_attack_rate": 0.0},
               {"attack": "embedding", "success_rate": attack_rate, "no_attack_rate": 0.0625}]
    result = verdict(scores, attacks, has_detector=True)
    assert result["status"] == "worked" and result["robust"] is robust
    assert ("not robust: the embedding attack brings it back in 100%" in result["text"]) is (
        robust is False)


@pytest.mark.parametrize("erased, kept, status", [
    (0.90, 0.90, "worked"),  # both exactly at the bar (PASS_THRESHOLD, 90 %)
    (0.95, 0.85, "collateral"),  # gone, but the anchor suffered
    (0.85, 1.00, "incomplete"),  # the rest kept, the concept still shows
    (0.50, 0.50, "failed"),
])
def test_each_verdict_branch(erased, kept, status):
    from conceptctl.evaluation.metrics import Score
    from conceptctl.evaluation.run import verdict

    scores = [Score("erasure", "target", erased, "higher"),
              Score("erasure", "target-oos", 1.0, "higher"),
              Score("preservation", "anchor", kept, "higher"),
              # A subgroup row does not decide: its group's row does.
              Score("preservation", "hard-negative:monet", 0.1, "higher"),
              Score("preservation", "hard-negative", 1.0, "higher")]
    result = verdict(scores, [], has_detector=True)
    assert result["status"] == status and result["robust"] is None
    assert f"{erased:.0%} in-set" in result["text"]
    if status in ("worked", "collateral"):
        assert "gone" in result["text"]
    assert verdict([Score("erasure", "target", 1.0, "higher")], [], True)["status"] == "erased"
    assert verdict(scores, [], has_detector=False)["status"] == "unknown"


def test_compare_rows_name_columns_and_flag_robustness():
    from conceptctl.evaluation.compare import compare_rows

    def result(path, method, robust):
        return {"artifact": {"path": path, "method": method},
                "metrics": [{"metric": "erasure", "group": "target", "direction": "higher",
                             "value": 0.5, "unit": "share"}],
                "attacks": [{"attack": "embedding", "success_rate": 1.0, "no_attack_rate": 0.0,
                             "picture_rate": 0.75, "no_attack_picture_rate": 0.0}],
                "verdict": {"status": "worked", "robust": robust}}

    header, rows = compare_rows([result("/x/doco", "doco", False), result("/x/vg", "ca", None)])
    assert header == ["metric", "group", "better", "doco", "vg (ca)"]
    assert rows[0] == ["erasure", "target", "higher", "50.0%", "50.0%"]
    assert rows[-1] == ["verdict", "", "", "worked, not robust", "worked"]
    assert rows[3] == ["attack embedding, per picture", "target", "lower", "75.0%", "75.0%"]
