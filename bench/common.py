"""Shared pieces of the benchmarks: models to measure, the real DoCo step, timing, reporting.

Every figure comes from conceptctl's own code path: the DoCo step is one iteration of
``conceptctl.erasure.trainer.run_loop`` with the built-in ``doco`` method, discriminator and
surgery, exactly as ``conceptctl erase`` builds them. Only the data is synthetic (random anchor
latents and prompt embeddings of the right shapes), since speed does not depend on it.

The SD 1.4-shaped UNet is built from the configuration of CompVis/stable-diffusion-v1-4's UNet,
written below, with random weights: SD-scale figures without the weights (none can be downloaded
here). The SDXL-shaped UNet likewise, from stabilityai/stable-diffusion-xl-base-1.0's; it is
conditioned as conceptctl conditions SDXL, through the packed text tensor and the UNet hook of
conceptctl.backbones.sdxl.
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


# unet/config.json of stabilityai/stable-diffusion-xl-base-1.0 (2,567,463,684 parameters), typed
# in from the published file. tests/test_bench.py checks it against what diffusers' reader of
# original checkpoints (create_unet_diffusers_config_from_ldm) makes of Stability's
# sd_xl_base.yaml, and the parameter count on the meta device.
SDXL_UNET_CONFIG = dict(
    sample_size=128,
    in_channels=4,
    out_channels=4,
    center_input_sample=False,
    flip_sin_to_cos=True,
    freq_shift=0,
    # No attention at the highest resolution; 2 then 10 transformer blocks per attention below.
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(320, 640, 1280),
    layers_per_block=2,
    transformer_layers_per_block=(1, 2, 10),
    downsample_padding=1,
    mid_block_scale_factor=1,
    act_fn="silu",
    norm_num_groups=32,
    norm_eps=1e-5,
    cross_attention_dim=2048,  # CLIP ViT-L's 768 + OpenCLIP bigG's 1280 token states
    # diffusers' historical name: these are head *counts* (64-wide heads), as in SDXL's file.
    attention_head_dim=(5, 10, 20),
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,  # pooled 1280 + 6 size/crop numbers x 256
)
SDXL_TEXT_TOKENS = 77  # both CLIP encoders' context length
SDXL_POOLED_WIDTH = 1280  # OpenCLIP bigG's text projection: the pooled embedding


def _narrow(channels: int, width: int) -> int:
    """``channels`` divided by ``width``, kept a multiple of the 32 normalisation groups."""
    return max(32, channels // width // 32 * 32)


def sd14_unet(seed: int = 0, device: str = "cpu", width: int = 1):
    """The SD 1.4-shaped UNet; ``width`` > 1 divides its channels (same layout, for dry runs
    that only check that code runs)."""
    from diffusers import UNet2DConditionModel

    config = dict(SD14_UNET_CONFIG)
    if width > 1:
        config["block_out_channels"] = tuple(_narrow(c, width)
                                             for c in config["block_out_channels"])
    torch.manual_seed(seed)
    with torch.device(device):  # initialise on the device: seconds instead of a minute on a GPU
        return UNet2DConditionModel(**config)


def sdxl_unet(seed: int = 0, device: str = "cpu", width: int = 1):
    """The SDXL-shaped UNet (9.6 GiB of float32 weights at full width); ``width`` > 1 divides
    its channels as :func:`sd14_unet` does (one 64-wide head per 64 channels, at least one).

    Built on the meta device first, so its size is known before any memory is taken (and
    checked against what the device has free: a full-size UNet that does not fit stops here
    with one line instead of swapping a shared machine); its tensors are then allocated once,
    on ``device``, and initialised as each layer's constructor would have."""
    from diffusers import UNet2DConditionModel

    config = dict(SDXL_UNET_CONFIG)
    if width > 1:
        channels = tuple(_narrow(c, width) for c in config["block_out_channels"])
        config["block_out_channels"] = channels
        config["attention_head_dim"] = tuple(max(1, c // 64) for c in channels)
    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
    check_free_memory(sum(p.numel() * p.element_size() for p in unet.parameters()), device,
                      "the SDXL-shaped UNet's weights")
    unet.to_empty(device=device)
    torch.manual_seed(seed)
    initialise(unet)
    return unet


def initialise(module: torch.nn.Module) -> None:
    """Give the uninitialised tensors of ``module`` (after ``to_empty``) their layers' default
    initialisation. Every module that holds parameters of its own must say how
    (``reset_parameters``, as torch's layers do); buffers are not expected."""
    buffers = [name for name, _ in module.named_buffers()]
    if buffers:
        raise RuntimeError(f"cannot initialise buffers after to_empty: {', '.join(buffers)}")
    with torch.no_grad():
        for name, child in module.named_modules():
            if next(child.parameters(recurse=False), None) is None:
                continue
            reset = getattr(child, "reset_parameters", None)
            if reset is None:
                raise RuntimeError(f"{name} ({type(child).__name__}) holds parameters but has "
                                   "no reset_parameters to initialise them")
            reset()


def free_memory_bytes(device: str) -> int | None:
    """Memory the device can still give (CPU: the kernel's MemAvailable), None if unknown."""
    if torch.device(device).type == "cuda":
        return torch.cuda.mem_get_info(torch.device(device))[0]
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_free_memory(needed: int, device: str, what: str) -> None:
    """Stop with one line when ``needed`` bytes are more than ``device`` has free."""
    free = free_memory_bytes(device)
    if free is not None and needed > free:
        sys.exit(f"error: {what} need {needed / 2**30:.1f} GiB and {device} has "
                 f"{free / 2**30:.1f} GiB free; free some memory, or divide the channels with "
                 "--width N for a dry run")


def text_encoder_stand_ins(pooled_width: int | None = None) -> dict:
    """The pipeline's text encoders for a Backbone around a bare UNet: one tiny CLIP layer each.
    A step never runs them (its prompt embeddings are precomputed tensors of the real widths),
    but a Backbone holds them (prepare_training freezes them, the parameter groups list their
    tensors) and reads SDXL's pooled width from the second one's projection."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    tiny = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=2, max_position_embeddings=77)
    encoders = {"text_encoder": CLIPTextModel(CLIPTextConfig(**tiny))}
    if pooled_width is not None:
        encoders["text_encoder_2"] = CLIPTextModelWithProjection(
            CLIPTextConfig(**tiny, projection_dim=pooled_width))
    return encoders


def unet_backbone(unet, latent_size: int, device: str = "cpu", dtype=torch.float32):
    """A conceptctl Backbone around a bare UNet (no VAE or text encoder weights needed): what the
    erasure methods use of a backbone is the UNet, the noise schedule and the latent size. An
    SDXL-shaped UNet gets conceptctl's SDXL conditioning as a loaded SDXL model does: the
    Backbone installs the hook that unpacks the pooled row (conceptctl.backbones.sdxl)."""
    from diffusers import DDPMScheduler

    from conceptctl.backbones import sdxl
    from conceptctl.backbones.architecture import SDXL_DEFAULTS
    from conceptctl.backbones.backbone import Backbone
    from conceptctl.backbones.spec import BackboneSpec

    is_sdxl = getattr(unet.config, "addition_embed_type", None) == "text_time"
    # A stand-in VAE config with SD's factor 8 (four blocks), so ``backbone.resolution`` is the
    # picture side, the discriminator is sized for the latent side, and SDXL's size numbers
    # (time_ids) are the pixels they are in real use.
    vae = SimpleNamespace(config=SimpleNamespace(block_out_channels=(1, 1, 1, 1),
                                                 scaling_factor=0.13025 if is_sdxl else 0.18215))
    unet.to(device=device)
    if unet.dtype != dtype:
        unet.to(dtype=dtype)
    pooled = (int(unet.add_embedding.linear_1.in_features)
              - sdxl.TIME_IDS * int(unet.config.addition_time_embed_dim)) if is_sdxl else None
    pipeline = SimpleNamespace(unet=unet, vae=vae, scheduler=DDPMScheduler(**SD_SCHEDULE),
                               tokenizer=None, tokenizer_2=None,
                               **text_encoder_stand_ins(pooled))
    unet.config.sample_size = latent_size  # only read for the discriminator's depth
    spec = (BackboneSpec(name="bench-unet", **SDXL_DEFAULTS) if is_sdxl
            else BackboneSpec(name="bench-unet", family="sd"))
    return Backbone(spec=spec, pipeline=pipeline, device=torch.device(device), dtype=dtype)


def toy_unet_backbone(device: str = "cpu"):
    """The shipped toy UNet (16 x 16 latents, MiniLM 384-wide text states, 32 tokens)."""
    from diffusers import UNet2DConditionModel

    from conceptctl.toy.model import MODEL_DIR

    unet = UNet2DConditionModel.from_pretrained(MODEL_DIR / "unet").float()
    return unet_backbone(unet, 16, device)


@dataclass
class Model:
    """A model to measure: the backbone, the latent side, the text shape (token rows of
    ``text_width``; SDXL: and the pooled embedding of ``pooled_width``, packed as one more
    row, as ``Backbone.encode_prompts`` gives it)."""

    name: str
    backbone: object
    latent_size: int
    tokens: int
    text_width: int
    pooled_width: int | None = None

    def random_text(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """``n`` random prompt embeddings of the shape the model's erasures train on."""
        hidden = torch.randn(n, self.tokens, self.text_width, generator=generator)
        if self.pooled_width is None:
            return hidden
        from conceptctl.backbones import sdxl

        return sdxl.pack(hidden, torch.randn(n, self.pooled_width, generator=generator))


def toy_model(device: str = "cpu") -> Model:
    from conceptctl.toy.model import TOKEN_LENGTH

    return Model("toy", toy_unet_backbone(device), 16, TOKEN_LENGTH, 384)


def _shaped_name(kind: str, latent_size: int, width: int) -> str:
    return f"{kind}-shaped@{latent_size * 8}px" + (f" (channels / {width})" if width > 1 else "")


def sd14_model(latent_size: int, device: str = "cpu", dtype=torch.float32,
               width: int = 1) -> Model:
    unet = sd14_unet(device=device, width=width)
    return Model(_shaped_name("sd14", latent_size, width),
                 unet_backbone(unet, latent_size, device, dtype), latent_size,
                 SD14_TEXT_TOKENS, 768)


def sdxl_model(latent_size: int, device: str = "cpu", dtype=torch.float32,
               width: int = 1) -> Model:
    unet = sdxl_unet(device=device, width=width)
    return Model(_shaped_name("sdxl", latent_size, width),
                 unet_backbone(unet, latent_size, device, dtype), latent_size,
                 SDXL_TEXT_TOKENS, SDXL_UNET_CONFIG["cross_attention_dim"], SDXL_POOLED_WIDTH)


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


def write_json(path: Path | None, records: list[dict], quiet: bool = False) -> None:
    if path is None:
        return
    from conceptctl.fileio import staged_file

    # Whole or not at all: a script that rewrites it after each part may be stopped any time.
    with staged_file(path) as tmp:
        tmp.write_text(json.dumps({"machine": machine(), "records": records}, indent=1) + "\n")
    if not quiet:
        print(f"wrote {path}", file=sys.stderr)
