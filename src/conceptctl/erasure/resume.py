"""``--resume``: continue a run only from a checkpoint of that same run.

Every checkpoint carries its run's record (``config.json``, written by
:func:`conceptctl.erasure.checkpoints.save_checkpoint`): the whole EraseConfig, and what else
decides the trained numbers but is not in it — the dtype of the trained tensors, the digest of
the base tensors training starts from, and the anchor images (how many, and the name of their
cache file, a hash of the backbone's weights, the anchor prompts and the sampler settings).
``--resume`` compares the command's record with the checkpoint's and refuses every difference
outside :data:`MAY_DIFFER`, naming each with both values: otherwise the manifest would describe
settings that some of the steps never trained with.

The settings are compared before anything is loaded; the dtype, base weights and anchor images
once the backbone is loaded, before the anchor images are drawn.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from conceptctl.erasure.checkpoints import list_checkpoints, read_run
from conceptctl.errors import ConceptctlError, UsageError

RECORD_FORMAT = 1

# EraseConfig settings a resumed run may change: they decide how fast, how often saved or for how
# long training runs, not what any step computes.
MAY_DIFFER = frozenset({
    # No schedule depends on the total: the warm-up is absolute (steps 1..warmup), the learning
    # rates are constant, and each step draws its batch from the saved generator. So N steps
    # then a resume to M give the same weights, bit for bit, as M steps (tested), and raising
    # --steps continues a finished run. It cannot go below the checkpoint's step.
    "steps",
    "checkpointing_steps",
    "checkpoints_total_limit",
    "gradient_checkpointing",  # recomputes the same activations: the same numbers
    # The same arithmetic, faster; like another --device (which is not recorded at all) they
    # may move the last bits of float rounding, not the result.
    "compile",
    "tf32",
    # Where the mixed precision was decided (--mixed-precision or accelerate): the mode itself
    # must match, not whether it was given by one or the other.
    "mixed_precision_source",
})

# How the record's own entries (besides the EraseConfig) are named in a refusal.
_LABELS = {"dtype": "dtype", "base_tensors_digest": "base weights",
           "anchor_images": "anchor images", "anchor_cache_file": "anchor cache file"}
_NOT_RECORDED = "(not recorded)"
_AFRESH = "or start afresh with another --output (or --overwrite)"


class ResumeError(UsageError):
    """A checkpoint cannot continue this command's run."""


def settings_record(cfg) -> dict:
    """The part of a run's record known before anything loads: its settings."""
    return {"format": RECORD_FORMAT, "config": cfg.as_dict()}


def data_record(dtype, base: dict, anchor_images: int, anchor_cache_file: str) -> dict:
    """The rest, known once the backbone is loaded: the trained tensors' dtype, the base record
    (conceptctl.erasure.artifact.base_record) and the anchor images' count and cache file."""
    return {"dtype": str(dtype).removeprefix("torch."),
            "base_tensors_digest": base["tensors_digest"], "anchor_images": anchor_images,
            "anchor_cache_file": anchor_cache_file}


T = TypeVar("T")


def on_main(dist, work: Callable[[], T]) -> T | None:
    """``work()`` on the main process only (None elsewhere). A refusal it raises is raised by
    every process: the others would otherwise wait forever at the next collective."""
    result, failure = None, None
    if dist.is_main:
        try:
            result = work()
        except ConceptctlError as err:
            failure = err
    told = dist.broadcast_object(None if failure is None else (failure.message, failure.hint))
    if failure is not None:
        raise failure
    if told is not None:
        raise ConceptctlError(told[0], hint=told[1])
    return result


def resume_point(out_dir: Path, resume: str | None, dist) -> Path | None:
    """The checkpoint ``--resume`` names ('latest': the newest; None when there is none), as the
    main process finds it. A named checkpoint that is not there is refused."""
    if resume is None:
        return None
    return dist.broadcast_object(on_main(dist, lambda: _find(Path(out_dir), resume)))


def _find(out_dir: Path, resume: str) -> Path | None:
    found = list_checkpoints(out_dir)
    if resume == "latest":
        return found[-1] if found else None
    named = [p for p in found if p.name == resume]
    if not named:
        have = ", ".join(p.name for p in found) or "none"
        raise UsageError(f"no checkpoint {resume!r} in {out_dir} (there: {have})",
                         hint="--resume latest takes the newest")
    return named[0]


def check_resume(checkpoint: Path | None, record: dict, dist) -> None:
    """Refuse to resume ``checkpoint`` unless its record agrees with ``record`` (what is known of
    this run so far) in everything outside :data:`MAY_DIFFER`. Checked by the main process."""
    if checkpoint is not None:
        on_main(dist, lambda: _check(checkpoint, record))


def _check(checkpoint: Path, record: dict) -> None:
    saved = read_run(checkpoint)
    if saved is None:
        raise ResumeError(
            f"{checkpoint.name} records no settings (written by an older conceptctl), so "
            "resuming it cannot be checked", hint=f"rerun from the start: {_AFRESH}")
    differences = _differences(saved, record)
    if differences:
        raise ResumeError(
            f"{checkpoint.name} was trained with other settings: {', '.join(differences)}",
            hint=f"resume with the checkpoint's settings (its config.json), {_AFRESH}")
    step = int(checkpoint.name.removeprefix("checkpoint-"))
    steps = record["config"]["steps"]
    if steps < step:
        raise ResumeError(f"{checkpoint.name} is already past --steps {steps}",
                          hint=f"give --steps {step} or more to continue it")


def _differences(saved: dict, now: dict) -> list[str]:
    """'NAME OLD != NEW' for each entry of ``now`` the checkpoint recorded otherwise, in the
    EraseConfig's order, then the record's own entries."""
    old_config = saved.get("config", {})
    pairs = [(name.replace("_", "-"), old_config.get(name, _NOT_RECORDED), value)
             for name, value in now.get("config", {}).items() if name not in MAY_DIFFER]
    pairs += [(_LABELS.get(name, name), saved.get(name, _NOT_RECORDED), value)
              for name, value in now.items() if name not in ("format", "config")]
    return [f"{label} {_shown(old)} != {_shown(new)}" for label, old, new in pairs if old != new]


def _shown(value) -> str:
    return value if value is _NOT_RECORDED else repr(value)
