"""``esd-x``: Erased Stable Diffusion on cross-attention (Gandikota et al., ICCV 2023), with the
authors' recipe (rohitgandikota/erasing, train-scripts/train-esd.py, the paper's code).

Each step: start from fresh noise, run k of n DDIM steps (η = 0, guidance 3; n = 50 as the
reference, ``esd_sampling_steps``) on the concept prompt with the model being trained (k uniform
in 0..n−1), which leaves a latent x_t that the
model itself would produce for the concept; then pull ε_θ(x_t, c) towards the original model's
guidance direction reversed, ε*(x_t, ∅) − η (ε*(x_t, c) − ε*(x_t, ∅)). No anchor images.

One deliberate difference: the reference queries the models at t ≈ 1000·k/50 although after k
steps from pure noise its latent sits at the noise level of DDIM timestep k, i.e. t ≈ 1000·(1 −
k/50); here every model is asked at the timestep the latent is actually at ("noised at the right
level", docs/erase.md "Differences from the reference code").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from conceptctl.backbones.soft_prompt import PromptEncoder
from conceptctl.erasure.methods import Context, StepStats, esd_goal, plus_optional, retain_loss
from conceptctl.errors import UsageError

DDIM_STEPS = 50  # the reference's ddim_steps (the esd_sampling_steps setting's default)
START_GUIDANCE = 3.0  # the reference's start_guidance (guidance of the partial sampling)


def ddim_timesteps(num_train_timesteps: int, steps: int = DDIM_STEPS) -> torch.Tensor:
    """The reference sampler's timesteps, descending: 0, T/n, 2T/n, … shifted by one (981, 961,
    …, 1 for T = 1000 and n = 50, CompVis' 'uniform' DDIM schedule)."""
    stride = max(num_train_timesteps // steps, 1)
    ts = torch.arange(steps) * stride + 1
    return ts.clamp(max=num_train_timesteps - 1).flip(0)


def _epsilon(backbone, x: torch.Tensor, out: torch.Tensor, t: torch.Tensor):
    """(x̂0, ε̂) from the UNet's output at x_t, whatever the model predicts."""
    x0 = backbone.predicted_original(x, out, t)
    if backbone.prediction_type == "epsilon":
        return x0, out
    abar = backbone.alphas_cumprod(t).view(-1, 1, 1, 1).to(x.dtype)
    return x0, (x - abar.sqrt() * x0) / (1 - abar).sqrt()


@torch.no_grad()
def partial_sample(backbone, unet, noise: torch.Tensor, text: torch.Tensor,
                   empty: torch.Tensor, k: int, guidance: float = START_GUIDANCE,
                   steps: int = DDIM_STEPS) -> tuple[torch.Tensor, torch.Tensor]:
    """k deterministic DDIM steps from ``noise`` with classifier-free guidance; returns the
    latent and the timestep it is at (the k-th of :func:`ddim_timesteps`), ᾱ from the model's
    training schedule."""
    ts = ddim_timesteps(backbone.num_train_timesteps, steps).to(noise.device)
    x, n = noise, len(noise)
    for i in range(k):
        t = ts[i].expand(n)
        both = unet(torch.cat([x, x]), torch.cat([t, t]), torch.cat([empty, text])).sample
        uncond, cond = both.chunk(2)
        x0, eps = _epsilon(backbone, x, uncond + guidance * (cond - uncond), t)
        abar = backbone.alphas_cumprod(ts[i + 1].expand(n)).view(-1, 1, 1, 1).to(x.dtype)
        x = abar.sqrt() * x0 + (1 - abar).sqrt() * eps
    return x, ts[k].expand(n)


class EsdX:
    """``esd-x`` with the authors' recipe (module docstring). Draws no anchor images; ``batch``
    is None. The trainer applies its gradient unclipped, as the reference does."""

    clips_gradients = True  # i.e. the trainer must not clip: the reference never does

    def __init__(self, ctx: Context, concepts: str | list[str], batch_size: int,
                 eta: float = 1.0, sampling_steps: int = DDIM_STEPS) -> None:
        if ctx.dist.world > 1:
            raise UsageError(
                "esd-x samples its own training latents one batch at a time and runs in one "
                "process only", hint="run it without 'accelerate launch', or use "
                "--method esd-x-doco-recipe")
        backbone = ctx.backbone
        self.ctx, self.eta, self.batch_size, self.steps = ctx, eta, batch_size, sampling_steps
        # The original model's conditioning, encoded once before training; with
        # --params text-encoder the student's is encoded afresh each step (_student_text).
        # Several concepts: step s trains on concept s mod their number (no random draw, so one
        # concept's run draws exactly the numbers it always did).
        self.concepts = [concepts] if isinstance(concepts, str) else list(concepts)
        self.text = backbone.encode_prompts(self.concepts)
        self.empty = backbone.encode_prompts([""])
        self.student_prompts = (PromptEncoder(backbone, [*self.concepts, ""])
                                if ctx.trains_text_encoder else None)
        side = backbone.resolution // backbone.vae_scale_factor
        self.shape = (backbone.latent_channels, side, side)

    def training_step(self, batch, step: int) -> StepStats:
        ctx, backbone, n = self.ctx, self.ctx.backbone, self.batch_size
        unet = backbone.unet
        # Drawn on the CPU from the run's generator: the same on every device, and resumable.
        k = int(torch.randint(self.steps, (1,), generator=ctx.generator))
        noise = torch.randn((n, *self.shape), generator=ctx.generator)
        noise = noise.to(device=backbone.device, dtype=backbone.dtype)
        which = step % len(self.concepts)
        text = self.text[which:which + 1].expand(n, -1, -1)
        empty = self.empty.expand(n, -1, -1)
        own, own_empty = text, empty  # the student's conditioning
        if self.student_prompts is not None:
            encoded = self.student_prompts().to(backbone.dtype)
            own = encoded[which:which + 1].expand(n, -1, -1)
            own_empty = encoded[-1:].expand(n, -1, -1)
        with ctx.timer("partial sampling"):  # the model as it is now draws x_t
            x_t, t = partial_sample(backbone, unet, noise, own.detach(), own_empty.detach(), k,
                                    steps=self.steps)
        goal = esd_goal(ctx, x_t, t, text, empty, self.eta)
        if ctx.adversary is not None:  # --adversarial: the attacked concept prompt, same goal
            with ctx.timer("inner attack"):
                attacked = ctx.adversary(x_t, t, torch.full((n,), which, dtype=torch.long),
                                         text, step)
            if ctx.adversary.replaces:
                own = attacked
            else:
                x_t, t, goal = torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([goal, goal])
                own = torch.cat([own, attacked])
        loss = F.mse_loss(unet(x_t, t, own).sample.float(), goal.float())
        ctx.precision.backward(plus_optional(loss, retain_loss(ctx, x_t, t)))
        return StepStats(loss=loss.item())
