"""``checkpoint-{step}/`` folders: everything needed to resume a run bit for bit, no pickles.

A checkpoint holds the trainable tensors, each optimiser's state, the discriminator (if any), the
training random generator's state, the loop history and small JSON extras (the fp16 loss scale).
Optimiser states are flattened into safetensors (tensors) plus JSON (hyperparameters), so loading
one never runs code. ``config.json`` records the run it belongs to (its settings, base weights and
anchor images: conceptctl.erasure.resume), so that a resume can be checked against it.

Only finite tensors are written (and read): a checkpoint is what a diverged run falls back on.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from conceptctl.erasure.finite import NonFiniteWeightsError, first_non_finite
from conceptctl.fileio import staged_directory

_NAME = re.compile(r"^checkpoint-(\d+)$")
RUN_FILE = "config.json"  # the run's settings, beside state.json


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, entry in state["state"].items():
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _load_optimizer(optimizer: torch.optim.Optimizer, tensors: dict, meta: dict) -> None:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    for key, value in meta["scalars"].items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_checkpoint(
    out_dir: Path,
    step: int,
    *,
    trainable: dict[str, torch.Tensor],
    optimizers: dict[str, torch.optim.Optimizer],
    modules: dict[str, torch.nn.Module],
    generator: torch.Generator,
    history: list[dict],
    keep: int,
    extra: dict | None = None,
    run: dict | None = None,
) -> Path:
    """Write ``out_dir/checkpoint-{step}`` atomically, then keep only the newest ``keep``.
    ``run``: the run's record (conceptctl.erasure.resume), written to ``config.json``. Refuses
    non-finite tensors, so the checkpoints on disk stay the last finite state."""
    files = {"trainable": {k: v.detach().cpu().contiguous() for k, v in trainable.items()}}
    meta: dict = {"step": step, "optimizers": {}, "modules": list(modules), "extra": extra or {}}
    for name, opt in optimizers.items():
        files[f"optimizer-{name}"], meta["optimizers"][name] = _optimizer_tensors(opt)
    for name, module in modules.items():
        files[f"module-{name}"] = {k: v.detach().cpu().contiguous()
                                   for k, v in module.state_dict().items()}
    _refuse_non_finite(files, f"refusing to write checkpoint-{step}")
    final = out_dir / f"checkpoint-{step}"
    with staged_directory(final) as staging:
        for file, tensors in files.items():
            save_file(tensors, str(staging / f"{file}.safetensors"))
        save_file({"state": generator.get_state()}, str(staging / "rng.safetensors"))
        if run is not None:
            (staging / RUN_FILE).write_text(json.dumps(run, indent=1))
        (staging / "state.json").write_text(json.dumps({**meta, "history": history}))
    for old in list_checkpoints(out_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _refuse_non_finite(files: dict[str, dict[str, torch.Tensor]], refusal: str) -> None:
    for file, tensors in files.items():
        problem = first_non_finite(tensors)
        if problem is not None:
            raise NonFiniteWeightsError(
                f"{refusal}: {problem} (in {file}.safetensors)",
                hint="lower --lr (or --d-lr) and start afresh (--overwrite, or another "
                "--output)")


def read_run(path: Path) -> dict | None:
    """The run record a checkpoint was saved with; None for one written before they were."""
    file = path / RUN_FILE
    return json.loads(file.read_text()) if file.is_file() else None


def list_checkpoints(out_dir: Path) -> list[Path]:
    """Checkpoint folders in ``out_dir``, oldest first."""
    if not out_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in out_dir.iterdir()
             if p.is_dir() and (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def load_checkpoint(
    path: Path,
    *,
    trainable: dict[str, torch.nn.Parameter],
    optimizers: dict[str, torch.optim.Optimizer],
    modules: dict[str, torch.nn.Module],
    generator: torch.Generator,
) -> tuple[int, list[dict], dict]:
    """Restore everything :func:`save_checkpoint` wrote; returns (step, history, extra)."""
    meta = json.loads((path / "state.json").read_text())
    files = {"trainable": load_file(str(path / "trainable.safetensors"))}
    files |= {f"optimizer-{name}": load_file(str(path / f"optimizer-{name}.safetensors"))
              for name in optimizers}
    files |= {f"module-{name}": load_file(str(path / f"module-{name}.safetensors"))
              for name in modules}
    # e.g. one written by a conceptctl that did not check
    _refuse_non_finite(files, f"refusing to resume from {path}")
    with torch.no_grad():
        for name, param in trainable.items():
            param.copy_(files["trainable"][name])
    for name, opt in optimizers.items():
        _load_optimizer(opt, files[f"optimizer-{name}"], meta["optimizers"][name])
    for name, module in modules.items():
        module.load_state_dict(files[f"module-{name}"])
    generator.set_state(load_file(str(path / "rng.safetensors"))["state"])
    return int(meta["step"]), meta["history"], meta.get("extra", {})
