"""The erasure training loop, one function that reads top to bottom.

Components (method, discriminator, surgery) are resolved once from the registries by the caller
and handed in built; the loop never looks at their names. A step: draw a batch of anchor latents
with their anchor/target prompt embeddings, let the method put gradients in the trainable
parameters, clip (unless the method did: DoCo's surgery places its own clip), step, check the
losses and then the updated weights are finite, and checkpoint now and then. The weights are
checked after the update and before its checkpoint, so a step that makes them NaN or infinite
stops training with the last finite checkpoint kept.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from conceptctl.erasure.augment import Rescale
from conceptctl.erasure.distributed import ProcessGroup, SingleProcess
from conceptctl.erasure.finite import NonFiniteWeightsError, all_finite, first_non_finite
from conceptctl.erasure.methods import Batch, PriorBatch, StepStats, StudentText, draw_noise
from conceptctl.erasure.precision import Precision
from conceptctl.errors import ConceptctlError


class NonFiniteLossError(ConceptctlError):
    """A loss became NaN or infinite; training stopped."""


# What to do after a loss or weight went non-finite. Resuming would only repeat the same steps
# (the run is deterministic and '--resume' refuses other settings), so the way on is afresh.
_DIVERGED_HINT = ("lower --lr (or --d-lr) and start afresh (--overwrite, or another --output); "
                  "nothing non-finite was saved")


@dataclass
class TrainingData:
    """Anchor latents (N, C, h, w), which prompt each came from, and the prompt embeddings."""

    latents: torch.Tensor
    prompt_index: torch.Tensor
    anchor_text: torch.Tensor  # (P, tokens, width)
    target_text: torch.Tensor  # (P, tokens, width)
    empty_text: torch.Tensor  # (1, tokens, width)
    # The reference's resize augmentation (conceptctl.erasure.augment.Rescale), when chosen:
    # it replaces the adversarial batch's latents, and each target caption takes the prefix it
    # drew (its ``target_variants``).
    augment: Rescale | None = None
    # With ``--params text-encoder``: the prompts above, encoded afresh each step by the text
    # encoder being trained (:class:`StudentPrompts`), for the student's conditioning.
    student: StudentPrompts | None = None
    # Several concepts: each image's chance of being drawn for the adversarial batch, so that
    # every erasure is drawn equally often whatever its number of anchor prompts (None: every
    # image alike, as a one-concept run draws).
    weights: torch.Tensor | None = None

    def batch(self, size: int, generator: torch.Generator, device, dtype,
              num_timesteps: int = 1000, dist: ProcessGroup | None = None) -> Batch:
        """A batch of ``size`` images with their timesteps and noise, and ``size`` more for the
        preservation loss, drawn from ``generator`` in a fixed order (indices, t, ε, then the
        prior's); with several processes, this process's share of it (every process draws the
        same global batch, so the generators stay in step)."""
        dist = dist or SingleProcess()
        idx = (torch.randint(len(self.latents), (size,), generator=generator)
               if self.weights is None else
               torch.multinomial(self.weights, size, replacement=True, generator=generator))
        t, noise = draw_noise(generator, size, self.latents.shape[1:], num_timesteps)
        # The preservation loss's own images, t and ε (the reference's separate prior batch).
        prior_idx = torch.randint(len(self.latents), (size,), generator=generator)
        prior_t, prior_noise = draw_noise(generator, size, self.latents.shape[1:], num_timesteps)
        rows = dist.shard(size)
        # Drawn after everything above, so the batches without augmentation stay as they were.
        augmented = None if self.augment is None else self.augment(idx, generator, rows)
        idx, t, noise = idx[rows], t[rows], noise[rows]
        prior_idx, prior_t, prior_noise = prior_idx[rows], prior_t[rows], prior_noise[rows]
        prompts = self.prompt_index[idx]
        local = len(idx)
        latents, target_text = self.latents[idx], self.target_text[prompts]
        if augmented is not None:
            latents, prefix = augmented
            target_text = self.augment.target_variants[prefix, prompts]
        prior = PriorBatch(
            latents=self.latents[prior_idx].to(device=device, dtype=dtype),
            text=self.anchor_text[self.prompt_index[prior_idx]].to(device=device, dtype=dtype),
            timesteps=prior_t.to(device), noise=prior_noise.to(device=device, dtype=dtype))
        student = None if self.student is None else self.student.text(
            prompts, self.prompt_index[prior_idx], local, dtype)
        return Batch(
            student=student,
            latents=latents.to(device=device, dtype=dtype),
            anchor_text=self.anchor_text[prompts].to(device=device, dtype=dtype),
            target_text=target_text.to(device=device, dtype=dtype),
            empty_text=self.empty_text.expand(local, -1, -1).to(device=device, dtype=dtype),
            timesteps=t.to(device),
            noise=noise.to(device=device, dtype=dtype),
            prompts=prompts,
            sizes=None if dist.world == 1 else tuple(dist.shares(size)),
            share=local / size,
            prior=prior,
        )


class StudentPrompts:
    """The run's anchor, target and empty prompts on the text encoder being trained: each batch
    encodes the prompts it holds (each once), with gradients to the encoder's weights."""

    def __init__(self, backbone, anchor: list[str], target: list[str]) -> None:
        from conceptctl.backbones.soft_prompt import PromptEncoder

        self.anchor = PromptEncoder(backbone, anchor)
        self.target = PromptEncoder(backbone, target)
        self.empty = PromptEncoder(backbone, [""])

    def text(self, prompts: torch.Tensor, prior_prompts: torch.Tensor, rows: int,
             dtype) -> StudentText:
        def encode(encoder, which: torch.Tensor) -> torch.Tensor:
            unique, inverse = which.unique(return_inverse=True)
            return encoder(unique)[inverse.to(encoder.input_ids.device)].to(dtype)

        return StudentText(anchor_text=encode(self.anchor, prompts),
                           target_text=encode(self.target, prompts),
                           empty_text=self.empty().to(dtype).expand(rows, -1, -1),
                           prior_text=encode(self.anchor, prior_prompts))


@dataclass
class LoopState:
    step: int = 0
    generator: torch.Generator = field(default_factory=torch.Generator)
    history: list[dict] = field(default_factory=list)


def run_loop(
    method,
    optimizer: torch.optim.Optimizer,
    params: dict[str, torch.nn.Parameter],
    data: TrainingData | None,
    state: LoopState,
    *,
    steps: int,
    batch_size: int,
    max_grad_norm: float,
    device,
    dtype,
    on_step: Callable[[int, StepStats], None] | None = None,
    checkpoint: Callable[[int], None] | None = None,
    checkpoint_every: int = 0,
    precision: Precision | None = None,
    num_timesteps: int = 1000,
    dist: ProcessGroup | None = None,
    modules: dict[str, torch.nn.Module] | None = None,
) -> LoopState:
    """Train from ``state.step`` to ``steps``; ``state`` carries the RNG so a resumed run draws
    exactly the batches an uninterrupted one would (``data`` None: the method draws its own).
    With several processes (``dist``) each works on its share of every batch and all take the
    same optimiser step. ``modules``: what the method trains besides ``params`` (default: its
    ``state_modules``, e.g. DoCo's discriminator), checked for finite weights with them."""
    trainable = list(params.values())
    if modules is None:
        modules = dict(getattr(method, "state_modules", {}))
    precision = precision or Precision("no", torch.device(device).type)
    dist = dist or SingleProcess()
    while state.step < steps:
        step = state.step + 1
        started = time.perf_counter()
        # No data: the method makes its own training latents (esd-x) and gets no batch.
        batch = None if data is None else data.batch(batch_size, state.generator, device, dtype,
                                                     num_timesteps, dist)
        optimizer.zero_grad(set_to_none=True)
        with precision.autocast():
            stats = method.training_step(batch, step)
        if dist.world > 1 and not getattr(method, "reduces_gradients", False):
            stats = _combine(stats, trainable, batch.share, dist)
        # fp16: unscale gradients; a step with overflowing ones is skipped (the scale shrinks).
        usable = precision.finish(trainable)
        _check_losses(stats, step)
        if stats.generator_step and usable:
            if not getattr(method, "clips_gradients", False):  # DoCo's surgery clips itself
                torch.nn.utils.clip_grad_norm_(trainable, max_grad_norm)
            optimizer.step()
        _check_weights(params, modules, step)  # before this step's checkpoint is written
        state.step = step
        # The run's one record of each step: checkpoints keep it, the manifest's summary and
        # the artifact's losses.jsonl (conceptctl.erasure.loss_log) are made from it.
        state.history.append({
            "step": step, "time": time.time(), "seconds": time.perf_counter() - started,
            "lr": optimizer.param_groups[0]["lr"],
            **{k: v for k, v in vars(stats).items() if v is not None}})
        if on_step is not None:
            on_step(step, stats)
        if checkpoint is not None and checkpoint_every and step % checkpoint_every == 0:
            checkpoint(step)
    return state


_LOSSES = ("loss", "preserve_loss", "d_loss")


def _check_losses(stats: StepStats, step: int) -> None:
    """Stop at a non-finite loss. During a warm-up step only the discriminator's counts: the
    generator's loss is NaN there by design (nothing computed it)."""
    for name in _LOSSES:
        value = getattr(stats, name)
        counts = stats.generator_step or name == "d_loss"
        if value is not None and not math.isfinite(value) and counts:
            raise NonFiniteLossError(
                f"the {name.replace('_', ' ')} became {value} at step {step}; training stopped",
                hint=_DIVERGED_HINT)


def _check_weights(params: dict[str, torch.Tensor], modules: dict[str, torch.nn.Module],
                   step: int) -> None:
    """Stop if the step just taken made a trained tensor (or a module's) NaN or infinite: a
    finite loss before an update says nothing about the weights after it. One fused check
    (conceptctl.erasure.finite); the names are looked up only when it fails."""
    tensors = [*params.values(), *(t for m in modules.values() for t in m.state_dict().values())]
    if all_finite(tensors):
        return
    named = {**params, **{f"{m}.{k}": t for m, module in modules.items()
                          for k, t in module.state_dict().items()}}
    raise NonFiniteWeightsError(
        f"the weights became non-finite at step {step} ({first_non_finite(named)}); training "
        "stopped before saving them", hint=_DIVERGED_HINT)


def _combine(stats: StepStats, trainable: list[torch.Tensor], share: float,
             dist: ProcessGroup) -> StepStats:
    """Data-parallel, for methods with mean losses over their share: sum the share-weighted
    gradients (and losses) over processes, in one collective; equal to the whole batch's mean
    loss gradient. A parameter without a gradient here gets zeros, so all processes agree."""
    grads = []
    for p in trainable:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        grads.append(p.grad.mul_(share))
    values = [getattr(stats, name) for name in _LOSSES]
    present = [i for i, v in enumerate(values) if v is not None]
    losses = torch.tensor([values[i] * share for i in present], dtype=torch.float32,
                          device=grads[0].device if grads else "cpu")
    dist.sum_([*grads, losses])
    for i, total in zip(present, losses.tolist(), strict=True):
        setattr(stats, _LOSSES[i], total)
    return stats
