"""Only what the erasure changed: erased minus base, for the smallest download.

The file holds, by UNet parameter name, ``erased − base`` for every tensor whose value changed,
and in its header the record of the erasure with the hash of exactly those base tensors. It is
read back by :func:`conceptctl.erasure.artifact.read_artifact` and applied by ``apply_artifact``
(``conceptctl sample --model DELTA.safetensors``), which refuses a base whose tensors hash
differently unless forced — adding a difference to the wrong weights gives a plausible-looking
but wrong model, so the check matters more here than anywhere.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from conceptctl.erasure.artifact import DELTA, base_record
from conceptctl.errors import ConceptctlError
from conceptctl.export.metadata import header


def delta_tensors(job) -> dict[str, torch.Tensor]:
    """``erased − base`` of the changed tensors, computed in the artifact's precision."""
    names = job.changed()
    if not names:
        raise ConceptctlError("the artifact changes nothing relative to this base: a delta "
                              "would be empty")
    return {name: (job.erased[name] - job.base[name]).to(job.dtype).contiguous()
            for name in names}


def export_delta(job, out: Path) -> dict[str, Any]:
    deltas = delta_tensors(job)
    names = sorted(deltas)
    # The applier hashes the base tensors it is about to change, so the record names exactly
    # these (a subset of the artifact's when some trained tensors did not move).
    base = {**job.info["base"], **base_record({name: job.base[name] for name in names}),
            "tensors": names}
    save_file(deltas, str(out), metadata=header({**job.info, "kind": DELTA, "base": base}))
    # What a reader gets back: base + delta in the base's precision, against the erased values.
    worst = max(float(((job.base[n] + deltas[n].to(job.base[n].dtype)) - job.erased[n])
                      .abs().max()) for n in names)
    return {"tensors": len(names), "skipped_unchanged": len(job.erased) - len(names),
            "parameters": sum(d.numel() for d in deltas.values()),
            "max_reapply_error": worst}
