"""Time to the first picture: one toy image from a fresh process, beside the bare imports.

    python bench/first_picture.py [--repeats 5] [--backbone toy] [--json FILE]

Measured side by side, alternating, each in a fresh Python process:

* ``baseline``: ``python -c "import torch, diffusers"``;
* ``sample``: ``conceptctl sample PROMPT -n 1 -o TMP`` (the whole command);
* ``floor``: the same picture drawn by a bare diffusers script (this script's ``--floor``
  child: the toy's UNet, VAE, scheduler and MiniLM loaded with diffusers' and transformers' own
  classes into a ``StableDiffusionPipeline``, one call, one PNG), i.e. what any diffusers-based
  tool pays; its picture is checked to be the command's, pixel for pixel;
* ``phases``: this script's ``--phases`` child, the same path as the command with a clock
  between its parts: importing torch, diffusers, the model classes loading needs (diffusers'
  UNet, VAE and pipeline, transformers' BERT) and conceptctl's sampling modules, loading the
  model, encoding the prompt (to the first denoising step), denoising, decoding, writing.

Prints one JSON line with the medians, whether ``sample <= baseline + 1.5 s`` (issue 14's
target) and conceptctl's own overhead over the floor, then a table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPT = "a red church in the style of Van Gogh"
TARGET_OVERHEAD = 1.5  # seconds over the bare imports


def phases(backbone: str, out: Path) -> dict:
    """The sample command's path with a clock between its parts (run in a fresh process)."""
    marks = {"start": time.perf_counter()}
    import torch  # noqa: F401

    marks["import torch"] = time.perf_counter()
    import diffusers  # noqa: F401

    marks["import diffusers"] = time.perf_counter()
    # What loading the toy imports first (diffusers' lazy top level defers it): its own clock,
    # as it is diffusers' and transformers' cost, not conceptctl's.
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel  # noqa: F401
    from transformers import BertModel  # noqa: F401

    marks["import model classes"] = time.perf_counter()
    from conceptctl.sampling import SampleSettings, sample_model

    marks["import conceptctl"] = time.perf_counter()
    steps: list[float] = []
    settings = SampleSettings(prompts=(PROMPT,), images_per_prompt=1)
    sample_model(settings, out, backbone=backbone, device="cpu",
                 on_step=lambda n, total: steps.append(time.perf_counter()))
    marks["written"] = time.perf_counter()
    # sample_model loads, encodes, denoises (a step callback each), decodes and writes; the first
    # callback ends the first step, so "to first step" holds the load, the text encoding and
    # one step: the step's own time (the denoising's mean) is moved to "denoise".
    per_step = (steps[-1] - steps[0]) / max(1, len(steps) - 1)
    return {
        "import torch": marks["import torch"] - marks["start"],
        "import diffusers": marks["import diffusers"] - marks["import torch"],
        "import model classes": marks["import model classes"] - marks["import diffusers"],
        "import conceptctl": marks["import conceptctl"] - marks["import model classes"],
        "load + encode": steps[0] - per_step - marks["import conceptctl"],
        "denoise": steps[-1] - steps[0] + per_step,
        "decode + write": marks["written"] - steps[-1],
    }


def floor(backbone: str, out: Path) -> dict:
    """The same picture without conceptctl: diffusers' and transformers' classes only."""
    if backbone != "toy":
        raise SystemExit("--floor draws the toy backbone only")
    marks = {"start": time.perf_counter()}
    import torch
    from diffusers import (  # noqa: F401  (timed apart from the loading)
        AutoencoderKL,
        DPMSolverMultistepScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import AutoTokenizer, BertModel  # noqa: F401

    marks["import"] = time.perf_counter()
    from conceptctl.testing import bare_toy_pipeline

    pipe = bare_toy_pipeline()
    marks["load"] = time.perf_counter()
    # The toy's defaults (64 px, 20 steps, guidance 3) and conceptctl's seeding (CPU noise, seed 0).
    latents = torch.randn((1, 4, 16, 16), generator=torch.Generator("cpu").manual_seed(0))
    image = pipe(PROMPT, height=64, width=64, num_inference_steps=20, guidance_scale=3.0,
                 latents=latents).images[0]
    marks["draw"] = time.perf_counter()
    out.mkdir(parents=True)
    image.save(out / "floor.png")
    marks["written"] = time.perf_counter()
    return {"import classes": marks["import"] - marks["start"],
            "load": marks["load"] - marks["import"], "draw": marks["draw"] - marks["load"],
            "write": marks["written"] - marks["draw"]}


def _same_picture(floor_png: Path, sample_dir: Path) -> bool:
    from PIL import Image

    drawn = sorted(p for p in sample_dir.glob("000-*.png"))
    return len(drawn) == 1 and (Image.open(floor_png).tobytes()
                                == Image.open(drawn[0]).tobytes())


def _wall(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--backbone", default="toy")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--phases", type=Path, help=argparse.SUPPRESS)  # the children's modes
    parser.add_argument("--floor", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phases or args.floor:
        child = phases if args.phases else floor
        print(json.dumps(child(args.backbone, args.phases or args.floor)))
        return
    runs: dict[str, list] = {"baseline": [], "sample": [], "floor": [], "phases": []}
    same = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            runs["baseline"].append(_wall([sys.executable, "-c", "import torch, diffusers"]))
            runs["sample"].append(_wall([sys.executable, "-m", "conceptctl", "sample", PROMPT,
                                         "-b", args.backbone, "-n", "1", "-o", f"{tmp}/s{i}"]))
            if args.backbone == "toy":
                runs["floor"].append(_wall([sys.executable, __file__, "--floor", f"{tmp}/f{i}"]))
                same.append(_same_picture(Path(f"{tmp}/f{i}/floor.png"), Path(f"{tmp}/s{i}")))
            child = subprocess.run([sys.executable, __file__, "--backbone", args.backbone,
                                    "--phases", f"{tmp}/p{i}"], check=True,
                                   capture_output=True, text=True)
            runs["phases"].append(json.loads(child.stdout.strip().splitlines()[-1]))
    baseline = statistics.median(runs["baseline"])
    sample = statistics.median(runs["sample"])
    floor_s = statistics.median(runs["floor"]) if runs["floor"] else None
    parts = {k: round(statistics.median(r[k] for r in runs["phases"]), 3)
             for k in runs["phases"][0]}
    record = {"bench": "first_picture", "backbone": args.backbone, "repeats": args.repeats,
              "baseline_s": round(baseline, 3), "sample_s": round(sample, 3),
              "overhead_s": round(sample - baseline, 3),
              "target_met": sample <= baseline + TARGET_OVERHEAD,
              "floor_s": floor_s and round(floor_s, 3),
              "over_floor_s": floor_s and round(sample - floor_s, 3),
              "floor_same_picture": all(same) if same else None, "phases_s": parts,
              "runs": {k: v for k, v in runs.items() if k != "phases"}}
    print(json.dumps(record))
    if args.json:
        args.json.write_text(json.dumps(record, indent=2) + "\n")
    print(f"import torch, diffusers   {baseline:6.2f} s")
    print(f"conceptctl sample -n 1    {sample:6.2f} s   (+{sample - baseline:.2f} s; target "
          f"+{TARGET_OVERHEAD} s: {'met' if record['target_met'] else 'not met'})")
    if floor_s is not None:
        print(f"bare diffusers, same image {floor_s:6.2f} s   (conceptctl over it: "
              f"{sample - floor_s:+.2f} s; same picture: {record['floor_same_picture']})")
    for name, seconds in parts.items():
        print(f"  {name:22s} {seconds:6.2f} s")


if __name__ == "__main__":
    main()
