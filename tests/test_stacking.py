"""Stacking: `conceptctl erase B --base A` erases on top of an earlier artifact. The new artifact
records the chain (each link with its path, weights digest and base digest); sample, eval and
every export apply the whole chain; a broken chain is refused in one line; exports flatten it."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from conceptctl.backbones.loading import open_backbone
from conceptctl.erasure.artifact import (
    all_concepts,
    apply_artifact,
    base_digest,
    read_artifact,
    weights_digest,
)

PROMPT = "a red church"


def _erase(cli, *args):
    # 5 template prompts a concept: a quick evaluation (its targets are the run's prompts).
    result = cli("erase", *args, "--method", "uce", "--anchor-prompt-count", "5", "--json")
    assert result.code == 0, result.err
    return result


def _manifest(folder):
    return json.loads((folder / "conceptctl.json").read_text())


def _sampled(cli, out, model):
    result = cli("sample", PROMPT, "-n", "1", "--steps", "3", "-o", out, "--model", model)
    assert result.code == 0, result.err
    return np.asarray(Image.open(next(out.glob("000-*.png"))))


@pytest.fixture
def chain(tiny_sd1, tmp_path, cli):
    """church -> house erased (uce) into A, airplane -> tree on top of it into B."""
    a, b = tmp_path / "arts" / "A", tmp_path / "arts" / "B"
    _erase(cli, "church", "--anchor", "house", "-b", tiny_sd1, "-o", a)
    _erase(cli, "airplane", "--anchor", "tree", "--base", a, "-o", b)  # backbone: A's
    return a, b


def test_the_chain_is_recorded_link_by_link(chain, tiny_sd1):
    a, b = chain
    first, manifest = read_artifact(a), _manifest(b)
    [link] = manifest["chain"]
    assert link["path"] == "../A"  # relative: the folders can move together
    assert link["weights_digest"] == weights_digest(first)
    assert link["base_tensors_digest"] == first.base["tensors_digest"]
    assert [c["concept"] for c in link["concepts"]] == ["church"]
    assert [c["concept"] for c in manifest["concepts"]] == ["airplane"]  # its own run's
    assert [c["concept"] for c in all_concepts(manifest)] == ["church", "airplane"]
    # B was trained on A's model: its base digest is that of A's tensors, not the original's.
    model = open_backbone(str(tiny_sd1), device="cpu", dtype="float32")
    original = base_digest(model, manifest["base"]["tensors"])
    apply_artifact(model, first)
    assert base_digest(model, manifest["base"]["tensors"]) == manifest["base"]["tensors_digest"]
    assert manifest["base"]["tensors_digest"] != original
    card = (b / "README.md").read_text()
    assert "**church**" in card and "**airplane**" in card and "stacked on" in card
    with safe_open(str(b / "weights.safetensors"), "pt") as f:
        header = json.loads(f.metadata()["conceptctl"])
    assert header["chain"] == manifest["chain"]


def test_a_stacked_run_knows_what_its_base_forgot(chain, tmp_path, cli):
    """B's settings record the base's concepts, and a third link the whole chain's: what its
    anchor selector names in no pair and its retain set leaves out."""
    a, b = chain
    assert _manifest(b)["hyperparameters"]["erased_before"] == ["church"]
    _erase(cli, "boat", "--anchor", "tree", "--base", b, "-o", tmp_path / "C")
    assert _manifest(tmp_path / "C")["hyperparameters"]["erased_before"] == ["church",
                                                                           "airplane"]


def test_a_stacked_toy_run_trains_on_no_pair_naming_what_its_base_forgot():
    """church on top of a model without Van Gogh: no pair asks for a Van Gogh house (the base
    draws something else for it: the discriminator would learn that as the real domain), and
    no retain prompt names Van Gogh. The same run unstacked keeps those pairs."""
    from conceptctl.erasure.anchors import retain_prompts
    from conceptctl.erasure.config import plan
    from conceptctl.registry import get_registry
    from conceptctl.toy.world import STYLE_WORDS

    selector = get_registry("anchor-selector").get("toy")
    plain = plan("church", "house", backbone="toy")
    stacked = replace(plain, erased_before=("Van Gogh",))
    assert stacked.also_erased() == ("Van Gogh",) and plain.also_erased() == ()

    def gogh(prompts):
        return [p for p in prompts if any(w.lower() in p.lower() for w in STYLE_WORDS["van-gogh"])]

    alone = selector.build(config=plain, backbone=None)
    on_base = selector.build(config=stacked, backbone=None)
    assert gogh(alone.anchor + alone.target)
    assert on_base.anchor and not gogh(on_base.anchor + on_base.target + on_base.retain)
    forgotten = [*(e.concept for e in stacked.erasures()), *stacked.erased_before]
    assert not gogh(retain_prompts(alone, forgotten))


def test_applying_a_stacked_artifact_applies_every_link_in_order(chain, tiny_sd1):
    a, b = chain
    stacked = read_artifact(b)
    assert [link.path for link in stacked.chain] == [a]
    by_hand = open_backbone(str(tiny_sd1), device="cpu", dtype="float32")
    apply_artifact(by_hand, read_artifact(a))
    apply_artifact(by_hand, read_artifact(b, follow_chain=False))
    whole = open_backbone(str(tiny_sd1), device="cpu", dtype="float32")
    apply_artifact(whole, stacked)
    hand, got = by_hand.named_tensors(), whole.named_tensors()
    assert stacked.changed_tensors == sorted(set(stacked.weights) | set(read_artifact(a).weights))
    for name in stacked.changed_tensors:
        torch.testing.assert_close(got[name], hand[name], rtol=0, atol=0)
    # Without A first, B's own values land on a base they were not made from: refused.
    alone = open_backbone(str(tiny_sd1), device="cpu", dtype="float32")
    with pytest.raises(Exception, match="was made from base"):
        apply_artifact(alone, read_artifact(b, follow_chain=False))


def test_stacks_repeat_and_move_together(chain, tmp_path, cli):
    a, b = chain
    c = tmp_path / "arts" / "C"
    _erase(cli, "boat", "--anchor", "tree", "--base", b, "-o", c)
    manifest = _manifest(c)
    assert [link["path"] for link in manifest["chain"]] == ["../A", "../B"]
    assert [x["concept"] for x in all_concepts(manifest)] == ["church", "airplane", "boat"]
    before = _sampled(cli, tmp_path / "s1", c)
    moved = tmp_path / "elsewhere"
    shutil.move(tmp_path / "arts", moved)
    np.testing.assert_array_equal(_sampled(cli, tmp_path / "s2", moved / "C"), before)


@pytest.mark.parametrize("command", ["sample", "eval", "export"])
def test_a_missing_link_is_one_clear_line(chain, tmp_path, cli, command):
    a, b = chain
    shutil.move(a, tmp_path / "A-moved")
    args = {"sample": ["sample", PROMPT, "--model", b, "-o", tmp_path / "s"],
            "eval": ["eval", b, "-o", tmp_path / "e", "--steps", "2", "-n", "1"],
            "export": ["export", b, "--format", "delta", "-o", tmp_path / "d.safetensors"]}
    result = cli(*args[command])
    assert result.code != 0
    first = result.err.strip().splitlines()[0]
    assert "is stacked on" in first and "which is missing" in first, result.err
    assert len(result.err.strip().splitlines()) <= 2  # the error and its hint
    assert not any((tmp_path / name).exists() for name in ("s", "e", "d.safetensors"))


def test_a_changed_link_is_refused(chain, tiny_sd1, tmp_path, cli):
    a, b = chain
    # A re-erased in place with other settings: B was not made on this model.
    _erase(cli, "church", "--anchor", "house", "-b", tiny_sd1, "-o", a, "--overwrite",
           "--uce-erase-scale", "0.5")
    result = cli("sample", PROMPT, "--model", b, "-o", tmp_path / "s")
    assert result.code != 0 and "which has changed since" in result.err


def test_stacking_refuses_bad_bases_before_any_work(chain, tmp_path, cli):
    a, b = chain
    out = tmp_path / "new"
    for base, message in ((tmp_path / "nowhere", "does not exist"),
                          (tmp_path, "is not a conceptctl artifact")):
        result = cli("erase", "boat", "--anchor", "tree", "--method", "uce", "--base", base,
                     "-o", out)
        assert result.code != 0 and message in result.err, result.err
    delta = tmp_path / "a.safetensors"
    assert cli("export", a, "--format", "delta", "-o", delta).code == 0
    result = cli("erase", "boat", "--anchor", "tree", "--method", "uce", "--base", delta,
                 "-o", out)
    assert result.code != 0 and "stacking builds on an artifact folder" in result.err
    assert not out.exists()
    # Writing the stacked artifact over its own base (or a link below it) would break it.
    for target in (a, b):
        result = cli("erase", "boat", "--anchor", "tree", "--method", "uce", "--base", b,
                     "-o", target, "--overwrite")
        assert result.code != 0 and "which the new artifact is stacked on" in result.err
        assert (target / "conceptctl.json").is_file()
    assert read_artifact(b).chain  # still whole


def test_eval_views_cover_every_link_with_its_own_anchors(chain):
    from conceptctl.evaluation.run import concept_views

    a, b = chain
    stacked = read_artifact(b)
    views = concept_views(stacked.manifest, [link.manifest for link in stacked.chain])
    assert [(v["concept"], v["anchor"]) for v in views] == [("church", "house"),
                                                           ("airplane", "tree")]
    assert all(v["erased_concepts"] == ["church", "airplane"] for v in views)
    assert views[0]["anchors"]["targets"] == _manifest(a)["anchors"]["targets"]
    assert views[1]["anchors"]["targets"] == _manifest(b)["anchors"]["targets"]


def test_doco_trains_on_the_base_model_and_draws_its_anchors_from_it(tiny_sd1, tmp_path):
    """DoCo on top of an artifact: the anchor images come from the stacked-on model (another
    cache file than the same run on the original), and the frozen copy it preserves is that
    model too."""
    from conceptctl.erasure.run import erase
    from conceptctl.testing import tiny_erase_config

    first = tiny_erase_config(tiny_sd1, concept="church", anchor="house", method="uce")
    erase(first, tmp_path / "A")
    plain = tiny_erase_config(tiny_sd1, concept="airplane", anchor="house")
    erase(plain, tmp_path / "plain")
    stacked = replace(plain, base_artifact=str(tmp_path / "A"))
    result = erase(stacked, tmp_path / "B")
    assert not result.anchors_cached  # the base model draws other pictures
    assert (_manifest(tmp_path / "B")["anchors"]["cache_file"]
            != _manifest(tmp_path / "plain")["anchors"]["cache_file"])
    model = open_backbone(str(tiny_sd1), device="cpu", dtype="float32")
    apply_artifact(model, read_artifact(tmp_path / "B"))  # the chain holds


def test_eval_reports_every_concept_of_the_chain(chain, tmp_path, cli):
    a, b = chain
    result = cli("eval", b, "--steps", "2", "-n", "1", "--attacks", "none", "-o",
                 tmp_path / "report", "--json")
    assert result.code == 0, result.err
    report = json.loads(result.out)
    assert [(p["concept"], p["anchor"]) for p in report["concepts"]] == [("church", "house"),
                                                                        ("airplane", "tree")]
    assert [link["path"] for link in report["artifact"]["chain"]] == ["../A"]
