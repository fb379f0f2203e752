"""The GPU part of the benchmarks, in one call: SD 1.4-shaped UNet at 512 px, batch 8, and
SDXL-shaped UNet at 1024 px, batch 8.

    python bench/gpu.py [--json FILE] [--budget-s 420]      # on a CUDA GPU, < 10 min
    python bench/gpu.py --dry-run                            # on a CPU: tiny sizes, proves it runs

Measures, on the SD 1.4-shaped UNet (random weights, bench/common.py) at 512 px (64 x 64
latents), batch 8, as ``conceptctl erase`` trains it (fp32 weights, cross-attention k/v trained,
PatchGAN, exact surgery):

1. the DoCo step in bf16 autocast with TF32 and SDPA: time, parts, ratio to its floor, the
   warm-up step, peak GPU memory (bench/doco_step.py);
2. the DoCo step under each setting, side by side: fp32 without TF32, fp32 with TF32, bf16,
   fp16 (loss scaling), bf16 + gradient checkpointing, bf16 with classic (non-SDPA) attention,
   and, if time is left, bf16 + torch.compile: time and peak memory;
3. anchor generation (SD 1.4-shaped pipeline, DPM-Solver 25 steps, guidance 6, 512 px) in
   images per second by batch size, with bf16 autocast over fp32 weights (``erase
   --mixed-precision bf16``) and with fp16 weights (``sample``'s default on GPUs);
4. the projected time of the reference recipe: 1000 anchor images + 2000 steps of which 1000
   are warm-up, batch 8 at 512 px, from the figures above;
5. SDXL: the DoCo step of the SDXL-shaped UNet (2.6 B parameters, random weights,
   bench/common.py; conditioned through conceptctl's SDXL hook) at 1024 px (128 x 128
   latents), batch 8, the recipe's, in bf16 autocast: time, parts, ratio to its floor and peak
   GPU memory, without and with gradient checkpointing (3 rounds each). A setting that does
   not fit the GPU is reported as out of memory.

Prints JSON lines and tables; ``--json`` also writes everything to one file, rewritten after
each part (a run stopped midway keeps what it measured). ``--budget-s`` skips the optional
parts (compile) once half of it has passed.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import doco_step  # noqa: E402
import sampling_speed  # noqa: E402
import torch  # noqa: E402

RECIPE = {"anchor_images": 1000, "steps": 2000, "warmup": 1000, "batch": 8, "resolution": 512}
# SDXL: the same recipe (conceptctl keeps DoCo's SD recipe for SDXL) at SDXL's own resolution;
# 3 rounds keep this part to about two minutes of the script's ten.
SDXL = {"batch": RECIPE["batch"], "resolution": 1024, "rounds": 3}


def sdxl_steps(model: common.Model, batch: int, rounds: int, records: list[dict]) -> dict:
    """The DoCo step of an SDXL-shaped model in bf16 autocast against its floor, plain and
    with gradient checkpointing (the floor's fine-tuning steps checkpoint too): time, parts,
    peak memory. A setting the GPU has no memory for gives {"out_of_memory": message}."""
    h = doco_step.Harness(model, batch, mixed_precision="bf16")
    unet = model.backbone.unet
    results = {}
    for checkpointing in (False, True):
        if checkpointing:
            unet.enable_gradient_checkpointing()
        record = {"bench": "gpu/sdxl_doco_step", "model": model.name, "batch": batch,
                  "mixed_precision": "bf16", "tf32": True, "gradient_checkpointing":
                  checkpointing, "attention": doco_step.processors(unet)}
        try:
            record.update(doco_step.measure(h, rounds))
        except torch.cuda.OutOfMemoryError as error:
            record["out_of_memory"] = str(error).splitlines()[0]
        finally:
            unet.disable_gradient_checkpointing()
            for p in h.training.params.values():  # what a step cut short left behind
                p.grad = None
            if h.device.type == "cuda":
                torch.cuda.empty_cache()
        results["checkpointing" if checkpointing else "plain"] = common.emit(record, records)
        if "out_of_memory" not in record:
            print(doco_step.breakdown_table(record), file=sys.stderr)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true",
                        help="tiny sizes on the CPU: checks that every part runs")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--budget-s", type=float, default=420.0)
    args = parser.parse_args()
    started = time.time()

    if args.dry_run:
        # Every part on the CPU at toy sizes: the SD 1.4 layout at 1/10 of its channels, 64 px.
        device, resolution, batch, rounds, width = "cpu", 64, 2, 1, 10
        anchor_images, anchor_steps, anchor_batches = 2, 2, [1, 2]
        low = torch.bfloat16
    else:
        if not torch.cuda.is_available():
            sys.exit("no CUDA GPU: run with --dry-run to check the script on a CPU")
        device, resolution, batch, rounds, width = "cuda", RECIPE["resolution"], \
            RECIPE["batch"], 5, 1
        anchor_images, anchor_steps, anchor_batches = 16, 25, [1, 8, 16]
        low = torch.float16
    records: list[dict] = []
    common.emit({"bench": "gpu/machine", "dry_run": args.dry_run, **common.machine()}, records)

    # 1. The DoCo step in bf16 (what the reference recipe would run with here).
    save = lambda: common.write_json(args.json, records, quiet=True)  # noqa: E731
    model = common.sd14_model(resolution // 8, device, width=width)
    bf16 = doco_step.Harness(model, batch, mixed_precision="bf16")
    step = common.emit({"bench": "gpu/doco_step", "model": model.name, "batch": batch,
                        "mixed_precision": "bf16", "tf32": True,
                        "attention": doco_step.processors(model.backbone.unet),
                        **doco_step.measure(bf16, rounds)}, records)
    print(doco_step.breakdown_table(step), file=sys.stderr)
    save()

    # 2. Each setting side by side, on the same UNet (switched around each step).
    unet = model.backbone.unet
    precision = bf16.training.precision

    def mode(mp: str, tf32: bool):
        def enter():
            precision.mode, precision.scaling = mp, mp == "fp16"
            precision.scale = 2.0**16 if mp == "fp16" else 1.0
            torch.backends.cuda.matmul.allow_tf32 = tf32
            torch.backends.cudnn.allow_tf32 = tf32
        return enter

    def reset():
        mode("bf16", True)()
        unet.disable_gradient_checkpointing()

    def checkpointing():
        mode("bf16", True)()
        unet.enable_gradient_checkpointing()

    attention = doco_step.attention_variants(bf16)
    variants = [
        ("fp32, TF32 off", bf16, mode("no", False), reset),
        ("fp32, TF32 on", bf16, mode("no", True), reset),
        ("bf16 autocast, TF32 on (default speed settings + --mixed-precision bf16)", bf16,
         mode("bf16", True), reset),
        ("fp16 autocast + loss scaling", bf16, mode("fp16", True), reset),
        ("bf16 + gradient checkpointing", bf16, checkpointing, reset),
        ("bf16, classic attention (no SDPA)", bf16,
         lambda: (mode("bf16", True)(), attention[1][1]()), attention[1][2]),
    ]
    comparison = doco_step.compare(variants, max(2, rounds - 2))
    common.emit({"bench": "gpu/doco_step_settings", "model": model.name, "batch": batch,
                 "settings": comparison}, records)
    print(common.table([[k, v["wall_s"], v["wall_speedup_vs_first"], v.get("peak_memory_gb")]
                        for k, v in comparison.items()],
                       ["setting", "DoCo step s", "speed-up", "peak GB"]), file=sys.stderr)
    reset()
    save()

    # Optional: torch.compile, only when the time budget allows (it compiles for minutes; on a
    # CPU dry run far longer: there `bench/doco_step.py --compile` covers the code on the toy).
    if args.dry_run:
        common.emit({"bench": "gpu/compile", "skipped": "dry run"}, records)
    elif time.time() - started < args.budget_s / 2:
        compiled = doco_step.clone_harness(bf16, mixed_precision="bf16", compile=True)
        t0 = time.time()
        compiled.doco_step()
        compile_s = time.time() - t0
        both = doco_step.compare([("bf16 eager", bf16, lambda: None, lambda: None),
                                  ("bf16 + torch.compile", compiled, lambda: None,
                                   lambda: None)], max(2, rounds - 2))
        common.emit({"bench": "gpu/compile", "first_step_s": round(compile_s, 1),
                     "settings": both}, records)
        del compiled
    else:
        common.emit({"bench": "gpu/compile", "skipped": "time budget"}, records)
    save()
    del bf16, model
    unet = None  # let the SD-shaped UNet go before the pipeline is built
    if device == "cuda":
        torch.cuda.empty_cache()

    # 3. Anchor generation on the SD 1.4-shaped pipeline.
    prompts = tuple(f"a photo of a house, view {i}" for i in range(anchor_images))
    anchors = {}
    for label, dtype, mp in (("fp32 weights + bf16 autocast (erase --mixed-precision bf16)",
                              "float32", "bf16"),
                             (f"{str(low).removeprefix('torch.')} weights (sample)",
                              str(low).removeprefix("torch."), "no")):
        backbone = sampling_speed.sd14_pipeline_backbone(device, dtype, width)
        rates = sampling_speed.rates(backbone, prompts, 1, anchor_steps, 6.0, anchor_batches,
                                     1, "anchors", resolution, mp)
        anchors[label] = rates
        common.emit({"bench": "gpu/anchors", "setting": label, "resolution": resolution,
                     **rates}, records)
        del backbone
        if device == "cuda":
            torch.cuda.empty_cache()
        save()

    # 4. The reference recipe, projected from the measured parts (bf16 everywhere).
    erase_anchors = anchors["fp32 weights + bf16 autocast (erase --mixed-precision bf16)"]
    best_rate = max(v["images_per_s"] for v in erase_anchors["by_batch"].values())
    # The anchor bench used fewer steps on a dry run; scale to the recipe's 25.
    rate_25 = best_rate * anchor_steps / 25
    wall = step["wall"]
    projection = {
        "anchor_images_s": round(RECIPE["anchor_images"] / rate_25, 1),
        "warmup_steps_s": round(RECIPE["warmup"] * wall["warmup_step_s"], 1),
        "training_steps_s": round((RECIPE["steps"] - RECIPE["warmup"]) * wall["doco_step_s"], 1),
    }
    projection["total_s"] = round(sum(projection.values()), 1)
    projection["total_min"] = round(projection["total_s"] / 60, 1)
    common.emit({"bench": "gpu/reference_recipe_projection", "recipe": RECIPE,
                 "from": {"anchor_images_per_s": round(rate_25, 3),
                          "warmup_step_s": wall["warmup_step_s"],
                          "doco_step_s": wall["doco_step_s"],
                          "peak_memory_gb": step.get("peak_memory_gb")},
                 "projected": projection, "dry_run": args.dry_run,
                 "elapsed_s": round(time.time() - started, 1)}, records)
    save()

    # 5. SDXL at 1024 px (the dry run: its layout at 1/10 of the channels, 64 px, batch 1).
    if args.dry_run:
        xl_model = common.sdxl_model(8, device, width=width)
        xl_batch, xl_rounds = 1, 1
    else:
        xl_model = common.sdxl_model(SDXL["resolution"] // 8, device)
        xl_batch, xl_rounds = SDXL["batch"], SDXL["rounds"]
    sdxl_steps(xl_model, xl_batch, xl_rounds, records)
    common.emit({"bench": "gpu/done", "elapsed_s": round(time.time() - started, 1)}, records)
    common.write_json(args.json, records)


if __name__ == "__main__":
    main()
