"""What one DoCo training step costs, part by part, against its floor.

    python bench/doco_step.py [--model toy|sd14|sdxl] [--resolution PX] [--batch B]
                              [--rounds R] [--device cpu|cuda] [--mixed-precision no|bf16|fp16]
                              [--gradient-checkpointing] [--compile] [--width N] [--json FILE]

The step is one iteration of conceptctl's real training loop with the built-in DoCo method
(PatchGAN discriminator, exact surgery, cross-attention k/v trained), built by
``conceptctl.erasure.run.prepare_training`` exactly as ``conceptctl erase`` builds it; its parts
are timed by the method's own sections. The floor is what any implementation must spend on
the same UNet, trained parameters and batch: two plain fine-tuning steps (forward + MSE loss +
backward: DoCo needs two gradients, g_u and g_p) plus one no-grad forward (the frozen model's
target). The three are measured in the same process, interleaved with the DoCo steps, in
rounds (order rotated each round); the ratio is reported as the median over rounds of
DoCo / floor measured in the same round, and as min(DoCo) / (2 min(fine-tune) + min(forward)).

The warm-up step (first ``--warmup`` steps: discriminator only) is measured too: the reference
recipe spends half its steps there. Peak memory: the GPU allocator's peak over the rounds
(CUDA), or the process's peak resident set size (CPU; it includes building the model).

``sdxl`` is a full-size SDXL-shaped UNet (2.6 B parameters, random weights: bench/common.py),
conditioned through conceptctl's SDXL path: 77 token rows of 2048 plus the pooled row, which
the UNet hook unpacks into the pooled embedding and the size numbers. ``--width N`` divides
the channels of ``sd14``/``sdxl`` by N (same layout: a dry run that checks the code runs).
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


class Harness:
    """A DoCo training set up as ``erase`` does it, on synthetic anchors, plus the floor's
    reference operations on the same student UNet."""

    def __init__(self, model: common.Model, batch: int, *, seed: int = 0, **cfg_overrides):
        from conceptctl.erasure.config import EraseConfig
        from conceptctl.erasure.run import apply_speed_settings, prepare_training
        from conceptctl.erasure.trainer import TrainingData

        self.model, self.batch = model, batch
        backbone = model.backbone
        self.device = backbone.device
        self.cfg = EraseConfig(concept="bench", anchor="anchor", backbone=model.name,
                               warmup=0, batch_size=batch, steps=10**9, seed=seed,
                               **cfg_overrides)
        apply_speed_settings(self.cfg, self.device)
        self.sections = common.Sections(self.device)
        self.training = prepare_training(backbone, self.cfg, timer=self.sections)
        g = torch.Generator().manual_seed(seed)
        n, prompts, side = 64, 8, model.latent_size
        self.data = TrainingData(
            latents=torch.randn(n, 4, side, side, generator=g),
            prompt_index=torch.arange(prompts).repeat_interleave(n // prompts),
            anchor_text=model.random_text(prompts, g),
            target_text=model.random_text(prompts, g),
            empty_text=model.random_text(1, g),
        )
        self.generator = torch.Generator().manual_seed(seed + 1)
        backbone.unet.train()

    def doco_step(self, warmup: bool = False) -> None:
        from conceptctl.erasure.trainer import run_loop

        t = self.training
        t.method.warmup = t.state.step + 1 if warmup else 0
        backbone = self.model.backbone
        run_loop(t.method, t.optimizer, t.params, self.data, t.state, steps=t.state.step + 1,
                 batch_size=self.batch, max_grad_norm=self.cfg.max_grad_norm,
                 device=backbone.device, dtype=backbone.dtype, precision=t.precision,
                 num_timesteps=backbone.num_train_timesteps)

    def _inputs(self):
        backbone = self.model.backbone
        b = self.data.batch(self.batch, self.generator, backbone.device, backbone.dtype,
                            backbone.num_train_timesteps)
        x_t = backbone.add_noise(b.latents, b.noise, b.timesteps)
        return x_t, b

    def finetune_step(self) -> None:
        """Plain fine-tuning of the same UNet and parameters: forward, MSE, backward."""
        x_t, b = self._inputs()
        t = self.training
        t.optimizer.zero_grad(set_to_none=True)
        with t.precision.autocast():
            pred = self.model.backbone.unet(x_t, b.timesteps, b.anchor_text).sample
            loss = F.mse_loss(pred.float(), b.noise.float())
        t.precision.backward(loss)
        t.optimizer.zero_grad(set_to_none=True)

    def nograd_forward(self) -> None:
        x_t, b = self._inputs()
        with torch.no_grad(), self.training.precision.autocast():
            self.training.frozen(x_t, b.timesteps, b.anchor_text)


def _ratios(times: dict[str, list[float]]) -> dict:
    ft = [(a + b) / 2 for a, b in zip(times["finetune_a"], times["finetune_b"], strict=True)]
    floor = [2 * f + n for f, n in zip(ft, times["nograd"], strict=True)]
    ratios = [d / f for d, f in zip(times["doco"], floor, strict=True)]
    min_ft = min(times["finetune_a"] + times["finetune_b"])
    doco = common.median(times["doco"])
    out = {
        "doco_step_s": round(doco, 4),
        "finetune_step_s": round(common.median(ft), 4),
        "nograd_forward_s": round(common.median(times["nograd"]), 4),
        "floor_s": round(common.median(floor), 4),
        "ratio_doco_to_floor": round(common.median(ratios), 3),
        "ratio_doco_to_floor_of_minima": round(
            min(times["doco"]) / (2 * min_ft + min(times["nograd"])), 3),
        "ratio_doco_to_one_finetune_step": round(doco / common.median(ft), 3),
        "ratio_range": [round(min(ratios), 3), round(max(ratios), 3)],
    }
    if "warmup_step" in times:
        out["warmup_step_s"] = round(common.median(times["warmup_step"]), 4)
    return out


def measure(h: Harness, rounds: int, warmup_steps: bool = True) -> dict:
    """Interleaved rounds of DoCo step, 2 fine-tuning steps and a no-grad forward; figures on
    both clocks (``wall`` and ``cpu``, see common.timed)."""
    dev = h.device
    # Warm-up: allocator, oneDNN/cuDNN algorithm choice, torch.compile's compilation.
    for _ in range(2):
        h.doco_step()
        h.finetune_step()
        h.nograd_forward()
        if warmup_steps:
            h.doco_step(warmup=True)
    ops = {"doco": h.doco_step, "finetune_a": h.finetune_step, "finetune_b": h.finetune_step,
           "nograd": h.nograd_forward}
    if warmup_steps:
        ops["warmup_step"] = lambda: h.doco_step(warmup=True)
    names = list(ops)
    clocks: dict[str, list[common.Clock]] = {n: [] for n in names}
    parts: list[dict[str, common.Clock]] = []
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            if name == "doco":
                h.sections.seconds.clear()
            clocks[name].append(common.timed(ops[name], dev))
            if name == "doco":
                parts.append(dict(h.sections.seconds))
    result: dict = {"rounds": rounds}
    for clock in ("wall", "cpu"):
        times = {n: [getattr(c, clock) for c in v] for n, v in clocks.items()}
        figures = _ratios(times)
        breakdown = {k: round(common.median([getattr(p[k], clock) for p in parts]), 4)
                     for k in parts[0]}
        breakdown["batch, clip, optimiser, bookkeeping"] = round(
            figures["doco_step_s"] - sum(breakdown.values()), 4)
        figures["breakdown_s"] = breakdown
        result[clock] = figures
    result.update(peak_memory(dev))
    return result


def peak_memory(device) -> dict:
    """{"peak_memory_gb": the CUDA allocator's peak} or, on a CPU, {"peak_rss_gb": the
    process's peak resident set size}: conceptctl erase's own figure (its peak_memory_mb)."""
    from conceptctl.erasure.run import peak_memory_mb

    key = "peak_memory_gb" if device.type == "cuda" else "peak_rss_gb"
    return {key: round(peak_memory_mb(device) / 2**10, 2)}


def compare(variants: list[tuple[str, Harness, object, object]], rounds: int) -> dict:
    """DoCo step time of several set-ups, interleaved round-robin in one process.

    Each variant is (label, harness, enter, leave): ``enter``/``leave`` switch a setting on the
    harness's modules around its steps (attention processor, checkpointing)."""
    dev = variants[0][1].device
    clocks: dict[str, list[common.Clock]] = {v[0]: [] for v in variants}
    peaks: dict[str, float] = {}
    for label, h, enter, leave in variants:  # warm-up each
        enter()
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        for _ in range(2):
            h.doco_step()
        if dev.type == "cuda":
            peaks[label] = round(torch.cuda.max_memory_allocated(dev) / 2**30, 2)
        leave()
    for r in range(rounds):
        order = variants[r % len(variants):] + variants[:r % len(variants)]
        for label, h, enter, leave in order:
            enter()
            clocks[label].append(common.timed(h.doco_step, dev))
            leave()
    first = variants[0][0]
    out = {}
    for label, _, _, _ in variants:
        row = {}
        for clock in ("wall", "cpu"):
            m = common.median([getattr(c, clock) for c in clocks[label]])
            base = common.median([getattr(c, clock) for c in clocks[first]])
            row[f"{clock}_s"] = round(m, 4)
            row[f"{clock}_speedup_vs_first"] = round(base / m, 3)
        if label in peaks:
            row["peak_memory_gb"] = peaks[label]
        out[label] = row
    return out


def held_for_backward_mb(h: Harness, gradient_checkpointing: bool) -> float:
    """Activation memory the student's forward keeps for its backward (one DoCo student pass),
    counted on the tensors autograd saves (parameters excluded). A CPU has no allocator peak to
    read per phase; this is the part that gradient checkpointing trades for recomputation."""
    unet = h.model.backbone.unet
    weights = {p.untyped_storage().data_ptr() for p in unet.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    if gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    try:
        x_t, b = h._inputs()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
                h.training.precision.autocast():
            out = unet(x_t, b.timesteps, b.target_text).sample
        del out
    finally:
        if gradient_checkpointing:
            unet.disable_gradient_checkpointing()
    return round(sum(seen.values()) / 2**20, 1)


def frozen_copy_mb(h: Harness) -> dict:
    """Memory of the frozen original: a full copy of the UNet versus conceptctl's copy, which
    shares every tensor that does not train."""
    unet, frozen = h.model.backbone.unet, h.training.frozen
    student = {t.untyped_storage().data_ptr() for t in (*unet.parameters(), *unet.buffers())}
    full = sum(t.numel() * t.element_size() for t in (*unet.parameters(), *unet.buffers()))
    own = sum(t.numel() * t.element_size() for t in (*frozen.parameters(), *frozen.buffers())
              if t.untyped_storage().data_ptr() not in student)
    return {"full_copy_mb": round(full / 2**20, 1), "shared_copy_mb": round(own / 2**20, 1)}


def attention_variants(h: Harness):
    """(label, enter, leave) for diffusers' classic attention vs PyTorch SDPA (AttnProcessor2_0,
    the default that ``erase`` runs with)."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    unets = (h.model.backbone.unet, h.training.frozen)

    def use(processor_class):
        def switch():
            for u in unets:
                u.set_attn_processor(processor_class())
        return switch

    return [("SDPA (AttnProcessor2_0, default)", use(AttnProcessor2_0), lambda: None),
            ("classic attention (AttnProcessor)", use(AttnProcessor), use(AttnProcessor2_0))]


def breakdown_table(record: dict) -> str:
    wall, cpu = record["wall"], record["cpu"]
    rows = [[k, v, cpu["breakdown_s"][k]] for k, v in wall["breakdown_s"].items()]
    rows += [["DoCo step", wall["doco_step_s"], cpu["doco_step_s"]],
             ["floor: 2 fine-tuning steps + 1 no-grad forward", wall["floor_s"], cpu["floor_s"]],
             ["DoCo / floor (median of rounds)", wall["ratio_doco_to_floor"],
              cpu["ratio_doco_to_floor"]]]
    return common.table(rows, [f"{record['model']}, batch {record['batch']}", "wall s",
                               "CPU s"])


def processors(unet) -> list[str]:
    return sorted({type(p).__name__ for p in unet.attn_processors.values()})


# Each model's native picture side, the default --resolution.
NATIVE_RESOLUTION = {"sd14": 512, "sdxl": 1024}


def build_model(name: str, resolution: int | None, device: str, dtype=torch.float32,
                width: int = 1):
    if name == "toy":
        return common.toy_model(device)
    build = common.sdxl_model if name == "sdxl" else common.sd14_model
    return build((resolution or NATIVE_RESOLUTION[name]) // 8, device, dtype, width=width)


def clone_harness(h: Harness, **cfg_overrides) -> Harness:
    """A second harness on a copy of the model (for settings that cannot be switched back, such
    as torch.compile)."""
    backbone = h.model.backbone
    unet = copy.deepcopy(backbone.unet)
    model = common.Model(h.model.name, common.unet_backbone(unet, h.model.latent_size,
                                                            str(h.device), backbone.dtype),
                         h.model.latent_size, h.model.tokens, h.model.text_width,
                         h.model.pooled_width)
    return Harness(model, h.batch, **cfg_overrides)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("toy", "sd14", "sdxl"), default="toy")
    parser.add_argument("--resolution", type=int,
                        help="sd14, sdxl: image side in pixels, a multiple of 8 (latents are "
                             "1/8; default: the model's own, 512 and 1024)")
    parser.add_argument("--width", type=int, default=1,
                        help="sd14, sdxl: divide the channels by N (a dry run; default 1)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--mixed-precision", default="no", choices=("no", "bf16", "fp16"))
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    args = parser.parse_args()
    if args.resolution is not None and (args.resolution < 64 or args.resolution % 8):
        parser.error(f"--resolution must be a multiple of 8 of at least 64, not "
                     f"{args.resolution}")
    if args.width < 1:
        parser.error(f"--width must be 1 or more, not {args.width}")
    if args.model == "toy" and (args.resolution or args.width > 1):
        parser.error("--resolution and --width are for sd14 and sdxl (the toy is 64 px)")
    common.set_threads(args.threads)

    model = build_model(args.model, args.resolution, args.device, width=args.width)
    h = Harness(model, args.batch, mixed_precision=args.mixed_precision,
                gradient_checkpointing=args.gradient_checkpointing, compile=args.compile)
    record = {"bench": "doco_step", "model": model.name, "batch": args.batch,
              "device": args.device, "mixed_precision": args.mixed_precision,
              "gradient_checkpointing": args.gradient_checkpointing, "compile": args.compile,
              "threads": torch.get_num_threads(), "attention": processors(model.backbone.unet),
              **measure(h, args.rounds)}
    # What gradient checkpointing saves, from this one process (a CPU's peak RSS cannot be
    # reset to measure both settings): activations one student forward keeps for backward.
    model.backbone.unet.disable_gradient_checkpointing()
    record["held_for_backward_mb"] = {"plain": held_for_backward_mb(h, False),
                                      "gradient_checkpointing": held_for_backward_mb(h, True)}
    records = [common.emit(record)]
    print(breakdown_table(record), file=sys.stderr)
    common.write_json(args.json, records)


if __name__ == "__main__":
    main()
