"""How fast `conceptctl sample` draws on this machine (wall clock, process start included).

    python bench/sample_speed.py [--backbone toy] [--images 8] [--steps 20] [--repeats 3]

Prints one JSON line: the median wall time of the whole command (Python start, imports, model
load, sampling, writing PNGs) and, measured in-process on a loaded model, images per second.
The toy target (issue "toy world"): 8 images at 20 steps in <= 10 s on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="toy")
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prompt", default="a red church in the style of Van Gogh")
    args = parser.parse_args()

    walls = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            cmd = [sys.executable, "-m", "conceptctl", "sample", args.prompt, "-b", args.backbone,
                   "-n", str(args.images), "--steps", str(args.steps), "-o", f"{tmp}/run{i}"]
            start = time.perf_counter()
            subprocess.run(cmd, check=True, capture_output=True)
            walls.append(time.perf_counter() - start)

    import torch

    from conceptctl.backbones.loading import open_backbone
    from conceptctl.sampling import SampleSettings, sample_images

    model = open_backbone(args.backbone, device="cpu")
    settings = SampleSettings(prompts=(args.prompt,), images_per_prompt=args.images,
                              steps=args.steps)
    list(sample_images(model, settings))  # warm-up
    start = time.perf_counter()
    list(sample_images(model, settings))
    in_process = time.perf_counter() - start
    print(json.dumps({
        "bench": "sample_speed",
        "backbone": args.backbone,
        "images": args.images,
        "steps": args.steps,
        "command_wall_s_median": round(statistics.median(walls), 2),
        "command_wall_s_all": [round(w, 2) for w in walls],
        "in_process_images_per_s": round(args.images / in_process, 2),
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "processor": platform.processor() or platform.machine(),
                    "torch": torch.__version__},
    }))


if __name__ == "__main__":
    main()
