"""Erase a toy concept and measure it: the figures in docs/erase.md.

    python bench/toy_erasure.py --concept "Van Gogh" --anchor painting [--method doco]
           [--seeds 2] [--seed 0] [any erase override: --steps 400 --lr 1e-4 ...] [--out DIR]

Runs `erase()` with the toy preset (plus overrides), then judges fixed prompt groups drawn by
the original and the erased model with the same seeds (conceptctl.toy.erasure_check). Prints
one JSON line: the run's time and, per group, the judged rates before and after.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concept", required=True)
    parser.add_argument("--anchor", required=True)
    parser.add_argument("--method", default="doco")
    parser.add_argument("--seeds", type=int, default=2, help="judged images per prompt")
    parser.add_argument("--seed", type=int, default=0, help="the erase run's seed")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--skip-erase", action="store_true",
                        help="measure an existing artifact at --out instead of erasing again")
    for name, kind in (("steps", int), ("warmup", int), ("batch-size", int), ("lr", float),
                       ("d-lr", float), ("anchor-images", int), ("surgery", str),
                       ("discriminator", str), ("params", str), ("prior-batch", str)):
        parser.add_argument(f"--{name}", type=kind)
    args = parser.parse_args()

    from conceptctl.backbones.loading import open_backbone
    from conceptctl.erasure.anchors import guess_type
    from conceptctl.erasure.artifact import apply_artifact, read_artifact
    from conceptctl.erasure.config import EraseConfig, preset
    from conceptctl.erasure.run import erase
    from conceptctl.toy.erasure_check import erasure_report
    from conceptctl.toy.judge import Judge

    kind = guess_type(args.concept, args.anchor)
    base = EraseConfig(concept=args.concept, anchor=args.anchor, concept_type=kind,
                       backbone="toy")
    recipe = preset("toy", kind, args.batch_size, args.method)
    cfg = base.with_overrides(**recipe).with_overrides(
        method=args.method, seed=args.seed, steps=args.steps, warmup=args.warmup,
        batch_size=args.batch_size,
        lr=args.lr, d_lr=args.d_lr, anchor_images_per_prompt=args.anchor_images,
        surgery=args.surgery, discriminator=args.discriminator, params=args.params,
        prior_batch=args.prior_batch)
    out = args.out or Path(tempfile.mkdtemp(prefix="toy-erasure-")) / "artifact"
    start = time.time()
    result = None if args.skip_erase else erase(cfg, out, overwrite=True)
    erase_seconds = time.time() - start

    original = open_backbone("toy", device="cpu")
    erased = open_backbone("toy", device="cpu")
    apply_artifact(erased, read_artifact(out))
    start = time.time()
    report = erasure_report(original, erased, Judge.load(), args.concept, args.anchor,
                            seeds=args.seeds)
    print(json.dumps({
        "bench": "toy_erasure", "concept": args.concept, "anchor": args.anchor,
        "method": args.method, "config": cfg.as_dict(),
        "erase_seconds": None if result is None else round(erase_seconds, 1),
        "erase_breakdown": None if result is None else result.seconds,
        "anchors_cached": None if result is None else result.anchors_cached,
        "check_seconds": round(time.time() - start, 1), "artifact": str(out), **report,
    }))
    for name, row in report["groups"].items():
        before, after = row["before"], row["after"]
        print(f"{name:22s} concept {before['concept']:6.1%} -> {after['concept']:6.1%}"
              f"   correct {before['correct']:6.1%} -> {after['correct']:6.1%}")
    for name, row in report["objects"].items():
        print(f"object {name:15s} accuracy {row['before']:6.1%} -> {row['after']:6.1%}")


if __name__ == "__main__":
    main()
