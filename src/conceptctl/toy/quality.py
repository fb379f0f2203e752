"""How good the toy world is: the judge's accuracy and the model's prompt-following.

These are the figures docs/toy-world.md reports, measured by ``conceptctl toy check``:

* judge accuracy: share of freshly rendered pictures (seeds never used in training) whose judged
  value equals the rendered one, per axis;
* prompt-following: over the fixed prompt set (every one of the 120 concepts, each template
  family in turn), ``seeds`` images per prompt, share judged as the prompted value, per axis —
  once with training templates and once with held-out templates.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from conceptctl.toy.judge import Judge
from conceptctl.toy.world import AXES, prompt_set

EVAL_SEED = 10_000  # sampling seeds for prompt-following, fixed so figures are reproducible


def fresh_judge_accuracy(judge: Judge, per_concept: int = 10) -> dict[str, float]:
    from conceptctl.toy.training import HELDOUT_SEED_BASE, judge_accuracy, render_dataset

    images, index = render_dataset(per_concept, HELDOUT_SEED_BASE, workers=1)
    return judge_accuracy(judge, images, index)


def prompt_following(
    backbone,
    judge: Judge,
    *,
    held_out: bool,
    seeds: int = 4,
    steps: int | None = None,
    guidance: float | None = None,
    batch_size: int = 32,
    on_step: Callable[[int], None] | None = None,
) -> dict:
    """Generate ``seeds`` images for each fixed prompt and judge them."""
    from conceptctl.sampling import SampleSettings, sample_images

    prompts = prompt_set(held_out=held_out)
    settings = SampleSettings(
        prompts=tuple(p for _, p in prompts), images_per_prompt=seeds, seed=EVAL_SEED,
        steps=steps, guidance=guidance, batch_size=batch_size,
    )
    images = [np.asarray(item.image.convert("RGB"))
              for item in sample_images(backbone, settings, on_step=on_step)]
    verdicts = judge.judge(np.stack(images))
    hits = {axis: 0 for axis in AXES}
    per_value = {axis: {v: [0, 0] for v in values} for axis, values in AXES.items()}
    for k, verdict in enumerate(verdicts):
        concept = prompts[k // seeds][0]
        for axis in AXES:
            wanted = getattr(concept, axis)
            ok = verdict.labels[axis] == wanted
            hits[axis] += ok
            per_value[axis][wanted][0] += ok
            per_value[axis][wanted][1] += 1
    resolved = settings.for_backbone(backbone)
    return {
        "templates": "held-out" if held_out else "training",
        "images": len(verdicts),
        "steps": resolved.steps,
        "guidance": resolved.guidance,
        "accuracy": {axis: hits[axis] / len(verdicts) for axis in AXES},
        "per_value": {axis: {v: ok / n for v, (ok, n) in table.items()}
                      for axis, table in per_value.items()},
    }
