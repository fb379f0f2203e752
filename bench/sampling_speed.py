"""Anchor generation and sampling throughput (images per second) by batch size.

    python bench/sampling_speed.py [--model toy|sd14] [--resolution PX] [--prompts N]
                                   [--images-per-prompt K] [--steps S] [--guidance G]
                                   [--batch-sizes 1,8,32] [--rounds R] [--threads T]
                                   [--device cpu|cuda] [--dtype float32|float16|bfloat16]
                                   [--json FILE]

Anchor generation is conceptctl's own path (``conceptctl.sampling.sample_latents``, as
``erase`` calls it: latents, no VAE) with the toy preset's anchor prompts (church -> house,
DPM-Solver, 20 steps, guidance 3) or, for the SD 1.4-shaped pipeline, the SD preset's sampler
(25 steps, guidance 6; fewer with --steps on a CPU). "Batch 1" is one image per pipeline call:
the same sampler, steps and seeds, so the images are the same up to float rounding. Batch sizes
are measured side by side, round-robin, in one process. Sampling (``sample_images``: latents,
VAE decode and PIL pictures, what ``conceptctl sample`` does) is measured the same way.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import torch  # noqa: E402

# vae/config.json of CompVis/stable-diffusion-v1-4
SD14_VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32,
    act_fn="silu", sample_size=512, scaling_factor=0.18215,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
)
# text_encoder/config.json of CompVis/stable-diffusion-v1-4 (CLIP ViT-L/14 text tower)
SD14_TEXT_CONFIG = dict(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
    num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
    projection_dim=768,
)


def sd14_pipeline_backbone(device: str = "cpu", dtype: str = "float32", width: int = 1):
    """A StableDiffusionPipeline with SD 1.4's UNet, VAE and text-encoder architectures and
    random weights (the tokenizer is conceptctl.testing's byte-level CLIP tokenizer; CLIP's
    vocabulary size is kept, so the text encoder costs what SD's does)."""
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel

    from conceptctl.backbones.loading import LoadOptions, wrap_pipeline
    from conceptctl.backbones.spec import BackboneSpec
    from conceptctl.testing import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    torch.manual_seed(0)
    text = CLIPTextModel(CLIPTextConfig(**SD14_TEXT_CONFIG, bos_token_id=tokenizer.bos_token_id,
                                        eos_token_id=tokenizer.eos_token_id,
                                        pad_token_id=tokenizer.pad_token_id))
    pipeline = StableDiffusionPipeline(
        vae=AutoencoderKL(**SD14_VAE_CONFIG), text_encoder=text, tokenizer=tokenizer,
        unet=common.sd14_unet(device=device, width=width),
        scheduler=DPMSolverMultistepScheduler(**common.SD_SCHEDULE),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    spec = BackboneSpec(name="sd14-shaped", family="sd", sample_steps=25, sample_guidance=6.0)
    return wrap_pipeline(spec, pipeline, LoadOptions(device=device, dtype=dtype))


def toy_anchor_prompts(count: int) -> tuple[str, ...]:
    from conceptctl.toy.anchors import toy_anchor_set

    return toy_anchor_set("church", "house", "object").anchor[:count]


def rates(backbone, prompts, images_per_prompt: int, steps: int, guidance: float,
          batch_sizes: list[int], rounds: int, what: str = "anchors",
          resolution: int | None = None, mixed_precision: str = "no") -> dict:
    """Images per second for each batch size, interleaved (order rotated each round).
    ``mixed_precision``: autocast as ``erase --mixed-precision`` draws its anchors."""
    from conceptctl.erasure.precision import Precision
    from conceptctl.sampling import SampleSettings, sample_images, sample_latents

    n = len(prompts) * images_per_prompt
    precision = Precision(mixed_precision, backbone.device.type)

    def run(batch: int):
        settings = SampleSettings(prompts=tuple(prompts), images_per_prompt=images_per_prompt,
                                  steps=steps, guidance=guidance, batch_size=batch,
                                  resolution=resolution)
        with precision.autocast():
            if what == "anchors":
                return sample_latents(backbone, settings)
            return list(sample_images(backbone, settings))

    # Warm-up with a small call per batch size (allocator, oneDNN primitives).
    warm = SampleSettings(prompts=tuple(prompts[:1]), images_per_prompt=1, steps=2,
                          guidance=guidance, resolution=resolution)
    sample_latents(backbone, warm)
    seconds: dict[int, list[float]] = {b: [] for b in batch_sizes}
    cpu: dict[int, list[float]] = {b: [] for b in batch_sizes}
    outputs = {}
    for r in range(rounds):
        order = batch_sizes[r % len(batch_sizes):] + batch_sizes[:r % len(batch_sizes)]
        for b in order:
            holder = {}
            clock = common.timed(lambda b=b, holder=holder: holder.setdefault("x", run(b)),
                                 backbone.device)
            seconds[b].append(clock.wall)
            cpu[b].append(clock.cpu)
            outputs[b] = holder["x"]
    out = {"images": n, "steps": steps, "guidance": guidance, "rounds": rounds,
           "mixed_precision": mixed_precision, "by_batch": {}}
    first = batch_sizes[0]
    for b in batch_sizes:
        wall, c = common.median(seconds[b]), common.median(cpu[b])
        out["by_batch"][str(b)] = {
            "images_per_s": round(n / wall, 3), "images_per_cpu_s": round(n / c, 3),
            f"speedup_vs_batch_{first}": round(common.median(seconds[first]) / wall, 3),
            f"cpu_speedup_vs_batch_{first}": round(common.median(cpu[first]) / c, 3),
        }
    if what == "anchors":  # the batch size does not change the images beyond float rounding
        ref = outputs[first].float()
        out[f"max_abs_difference_vs_batch_{first}"] = max(
            float((outputs[b].float() - ref).abs().max()) for b in batch_sizes)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("toy", "sd14"), default="toy")
    parser.add_argument("--resolution", type=int)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--images-per-prompt", type=int, default=4)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--guidance", type=float)
    parser.add_argument("--batch-sizes", default="1,8,32")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--what", choices=("anchors", "images"), default="anchors")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    common.set_threads(args.threads)

    if args.model == "toy":
        from conceptctl.backbones.loading import open_backbone

        backbone = open_backbone("toy", device=args.device, dtype=args.dtype)
        prompts = toy_anchor_prompts(args.prompts)
        steps, guidance = args.steps or 20, args.guidance if args.guidance is not None else 3.0
    else:
        backbone = sd14_pipeline_backbone(args.device, args.dtype)
        prompts = tuple(f"a photo of a house, view {i}" for i in range(args.prompts))
        steps, guidance = args.steps or 25, args.guidance if args.guidance is not None else 6.0
    batches = [int(b) for b in args.batch_sizes.split(",")]
    result = rates(backbone, prompts, args.images_per_prompt, steps, guidance, batches,
                   args.rounds, args.what, args.resolution)
    record = common.emit({"bench": f"sampling_speed/{args.what}", "model": args.model,
                          "resolution": args.resolution or backbone.resolution,
                          "device": args.device, "dtype": args.dtype,
                          "threads": torch.get_num_threads(), **result})
    rows = [[b, v["images_per_s"], v["images_per_cpu_s"]]
            for b, v in record["by_batch"].items()]
    print(common.table(rows, ["batch", "images/s", "images/CPU-s"]), file=sys.stderr)
    common.write_json(args.json, [record])


if __name__ == "__main__":
    main()
