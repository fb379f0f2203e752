"""Erasure methods: what one training step computes. DoCo and the baselines' ``*-doco-recipe``
variants share the anchor data, the trainer loop and the artifact, so they compare on equal
footing; ``ca`` and ``esd-x`` follow their authors' recipes (``conceptctl.erasure.esd`` for ESD).

Every method gets the same :class:`Batch` (anchor latents with their anchor- and target-prompt
embeddings, the timesteps and noise drawn for them) and leaves gradients in the trainable
parameters' ``.grad``; the trainer clips and steps the optimiser. In a data-parallel run the
batch is this process's share and the trainer sums the share-weighted gradients over processes,
unless the method combines them itself (``reduces_gradients = True``, as DoCo must: see
conceptctl.erasure.distributed). Symbols: ε_θ the student UNet, ε* the frozen original, x_t
the noised anchor latent, c_a / c_t the anchor / target prompt, x̂0 the predicted clean latent.

The batch's embeddings are the *original* text encoder's, what the frozen model is conditioned
on; the student UNet is conditioned on :meth:`Batch.for_student`'s, which differ where the text
encoder trains (``--params text-encoder``: the prompts encoded by the model being trained, with
gradients) and on the inner attack's rows (``--adversarial``: the attacked prompts, while the
frozen model keeps the plain target prompt, as AdvUnlearn's goal does).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch.profiler import record_function

from conceptctl.erasure.distributed import ProcessGroup, SingleProcess
from conceptctl.erasure.precision import Precision


@dataclass
class Batch:
    latents: torch.Tensor  # x0 of anchor images, (B, C, h, w)
    anchor_text: torch.Tensor  # c_a, embeddings of each image's anchor prompt
    target_text: torch.Tensor  # c_t, the paired target prompt
    empty_text: torch.Tensor  # ∅, the empty prompt (ESD's unconditional branch)
    timesteps: torch.Tensor | None = None  # t for each image (None: the method draws them)
    noise: torch.Tensor | None = None  # ε for each image
    # The preservation loss's own images (the reference's separate prior batch): other anchor
    # images with their own captions, t and ε. None: it reuses the images above.
    prior: PriorBatch | None = None
    # Which target prompt each row's c_t is (an index into the run's target prompts): the
    # inner attack of adversarial erasure attacks these prompts.
    prompts: torch.Tensor | None = None
    # Data-parallel: rows of the global batch each process holds (None: one process), and this
    # process's share of the global batch (weights its mean losses).
    sizes: tuple[int, ...] | None = None
    share: float = 1.0
    # What the student is conditioned on where it differs from the fields above (module
    # docstring); None: the same embeddings.
    student: StudentText | None = None

    def for_student(self) -> StudentText:
        """The embeddings the student UNet is conditioned on."""
        if self.student is not None:
            return self.student
        return StudentText(self.anchor_text, self.target_text, self.empty_text,
                           None if self.prior is None else self.prior.text)


@dataclass
class StudentText:
    """The student's conditioning, row for row with the batch (``prior_text``: with its prior
    batch's rows)."""

    anchor_text: torch.Tensor
    target_text: torch.Tensor
    empty_text: torch.Tensor
    prior_text: torch.Tensor | None = None


@dataclass
class PriorBatch:
    """Anchor images for L_prior, drawn apart from the adversarial ones (DreamBooth-style prior
    preservation, as the reference does: 8 more images with their own t and ε)."""

    latents: torch.Tensor
    text: torch.Tensor  # each image's own (anchor) caption
    timesteps: torch.Tensor
    noise: torch.Tensor


@dataclass
class StepStats:
    loss: float  # the quantity the method minimises (adversarial loss for DoCo)
    preserve_loss: float | None = None
    d_loss: float | None = None
    d_accuracy: float | None = None
    surgery_fired: float | None = None  # share of trainable tensors whose gradient was changed
    generator_step: bool = True  # False during DoCo's discriminator warm-up


@dataclass
class Context:
    """What a method works with, built once by the trainer."""

    backbone: object  # conceptctl Backbone (student UNet = backbone.unet)
    frozen_unet: torch.nn.Module
    params: dict[str, torch.nn.Parameter]
    generator: torch.Generator
    # Gradients go through it (grad / backward) so fp16 loss scaling stays out of the methods.
    precision: Precision = field(default_factory=lambda: Precision("no", "cpu"))
    # ``timer("name")`` wraps each part of a step: a torch.profiler range, so a profile shows
    # the paper's parts by name; benchmarks pass one that also records wall time
    # (bench/common.py Sections).
    timer: Callable[[str], AbstractContextManager] = record_function
    # The process group of a data-parallel run (conceptctl.erasure.distributed).
    dist: ProcessGroup = field(default_factory=SingleProcess)
    # ``--adversarial``'s inner attacker (conceptctl.erasure.adversarial.PromptAdversary).
    adversary: torch.nn.Module | None = None

    @property
    def trains_text_encoder(self) -> bool:
        """Whether the text encoder's weights train (the student's prompts must be encoded by
        it, with gradients; the batch's embeddings are the original encoder's)."""
        from conceptctl.backbones.backbone import is_text_encoder_tensor

        return any(is_text_encoder_tensor(name) for name in self.params)

    def summed_grad(self, loss: torch.Tensor, params: list[torch.Tensor],
                    also: tuple[torch.Tensor, ...] = ()) -> list[torch.Tensor]:
        """d loss / d params through the precision policy, summed over the processes of a
        data-parallel run, where each process's loss covers its own rows (the role of
        accelerate's ``accelerator.backward``); ``also``: tensors summed in the same collective
        (e.g. the loss itself, for the log)."""
        grads = self.precision.grad(loss, params)
        self.dist.sum_([*grads, *also])
        return grads


def draw_noise(generator: torch.Generator, size: int, shape, num_timesteps: int):
    """t ~ U{0..T-1} and ε ~ N(0, I) for ``size`` images, in that order from ``generator``
    (on the CPU, so every device and process draws the same numbers)."""
    t = torch.randint(0, num_timesteps, (size,), generator=generator)
    return t, torch.randn((size, *shape), generator=generator)


def _noised(ctx: Context, batch: Batch):
    """Shared first step: x_t = √ᾱ_t x0 + √(1−ᾱ_t) ε, with the batch's t and ε and ᾱ from the
    model's training schedule (``Backbone.add_noise``), never the sampling scheduler's
    ``add_noise``: DPM-Solver/Euler/UniPC look t up in their inference steps there, so x_t would be
    noised at the wrong level and change once anchor images are drawn (``set_timesteps``)."""
    latents = batch.latents
    if batch.timesteps is None:
        t, noise = draw_noise(ctx.generator, latents.shape[0], latents.shape[1:],
                              ctx.backbone.num_train_timesteps)
    else:
        t, noise = batch.timesteps, batch.noise
    noise, t = noise.to(latents), t.to(latents.device)
    return ctx.backbone.add_noise(latents, noise, t), noise, t


def with_attacked_rows(ctx: Context, batch: Batch, x_t, noise, t, step: int):
    """With ``--adversarial``: the batch, x_t, ε and t with one more row per row, whose target
    prompt is, for the student, the inner attack's version of that row's (same anchor latent, t
    and ε; the frozen model keeps the plain prompt), so the method erases on attacked prompts
    next to the usual ones; with ``--adversarial-rows replaced`` the same rows, the student's
    target prompt of each being the attacked one instead. Without: all unchanged."""
    if ctx.adversary is None:
        return batch, x_t, noise, t
    with ctx.timer("inner attack"):
        attacked = ctx.adversary(x_t, t, batch.prompts, batch.target_text, step)
    own = batch.for_student()
    if ctx.adversary.replaces:
        student = StudentText(own.anchor_text, attacked, own.empty_text, own.prior_text)
        return replace(batch, student=student), x_t, noise, t

    def twice(value):
        return torch.cat([value, value])

    student = StudentText(twice(own.anchor_text), torch.cat([own.target_text, attacked]),
                          twice(own.empty_text), own.prior_text)
    more = replace(batch, latents=twice(batch.latents), anchor_text=twice(batch.anchor_text),
                   target_text=twice(batch.target_text), empty_text=twice(batch.empty_text),
                   timesteps=twice(t), noise=twice(noise), prompts=twice(batch.prompts),
                   student=student)
    return more, twice(x_t), twice(noise), twice(t)


def retain_loss(ctx: Context, x_t, t) -> torch.Tensor | None:
    """With ``--adversarial``: the retain loss (conceptctl.erasure.adversarial) on the batch's own
    rows (the first half of x_t after :func:`with_attacked_rows` adds rows, all of them when the
    attacked rows replace the plain ones); None without."""
    if ctx.adversary is None:
        return None
    rows = len(x_t) if ctx.adversary.replaces else len(x_t) // 2
    return ctx.adversary.retain_loss(x_t[:rows], t[:rows], ctx.generator)


def plus_optional(loss: torch.Tensor, extra: torch.Tensor | None) -> torch.Tensor:
    """``loss + extra``, or ``loss`` when there is no extra term."""
    return loss if extra is None else loss + extra


PRIOR_BATCHES = ("separate", "shared")
# What D's update is the gradient of: "own" its own loss (the method), or "reference" its loss
# plus the generator's adversarial loss, as the authors' code does by never clearing D's
# gradients after the generator's backward pass (kept to measure the difference).
D_UPDATES = ("own", "reference")


def _preserving_loss(ctx: Context, batch: Batch, x_t, noise, t) -> torch.Tensor:
    """L_prior: the student's ordinary denoising loss on anchor images with their own captions:
    the batch's separate prior images when it has them (the reference), else its own x_t."""
    student = batch.for_student()
    latents, text = batch.latents, student.anchor_text
    if batch.prior is not None:
        prior = batch.prior
        latents, text, noise = prior.latents, student.prior_text, prior.noise.to(prior.latents)
        t = prior.timesteps.to(latents.device)
        x_t = ctx.backbone.add_noise(latents, noise, t)
    pred = ctx.backbone.unet(x_t, t, text).sample
    target = ctx.backbone.training_target(latents, noise, t)
    return F.mse_loss(pred.float(), target.float())


class DoCo:
    """``doco``: adversarial concept-domain correction + concept-preserving gradient surgery."""

    # g_u and g_p must be summed over processes separately, before surgery.
    reduces_gradients = True
    # The surgery places the gradient-norm clip itself (the reference clips g_p and g_u before
    # its surgery, not after): the trainer applies what it returns with no further clip.
    clips_gradients = True

    def __init__(self, ctx: Context, discriminator, d_optimizer, surgery, warmup: int,
                 prior_batch: str = "separate", d_update: str = "own") -> None:
        self.ctx, self.disc, self.d_opt, self.surgery = ctx, discriminator, d_optimizer, surgery
        self.warmup, self.prior_batch, self.d_update = warmup, prior_batch, d_update
        # Saved in checkpoints alongside the UNet's trainable tensors, for exact resumption.
        self.state_modules = {"discriminator": discriminator}
        self.state_optimizers = {"discriminator": d_optimizer}

    def training_step(self, batch: Batch, step: int) -> StepStats:
        ctx, timer, dist = self.ctx, self.ctx.timer, self.ctx.dist
        x_t, noise, t = _noised(ctx, batch)
        backbone = ctx.backbone
        warming_up = step <= self.warmup
        if not warming_up:  # the model only changes after the warm-up: nothing to attack before
            batch, x_t, noise, t = with_attacked_rows(ctx, batch, x_t, noise, t,
                                                      step - self.warmup)
        # "Real": what the original model predicts for the anchor prompt, as a clean latent.
        with timer("frozen forward"), torch.no_grad():
            frozen = ctx.frozen_unet(x_t, t, batch.anchor_text).sample
            real = backbone.predicted_original(x_t, frozen, t)
        # "Fake": the student's clean-latent prediction for the target prompt. During warm-up
        # only D learns from it, so no graph is kept (same numbers, less memory and time).
        with timer("student forward, adversarial"), \
                torch.no_grad() if warming_up else nullcontext():
            fake = backbone.predicted_original(
                x_t, backbone.unet(x_t, t, batch.for_student().target_text).sample, t)

        real_all = dist.gather(real.float(), batch.sizes)
        fake_all = dist.gather(fake.detach().float(), batch.sizes)
        self.disc.train()
        # The reference's order: the generator step first, judged by D as it stands, then D's
        # step on the same (pre-update) pictures. During warm-up only D trains.
        stats = StepStats(loss=float("nan"), generator_step=False) if warming_up else \
            self._generator_step(batch, x_t, noise, t, fake, fake_all)
        # D is small: it stays fp32, and in a data-parallel run every process trains it on the
        # whole gathered batch, so all copies stay identical with no gradient exchange.
        with timer("discriminator"), ctx.precision.full_precision():
            d_loss = self.disc.d_loss(real_all, fake_all)
            self.d_opt.zero_grad(set_to_none=True)
            if self.d_update == "reference" and not warming_up:
                # ∇_D of the generator's loss as the generator step saw it: same D (not yet
                # updated), same pictures; the inputs' own gradient plays no part here.
                (d_loss + self.disc.g_loss(fake_all)).backward()
            else:
                d_loss.backward()
            self.d_opt.step()
            stats.d_loss, stats.d_accuracy = d_loss.item(), self.disc.accuracy(real_all, fake_all)
        return stats

    def _generator_step(self, batch: Batch, x_t, noise, t, fake, fake_all) -> StepStats:
        """g_u and g_p, combined by the surgery into the UNet's gradients (``p.grad``)."""
        ctx, timer, dist = self.ctx, self.ctx.timer, self.ctx.dist
        # Unlearning gradient g_u: make the target's x̂0 look like the anchor's to D. With
        # several processes the loss is the whole batch's, and gradients flow through this
        # process's rows only: summed over processes, that is the whole batch's gradient.
        params = list(ctx.params.values())
        with timer("student backward, adversarial"):
            with ctx.precision.full_precision():
                adv = self.disc.g_loss(_with_own_rows(fake_all, fake.float(), batch, dist))
            g_u = ctx.summed_grad(adv, params)
        # Preserving gradient g_p: keep denoising anchor images under their own captions.
        with timer("student forward, preserving"):
            own = batch if self.prior_batch == "separate" else replace(batch, prior=None)
            prior = plus_optional(_preserving_loss(ctx, own, x_t, noise, t),
                                  retain_loss(ctx, x_t, t))
            if dist.world > 1:
                prior = prior * batch.share  # summed over processes: the whole batch's mean
        with timer("student backward, preserving"):
            prior_sum = prior.detach().reshape(1).clone()  # summed with g_p, for the log
            g_p = ctx.summed_grad(prior, params, also=(prior_sum,))
        # Surgery on the whole set at once (it also clips, jointly): its result is the update.
        # The sums are identical on every process, so every process applies the same gradients.
        with timer("surgery"):
            names = list(ctx.params)
            grads, changed = self.surgery(dict(zip(names, g_u, strict=True)),
                                          dict(zip(names, g_p, strict=True)))
            for name, p in ctx.params.items():
                p.grad = grads[name].to(p.dtype)
        return StepStats(loss=adv.item(), preserve_loss=prior_sum.item(),
                         surgery_fired=changed / len(params))



def _with_own_rows(whole: torch.Tensor, own: torch.Tensor, batch: Batch, dist) -> torch.Tensor:
    """The gathered batch with this process's rows replaced by ``own`` (which carries grads)."""
    if dist.world == 1:
        return own
    rows = dist.shard(sum(batch.sizes))
    return torch.cat([whole[: rows.start], own, whole[rows.stop:]])


class AblatingConcepts:
    """``ca`` (Kumari et al. 2023, model-based): ε_θ(x_t, c_t) → sg ε_goal(x_t, c_a) on anchor
    images, plus ``prior_weight`` × the preserving loss.

    As the authors' code (concept-ablation diffusers/train.py) by default: the goal is the
    model being trained itself, without gradient (``goal="student"``), and no prior loss.
    ``goal="frozen"`` with ``prior_weight=1`` is the ``ca-doco-recipe`` variant: the original
    model's prediction and DoCo's preserving loss, trained with DoCo's recipe, so that a
    comparison isolates DoCo's discriminator and surgery."""

    def __init__(self, ctx: Context, prior_weight: float = 0.0, goal: str = "student") -> None:
        if goal not in ("student", "frozen"):
            raise ValueError(f"goal must be 'student' or 'frozen', not {goal!r}")
        self.ctx, self.prior_weight, self.goal = ctx, prior_weight, goal

    def training_step(self, batch: Batch, step: int) -> StepStats:
        ctx = self.ctx
        x_t, noise, t = _noised(ctx, batch)
        batch, x_t, noise, t = with_attacked_rows(ctx, batch, x_t, noise, t, step)
        student = batch.for_student()
        with torch.no_grad():
            if self.goal == "student":
                goal = ctx.backbone.unet(x_t, t, student.anchor_text).sample
            else:
                goal = ctx.frozen_unet(x_t, t, batch.anchor_text).sample
        loss = F.mse_loss(ctx.backbone.unet(x_t, t, student.target_text).sample.float(),
                          goal.float())
        retain = retain_loss(ctx, x_t, t)
        if not self.prior_weight:
            ctx.precision.backward(plus_optional(loss, retain))
            return StepStats(loss=loss.item())
        prior = _preserving_loss(ctx, batch, x_t, noise, t)
        ctx.precision.backward(plus_optional(loss + self.prior_weight * prior, retain))
        return StepStats(loss=loss.item(), preserve_loss=prior.item())


def esd_goal(ctx: Context, x_t, t, concept_text, empty_text, eta: float) -> torch.Tensor:
    """ESD's target: ε*(x_t, ∅) − η (ε*(x_t, c) − ε*(x_t, ∅)), the original model's guidance
    direction for the concept, reversed."""
    with torch.no_grad():
        uncond = ctx.frozen_unet(x_t, t, empty_text).sample
        cond = ctx.frozen_unet(x_t, t, concept_text).sample
        return uncond - eta * (cond - uncond)


class EsdXOnAnchors:
    """``esd-x-doco-recipe``: ESD's negative-guidance target, ε_θ(x_t, c_t) → esd_goal, on x_t
    from the anchor images (with DoCo's recipe and trained tensors), for a comparison on equal
    footing. ``esd-x`` (conceptctl.erasure.esd) is the authors' method and recipe."""

    def __init__(self, ctx: Context, eta: float = 1.0) -> None:
        self.ctx, self.eta = ctx, eta

    def training_step(self, batch: Batch, step: int) -> StepStats:
        ctx = self.ctx
        x_t, noise, t = _noised(ctx, batch)
        batch, x_t, _, t = with_attacked_rows(ctx, batch, x_t, noise, t, step)
        goal = esd_goal(ctx, x_t, t, batch.target_text, batch.empty_text, self.eta)
        loss = F.mse_loss(
            ctx.backbone.unet(x_t, t, batch.for_student().target_text).sample.float(),
            goal.float())
        ctx.precision.backward(plus_optional(loss, retain_loss(ctx, x_t, t)))
        return StepStats(loss=loss.item())
