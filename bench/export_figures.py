"""Export one artifact in every format and measure it: the figures in docs/export.md.

    python bench/export_figures.py ARTIFACT [--ranks 1,2,4,8,16,32,64,1000]
           [--max-errors 0.01,0.05,0.1] [--judge-ranks 1,4,16] [--seeds 2] [--out DIR]

1. Times ``conceptctl export ARTIFACT --format F`` for each built-in format as a fresh process
   (Python start and model load included, as a user runs it) and records the size written; a
   format the backbone does not support is recorded with its one-line error.
2. LoRA: overall and worst-layer relative error, adapter parameters and file size for each
   fixed rank and for ``--rank auto`` at each ``--max-error``.
3. Toy artifacts only (``--judge-ranks``): the base model with each LoRA loaded through
   diffusers' ``load_lora_weights`` (needs peft) is judged on the toy evaluation suite's target
   and anchor prompts, beside the base and the full artifact, to show which rank still erases.

Prints one JSON line, then a readable summary.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _cli(*args: str) -> tuple[float, subprocess.CompletedProcess]:
    start = time.time()
    done = subprocess.run([sys.executable, "-m", "conceptctl", *args], capture_output=True,
                          text=True)
    return time.time() - start, done


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def time_formats(artifact: Path, out: Path) -> dict:
    rows = {}
    for fmt in ("diffusers", "lora", "single-file", "delta"):
        target = out / (fmt if fmt == "diffusers" else f"{fmt}.safetensors")
        seconds, done = _cli("export", str(artifact), "--format", fmt, "--out", str(target),
                             "--json")
        if done.returncode == 0:
            report = json.loads(done.stdout)
            rows[fmt] = {"seconds": round(seconds, 1), "bytes": _size(target),
                         "in_process": report["seconds"]}
        else:
            rows[fmt] = {"seconds": round(seconds, 1), "error": done.stderr.strip()}
    return rows


def lora_errors(artifact: Path, out: Path, ranks: list[str], max_errors: list[float]) -> list:
    from conceptctl.export.run import export_artifact

    rows = []
    choices = [{"rank": r} for r in ranks] + [{"rank": "auto", "max_error": e}
                                              for e in max_errors]
    for options in choices:
        target = out / ("lora-" + "-".join(str(v) for v in options.values()) + ".safetensors")
        result = export_artifact(artifact, "lora", target, options=options)
        layers = result.report["layers"]
        rows.append({**options, "file": str(target), "bytes": result.bytes,
                     "overall_error": result.report["overall_error"],
                     "worst_layer_error": max(layer["error"] for layer in layers),
                     "ranks": sorted({layer["rank"] for layer in layers}),
                     "parameters": result.report["parameters"]})
    return rows


def judge_loras(artifact: Path, rows: list[dict], judge_ranks: list[str], seeds: int) -> dict:
    from conceptctl.backbones.loading import open_backbone
    from conceptctl.erasure.artifact import apply_artifact, read_artifact
    from conceptctl.evaluation.generate import DrawSettings, draw_cases
    from conceptctl.sampling import SampleSettings
    from conceptctl.toy.detector import ToyJudgeDetector
    from conceptctl.toy.eval_suite import toy_suite

    record = read_artifact(artifact)
    concept = record.manifest["concept"]
    # The default evaluation's toy suite and judge, on its target and anchor prompts.
    suite = toy_suite(record.manifest, seeds, 20_000)
    detector = ToyJudgeDetector()

    def measure(model) -> dict:
        defaults = SampleSettings(prompts=("x",)).for_backbone(model)
        draw = DrawSettings(seeds, defaults.steps, defaults.guidance)
        out = {}
        for name in ("target", "anchor"):
            cases = suite.group(name)
            labels = detector.judge(draw_cases(model, cases, draw).images)
            if name == "target":  # share still drawn as the concept
                hits = [detector.shows(lab, concept) for lab in labels]
            else:  # share drawn as asked on every axis
                hits = [detector.matches(lab, cases[i // seeds].expect)
                        for i, lab in enumerate(labels)]
            out[name] = sum(hits) / len(hits)
        return out

    models = {"base": open_backbone("toy", device="cpu")}
    erased = open_backbone("toy", device="cpu")
    apply_artifact(erased, record)
    models["artifact"] = erased
    for row in rows:
        label = str(row["rank"]) if row["rank"] != "auto" else f"auto {row['max_error']}"
        if str(row["rank"]) not in judge_ranks and label not in judge_ranks:
            continue
        model = open_backbone("toy", device="cpu")
        model.pipeline.load_lora_weights(row["file"])
        model.pipeline.fuse_lora()
        model.pipeline.unload_lora_weights()
        models[f"lora {label}"] = model
    return {name: measure(model) for name, model in models.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--ranks", default="1,2,4,8,16,32,64,1000")
    parser.add_argument("--max-errors", default="0.01,0.05,0.1")
    parser.add_argument("--judge-ranks", default="",
                        help="comma-separated ranks (or 'auto 0.05') to judge; toy only")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    out = args.out or Path(tempfile.mkdtemp(prefix="export-figures-"))
    out.mkdir(parents=True, exist_ok=True)
    formats = time_formats(args.artifact, out / "formats")
    lora = lora_errors(args.artifact, out, args.ranks.split(","),
                       [float(e) for e in args.max_errors.split(",")])
    judged = (judge_loras(args.artifact, lora, args.judge_ranks.split(","), args.seeds)
              if args.judge_ranks else None)
    print(json.dumps({"bench": "export_figures", "artifact": str(args.artifact),
                      "formats": formats, "lora": lora, "judged": judged}))
    for fmt, row in formats.items():
        what = (f"{row['bytes'] / 2**20:8.2f} MiB" if "bytes" in row
                else row["error"].splitlines()[0])
        print(f"{fmt:12s} {row['seconds']:6.1f} s  {what}")
    for row in lora:
        label = row["rank"] if row["rank"] != "auto" else f"auto {row['max_error']}"
        print(f"lora {label!s:10s} ranks {row['ranks']!s:24s} overall {row['overall_error']:.2e}"
              f"  worst {row['worst_layer_error']:.2e}  {row['parameters']:>9,} params"
              f"  {row['bytes'] / 2**20:6.2f} MiB")
    for name, row in (judged or {}).items():
        print(f"{name:16s} concept still drawn {row['target']:6.1%}   anchor correct "
              f"{row['anchor']:6.1%}")


if __name__ == "__main__":
    main()
