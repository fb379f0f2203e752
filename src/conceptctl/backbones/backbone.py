"""A loaded backbone: the pipeline's parts plus the few model facts the rest of conceptctl needs.

Everything that differs between SD 1.x and 2.x (prediction type, resolution, text width, latent
scaling) is read here from the model's own configuration, so no other module special-cases them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from conceptctl.backbones.spec import BackboneSpec

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


@dataclass
class Backbone:
    """A Stable-Diffusion-shaped model ready to use on ``device`` in ``dtype``."""

    spec: BackboneSpec
    pipeline: DiffusionPipeline
    device: torch.device
    dtype: torch.dtype

    def __post_init__(self) -> None:
        prediction = self.scheduler.config.get("prediction_type", "epsilon")
        if prediction not in PREDICTION_TYPES:
            raise ValueError(f"unsupported prediction type {prediction!r}")

    # --- parts -------------------------------------------------------------------------------
    @property
    def unet(self) -> torch.nn.Module:
        return self.pipeline.unet

    @property
    def vae(self) -> torch.nn.Module:
        return self.pipeline.vae

    @property
    def text_encoder(self) -> torch.nn.Module:
        return self.pipeline.text_encoder

    @property
    def tokenizer(self) -> Any:
        return self.pipeline.tokenizer

    @property
    def scheduler(self) -> Any:
        return self.pipeline.scheduler

    # --- facts read from the model's configuration -------------------------------------------
    @property
    def prediction_type(self) -> str:
        return self.scheduler.config.get("prediction_type", "epsilon")

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def resolution(self) -> int:
        return int(self.unet.config.sample_size) * self.vae_scale_factor

    @property
    def latent_channels(self) -> int:
        return int(self.unet.config.in_channels)

    @property
    def latent_scaling(self) -> float:
        return float(self.vae.config.scaling_factor)

    @property
    def text_width(self) -> int:
        return int(self.unet.config.cross_attention_dim)

    @property
    def num_train_timesteps(self) -> int:
        return int(self.scheduler.config.num_train_timesteps)

    def describe(self) -> dict[str, Any]:
        """Identity and properties as plain data (written into sidecars and artifacts)."""
        return {
            "name": self.spec.name,
            "source": self.spec.source,
            "format": self.spec.format,
            "family": self.spec.family,
            "prediction_type": self.prediction_type,
            "resolution": self.resolution,
            "text_width": self.text_width,
            "unet_parameters": sum(p.numel() for p in self.unet.parameters()),
            "dtype": str(self.dtype).removeprefix("torch."),
        }

    # --- helpers the trainer and samplers share ----------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """Text-encoder hidden states the UNet is conditioned on, shape (B, tokens, text_width)."""
        embeds, _ = self.pipeline.encode_prompt(
            prompts, self.device, 1, do_classifier_free_guidance=False
        )
        return embeds

    def alphas_cumprod(self, timesteps: torch.Tensor) -> torch.Tensor:
        """ᾱ_t for each timestep, on the timesteps' device, as float32."""
        table = self.scheduler.alphas_cumprod.to(device=timesteps.device, dtype=torch.float32)
        return table[timesteps.long()]

    def predicted_original(
        self, noisy: torch.Tensor, model_output: torch.Tensor, timesteps: torch.Tensor
    ) -> torch.Tensor:
        """x̂0 from the UNet's output at x_t, whatever the model predicts.

        epsilon: x̂0 = (x_t − √(1−ᾱ)·ε̂) / √ᾱ;  v: x̂0 = √ᾱ·x_t − √(1−ᾱ)·v̂ (Salimans & Ho 2022);
        sample: the output is x̂0.
        """
        if self.prediction_type == "sample":
            return model_output
        abar = self.alphas_cumprod(timesteps).view(-1, *([1] * (noisy.dim() - 1)))
        sqrt_a, sqrt_1ma = abar.sqrt().to(noisy.dtype), (1 - abar).sqrt().to(noisy.dtype)
        if self.prediction_type == "epsilon":
            return (noisy - sqrt_1ma * model_output) / sqrt_a
        return sqrt_a * noisy - sqrt_1ma * model_output

    def training_target(
        self, clean: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
    ) -> torch.Tensor:
        """What the UNet should output for x_t built from ``clean`` and ``noise``."""
        if self.prediction_type == "epsilon":
            return noise
        if self.prediction_type == "sample":
            return clean
        return self.scheduler.get_velocity(clean, noise, timesteps)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Pixels in [-1, 1], shape (B, 3, H, W) -> scaled latents."""
        images = images.to(device=self.device, dtype=self.vae.dtype)
        return self.vae.encode(images).latent_dist.mean * self.latent_scaling

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> pixels in [-1, 1]."""
        latents = latents.to(device=self.device, dtype=self.vae.dtype)
        return self.vae.decode(latents / self.latent_scaling).sample.clamp(-1, 1)
