"""Writing results so that an interrupted run never leaves a half-written target behind."""

from __future__ import annotations

import glob
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from conceptctl.outputs import check_output_free, output_lock


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


def staging_dir(parent: Path, prefix: str) -> Path:
    """A new empty folder in ``parent`` to assemble a result in before renaming it into place,
    with the usual permissions (``mkdtemp`` makes it private, 0700, whatever the umask)."""
    staging = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    staging.chmod(0o777 & ~_umask())
    return staging


@contextmanager
def atomic_directory(target: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty staging folder next to ``target``; on success it becomes ``target``.

    On any error the staging folder is deleted and ``target`` is untouched. The final step is a
    rename on the same file system, so readers see either the old folder or the complete new one.
    Only a folder conceptctl wrote is ever replaced (:func:`conceptctl.outputs.check_output_free`),
    and the output's lock is held throughout.
    """
    target = Path(target)
    check_output_free(target, overwrite, "folder")
    with output_lock(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        clear_leftovers(target)
        # Still free after the work? (checked again just before the rename)
        with staged_directory(target, before_replace=lambda: check_output_free(
                target, overwrite, "folder")) as staging:
            yield staging


def clear_leftovers(target: Path) -> None:
    """Remove what a killed run (SIGKILL, power loss) left beside ``target``: its staging folders
    and temporary files, named by conceptctl alone. Called with the output's lock held, so no
    live process is using them. An old output moved aside for replacement goes back in place if
    the new one never arrived."""
    parent, name = target.parent, target.name
    if not parent.is_dir():
        return
    for trash in sorted(parent.glob(f".{glob.escape(name)}.old-*")):
        if trash.is_dir() and (trash / "old").exists() and not target.exists():
            os.replace(trash / "old", target)
        shutil.rmtree(trash, ignore_errors=True)
    for staging in parent.glob(f".{glob.escape(name)}.tmp-*"):
        if staging.is_dir() and not staging.is_symlink():
            shutil.rmtree(staging, ignore_errors=True)
    for tmp in parent.glob(f".{glob.escape(name)}.*.tmp"):
        if tmp.is_file() and not tmp.is_symlink():
            tmp.unlink(missing_ok=True)


def _replace_folder(new: Path, target: Path) -> None:
    """Rename ``new`` to ``target``; an existing ``target`` is moved aside first (rename() cannot
    replace a non-empty folder) and deleted only once the new one is in place."""
    if not target.exists():
        os.replace(new, target)
        return
    trash = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    try:
        os.replace(target, trash / "old")
    except BaseException:
        trash.rmdir()
        raise
    try:
        os.replace(new, target)
    except BaseException:
        os.replace(trash / "old", target)  # put the old one back
        trash.rmdir()
        raise
    shutil.rmtree(trash, ignore_errors=True)


def make_shareable(path: Path) -> None:
    """Give a file the permissions any new file gets (``0666`` less the umask).

    Writers such as safetensors >= 0.8 create private (0600) files; results are meant to be
    shared with other users and tools.
    """
    os.chmod(path, 0o666 & ~_umask())


@contextmanager
def staged_file(target: Path, before_replace=None) -> Iterator[Path]:
    """Yield a temporary file path next to ``target``; on success it is renamed over ``target``.

    On any error (or an interrupt) the temporary file is removed and ``target`` is untouched, so
    readers never see half a file. No ownership check: for files inside a folder conceptctl
    owns (an artifact, the anchor cache, settings); user-named outputs use :func:`atomic_file`.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
    try:
        yield tmp
        make_shareable(tmp)
        if before_replace is not None:
            before_replace()
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def staged_directory(target: Path, before_replace=None) -> Iterator[Path]:
    """:func:`staged_file` for a folder: yield an empty staging folder beside ``target``; on
    success it replaces ``target`` (an old one is moved aside first and deleted once the new
    one is in place). No ownership check: for folders inside an output conceptctl owns (an
    artifact's checkpoints); user-named outputs use :func:`atomic_directory`."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = staging_dir(target.parent, f".{target.name}.tmp-")
    try:
        yield staging
        if before_replace is not None:
            before_replace()
        _replace_folder(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


@contextmanager
def atomic_file(target: Path, overwrite: bool = False) -> Iterator[Path]:
    """:func:`staged_file` for an output the user named: the single-file counterpart of
    :func:`atomic_directory` (only a file conceptctl wrote is replaced; the lock is held)."""
    target = Path(target)
    check_output_free(target, overwrite, "file")
    with output_lock(target):
        clear_leftovers(target)
        with staged_file(target, before_replace=lambda: check_output_free(
                target, overwrite, "file")) as tmp:
            yield tmp


def write_json(path: Path, data: Any) -> None:
    """Pretty, UTF-8, newline-terminated JSON (diff-friendly sidecars)."""
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
