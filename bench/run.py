"""All CPU benchmarks in one process: the figures of docs/performance.md.

    python bench/run.py --quick [--json FILE] [--threads N]   # <= 5 min on 2 CPU cores
    python bench/run.py [--json FILE] [--threads N]           # the full set (longer)

Prints one JSON line per measurement (and tables on stderr):

* ``doco_step``: a DoCo step broken down and its ratio to the floor (2 plain fine-tuning steps
  + 1 no-grad forward of the same UNet, parameters and batch), on the toy UNet and on the SD
  1.4-shaped UNet (reduced resolution and batch on a CPU);
* ``speed_settings``: the DoCo step with each setting side by side (SDPA vs classic attention,
  gradient checkpointing, bf16 autocast; torch.compile in the full run);
* ``warmup_forward``: the student's forward during discriminator warm-up, with a graph (before)
  and without (now);
* ``memory``: the frozen copy (full vs shared) and the activations kept for backward (with and
  without gradient checkpointing);
* ``surgery_and_optimiser``: the surgery and AdamW on SD 1.x's trained tensors, before and now;
* ``anchors``: anchor generation in images per second, one image per call vs batched, with
  the toy preset's sampler (and the SD 1.4-shaped pipeline in the full run).

Figures are wall-clock and process CPU time; on a machine shared with other work the CPU-time
ratios are the steadier ones (bench/common.py says why).
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

QUICK = dict(toy_rounds=4, sd_resolution=128, sd_batch=2, sd_rounds=2, compare_rounds=3,
             anchor_prompts=12, anchor_images=4, anchor_batches=[1, 8, 32], anchor_rounds=1,
             compile=False, sd_sampling=False)
FULL = dict(toy_rounds=8, sd_resolution=256, sd_batch=2, sd_rounds=3, compare_rounds=5,
            anchor_prompts=40, anchor_images=4, anchor_batches=[1, 8, 32, 64], anchor_rounds=2,
            compile=True, sd_sampling=True)


def doco(model, batch: int, rounds: int, records: list) -> dict:
    h = doco_step.Harness(model, batch)
    record = common.emit({"bench": "doco_step", "model": model.name, "batch": batch,
                          "threads": torch.get_num_threads(),
                          "attention": doco_step.processors(model.backbone.unet),
                          **doco_step.measure(h, rounds)}, records)
    print(doco_step.breakdown_table(record), file=sys.stderr)
    return {"harness": h, "record": record}


def speed_settings(h: doco_step.Harness, rounds: int, with_compile: bool, records: list):
    unet, precision = h.model.backbone.unet, h.training.precision

    def bf16_on():
        precision.mode = "bf16"

    def bf16_off():
        precision.mode = "no"

    attention = doco_step.attention_variants(h)
    variants = [
        ("default (fp32, SDPA)", h, lambda: None, lambda: None),
        ("classic attention (AttnProcessor)", h, attention[1][1], attention[1][2]),
        ("gradient checkpointing", h, unet.enable_gradient_checkpointing,
         unet.disable_gradient_checkpointing),
        ("bf16 autocast", h, bf16_on, bf16_off),
    ]
    if with_compile:
        compiled = doco_step.clone_harness(h, compile=True)
        t0 = time.time()
        compiled.doco_step()
        common.emit({"bench": "compile_time", "model": h.model.name,
                     "first_step_s": round(time.time() - t0, 1)}, records)
        variants.append(("torch.compile", compiled, lambda: None, lambda: None))
    result = doco_step.compare(variants, rounds)
    common.emit({"bench": "speed_settings", "model": h.model.name, "batch": h.batch,
                 "settings": result}, records)
    print(common.table([[k, v["wall_s"], v["cpu_s"], v["cpu_speedup_vs_first"]]
                        for k, v in result.items()],
                       [f"{h.model.name}: setting", "wall s", "CPU s", "CPU speed-up"]),
          file=sys.stderr)


def warmup_forward(h: doco_step.Harness, rounds: int, records: list):
    """The student's target-prompt forward in a warm-up step: with autograd's graph (as before
    this change) and under no_grad (now); the outputs are identical."""
    unet = h.model.backbone.unet
    x_t, b = h._inputs()
    outs = {}

    def with_graph():
        outs["graph"] = unet(x_t, b.timesteps, b.target_text).sample

    def without():
        with torch.no_grad():
            outs["none"] = unet(x_t, b.timesteps, b.target_text).sample

    with_graph(), without()
    clocks = {"with graph (before)": [], "no_grad (now)": []}
    for r in range(rounds):
        pairs = [("with graph (before)", with_graph), ("no_grad (now)", without)]
        for label, fn in pairs[r % 2:] + pairs[:r % 2]:
            clocks[label].append(common.timed(fn, h.device))
            outs.pop("graph", None) if label.startswith("with") else None
    with_graph()
    result = {label: {"wall_s": round(common.median([c.wall for c in v]), 4),
                      "cpu_s": round(common.median([c.cpu for c in v]), 4)}
              for label, v in clocks.items()}
    common.emit({"bench": "warmup_forward", "model": h.model.name, "batch": h.batch,
                 "identical_output": bool(torch.equal(outs["graph"], outs["none"])),
                 "held_for_backward_mb_before": doco_step.held_for_backward_mb(h, False),
                 "held_for_backward_mb_now": 0.0, **result}, records)


def surgery_and_optimiser(h: doco_step.Harness, rounds: int, records: list):
    """Surgery and AdamW on the trained tensors (SD 1.x: cross-attention k/v, 19 M values):
    before (fp64 copies of both gradients; torch's default multi-tensor AdamW) and now."""
    from conceptctl.erasure.surgery import DocoProjection, project

    params = list(h.training.params.values())
    g = torch.Generator().manual_seed(0)
    # Random pairs: about half conflict, as in training (bench "surgery fired" ~ 30-60 %).
    pairs = [(torch.randn(p.shape, generator=g), torch.randn(p.shape, generator=g))
             for p in params]
    now = DocoProjection(1.0, max_grad_norm=1.0)
    names = [f"t{i}" for i in range(len(pairs))]
    unlearn = dict(zip(names, (u for u, _ in pairs), strict=True))
    preserve = dict(zip(names, (q for _, q in pairs), strict=True))

    def before_surgery():  # the projection as computed before, in fp64 copies
        for u, q in pairs:
            dot = torch.dot(u.flatten().double(), q.flatten().double())
            if dot < 0:
                scale = dot / q.double().pow(2).sum().clamp_min(1e-12)
                (u.double() - scale * q.double()).to(u.dtype)

    def now_projection():  # the same projection as computed now, tensor by tensor
        for u, q in pairs:
            project(u, q)

    def now_surgery():
        # The whole set at once, its joint clip included (the trainer's clip before). The clip
        # scales the unchanged g_u tensors in place: from the second call on they are already
        # within the norm.
        now(dict(unlearn), dict(preserve))

    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
    for c in copies:
        c.grad = torch.randn(c.shape, generator=g)
    foreach = torch.optim.AdamW(copies, lr=1e-5, foreach=True)
    fused = torch.optim.AdamW(copies, lr=1e-5, fused=True)
    ops = {"surgery, fp64 copies (before)": before_surgery, "surgery (now)": now_projection,
           "surgery with its joint clip (now)": now_surgery,
           "AdamW multi-tensor (before)": foreach.step, "AdamW fused (now)": fused.step}
    for fn in ops.values():
        fn()
    clocks = {k: [] for k in ops}
    for _ in range(rounds):
        for k, fn in ops.items():
            clocks[k].append(common.timed(fn, h.device))
    common.emit({"bench": "surgery_and_optimiser", "model": h.model.name,
                 "trained_values": sum(p.numel() for p in params),
                 **{k: {"wall_s": round(common.median([c.wall for c in v]), 4),
                        "cpu_s": round(common.median([c.cpu for c in v]), 4)}
                    for k, v in clocks.items()}}, records)


def memory(h: doco_step.Harness, records: list):
    common.emit({"bench": "memory", "model": h.model.name, "batch": h.batch,
                 "frozen_copy": doco_step.frozen_copy_mb(h),
                 "held_for_backward_mb": {
                     "default": doco_step.held_for_backward_mb(h, False),
                     "gradient_checkpointing": doco_step.held_for_backward_mb(h, True)}},
                records)


def anchors(cfg: dict, records: list):
    from conceptctl.backbones.loading import open_backbone

    backbone = open_backbone("toy", device="cpu", dtype="float32")
    prompts = sampling_speed.toy_anchor_prompts(cfg["anchor_prompts"])
    result = sampling_speed.rates(backbone, prompts, cfg["anchor_images"], 20, 3.0,
                                  cfg["anchor_batches"], cfg["anchor_rounds"])
    record = common.emit({"bench": "anchors", "model": "toy", "sampler": "DPM-Solver++",
                          "preset": "toy object (church -> house)", **result}, records)
    print(common.table([[b, v["images_per_s"], v["images_per_cpu_s"]]
                        for b, v in record["by_batch"].items()],
                       ["toy anchors: batch", "images/s", "images/CPU-s"]), file=sys.stderr)
    if cfg["sd_sampling"]:
        sd = sampling_speed.sd14_pipeline_backbone("cpu", "float32")
        prompts = tuple(f"a photo of a house, view {i}" for i in range(4))
        result = sampling_speed.rates(sd, prompts, 1, 10, 6.0, [1, 4], 1, "anchors", 128)
        common.emit({"bench": "anchors", "model": "sd14-shaped@128px",
                     "sampler": "DPM-Solver++ (10 steps on a CPU; the preset has 25)", **result},
                    records)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the <= 5 min set")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    common.set_threads(args.threads)
    cfg = QUICK if args.quick else FULL
    started = time.time()
    records: list[dict] = []
    common.emit({"bench": "machine", "quick": args.quick, **common.machine()}, records)

    toy = doco(common.toy_model(), 8, cfg["toy_rounds"], records)["harness"]
    speed_settings(toy, cfg["compare_rounds"], cfg["compile"], records)
    warmup_forward(toy, cfg["compare_rounds"], records)
    sd = doco(common.sd14_model(cfg["sd_resolution"] // 8), cfg["sd_batch"], cfg["sd_rounds"],
              records)["harness"]
    memory(sd, records)
    surgery_and_optimiser(sd, cfg["compare_rounds"], records)
    if not args.quick:
        speed_settings(sd, 2, False, records)
    del sd
    anchors(cfg, records)

    summary = {r["bench"] + ":" + r.get("model", ""): r for r in records}
    toy_step, sd_step = (summary["doco_step:toy"],
                         summary[f"doco_step:sd14-shaped@{cfg['sd_resolution']}px"])
    toy_anchor = summary["anchors:toy"]["by_batch"]
    best = max(toy_anchor.values(), key=lambda v: v["images_per_s"])
    common.emit({"bench": "summary", "seconds": round(time.time() - started, 1),
                 "ratio_doco_to_floor": {
                     "toy": {c: toy_step[c]["ratio_doco_to_floor"] for c in ("wall", "cpu")},
                     sd_step["model"]: {c: sd_step[c]["ratio_doco_to_floor"]
                                        for c in ("wall", "cpu")}},
                 "anchor_batching_speedup_vs_one_per_call": {
                     "wall": best["speedup_vs_batch_1"], "cpu": best["cpu_speedup_vs_batch_1"]}},
                records)
    common.write_json(args.json, records)


if __name__ == "__main__":
    main()
