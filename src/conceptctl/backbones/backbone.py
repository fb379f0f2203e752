"""A loaded backbone: the pipeline's parts plus the few model facts the rest of conceptctl needs.

Everything that differs between SD 1.x and 2.x (prediction type, resolution, text width, latent
scaling) is read here from the model's own configuration, so no other module special-cases them.

Training-time maths (x_t, ᾱ_t, the v target, x̂0) uses the model's *training* noise schedule, a
DDPM schedule rebuilt from the scheduler config's betas once at load (:func:`training_schedule`),
never the pipeline's sampling scheduler: DPM-Solver, Euler and UniPC look t up in their inference
timesteps in ``add_noise``/``get_velocity``, so they noise at the wrong level (DPM-Solver fresh
from its config gives √(1−ᾱ_t) reversed in t; after ``set_timesteps`` nearly every t gets the
same level), Euler rejects integer timesteps, and DPM-Solver/UniPC have no ``get_velocity``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from conceptctl.backbones.spec import BackboneSpec

if TYPE_CHECKING:
    from diffusers import DDPMScheduler, DiffusionPipeline

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
# How artifacts, checkpoints and exports name the text encoder's tensors: its own parameter names
# under this prefix (the UNet's keep their bare names, as in every artifact before the prefix).
TEXT_ENCODER_PREFIX = "text_encoder."
# The scheduler-config entries that define the training noise schedule (and what is predicted).
SCHEDULE_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule",
                 "trained_betas", "rescale_betas_zero_snr", "prediction_type")


def training_schedule(config: Any) -> DDPMScheduler:
    """The noise schedule the model was trained with, from any scheduler config of the DDPM
    family (DDPM, DDIM, PNDM, DPM-Solver, Euler, UniPC, …): a ``DDPMScheduler`` built from the
    config's betas (``beta_schedule``, ``beta_start``/``beta_end``, ``trained_betas``,
    ``num_train_timesteps``, ``rescale_betas_zero_snr``), the scheduler diffusers' training
    scripts noise with, so every ``beta_schedule`` it knows is covered.

    Its ``add_noise``/``get_velocity`` depend on t and the betas only, unlike a sampling
    scheduler's, which may depend on its inference timesteps (see the module docstring). The
    values are passed explicitly rather than through ``DDPMScheduler.from_config``, which would
    replace the entries the sampler took from its own defaults by DDPM's (Heun, KDPM2, LCM and
    TCD default to other betas).
    """
    from diffusers import DDPMScheduler

    from conceptctl.errors import BackboneError

    config = dict(config)
    if config.get("trained_betas") is None and "beta_schedule" not in config:
        raise BackboneError(
            "the scheduler config does not describe a DDPM noise schedule (no beta_schedule or "
            "trained_betas), so conceptctl cannot noise latents the way the model was trained",
            hint="conceptctl supports SD 1.x / 2.x-style models (DDPM-family schedulers)",
        )
    return DDPMScheduler(**{key: config[key] for key in SCHEDULE_KEYS if key in config})


@dataclass
class Backbone:
    """A Stable-Diffusion-shaped model ready to use on ``device`` in ``dtype``."""

    spec: BackboneSpec
    pipeline: DiffusionPipeline
    device: torch.device
    dtype: torch.dtype
    # The training noise schedule (a DDPMScheduler), built once from the scheduler config at
    # load, so nothing done to the sampling scheduler afterwards (set_timesteps) changes it.
    noise_schedule: Any = field(init=False, repr=False)

    def __post_init__(self) -> None:
        prediction = self.scheduler.config.get("prediction_type", "epsilon")
        if prediction not in PREDICTION_TYPES:
            raise ValueError(f"unsupported prediction type {prediction!r}")
        self.noise_schedule = training_schedule(self.scheduler.config)

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
        """The *sampling* scheduler (for drawing images). Training-time maths uses
        :attr:`noise_schedule` through :meth:`add_noise` and friends instead."""
        return self.pipeline.scheduler

    def named_tensors(self) -> dict[str, torch.nn.Parameter]:
        """Every parameter an erasure can change, by the name artifacts give it: the UNet's
        under their own names, the text encoder's under :data:`TEXT_ENCODER_PREFIX`."""
        return {**dict(self.unet.named_parameters()),
                **{TEXT_ENCODER_PREFIX + name: p
                   for name, p in self.text_encoder.named_parameters()}}

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
        return int(self.noise_schedule.config.num_train_timesteps)

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
        """ᾱ_t of the training schedule for each timestep, on the timesteps' device, as float32."""
        table = self.noise_schedule.alphas_cumprod.to(device=timesteps.device, dtype=torch.float32)
        return table[timesteps.long()]

    def add_noise(
        self, clean: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
    ) -> torch.Tensor:
        """x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε, with ᾱ from the model's training schedule.

        The one way every method, attack and plugin should form x_t: the sampling scheduler's
        own ``add_noise`` is wrong for DPM-Solver, Euler and UniPC (it looks t up in the
        inference timesteps, so it depends on the last ``set_timesteps``) and right only by luck
        for DDPM, DDIM and PNDM.
        """
        return self.noise_schedule.add_noise(clean, noise, timesteps.to(clean.device))

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
        """What the UNet should output for x_t built from ``clean`` and ``noise``; for v,
        √ᾱ_t·ε − √(1−ᾱ_t)·x0 from the training schedule (DPM-Solver and UniPC have no
        ``get_velocity``, and Euler's refuses integer t and looks t up in its inference steps)."""
        if self.prediction_type == "epsilon":
            return noise
        if self.prediction_type == "sample":
            return clean
        return self.noise_schedule.get_velocity(clean, noise, timesteps.to(clean.device))

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor, noise: torch.Tensor | None = None
                      ) -> torch.Tensor:
        """Pixels in [-1, 1], shape (B, 3, H, W) -> scaled latents: the VAE posterior's mean, or
        with ``noise`` (shaped as the latents) its sample mean + std · noise, as
        ``latent_dist.sample()`` draws with the caller's own random numbers."""
        images = images.to(device=self.device, dtype=self.vae.dtype)
        posterior = self.vae.encode(images).latent_dist
        latents = posterior.mean
        if noise is not None:
            latents = latents + posterior.std * noise.to(latents)
        return latents * self.latent_scaling

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> pixels in [-1, 1]."""
        latents = latents.to(device=self.device, dtype=self.vae.dtype)
        return self.vae.decode(latents / self.latent_scaling).sample.clamp(-1, 1)
