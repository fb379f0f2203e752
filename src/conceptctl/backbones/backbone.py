"""A loaded backbone: the pipeline's parts plus the few model facts the rest of conceptctl needs.

Everything that differs between SD 1.x, 2.x and SDXL (prediction type, resolution, text width,
latent scaling, SDXL's second text encoder and pooled conditioning) is read here from the model's
own configuration, so no other module special-cases them. SDXL's text conditioning is one
tensor like SD's, with the pooled embedding as an extra token row that a hook on the UNet
unpacks (conceptctl.backbones.sdxl).

Training-time maths (x_t, ᾱ_t, the v target, x̂0) uses the model's *training* noise schedule, a
DDPM schedule rebuilt from the scheduler config's betas once at load (:func:`training_schedule`),
never the pipeline's sampling scheduler: DPM-Solver, Euler and UniPC look t up in their inference
timesteps in ``add_noise``/``get_velocity``, so they noise at the wrong level (DPM-Solver fresh
from its config gives √(1−ᾱ_t) reversed in t; after ``set_timesteps`` nearly every t gets the
same level), Euler rejects integer timesteps, and DPM-Solver/UniPC have no ``get_velocity``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
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
# SDXL's second text encoder's, likewise (the pipeline's attribute names, as diffusers' LoRA
# loaders name them).
TEXT_ENCODER_2_PREFIX = "text_encoder_2."
TEXT_ENCODER_PREFIXES = (TEXT_ENCODER_PREFIX, TEXT_ENCODER_2_PREFIX)


def is_text_encoder_tensor(name: str) -> bool:
    """Whether a tensor name (as :meth:`Backbone.named_tensors` gives it) is a text encoder's."""
    return name.startswith(TEXT_ENCODER_PREFIXES)


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
            hint="conceptctl supports SD 1.x / 2.x and SDXL-style models (DDPM-family schedulers)",
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
    # SDXL: the pooled text embedding's width (the last row of encode_prompts' tensors holds
    # it); None for a model without pooled conditioning (SD 1.x / 2.x, the toy).
    pooled_width: int | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        from conceptctl.backbones import sdxl

        prediction = self.scheduler.config.get("prediction_type", "epsilon")
        if prediction not in PREDICTION_TYPES:
            raise ValueError(f"unsupported prediction type {prediction!r}")
        self.noise_schedule = training_schedule(self.scheduler.config)
        if sdxl.is_sdxl(self.pipeline):
            self.pooled_width = sdxl.pooled_width(self.pipeline)
            sdxl.install(self.unet, self.pooled_width, self.vae_scale_factor)

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
    def is_sdxl(self) -> bool:
        return self.pooled_width is not None

    @property
    def text_encoders(self) -> list[torch.nn.Module]:
        """Every text encoder, in the order their states sit side by side (SDXL: two)."""
        return [self.pipeline.text_encoder] + (
            [self.pipeline.text_encoder_2] if self.is_sdxl else [])

    @property
    def tokenizers(self) -> list[Any]:
        """Each text encoder's tokenizer, in :attr:`text_encoders`' order."""
        return [self.pipeline.tokenizer] + ([self.pipeline.tokenizer_2] if self.is_sdxl else [])

    @property
    def scheduler(self) -> Any:
        """The *sampling* scheduler (for drawing images). Training-time maths uses
        :attr:`noise_schedule` through :meth:`add_noise` and friends instead."""
        return self.pipeline.scheduler

    def named_tensors(self) -> dict[str, torch.nn.Parameter]:
        """Every parameter an erasure can change, by the name artifacts give it: the UNet's
        under their own names, the text encoder's under :data:`TEXT_ENCODER_PREFIX` (SDXL's
        second one's under :data:`TEXT_ENCODER_2_PREFIX`)."""
        named = dict(self.unet.named_parameters())
        for prefix, encoder in zip(TEXT_ENCODER_PREFIXES, self.text_encoders, strict=False):
            named.update({prefix + name: p for name, p in encoder.named_parameters()})
        return named

    def idle_tensors(self) -> set[str]:
        """Names (as :meth:`named_tensors`) of the text-encoder tensors the UNet's conditioning
        never depends on, so training them is impossible (no gradient reaches them): SDXL reads
        its first encoder's penultimate layer, so that encoder's last layer does nothing."""
        if not self.is_sdxl:
            return set()
        last = f"encoder.layers.{self.pipeline.text_encoder.config.num_hidden_layers - 1}."
        return {name for name in self.named_tensors()
                if name.startswith(TEXT_ENCODER_PREFIX) and last in name}

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

    @property
    def family(self) -> str:
        """The spec's family, else ``sdxl`` for a model of SDXL's architecture ("" unknown)."""
        return self.spec.family or ("sdxl" if self.is_sdxl else "")

    def describe(self) -> dict[str, Any]:
        """Identity and properties as plain data (written into sidecars and artifacts)."""
        return {
            "name": self.spec.name,
            "source": self.spec.source,
            "format": self.spec.format,
            "family": self.family,
            "prediction_type": self.prediction_type,
            "resolution": self.resolution,
            "text_width": self.text_width,
            "unet_parameters": sum(p.numel() for p in self.unet.parameters()),
            "dtype": str(self.dtype).removeprefix("torch."),
        }

    # --- helpers the trainer and samplers share ----------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """Text-encoder hidden states the UNet is conditioned on, shape (B, tokens, text_width):
        what ``backbone.unet(x_t, t, text)`` takes. SDXL: both encoders' states as its pipeline
        builds them, plus the pooled embedding as one last row (B, tokens + 1, text_width),
        which the UNet's hook unpacks (conceptctl.backbones.sdxl)."""
        if self.is_sdxl:
            from conceptctl.backbones import sdxl

            embeds, _, pooled, _ = self.pipeline.encode_prompt(
                prompts, device=self.device, num_images_per_prompt=1,
                do_classifier_free_guidance=False)
            return sdxl.pack(embeds, pooled)
        embeds, _ = self.pipeline.encode_prompt(
            prompts, self.device, 1, do_classifier_free_guidance=False
        )
        return embeds

    def token_states(self, text: torch.Tensor) -> torch.Tensor:
        """The part of :meth:`encode_prompts`' tensor that cross-attention reads, one row per
        token (SDXL: without the pooled row)."""
        return text[:, :-1] if self.is_sdxl else text

    def pipeline_arguments(self, text: torch.Tensor,
                           negative: torch.Tensor | None = None) -> dict[str, Any]:
        """The keywords that make the pipeline draw from :meth:`encode_prompts`' tensors
        instead of prompts: ``prompt_embeds`` (SDXL: and ``pooled_prompt_embeds``), and the
        ``negative_`` ones for ``negative``."""
        from conceptctl.backbones import sdxl

        def arguments(tensor: torch.Tensor, prefix: str) -> dict[str, Any]:
            if self.is_sdxl:
                return sdxl.pipeline_arguments(tensor, self.pooled_width, prefix)
            return {f"{prefix}prompt_embeds": tensor}

        return {**arguments(text, ""),
                **(arguments(negative, "negative_") if negative is not None else {})}

    @torch.no_grad()
    def unconditional_text(self) -> torch.Tensor:
        """What classifier-free guidance conditions its unconditional branch on when there is no
        negative prompt, as the pipeline's own sampling does, shape (1, tokens, text_width): the
        empty prompt, encoded; SDXL with ``force_zeros_for_empty_prompt`` (SDXL 1.0's setting):
        zeros, the unconditional input SDXL was trained with."""
        empty = self.encode_prompts([""])
        if self.is_sdxl and self.pipeline.config.get("force_zeros_for_empty_prompt", False):
            return torch.zeros_like(empty)
        return empty

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
        dtype = self.vae.dtype  # what comes back, even when the VAE runs upcast
        with self._vae_precision():
            images = images.to(device=self.device, dtype=self.vae.dtype)
            posterior = self.vae.encode(images).latent_dist
            latents = posterior.mean
            if noise is not None:
                latents = latents + posterior.std * noise.to(latents)
            return (latents * self.latent_scaling).to(dtype)

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> pixels in [-1, 1]."""
        dtype = self.vae.dtype  # what comes back, even when the VAE runs upcast
        with self._vae_precision():
            latents = latents.to(device=self.device, dtype=self.vae.dtype)
            return self.vae.decode(latents / self.latent_scaling).sample.clamp(-1, 1).to(dtype)

    @contextmanager
    def _vae_precision(self) -> Iterator[None]:
        """SDXL's VAE overflows in float16 (its config says ``force_upcast``): run it in float32
        for the block and put it back, as the SDXL pipeline does when it decodes. Other models
        keep their VAE as it is (their pipelines do not upcast)."""
        upcast = (self.is_sdxl and self.vae.dtype == torch.float16
                  and self.vae.config.get("force_upcast", False))
        if not upcast:
            yield
            return
        self.vae.to(torch.float32)
        try:
            yield
        finally:
            self.vae.to(torch.float16)
