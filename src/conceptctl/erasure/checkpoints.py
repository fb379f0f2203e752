"""``checkpoint-{step}/`` folders: everything needed to resume a run bit for bit, no pickles.

A checkpoint holds the trainable tensors, each optimiser's state, the discriminator (if any), the
training random generator's state, the loop history and small JSON extras (the fp16 loss scale).
Optimiser states are flattened into safetensors (tensors) plus JSON (hyperparameters), so loading
one never runs code.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

_NAME = re.compile(r"^checkpoint-(\d+)$")


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
) -> Path:
    """Write ``out_dir/checkpoint-{step}`` atomically, then keep only the newest ``keep``."""
    final = out_dir / f"checkpoint-{step}"
    staging = Path(tempfile.mkdtemp(prefix=f".checkpoint-{step}-", dir=out_dir))
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in trainable.items()},
                  str(staging / "trainable.safetensors"))
        meta: dict = {"step": step, "optimizers": {}, "modules": list(modules),
                      "extra": extra or {}}
        for name, opt in optimizers.items():
            tensors, opt_meta = _optimizer_tensors(opt)
            save_file(tensors, str(staging / f"optimizer-{name}.safetensors"))
            meta["optimizers"][name] = opt_meta
        for name, module in modules.items():
            save_file({k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()},
                      str(staging / f"module-{name}.safetensors"))
        save_file({"state": generator.get_state()}, str(staging / "rng.safetensors"))
        (staging / "state.json").write_text(json.dumps({**meta, "history": history}))
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    for old in list_checkpoints(out_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


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
    values = load_file(str(path / "trainable.safetensors"))
    with torch.no_grad():
        for name, param in trainable.items():
            param.copy_(values[name])
    for name, opt in optimizers.items():
        _load_optimizer(opt, load_file(str(path / f"optimizer-{name}.safetensors")),
                        meta["optimizers"][name])
    for name, module in modules.items():
        module.load_state_dict(load_file(str(path / f"module-{name}.safetensors")))
    generator.set_state(load_file(str(path / "rng.safetensors"))["state"])
    return int(meta["step"]), meta["history"], meta.get("extra", {})
