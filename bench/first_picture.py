"""Time to the first picture: one toy image from a fresh process, beside the bare imports.

    python bench/first_picture.py [--repeats 5] [--backbone toy] [--json FILE]

Measured side by side, alternating, each in a fresh Python process:

* ``baseline``: ``python -c "import torch, diffusers"``;
* ``sample``: ``conceptctl sample PROMPT -n 1 -o TMP`` (the whole command);
* ``phases``: this script's ``--phases`` child, the same path as the command with a clock
  between its parts: importing torch, diffusers and conceptctl's sampling modules, loading the
  model, encoding the prompt (to the first denoising step), denoising, decoding, writing.

Prints one JSON line with the medians and whether ``sample <= baseline + 1.5 s`` (issue 14's
target), then a table.
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
        "import conceptctl": marks["import conceptctl"] - marks["import diffusers"],
        "load + encode": steps[0] - per_step - marks["import conceptctl"],
        "denoise": steps[-1] - steps[0] + per_step,
        "decode + write": marks["written"] - steps[-1],
    }


def _wall(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--backbone", default="toy")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--phases", type=Path, help=argparse.SUPPRESS)  # the child's mode
    args = parser.parse_args()
    if args.phases:
        print(json.dumps(phases(args.backbone, args.phases)))
        return
    runs: dict[str, list] = {"baseline": [], "sample": [], "phases": []}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            runs["baseline"].append(_wall([sys.executable, "-c", "import torch, diffusers"]))
            runs["sample"].append(_wall([sys.executable, "-m", "conceptctl", "sample", PROMPT,
                                         "-b", args.backbone, "-n", "1", "-o", f"{tmp}/s{i}"]))
            child = subprocess.run([sys.executable, __file__, "--backbone", args.backbone,
                                    "--phases", f"{tmp}/p{i}"], check=True,
                                   capture_output=True, text=True)
            runs["phases"].append(json.loads(child.stdout.strip().splitlines()[-1]))
    baseline = statistics.median(runs["baseline"])
    sample = statistics.median(runs["sample"])
    parts = {k: round(statistics.median(r[k] for r in runs["phases"]), 3)
             for k in runs["phases"][0]}
    record = {"bench": "first_picture", "backbone": args.backbone, "repeats": args.repeats,
              "baseline_s": round(baseline, 3), "sample_s": round(sample, 3),
              "overhead_s": round(sample - baseline, 3),
              "target_met": sample <= baseline + TARGET_OVERHEAD, "phases_s": parts,
              "runs": {k: v for k, v in runs.items() if k != "phases"}}
    print(json.dumps(record))
    if args.json:
        args.json.write_text(json.dumps(record, indent=2) + "\n")
    print(f"import torch, diffusers   {baseline:6.2f} s")
    print(f"conceptctl sample -n 1    {sample:6.2f} s   (+{sample - baseline:.2f} s; target "
          f"+{TARGET_OVERHEAD} s: {'met' if record['target_met'] else 'not met'})")
    for name, seconds in parts.items():
        print(f"  {name:22s} {seconds:6.2f} s")


if __name__ == "__main__":
    main()
