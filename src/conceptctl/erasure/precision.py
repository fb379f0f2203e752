"""Mixed precision for training: autocast the UNet passes, keep fp32 master weights.

``no`` trains in the backbone's dtype. ``bf16`` autocasts forward passes to bfloat16 (same range
as fp32, no loss scaling needed). ``fp16`` autocasts to float16 and scales losses dynamically so
small gradients do not underflow, as torch's GradScaler does; it lives here rather than in a
GradScaler because DoCo needs its two gradients *unscaled* before gradient surgery (the
reference surgery clips to norm 1, which does not commute with a scale factor).

Methods call ``ctx.precision.grad(loss, params)`` (returns unscaled gradients) or
``ctx.precision.backward(loss)`` (the trainer unscales ``.grad`` afterwards); both are plain
``torch.autograd.grad`` / ``.backward()`` when no scaling is active, so ``no`` and ``bf16`` runs
are unaffected. A step whose gradients are not finite under fp16 is skipped and the scale halved.

Which mode a run uses (:func:`resolve_mode`): ``--mixed-precision`` when given, else what
accelerate asks for, else ``no``. ``accelerate launch`` exports its ``--mixed_precision`` flag (or
the ``mixed_precision`` of its config file, ``no`` when neither says) as
``ACCELERATE_MIXED_PRECISION`` to the processes it starts; accelerate's own ``Accelerator`` reads
that variable and nothing else, and so does conceptctl.
"""

from __future__ import annotations

import os
from contextlib import nullcontext

import torch

MODES = ("no", "fp16", "bf16")
_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
ACCELERATE_ENV = "ACCELERATE_MIXED_PRECISION"
# Where a run's mode came from, as its manifest records it (``mixed_precision_source``).
SOURCES = ("option", "accelerate", "default")


def resolve_mode(given: str | None) -> tuple[str, str]:
    """(mode, source): ``given`` (the --mixed-precision option or the setting a library caller
    passed), else accelerate's ``ACCELERATE_MIXED_PRECISION``, else ``no``."""
    if given is not None:
        return given, "option"
    launcher = os.environ.get(ACCELERATE_ENV, "").strip().lower()
    if not launcher:
        return "no", "default"
    if launcher not in MODES:
        from conceptctl.errors import UsageError

        raise UsageError(f"accelerate asks for mixed precision {launcher!r} ({ACCELERATE_ENV}), "
                         f"which conceptctl does not train with; it takes {', '.join(MODES)}",
                         hint="launch with --mixed_precision bf16 (or fp16, no), or give "
                         "conceptctl's --mixed-precision, which takes precedence")
    return launcher, "accelerate"


class Precision:
    def __init__(self, mode: str, device_type: str, init_scale: float = 2.0**16,
                 growth_interval: int = 2000) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown mixed precision {mode!r}")
        self.mode, self.device_type = mode, device_type
        self.scaling = mode == "fp16"
        self.scale = init_scale if self.scaling else 1.0
        self.growth_interval = growth_interval
        self.good_steps = 0
        self.skipped_steps = 0
        self._backward_pending = False  # .grad holds scaled values from backward()
        self._found_inf = False

    def autocast(self):
        if self.mode == "no":
            return nullcontext()
        return torch.autocast(self.device_type, dtype=_DTYPES[self.mode])

    def full_precision(self):
        """For small modules that should stay fp32 inside an autocast region (discriminators)."""
        if self.mode == "no":
            return nullcontext()
        return torch.autocast(self.device_type, enabled=False)

    def grad(self, loss: torch.Tensor, params) -> tuple[torch.Tensor, ...]:
        if not self.scaling:
            return torch.autograd.grad(loss, params)
        grads = torch.autograd.grad(loss * self.scale, params)
        grads = tuple(g.float() / self.scale for g in grads)
        if not all(torch.isfinite(g).all() for g in grads):
            self._found_inf = True
        return grads

    def backward(self, loss: torch.Tensor) -> None:
        if not self.scaling:
            loss.backward()
            return
        (loss * self.scale).backward()
        self._backward_pending = True

    def finish(self, params) -> bool:
        """After a method's step: unscale ``.grad`` if needed; False means skip this step."""
        if not self.scaling:
            return True
        if self._backward_pending:
            for p in params:
                if p.grad is not None:
                    p.grad.div_(self.scale)
        found_inf = self._found_inf or not all(
            torch.isfinite(p.grad).all() for p in params if p.grad is not None)
        self._backward_pending = self._found_inf = False
        if found_inf:
            self.scale /= 2
            self.good_steps = 0
            self.skipped_steps += 1
            return False
        self.good_steps += 1
        if self.good_steps % self.growth_interval == 0:
            self.scale *= 2
        return True

    def state_dict(self) -> dict:
        return {"mode": self.mode, "scale": self.scale, "good_steps": self.good_steps,
                "skipped_steps": self.skipped_steps}

    def load_state_dict(self, state: dict) -> None:
        if state.get("mode", self.mode) != self.mode:
            raise ValueError(f"the checkpoint was trained with mixed precision "
                             f"{state['mode']!r}, this run uses {self.mode!r}")
        self.scale = float(state["scale"])
        self.good_steps = int(state["good_steps"])
        self.skipped_steps = int(state["skipped_steps"])
