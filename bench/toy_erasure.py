"""Erase a toy concept and measure it: the figures in docs/erase.md.

    python bench/toy_erasure.py --concept "Van Gogh" --anchor painting [--method doco]
           [--seed 0] [any erase override: --steps 400 --lr 1e-4 ...] [--out DIR]
    python bench/toy_erasure.py --from-report evaluations/compare/doco   # an existing report

Runs `erase()` with the toy preset (plus overrides), then the default evaluation (no attacks
unless `--attacks` names them)
(`conceptctl.evaluation.report.evaluate_to`: the toy suite, drawn by the original and the erased
model with the same seeds, graded by the toy judge) and reduces its report to the figures the
docs give: per group the concept rate or the preservation, and every object's accuracy over the
non-target groups. `--from-report` reduces a report folder `conceptctl eval` wrote. Prints one
JSON line, then a table.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concept")
    parser.add_argument("--anchor")
    parser.add_argument("--method", default="doco")
    parser.add_argument("--images-per-prompt", type=int, default=2,
                        help="judged pictures per prompt and model")
    parser.add_argument("--seed", type=int, default=0, help="the erase run's seed")
    parser.add_argument("--out", type=Path, help="the artifact (its report goes to OUT-report)")
    parser.add_argument("--skip-erase", action="store_true",
                        help="measure an existing artifact at --out instead of erasing again")
    parser.add_argument("--from-report", type=Path,
                        help="reduce an existing evaluation report folder; nothing is drawn")
    for name, kind in (("steps", int), ("warmup", int), ("batch-size", int), ("lr", float),
                       ("d-lr", float), ("anchor-images", int), ("surgery", str),
                       ("discriminator", str), ("params", str), ("prior-batch", str),
                       ("d-update", str), ("augment", str), ("adversarial-steps", int),
                       ("adversarial-every", int), ("adversarial-tokens", int),
                       ("adversarial-lr", float), ("adversarial-retain", float),
                       ("adversarial-rows", str), ("retain-prompts", str),
                       ("retain-refine", float)):
        parser.add_argument(f"--{name}", type=kind)
    parser.add_argument("--adversarial", action="store_true", help="adversarial erasure")
    parser.add_argument("--attacks", default="",
                        help="attacks the evaluation runs too, e.g. "
                        "unlearndiffatk,embedding,paraphrase (default: none)")
    args = parser.parse_args()
    if args.from_report:
        report = json.loads((args.from_report / "report.json").read_text())
        line = {"bench": "toy_erasure", "report": str(args.from_report), **summary(report)}
    else:
        if not (args.concept and args.anchor):
            parser.error("--concept and --anchor are needed (or --from-report)")
        line = erase_and_measure(args)
    print(json.dumps(line))
    print_table(line)


def erase_and_measure(args) -> dict:
    from conceptctl.erasure.config import plan
    from conceptctl.erasure.run import erase
    from conceptctl.evaluation.report import evaluate_to
    from conceptctl.evaluation.run import EvalOptions

    cfg = plan(args.concept, args.anchor, "toy", method=args.method, seed=args.seed,
               steps=args.steps, warmup=args.warmup, batch_size=args.batch_size, lr=args.lr,
               d_lr=args.d_lr, anchor_images_per_prompt=args.anchor_images,
               surgery=args.surgery, discriminator=args.discriminator, params=args.params,
               prior_batch=args.prior_batch, d_update=args.d_update,
               augment=args.augment, adversarial=args.adversarial,
               adversarial_steps=args.adversarial_steps, adversarial_every=args.adversarial_every,
               adversarial_tokens=args.adversarial_tokens, adversarial_lr=args.adversarial_lr,
               adversarial_retain=args.adversarial_retain, adversarial_rows=args.adversarial_rows,
               retain_prompts=args.retain_prompts,
               retain_refine=args.retain_refine)
    out = args.out or Path(tempfile.mkdtemp(prefix="toy-erasure-")) / "artifact"
    start = time.time()
    result = None if args.skip_erase else erase(cfg, out, overwrite=True)
    erase_seconds = time.time() - start
    start = time.time()
    attacks = tuple(a for a in args.attacks.split(",") if a)
    opts = EvalOptions(attacks=attacks, metrics=("erasure", "preservation"),
                       images_per_prompt=args.images_per_prompt, device="cpu")
    report = evaluate_to(out, opts, out.with_name(out.name + "-report"), overwrite=True)
    # With --skip-erase the artifact's own record says how it was made, not this command line.
    config = (json.loads((out / "conceptctl.json").read_text())["hyperparameters"]
              if args.skip_erase else cfg.as_dict())
    return {
        "bench": "toy_erasure", "concept": config["concept"], "anchor": config["anchor"],
        "method": config["method"], "config": config,
        "erase_seconds": None if result is None else round(erase_seconds, 1),
        "erase_breakdown": None if result is None else result.seconds,
        "anchors_cached": None if result is None else result.anchors_cached,
        "check_seconds": round(time.time() - start, 1), "artifact": str(out),
        **summary(report),
    }


def summary(report: dict) -> dict:
    """A toy evaluation report reduced to docs/erase.md's figures.

    ``groups``: the target groups' concept rate before and after; for anchor, each hard
    negative and general prompts, the preservation (accuracy after / before, every axis the
    prompt names judged). ``objects``: per object (the erased one aside), the share of pictures
    of the anchor, hard-negative and general prompts that ask for it and show it, before and
    after, and kept = after / before.
    """
    from conceptctl.toy.world import normalise

    if report["suite"]["name"] != "toy":
        raise SystemExit(f"not a toy-suite report: {report['suite']['name']}")
    groups = {}
    for m in report["metrics"]:
        if m["metric"] == "erasure":
            groups[m["group"]] = {"concept_before": m["details"]["concept_rate_before"],
                                  "concept_after": m["details"]["concept_rate_after"]}
        elif m["metric"] == "preservation":
            groups[m["group"]] = {"kept": m["value"], **m["details"]}
    source = report["suite"]["source"]
    axis = source["axis"]
    erased = normalise(axis, source["concept"])
    counts: dict[str, list[int]] = {}  # object -> [shown before, shown after, pictures]
    for record in report["images"]:
        wanted = record["expect"].get("object")  # what the prompt asks for, as recorded
        if record["group"].startswith("target") or wanted is None:
            continue
        if axis == "object" and wanted == erased:
            continue
        row = counts.setdefault(wanted, [0, 0, 0])
        row[0] += record["original"]["labels"]["object"] == wanted
        row[1] += record["erased"]["labels"]["object"] == wanted
        row[2] += 1
    objects = {o: {"before": b / n, "after": a / n, "kept": a / b if b else None}
               for o, (b, a, n) in sorted(counts.items())}
    attacks = {a["attack"]: {k: a.get(k) for k in ("success_rate", "no_attack_rate", "cases",
                                                   "pictures", "seconds", "settings", "sweep",
                                                   "original_sweep")}
               for a in report.get("attacks", [])}
    return {"seconds": report["seconds"], "groups": groups, "objects": objects,
            "attacks": attacks}


def print_table(line: dict) -> None:
    for name, row in line["groups"].items():
        if "concept_after" in row:
            print(f"{name:28s} concept {row['concept_before']:6.1%} -> "
                  f"{row['concept_after']:6.1%}")
        else:
            kept = "-" if row["kept"] is None else f"{row['kept']:6.1%}"
            print(f"{name:28s} kept {kept}   accuracy {row['accuracy_before']:6.1%} -> "
                  f"{row['accuracy_after']:6.1%}")
    for name, row in line["objects"].items():
        print(f"object {name:21s} accuracy {row['before']:6.1%} -> {row['after']:6.1%}")
    for name, row in line.get("attacks", {}).items():
        print(f"attack {name:21s} ASR {row['success_rate']:6.1%} (no attack "
              f"{row['no_attack_rate']:6.1%}, {row['cases']} cases, {row['seconds']:.0f} s)")
        if row.get("sweep"):
            print(f"  sweep (steps: ASR) {_points(row['sweep'])}; original "
                  f"{_points(row.get('original_sweep') or [])}")


def _points(sweep: list[dict]) -> str:
    return ", ".join(f"{p['steps']}: {p['success_rate']:.1%}" for p in sweep)


if __name__ == "__main__":
    main()
