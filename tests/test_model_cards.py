"""Hub-style model cards: the artifact's README.md and every export's card carry front matter
with the base's license and Hub id (also for a local copy of a known backbone), the method and
concept-erasure tags; a one-file export gets NAME.md (and Automatic1111's NAME.json for a LoRA
or checkpoint) that never replaces a user's file; `conceptctl eval` records its summary in the
artifact, and the cards show it."""

from __future__ import annotations

import hashlib
import json

import pytest
import yaml

from conceptctl.backbones.loading import open_backbone
from conceptctl.cards import identify_base
from conceptctl.erasure.artifact import read_artifact, weights_digest
from conceptctl.evaluation.summary import record_evaluation
from conceptctl.testing import write_test_artifact

SD1_HUB, SD2_HUB = "stable-diffusion-v1-5/stable-diffusion-v1-5", "stabilityai/stable-diffusion-2-1"


def front_matter(text: str) -> dict:
    """The card's YAML front matter, parsed as the Hub parses it."""
    assert text.startswith("---\n"), text[:80]
    head, sep, _ = text[4:].partition("\n---\n")
    assert sep, "the front matter is not closed"
    return yaml.safe_load(head)


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


CACHED = "/cache/hub/models--stabilityai--stable-diffusion-2-1/snapshots/5cae40e6"


@pytest.mark.parametrize("base, hub, license_", [
    ({"name": "sd-1.5", "source": "/models/sd15"}, SD1_HUB, "creativeml-openrail-m"),
    ({"name": "CompVis/stable-diffusion-v1-4", "source": "CompVis/stable-diffusion-v1-4"},
     "CompVis/stable-diffusion-v1-4", "creativeml-openrail-m"),
    ({"name": CACHED, "source": CACHED}, SD2_HUB, "openrail++"),
])
def test_known_bases_are_named_by_their_hub_id_with_their_license(base, hub, license_):
    """A local copy of a known backbone, its Hub id typed as such, a folder of the Hub cache."""
    identity = identify_base(base)
    assert (identity.hub_id, identity.license) == (hub, license_)
    assert hub in identity.described


def test_unknown_bases_are_said_to_be_unknown_not_guessed():
    folder = identify_base({"name": "/models/my-sd", "source": "/models/my-sd", "family": ""})
    assert (folder.hub_id, folder.license) == (None, None)
    assert "cannot identify" in folder.described
    cached = identify_base({"name": "/c/models--someone--a-finetune/snapshots/abc",
                            "source": "/c/models--someone--a-finetune/snapshots/abc"})
    assert (cached.hub_id, cached.license) == ("someone/a-finetune", None)  # id yes, license no
    toy = identify_base({"name": "toy", "source": "/site-packages/conceptctl/toy/weights"})
    assert (toy.hub_id, toy.license, toy.family) == (None, "apache-2.0", "toy")


@pytest.mark.parametrize("flavor, name, hub, license_", [
    ("tiny_sd1", "sd-1.5", SD1_HUB, "creativeml-openrail-m"),
    ("tiny_sd2", "sd-2.1", SD2_HUB, "openrail++"),
])
def test_every_export_has_a_card_naming_the_base_it_came_from(flavor, name, hub, license_,
                                                               request, tmp_path, cli):
    """The base is a local folder, known as sd-1.5 / sd-2.1 through backbone-path: the cards
    name the Hub model and pass its license on."""
    assert cli("config", "set", f"backbone-path.{name}", request.getfixturevalue(flavor)).code \
        == 0
    art = write_test_artifact(open_backbone(name, device="cpu", dtype="float32"),
                              tmp_path / "art")
    cards = {}
    for fmt, out in (("diffusers", "folder"), ("lora", "church.safetensors"),
                     ("single-file", "church-ckpt.safetensors"),
                     ("delta", "church.delta.safetensors")):
        result = cli("export", art, "-f", fmt, "-o", tmp_path / out)
        assert result.code == 0, result.err
        card = (tmp_path / out / "README.md" if fmt == "diffusers"
                else (tmp_path / out).with_suffix(".md"))
        cards[fmt] = card.read_text(encoding="utf-8")
    for fmt, text in cards.items():
        meta = front_matter(text)
        assert (meta["license"], meta["base_model"]) == (license_, hub), fmt
        assert {"conceptctl", "concept-erasure", "test-perturbation"} <= set(meta["tags"])
        assert ("lora" in meta["tags"]) == (fmt == "lora")
        assert meta.get("base_model_relation") == {"lora": "adapter", "delta": None}.get(
            fmt, "finetune")
        assert f"# church erased from {name}" in text and "**house**" in text
        assert "## Evaluation" not in text  # never evaluated
    assert "load_lora_weights(\"church.safetensors\")" in cards["lora"]
    assert "from_single_file(\"church-ckpt.safetensors\"" in cards["single-file"]
    assert ("v_prediction" in cards["single-file"]) == (name == "sd-2.1")
    # Automatic1111's metadata beside the LoRA and the checkpoint, not the delta: the LoRA's SD
    # version keeps an SD 2.x adapter listed under SD 2.x checkpoints.
    lora_ui = json.loads((tmp_path / "church.json").read_text(encoding="utf-8"))
    assert lora_ui["sd version"] == {"sd-1.5": "SD1", "sd-2.1": "SD2"}[name]
    assert lora_ui["preferred weight"] == 1.0 and hub in lora_ui["description"]
    assert "church.md" in lora_ui["description"]
    assert "description" in json.loads((tmp_path / "church-ckpt.json").read_text())
    assert not (tmp_path / "church.delta.json").exists()


def test_a_file_export_never_replaces_a_users_card(tiny_sd1, tmp_path, cli):
    art = write_test_artifact(open_backbone(str(tiny_sd1), device="cpu", dtype="float32"),
                              tmp_path / "art")
    target = tmp_path / "church.safetensors"
    mine = tmp_path / "church.md"
    mine.write_text("# my notes\n")
    for extra in ((), ("--overwrite",)):
        refused = cli("export", art, "-f", "lora", "-o", target, *extra)
        assert refused.code == 1 and refused.err.startswith("error:")
        assert "church.md" in refused.err.splitlines()[0] and "model card" in refused.err
        assert not target.exists() and not (tmp_path / "church.json").exists()
    assert mine.read_text() == "# my notes\n"
    mine.unlink()
    assert cli("export", art, "-f", "lora", "-o", target).code == 0
    # The base is a folder by path: the card says it cannot name it, and gives no license.
    meta = front_matter(mine.read_text(encoding="utf-8"))
    assert "base_model" not in meta and "license" not in meta
    assert "cannot identify" in mine.read_text(encoding="utf-8")
    again = cli("export", art, "-f", "lora", "-o", target)
    assert again.code == 1 and "already exists" in again.err
    assert cli("export", art, "-f", "lora", "-o", target, "--overwrite").code == 0  # its own


def test_eval_records_its_summary_in_the_artifact_and_every_later_card(tiny_sd1, tmp_path, cli):
    assert cli("config", "set", "backbone-path.sd-1.4", tiny_sd1).code == 0
    a, b = tmp_path / "A", tmp_path / "B"
    for args in (("church", "-b", "sd-1.4", "-o", a), ("airplane", "--base", a, "-o", b)):
        made = cli("erase", *args, "--anchor", "house", "--method", "uce",
                   "--anchor-prompt-count", "5")
        assert made.code == 0, made.err
    readme = (a / "README.md").read_text(encoding="utf-8")
    meta = front_matter(readme)  # the artifact's own card, before any evaluation
    assert (meta["license"], meta["base_model"]) == ("creativeml-openrail-m",
                                                    "CompVis/stable-diffusion-v1-4")
    weights, manifest = _sha(a / "weights.safetensors"), (a / "conceptctl.json").read_bytes()

    prompts = tmp_path / "prompts.csv"  # two cases: the summary, not the suite, is tested here
    prompts.write_text("prompt,evaluation_seed,case_number,group\n"
                       "a church,1,0,target\na house,2,1,anchor\n")
    result = cli("eval", a, "--prompts", prompts, "--steps", "2", "-n", "1", "--attacks", "none",
                 "-o", tmp_path / "report")
    assert result.code == 0, result.err
    summary = json.loads((a / "evaluation.json").read_text())
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert summary["verdict"]["status"] == report["verdict"]["status"]
    assert summary["report"] == str((tmp_path / "report" / "report.html").resolve())
    assert len(summary["metrics"]) == len(report["metrics"])
    card = (a / "README.md").read_text(encoding="utf-8")
    assert "## Evaluation" in card and report["verdict"]["text"] in card
    assert front_matter(card) == meta
    # The weights and the record are untouched: the stack built on A still reads.
    assert _sha(a / "weights.safetensors") == weights
    assert (a / "conceptctl.json").read_bytes() == manifest
    assert weights_digest(read_artifact(b).chain[0]) == weights_digest(read_artifact(a))

    lora = tmp_path / "a.safetensors"
    assert cli("export", a, "-f", "lora", "-o", lora).code == 0
    assert report["verdict"]["text"] in (tmp_path / "a.md").read_text(encoding="utf-8")
    assert report["verdict"]["text"] in json.loads((tmp_path / "a.json").read_text())["notes"]

    # A summary of other weights (the folder erased again in place) is not shown.
    stale = {**summary, "weights_sha256": "0" * 64}
    (a / "evaluation.json").write_text(json.dumps(stale))
    assert cli("export", a, "-f", "delta", "-o", tmp_path / "d.safetensors").code == 0
    assert "## Evaluation" not in (tmp_path / "d.md").read_text(encoding="utf-8")

    # A README someone edited is left alone (the next evaluation's summary is still recorded).
    (a / "README.md").write_text("# my own card\n")
    notes = record_evaluation(a, report, tmp_path / "report" / "report.html")
    assert len(notes) == 1 and "README.md is not the card conceptctl wrote" in notes[0]
    assert (a / "README.md").read_text() == "# my own card\n"
    assert json.loads((a / "evaluation.json").read_text())["weights_sha256"] == weights
