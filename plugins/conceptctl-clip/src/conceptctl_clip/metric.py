"""``clip-score``: how well each group's pictures match their own prompts, original vs erased.

Per prompt group and model: CLIP score = max(0, mean over pictures of 100 * cos(image embedding,
prompt embedding)), exactly torchmetrics' ``CLIPScore`` (which averages first, then clips at 0;
clipping each picture first, as Hessel et al. do, only differs when a cosine is negative, which
real CLIP models practically never give a picture and its prompt). The value is the erased
model's score; the original's, from the same seeds, is in the details.

Target groups: lower is better (the erased model should no longer draw what the prompt asks).
Every other group: higher is better (ideally the original's score: nothing lost).
"""

from __future__ import annotations

import numpy as np

from conceptctl.evaluation.cases import TARGET_GROUPS
from conceptctl.evaluation.metrics import Score
from conceptctl_clip.model import NO_MODEL, load_clip, model_path, unit


def clip_score(model, images: np.ndarray, prompts: list[str]) -> float:
    """max(0, mean_i 100 * cos(image_i, prompt_i)), as torchmetrics' CLIPScore."""
    cos = (unit(model.image_embeds(images)) * unit(model.text_embeds(prompts))).sum(axis=1)
    return max(0.0, float(np.mean(100 * cos)))


class ClipScore:
    name = "clip-score"

    def compute(self, run) -> list[Score]:
        groups = [g for g in run.suite.groups() if run.indices(g)]
        if not groups:
            return []
        if getattr(run.detector, "name", None) == "clip":
            model = run.detector.model
        else:
            path = model_path()
            if path is None:
                return [Score(self.name, "all", None, "higher", note=NO_MODEL, unit="number")]
            device = str(getattr(run.erased_model, "device", "cpu"))
            model = load_clip(path, device)
        scores = []
        for group in groups:
            idx = run.indices(group)
            prompts = [run.cases_of[i].prompt for i in idx]
            before = clip_score(model, run.original.images[idx], prompts)
            after = clip_score(model, run.erased.images[idx], prompts)
            direction = "lower" if group in TARGET_GROUPS else "higher"
            scores.append(Score(self.name, group, after, direction, len(idx), {
                "original": before, "erased": after, "change": after - before,
                "model": model.provenance["model"],
                "weights_sha256": model.provenance["weights_sha256"]}, unit="number"))
        return scores
