"""Shared pieces of the benchmarks: models to measure, the real DoCo step, timing, reporting.

Every figure comes from conceptctl's own code path: the DoCo step is one iteration of
``conceptctl.erasure.trainer.run_loop`` with the built-in ``doco`` method, discriminator and
surgery, exactly as ``conceptctl erase`` builds them. Only the data is synthetic (random anchor
latents and prompt embeddings of the right shapes), since speed does not depend on it.

The SD 1.4-shaped UNet is built from the configuration of CompVis/stable-diffusion-v1-4's UNet,
written below, with random weights: SD-scale figures without the weights (none can be downloaded
here).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402

from conceptctl.runtime import quiet_libraries  # noqa: E402

quiet_libraries()

# unet/config.json of CompVis/stable-diffusion-v1-4 (859.5 M parameters), typed in from the
# published file: the architecture is what sets the cost of a step, not the weights.
SD14_UNET_CONFIG = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    center_input_sample=False,
    flip_sin_to_cos=True,
    freq_shift=0,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                      "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                    "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    downsample_padding=1,
    mid_block_scale_factor=1,
    act_fn="silu",
    norm_num_groups=32,
    norm_eps=1e-5,
    cross_attention_dim=768,
    attention_head_dim=8,
)
SD14_TEXT_TOKENS = 77  # CLIP ViT-L/14 context length; embeddings are 77 x 768
# SD's training schedule (scheduler/scheduler_config.json of SD 1.4).
SD_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                   beta_schedule="scaled_linear", steps_offset=1, prediction_type="epsilon")


def sd14_unet(seed: int = 0, device: str = "cpu", width: int = 1):
    """The SD 1.4-shaped UNet; ``width`` > 1 divides its channels (same layout, for dry runs
    that only check that code runs)."""
    from diffusers import UNet2DConditionModel

    config = dict(SD14_UNET_CONFIG)
    if width > 1:
        config["block_out_channels"] = tuple(max(32, c // width // 32 * 32)
                                             for c in config["block_out_channels"])
    torch.manual_seed(seed)
    with torch.device(device):  # initialise on the device: seconds instead of a minute on a GPU
        return UNet2DConditionModel(**config)


def unet_backbone(unet, latent_size: int, device: str = "cpu", dtype=torch.float32):
    """A conceptctl Backbone around a bare UNet (no VAE or text encoder weights needed): what the
    erasure methods use of a backbone is the UNet, the noise schedule and the latent size."""
    from diffusers import DDPMScheduler

    from conceptctl.backbones.backbone import Backbone
    from conceptctl.backbones.spec import BackboneSpec

    # A stand-in VAE config with factor 1, so ``backbone.resolution`` is the latent size the
    # discriminator is sized for.
    vae = SimpleNamespace(config=SimpleNamespace(block_out_channels=(1,), scaling_factor=0.18215))
    unet.to(device=device)
    if unet.dtype != dtype:
        unet.to(dtype=dtype)
    pipeline = SimpleNamespace(unet=unet, vae=vae, scheduler=DDPMScheduler(**SD_SCHEDULE),
                               text_encoder=None, tokenizer=None)
    unet.config.sample_size = latent_size  # only read for the discriminator's depth
    return Backbone(spec=BackboneSpec(name="bench-unet", family="sd"), pipeline=pipeline,
                    device=torch.device(device), dtype=dtype)


def toy_unet_backbone(device: str = "cpu"):
    """The shipped toy UNet (16 x 16 latents, MiniLM 384-wide text states, 32 tokens)."""
    from diffusers import UNet2DConditionModel

    from conceptctl.toy.model import MODEL_DIR

    unet = UNet2DConditionModel.from_pretrained(MODEL_DIR / "unet").float()
    return unet_backbone(unet, 16, device)


@dataclass
class Model:
    """A model to measure: the backbone, the latent side, the text shape."""

    name: str
    backbone: object
    latent_size: int
    tokens: int
    text_width: int


def toy_model(device: str = "cpu") -> Model:
    from conceptctl.toy.model import TOKEN_LENGTH

    return Model("toy", toy_unet_backbone(device), 16, TOKEN_LENGTH, 384)


def sd14_model(latent_size: int, device: str = "cpu", dtype=torch.float32,
               width: int = 1) -> Model:
    unet = sd14_unet(device=device, width=width)
    name = f"sd14-shaped@{latent_size * 8}px" + (f" (channels / {width})" if width > 1 else "")
    return Model(name, unet_backbone(unet, latent_size, device, dtype), latent_size,
                 SD14_TEXT_TOKENS, 768)


def machine() -> dict:
    info = {"platform": platform.platform(), "processor": platform.processor() or
            platform.machine(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "python": platform.python_version()}
    from conceptctl.sampling import library_versions

    info["versions"] = library_versions()
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
    with suppress(OSError):
        info["load_average"] = [round(x, 2) for x in os.getloadavg()]
    return info


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Clock:
    """Wall time and this process's CPU time (all threads) of one call."""

    wall: float
    cpu: float


def timed(fn: Callable[[], object], device) -> Clock:
    """Time one call. CPU time is the robust figure on a CPU shared with other work: with one
    torch thread it counts only this computation, however often the scheduler preempts it
    (with several threads it also counts OpenMP's spin-waiting, which preemption inflates)."""
    sync(device)
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    sync(device)
    return Clock(time.perf_counter() - wall, time.process_time() - cpu)


def set_threads(threads: int | None) -> None:
    if threads:
        torch.set_num_threads(threads)


class Sections:
    """Accumulates wall and CPU time per named section (synchronising CUDA at each boundary)."""

    def __init__(self, device) -> None:
        self.device = device
        self.seconds: dict[str, Clock] = {}

    @contextmanager
    def __call__(self, name: str):
        from torch.profiler import record_function

        sync(self.device)
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            with record_function(name):  # the same named range training's default timer opens
                yield
        finally:
            sync(self.device)
            old = self.seconds.get(name, Clock(0.0, 0.0))
            self.seconds[name] = Clock(old.wall + time.perf_counter() - wall,
                                       old.cpu + time.process_time() - cpu)


def median(values: list[float]) -> float:
    return statistics.median(values)


def emit(record: dict, out: list[dict] | None = None) -> dict:
    """Print one JSON line (the machine-readable result) and keep it for the JSON file."""
    print(json.dumps(record), flush=True)
    if out is not None:
        out.append(record)
    return record


def table(rows: list[list], header: list[str]) -> str:
    cells = [header] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = [" | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def write_json(path: Path | None, records: list[dict]) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"machine": machine(), "records": records}, indent=1) + "\n")
    print(f"wrote {path}", file=sys.stderr)
