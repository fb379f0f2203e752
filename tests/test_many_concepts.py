"""Several concepts in one run: `conceptctl erase A B --anchor X`, `--concepts FILE`, what the
artifact records, anchor images drawn (and cached) per erasure, and the refusals."""

from __future__ import annotations

import json
import re

import pytest

from conceptctl.erasure.config import Erasure


def test_concept_file_lines_header_comments_and_types(tmp_path):
    from conceptctl.erasure.concept_file import read_concept_file

    file = tmp_path / "concepts.csv"
    file.write_text("concept,anchor,type\n# artists first\n\"Smith, John\", painting, style\n"
                    "Monet,painting\n\nchurch, house, Object\n", encoding="utf-8")
    assert read_concept_file(file) == [Erasure("Smith, John", "painting", "style"),
                                       Erasure("Monet", "painting", None),
                                       Erasure("church", "house", "object")]


@pytest.mark.parametrize(("text", "message"), [
    ("church\n", "line 1: expected 'concept, anchor[, type]'"),
    ("church, house\nboat, , object\n", "line 2: expected"),
    ("church, house, building\n", "line 1: unknown concept type 'building'"),
    ("# nothing\n\n", "lists no concepts"),
])
def test_a_bad_concept_file_names_its_line(tmp_path, text, message):
    from conceptctl.erasure.concept_file import read_concept_file
    from conceptctl.errors import UsageError

    file = tmp_path / "concepts.csv"
    file.write_text(text, encoding="utf-8")
    with pytest.raises(UsageError, match=re.escape(message)):
        read_concept_file(file)


@pytest.mark.parametrize(("args", "message"), [
    (["church", "church", "--anchor", "house"], "'church' is listed twice"),
    (["church", "house", "--anchor", "tree"], None),  # fine: both towards tree
    (["church"], "--anchor is missing"),
    ([], "name a concept to erase"),
])
def test_concept_lists_are_checked_before_any_work(tiny_sd1, tmp_path, cli, args, message):
    out = tmp_path / "out"
    result = cli("erase", *args, "--backbone", str(tiny_sd1), "--output", str(out),
                 "--method", "uce", "--json")
    if message is None:
        assert result.code == 0, result.err
        return
    assert result.code != 0 and message in result.err
    assert len(result.err.strip().splitlines()) <= 2  # the error and its hint
    assert not out.exists()


def test_a_concept_that_is_another_ones_anchor_is_refused(tiny_sd1, tmp_path, cli):
    file = tmp_path / "concepts.csv"
    file.write_text("church, house\nhouse, tree\n", encoding="utf-8")
    result = cli("erase", "--concepts", str(file), "--backbone", str(tiny_sd1),
                 "--output", str(tmp_path / "out"))
    assert result.code != 0
    assert "'house' is erased and is also the anchor of 'church'" in result.err


def test_anchor_without_named_concepts_is_refused(tiny_sd1, tmp_path, cli):
    file = tmp_path / "concepts.csv"
    file.write_text("church, house\n", encoding="utf-8")
    result = cli("erase", "--concepts", str(file), "--anchor", "tree",
                 "--backbone", str(tiny_sd1), "--output", str(tmp_path / "out"))
    assert result.code != 0 and "--anchor applies to the concepts named" in result.err


def test_two_concepts_train_one_model_on_both(tiny_sd1, tmp_path):
    """DoCo on {church, airplane} -> house plus {Van Gogh} -> painting: every erasure's pairs in
    the training data, its anchor images drawn as its own run draws them (so a later
    one-concept run reuses the cache), and every concept in the manifest and the card."""
    from dataclasses import replace

    from conceptctl.erasure.config import complete
    from conceptctl.erasure.run import erase
    from conceptctl.testing import tiny_erase_config

    single = tiny_erase_config(tiny_sd1)
    several = complete(replace(single, concepts=(("church", "house", "object"),
                                                 ("airplane", "house", "object"),
                                                 ("Van Gogh", "painting", "style"))))
    first = erase(several, tmp_path / "several")
    assert not first.anchors_cached
    manifest = json.loads((tmp_path / "several" / "conceptctl.json").read_text())
    assert [c["concept"] for c in manifest["concepts"]] == ["church", "airplane", "Van Gogh"]
    per = manifest["anchors"]["per_concept"]
    assert [p["prompts"] for p in per] == [10, 10, 10]
    # church and airplane share their anchor and its template prompts: one drawing, one file.
    assert per[0]["cache_file"] == per[1]["cache_file"] != per[2]["cache_file"]
    targets = manifest["anchors"]["targets"]
    assert any("church" in t for t in targets) and any("airplane" in t for t in targets)
    assert any("Van Gogh" in t for t in targets) and len(targets) == 30
    card = (tmp_path / "several" / "README.md").read_text()
    assert all(f"**{name}**" in card for name in ("church", "airplane", "Van Gogh"))
    # church alone: the same anchor images, from the cache.
    alone = erase(single, tmp_path / "alone")
    assert alone.anchors_cached
    alone_manifest = json.loads((tmp_path / "alone" / "conceptctl.json").read_text())
    assert alone_manifest["anchors"]["cache_file"] == per[0]["cache_file"]
    assert alone_manifest["concepts"] == [{"concept": "church", "anchor": "house",
                                           "concept_type": "object"}]


def test_several_concepts_share_one_anchor_image_budget(tiny_sd1, tmp_path):
    """--anchor-images 3 over two distinct anchor-prompt sets: 2 images per prompt each (3 / 2
    rounded up), so the run draws about as many images as one concept's, and trains on them."""
    from dataclasses import replace

    from conceptctl.erasure.config import complete
    from conceptctl.erasure.run import erase
    from conceptctl.testing import tiny_erase_config

    single = tiny_erase_config(tiny_sd1, anchor_images_per_prompt=3, steps=2)
    for concepts, per_prompt in (((("church", "house", "object"),
                                   ("Van Gogh", "painting", "style")), 2),
                                 ((("church", "house", "object"),
                                   ("airplane", "house", "object")), 3)):  # one set, shared
        out = tmp_path / str(per_prompt)
        result = erase(complete(replace(single, concepts=concepts)), out)
        assert result.steps == 2
        anchors = json.loads((out / "conceptctl.json").read_text())["anchors"]
        assert [c["images_per_prompt"] for c in anchors["per_concept"]] == [per_prompt] * 2
        assert anchors["sampler"]["images_per_prompt"] == per_prompt
        assert f"{len(anchors['prompts'])} prompts x {per_prompt}" in (
            out / "README.md").read_text()


def test_esd_x_takes_turns_over_several_concepts(tiny_sd1, tmp_path):
    from dataclasses import replace

    from conceptctl.erasure.config import complete
    from conceptctl.erasure.run import erase
    from conceptctl.testing import tiny_erase_config

    cfg = complete(replace(tiny_erase_config(tiny_sd1, method="esd-x", steps=2, warmup=0,
                                             esd_sampling_steps=2),
                           concepts=(("church", "house", "object"),
                                     ("airplane", "house", "object"))))
    result = erase(cfg, tmp_path / "esd")
    assert result.steps == 2
    manifest = json.loads((tmp_path / "esd" / "conceptctl.json").read_text())
    assert [c["concept"] for c in manifest["concepts"]] == ["church", "airplane"]


def test_the_toy_retain_set_leaves_out_every_erased_concept():
    from conceptctl.toy.anchors import toy_anchor_set

    alone = toy_anchor_set("church", "house", "object")
    both = toy_anchor_set("church", "house", "object", also_erased=("airplane",))
    plane_words = ("airplane", "plane", "aeroplane", "jet")
    assert any(any(w in p for w in plane_words) for p in alone.retain)
    assert not any(any(w in p for w in plane_words) for p in both.retain)
    assert not any("church" in p or "chapel" in p for p in both.retain)
    assert both.anchor == alone.anchor and both.target == alone.target


def test_no_training_pair_names_another_erased_concept():
    """Van Gogh and church in one run: Van Gogh's pairs draw no church ("a painting of a
    church" would teach the discriminator that churches are the real domain) and church's
    pairs no Van Gogh picture ("a house in the style of Van Gogh" would teach it Van Gogh)."""
    from conceptctl.toy.anchors import toy_anchor_set
    from conceptctl.toy.world import OBJECT_WORDS, STYLE_WORDS

    def names(prompts, words):
        return [p for p in prompts if any(w.lower() in p.lower() for w in words)]

    church_words, gogh_words = OBJECT_WORDS["church"], STYLE_WORDS["van-gogh"]
    for concept, anchor, other, words in (("Van Gogh", "painting", "church", church_words),
                                          ("church", "house", "Van Gogh", gogh_words)):
        alone = toy_anchor_set(concept, anchor, "auto")
        both = toy_anchor_set(concept, anchor, "auto", also_erased=(other,))
        assert names(alone.anchor + alone.target, words)  # what a one-concept run trains on
        assert both.anchor and not names(both.anchor + both.target, words)
        assert len(both.anchor) == len(both.target) < len(alone.anchor)


FAST = ["--steps", "3", "-n", "1", "--attack-cases", "2"]


@pytest.mark.slow
def test_eval_scores_each_concept_of_a_several_concept_artifact(cli, tmp_path):
    """uce on the toy forgets church and airplane at once (seconds); `conceptctl eval` judges
    each with its own suite, whose hard negatives and general prompts leave the other erased
    concept out, and reports both in report.json, on the console and in report.html."""
    art = tmp_path / "two"
    made = cli("erase", "church", "airplane", "--anchor", "house", "--method", "uce",
               "--output", str(art))
    assert made.code == 0, made.err
    out = tmp_path / "report"
    result = cli("eval", str(art), *FAST, "--attacks", "paraphrase", "-o", str(out))
    assert result.code == 0, result.err
    report = json.loads((out / "report.json").read_text())
    parts = report["concepts"]
    assert [(p["concept"], p["anchor"]) for p in parts] == [("church", "house"),
                                                           ("airplane", "house")]
    for part in parts:
        groups = {m["group"] for m in part["metrics"] if m["metric"] == "erasure"}
        assert groups == {"target", "target-oos"}
        # hard negatives: the toy's 6 objects minus the concept, the anchor and the other
        # erased one, 20 prompts each (4 styles x 5 colours)
        assert part["suite"]["groups"]["hard-negative"] == 3 * 20
        subgroups = {m["group"] for m in part["metrics"] if m["metric"] == "preservation"}
        assert not any("airplane" in g or "church" in g for g in subgroups)
        assert part["attacks"][0]["attack"] == "paraphrase"
    assert report["metrics"] == parts[0]["metrics"]  # the top level: the first concept
    statuses = {p["verdict"]["status"] for p in parts}
    assert report["verdict"]["status"] in statuses
    assert "church:" in report["verdict"]["text"] and "airplane:" in report["verdict"]["text"]
    assert "[airplane]" in result.out  # the console table tags each row with its concept
    page = (out / "report.html").read_text()
    assert "id='concepts'" in page and "airplane" in page
    # Every concept's pictures are kept and shown, each concept's in folders of its own.
    for n, part in enumerate(parts, 1):
        folder = f"{n}-{part['concept']}"
        files = [e[m]["file"] for e in part["images"] for m in ("original", "erased")]
        assert len(files) == 2 * sum(part["suite"]["groups"].values())  # -n 1
        assert all(f.startswith(f"images/{folder}/") and (out / f).is_file() for f in files)
        targets = [e["expect"] for e in part["images"] if e["group"] == "target"]
        assert targets and all(t == {"object": part["concept"]} for t in targets)
        attacked = [f for row in part["attacks"][0]["rows"] for f in row["files"]]
        assert attacked and all(f.startswith(f"attacks/{folder}/paraphrase/") for f in attacked)
        assert f"<h2 class='concept-pictures'>{part['concept']} → house</h2>" in page
    assert report["images"] == parts[0]["images"]


def test_compare_and_verdict_of_several_concepts():
    from conceptctl.evaluation.compare import compare_rows
    from conceptctl.evaluation.run import combined_verdict

    def part(concept, value, status, robust):
        return {"concept": concept, "anchor": "painting",
                "metrics": [{"metric": "erasure", "group": "target", "direction": "higher",
                             "value": value, "unit": "share"}],
                "attacks": [{"attack": "embedding", "success_rate": 0.5}],
                "verdict": {"status": status, "robust": robust, "text": f"{status}.",
                            "threshold": 0.9}}

    parts = [part("Van Gogh", 1.0, "worked", True), part("Monet", 0.5, "incomplete", False)]
    verdict = combined_verdict(parts)
    assert verdict["status"] == "incomplete" and verdict["robust"] is False
    assert "Van Gogh: worked." in verdict["text"] and "Monet: incomplete." in verdict["text"]
    several = {"artifact": {"path": "/x/two", "method": "doco"}, "metrics": parts[0]["metrics"],
               "attacks": parts[0]["attacks"], "concepts": parts, "verdict": verdict}
    one = {"artifact": {"path": "/x/vg", "method": "doco"}, "metrics": parts[0]["metrics"],
           "attacks": parts[0]["attacks"], "verdict": parts[0]["verdict"]}
    header, rows = compare_rows([several, one])
    assert ["erasure", "target [Van Gogh]", "higher", "100.0%", "-"] in rows
    assert ["erasure", "target [Monet]", "higher", "50.0%", "-"] in rows
    assert ["erasure", "target", "higher", "-", "100.0%"] in rows
    assert ["attack embedding", "target [Monet]", "lower", "50.0%", "-"] in rows
    assert rows[-1][3:] == ["incomplete, not robust", "worked"]


def test_what_must_be_kept_names_no_other_erased_concept_on_any_axis():
    """church and Van Gogh erased at once: church's anchor and hard-negative prompts leave out
    Van Gogh's pictures (and Van Gogh's leave out churches), or they would count as lost."""
    from conceptctl.toy.eval_suite import _axis_value, toy_suite

    def suite(concept, anchor, erased):
        return toy_suite({"concept": concept, "anchor": anchor, "erased_concepts": erased,
                          "anchors": {"targets": [], "prompts": []}}, 1, 0)

    van_gogh, church = _axis_value("Van Gogh")[1], _axis_value("church")[1]
    for concept, anchor, axis, other in (("church", "house", "style", van_gogh),
                                         ("Van Gogh", "painting", "object", church)):
        alone = suite(concept, anchor, [concept]).cases
        both = suite(concept, anchor, ["church", "Van Gogh"]).cases
        kept = [c for c in both if c.group in ("anchor", "hard-negative", "general")]
        assert kept and not any(c.expect.get(axis) == other for c in kept)
        assert any(c.expect.get(axis) == other for c in alone if c.group == "anchor")


def test_every_erasure_is_drawn_equally_often_whatever_its_prompt_count():
    """30 anchor images of one concept, 10 of another: with the run's weights each fills half of
    the adversarial batches (uniform draws would give the second a quarter)."""
    import torch

    from conceptctl.erasure.trainer import TrainingData

    def data(weights):
        return TrainingData(latents=torch.zeros(40, 4, 2, 2), prompt_index=torch.arange(40),
                            anchor_text=torch.zeros(40, 2, 3), target_text=torch.zeros(40, 2, 3),
                            empty_text=torch.zeros(1, 2, 3), weights=weights)

    weights = torch.cat([torch.full((30,), 1 / 30), torch.full((10,), 1 / 10)]).double()
    for w, share in ((weights, 0.5), (None, 0.25)):
        batch = data(w).batch(4000, torch.Generator().manual_seed(0), "cpu", torch.float32)
        assert abs((batch.prompts >= 30).float().mean().item() - share) < 0.03
