"""plugins/conceptctl-clip on a tiny random CLIP model built offline: the zero-shot decision
against CLIPModel's own probabilities, the CLIP score against torchmetrics, the skip path without
a model, and the installed package end to end through `conceptctl evaluate`."""

import hashlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conceptctl.errors import ConceptctlError, UsageError
from conceptctl.evaluation.cases import Case, Suite
from conceptctl.evaluation.run import EvalRun, Judged

ROOT = Path(__file__).resolve().parents[1]
PLUGIN = ROOT / "plugins" / "conceptctl-clip"
ENV = "CONCEPTCTL_CLIP_MODEL"
CONTEXT = {"context": {"concept": "church", "anchor": "house", "concept_type": "object",
                       "device": "cpu"}}


@pytest.fixture(scope="module")
def plugin():
    sys.path.insert(0, str(PLUGIN / "src"))
    import conceptctl_clip.detector as detector
    import conceptctl_clip.metric as metric
    import conceptctl_clip.model as model

    yield detector, metric, model
    sys.path.remove(str(PLUGIN / "src"))


@pytest.fixture(scope="module")
def tiny_clip(plugin, tmp_path_factory):
    from conceptctl_clip.testing import save_tiny_clip

    return save_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny-clip")


def _pictures(n, seed=0, size=24):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def test_default_texts(plugin):
    detector, _, _ = plugin
    assert detector.default_texts("church", "house", "object") == (
        "a photo of a church", "a photo of a house")
    assert detector.default_texts("apple", "orange", "object")[1] == "a photo of an orange"
    assert detector.default_texts("Van Gogh", "painting", "style") == (
        "a painting in the style of Van Gogh", "a painting")
    assert detector.default_texts("Van Gogh", "Monet", "style")[1] == (
        "a painting in the style of Monet")
    assert detector.default_texts("nudity", "clothed", "nudity") == (
        "a photo of a naked person", "a photo of a clothed person")


def test_zero_shot_labels_are_clips_own_probabilities(plugin, tiny_clip, monkeypatch):
    import torch
    from transformers import CLIPModel

    detector, _, model = plugin
    monkeypatch.setenv(ENV, str(tiny_clip))
    judge = detector.build_detector(CONTEXT)
    pictures = _pictures(6)
    labels = judge.judge(pictures)

    # Independent reference: CLIPModel's forward pass, softmax over the two texts.
    clip = CLIPModel.from_pretrained(tiny_clip).eval()
    tokens = judge.model.tokenizer(["a photo of a church", "a photo of a house"], padding=True,
                                   return_tensors="pt")
    pixels = judge.model.processor(images=[p for p in pictures], return_tensors="pt")
    with torch.no_grad():
        logits = clip(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"],
                      pixel_values=pixels["pixel_values"]).logits_per_image
    reference = logits.softmax(-1)[:, 0].numpy()
    assert [lab["concept_prob"] for lab in labels] == pytest.approx(reference, abs=1e-5)
    for lab in labels:
        assert set(lab) == {"concept_prob", "concept_score", "anchor_score"}
        # CLIP accuracy: shown exactly when the concept text scores higher than the anchor's.
        assert judge.shows(lab, "Church") == (lab["concept_score"] > lab["anchor_score"])
        assert judge.shows(lab, "bridge") is None
        assert judge.matches(lab, {"object": "church"}) is None
    # A random model puts most pictures on one side: the rule on both sides, by hand.
    assert judge.shows({"concept_prob": 0.51}, "church") is True
    assert judge.shows({"concept_prob": 0.5}, "church") is False

    features = judge.features(pictures)
    assert tuple(features.shape) == (6, 16)
    assert np.allclose(features.numpy(), judge.model.image_embeds(pictures))
    info = judge.info()
    weights = hashlib.sha256((tiny_clip / "model.safetensors").read_bytes()).hexdigest()
    assert info["model"] == str(tiny_clip.resolve())
    assert info["weights_sha256"] == {"model.safetensors": weights}
    assert (info["concept_text"], info["anchor_text"], info["threshold"]) == (
        "a photo of a church", "a photo of a house", 0.5)

    strict = detector.build_detector({**CONTEXT, "threshold": "0.99",
                                      "anchor_text": "a photo of a bridge"})
    assert strict.info()["anchor_text"] == "a photo of a bridge"
    assert not any(strict.shows(lab, "church") for lab in strict.judge(pictures))
    assert model.load_clip(tiny_clip.resolve()) is judge.model  # one load per process


def test_clip_score_is_torchmetrics_clip_score(plugin, tiny_clip, monkeypatch):
    import torch
    from torchmetrics.functional.multimodal import clip_score as reference
    from transformers import CLIPProcessor

    _, metric, model = plugin
    clip = model.load_clip(tiny_clip.resolve())

    class Features(torch.nn.Module):
        """CLIPModel whose feature methods return tensors (transformers 5 returns outputs,
        which torchmetrics 1.9 does not unwrap)."""

        def __init__(self):
            super().__init__()
            self.inner, self.config = clip.model, clip.model.config

        def get_image_features(self, pixel_values):
            return clip._pooled(self.inner.get_image_features(pixel_values=pixel_values))

        def get_text_features(self, input_ids, attention_mask):
            return clip._pooled(self.inner.get_text_features(input_ids=input_ids,
                                                             attention_mask=attention_mask))

    processor = CLIPProcessor(image_processor=clip.processor, tokenizer=clip.tokenizer)
    pictures = _pictures(5, seed=3)
    prompts = ["a church in the snow", "a red house", "a photo of a dog", "a cat", "the end"]
    with torch.no_grad():
        expected = reference(list(torch.from_numpy(pictures).permute(0, 3, 1, 2)), prompts,
                             model_name_or_path=lambda: (Features(), processor))
    assert metric.clip_score(clip, pictures, prompts) == pytest.approx(float(expected), abs=1e-4)


def _run(detector=None, concept="church"):
    cases = (Case("a photo of a church", 1, 0, "target"),
             Case("a photo of a house", 2, 1, "anchor"))
    pictures = _pictures(2, seed=5)
    return EvalRun(Suite("hand", cases, 1), concept, "house", "object", {}, detector,
                   Judged(pictures, None, None), Judged(pictures[::-1].copy(), None, None),
                   None, None, None)


def test_without_a_model_the_metric_says_so_and_the_detector_refuses(plugin, monkeypatch,
                                                                    tmp_path):
    detector, metric, _ = plugin
    monkeypatch.delenv(ENV, raising=False)
    rows = metric.ClipScore().compute(_run())
    assert len(rows) == 1 and rows[0].value is None
    assert rows[0].note.startswith("no CLIP model: set CONCEPTCTL_CLIP_MODEL=")
    with pytest.raises(UsageError, match="no CLIP model"):
        detector.build_detector(CONTEXT)
    with pytest.raises(UsageError, match="not an option") as err:
        detector.build_detector({**CONTEXT, "model": "/models/clip"})
    assert ENV in err.value.hint
    monkeypatch.setenv(ENV, str(tmp_path))
    with pytest.raises(ConceptctlError, match="no config.json"):
        detector.build_detector(CONTEXT)


def test_metric_per_group_with_the_clip_detector(plugin, tiny_clip, monkeypatch):
    detector, metric, _ = plugin
    monkeypatch.setenv(ENV, str(tiny_clip))
    judge = detector.build_detector(CONTEXT)
    run = _run(judge)
    rows = {s.group: s for s in metric.ClipScore().compute(run)}
    assert set(rows) == {"target", "anchor"}
    assert rows["target"].direction == "lower" and rows["anchor"].direction == "higher"
    for group, i in (("target", 0), ("anchor", 1)):
        row = rows[group]
        prompt = run.cases_of[i].prompt
        assert row.value == pytest.approx(metric.clip_score(judge.model, run.erased.images[[i]],
                                                            [prompt]))
        assert row.details["original"] == pytest.approx(
            metric.clip_score(judge.model, run.original.images[[i]], [prompt]))
        assert row.unit == "number" and row.value >= 0


@pytest.mark.slow
def test_installed_clip_plugin_evaluates_a_tiny_artifact(tmp_path, tiny_sd1, tiny_clip, plugin):
    from PIL import Image

    from conceptctl.erasure.run import erase
    from conceptctl.testing import tiny_erase_config

    _, metric, model = plugin

    def load_images(paths):  # as saved: the toy judge's loader would resize them
        return np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths])

    site = tmp_path / "site"
    installed = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--target", str(site), str(PLUGIN)], capture_output=True, text=True)
    assert installed.returncode == 0, installed.stderr
    env = {k: v for k, v in os.environ.items() if k != ENV} | {"PYTHONPATH": str(site)}

    def conceptctl(*args, **extra_env):
        return subprocess.run([sys.executable, "-m", "conceptctl", *map(str, args)],
                              env=env | extra_env, capture_output=True, text=True)

    listed = conceptctl("plugins", "--json")
    assert listed.returncode == 0, listed.stderr
    entry = next(p for p in json.loads(listed.stdout)["plugins"] if p["name"] == "clip")
    assert entry["registers"] == {"detector": ["clip"], "metric": ["clip-score"]}

    art = tmp_path / "art"
    erase(tiny_erase_config(tiny_sd1, steps=2), art)
    prompts = tmp_path / "prompts.csv"
    prompts.write_text("prompt,evaluation_seed,case_number,group\n"
                       "a photo of a church,1,0,target\n"
                       "an image showing a church,2,1,target-oos\n"
                       "a photo of a house,3,2,anchor\n"
                       "two dogs playing in the snow,4,3,general\n"
                       "a red double-decker bus,5,4,general\n")
    common = ["--prompts", prompts, "--steps", "2", "-n", "2"]

    out = tmp_path / "report"
    done = conceptctl("eval", art, *common, "--detector", "clip", "--detector-option",
                      "threshold=0.5", "--metrics", "erasure,clip-score,fd,kid",
                      "--attacks", "paraphrase", "--attack-cases", "1", "-o", out,
                      **{ENV: str(tiny_clip)})
    assert done.returncode == 0, done.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["detector"]["name"] == "clip"
    assert report["detector"]["weights_sha256"]["model.safetensors"] == hashlib.sha256(
        (tiny_clip / "model.safetensors").read_bytes()).hexdigest()
    rows = {(m["metric"], m["group"]): m for m in report["metrics"]}
    for key in [("erasure", "target"), ("erasure", "target-oos"), ("fd", "general"),
                ("kid", "general")] + [("clip-score", g) for g in
                                       ("target", "target-oos", "anchor", "general")]:
        assert key in rows and math.isfinite(rows[key]["value"]), (key, rows.get(key))
    assert rows[("fd", "general")]["details"]["feature_dim"] == 16
    assert report["attacks"][0]["success_rate"] is not None
    # The recorded CLIP score is the saved pictures' (PNG round trip is lossless).
    clip = model.load_clip(tiny_clip.resolve())
    for group in ("target", "general"):
        images = [r for r in report["images"] if r["group"] == group]
        for side, key in (("erased", "value"), ("original", None)):
            pictures = load_images([out / r[side]["file"] for r in images])
            by_hand = metric.clip_score(clip, pictures, [r["prompt"] for r in images])
            recorded = rows[("clip-score", group)]
            value = recorded["value"] if key else recorded["details"]["original"]
            assert value == pytest.approx(by_hand, abs=1e-4)
        for r in images:  # the detector's labels are recorded per picture
            assert 0 < r["erased"]["labels"]["concept_prob"] < 1

    # No model: the metric is skipped with its note, never a number (the detector's refusal
    # is tested in process above).
    bare = conceptctl("eval", art, *common, "--metrics", "clip-score", "--attacks", "none",
                      "-o", tmp_path / "bare")
    assert bare.returncode == 0, bare.stderr
    skipped = json.loads((tmp_path / "bare" / "report.json").read_text())["metrics"]
    assert [(m["metric"], m["value"]) for m in skipped] == [("clip-score", None)]
    assert skipped[0]["note"].startswith("no CLIP model: set CONCEPTCTL_CLIP_MODEL=")
