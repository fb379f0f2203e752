"""Writing results so that an interrupted run never leaves a half-written target behind."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from conceptctl.errors import OutputExistsError


def check_output_free(target: Path, overwrite: bool) -> None:
    """Refuse early (before any work) when ``target`` exists and holds something."""
    if target.exists() and not overwrite and (target.is_file() or any(target.iterdir())):
        raise OutputExistsError(
            f"{target} already exists",
            hint="choose another output path, or pass --overwrite to replace it",
        )


def next_free_dir(base: Path) -> Path:
    """``base``, or ``base-2``, ``base-3`` … whichever does not exist yet."""
    candidate, n = base, 1
    while candidate.exists():
        n += 1
        candidate = base.with_name(f"{base.name}-{n}")
    return candidate


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_directory(target: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty staging folder next to ``target``; on success it becomes ``target``.

    On any error the staging folder is deleted and ``target`` is untouched. The final step is a
    rename on the same file system, so readers see either the old folder or the complete new one.
    """
    target = Path(target)
    check_output_free(target, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        # mkdtemp makes a private (0700) folder; the result should get the usual permissions.
        staging.chmod(0o777 & ~_umask())
        yield staging
        if target.exists():
            # Move the old one aside first: rename() cannot replace a non-empty folder.
            trash = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, trash / "old")
            os.replace(staging, target)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def make_shareable(path: Path) -> None:
    """Give a file the permissions any new file gets (``0666`` less the umask).

    Writers such as safetensors >= 0.8 create private (0600) files; results are meant to be
    shared with other users and tools.
    """
    os.chmod(path, 0o666 & ~_umask())


@contextmanager
def atomic_file(target: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary file path next to ``target``; on success it is renamed to ``target``.

    The single-file counterpart of :func:`atomic_directory`: on any error (or an interrupt) the
    temporary file is removed and ``target`` is untouched, so readers never see half a file.
    """
    target = Path(target)
    if target.is_dir():
        raise OutputExistsError(f"{target} is a folder; this output is a single file",
                                hint="give a file name, e.g. NAME.safetensors")
    check_output_free(target, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
    try:
        yield tmp
        make_shareable(tmp)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json(path: Path, data: Any) -> None:
    """Pretty, UTF-8, newline-terminated JSON (diff-friendly sidecars)."""
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
