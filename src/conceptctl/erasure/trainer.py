"""The erasure training loop, one function that reads top to bottom.

Components (method, discriminator, surgery) are resolved once from the registries by the caller
and handed in built; the loop never looks at their names. A step: draw a batch of anchor latents
with their anchor/target prompt embeddings, let the method put gradients in the trainable
parameters, clip, step, check the losses are finite, and checkpoint now and then.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from conceptctl.erasure.methods import Batch, StepStats
from conceptctl.erasure.precision import Precision
from conceptctl.errors import ConceptctlError


class NonFiniteLossError(ConceptctlError):
    """A loss became NaN or infinite; training stopped."""


@dataclass
class TrainingData:
    """Anchor latents (N, C, h, w), which prompt each came from, and the prompt embeddings."""

    latents: torch.Tensor
    prompt_index: torch.Tensor
    anchor_text: torch.Tensor  # (P, tokens, width)
    target_text: torch.Tensor  # (P, tokens, width)
    empty_text: torch.Tensor  # (1, tokens, width)

    def batch(self, size: int, generator: torch.Generator, device, dtype) -> Batch:
        idx = torch.randint(len(self.latents), (size,), generator=generator)
        prompts = self.prompt_index[idx]
        return Batch(
            latents=self.latents[idx].to(device=device, dtype=dtype),
            anchor_text=self.anchor_text[prompts].to(device=device, dtype=dtype),
            target_text=self.target_text[prompts].to(device=device, dtype=dtype),
            empty_text=self.empty_text.expand(size, -1, -1).to(device=device, dtype=dtype),
        )


@dataclass
class LoopState:
    step: int = 0
    generator: torch.Generator = field(default_factory=torch.Generator)
    history: list[dict] = field(default_factory=list)


def run_loop(
    method,
    optimizer: torch.optim.Optimizer,
    params: dict[str, torch.nn.Parameter],
    data: TrainingData,
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
) -> LoopState:
    """Train from ``state.step`` to ``steps``; ``state`` carries the RNG so a resumed run draws
    exactly the batches an uninterrupted one would."""
    trainable = list(params.values())
    precision = precision or Precision("no", torch.device(device).type)
    while state.step < steps:
        step = state.step + 1
        batch = data.batch(batch_size, state.generator, device, dtype)
        optimizer.zero_grad(set_to_none=True)
        with precision.autocast():
            stats = method.training_step(batch, step)
        # fp16: unscale gradients; a step with overflowing ones is skipped (the scale shrinks).
        usable = precision.finish(trainable)
        for name in ("loss", "preserve_loss", "d_loss"):
            value = getattr(stats, name)
            if value is not None and not math.isfinite(value) and stats.generator_step:
                raise NonFiniteLossError(
                    f"the {name.replace('_', ' ')} became {value} at step {step}; training "
                    "stopped",
                    hint="lower --lr or --d-lr; the last good checkpoint is kept, so "
                    "'--resume latest' continues from it",
                )
        if stats.generator_step and usable:
            torch.nn.utils.clip_grad_norm_(trainable, max_grad_norm)
            optimizer.step()
        state.step = step
        state.history.append({"step": step, "time": time.time(), **{
            k: v for k, v in vars(stats).items() if v is not None}})
        if on_step is not None:
            on_step(step, stats)
        if checkpoint is not None and checkpoint_every and step % checkpoint_every == 0:
            checkpoint(step)
    return state
