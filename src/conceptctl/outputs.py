"""Which outputs conceptctl may replace, and one writer per output.

``--overwrite`` replaces only what conceptctl wrote itself: a folder whose record says so (an
artifact's ``conceptctl.json``, its checkpoints, a ``samples.json``, an evaluation's
``report.json``…), or a file that carries conceptctl's mark (the ``conceptctl`` header of an
exported ``.safetensors``, the ``conceptctl`` text chunk of a rendered PNG, the ``conceptctl`` tag
of an export's model card, the ``conceptctl`` key of its Automatic1111 metadata). Anything else, the
working directory and its ancestors are refused whatever the flags: a user's files are never
moved or deleted.

A run holds an advisory lock on its output for its whole length: a sibling file
``.NAME.conceptctl-lock`` holding the writer's pid, host and command. A second writer is refused
naming the holder; a lock whose process is gone (same host) is taken over with a note.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from conceptctl.errors import ConceptctlError, OutputExistsError

# Record file -> the key path only conceptctl writes into it. A folder holding one is ours.
RECORDS: dict[str, tuple[str, ...]] = {
    "conceptctl.json": ("format_version",),  # erasure artifact, exported diffusers folder
    "samples.json": ("versions", "conceptctl"),  # conceptctl sample
    "report.json": ("versions", "conceptctl"),  # conceptctl evaluate
    "compare.json": ("reports",),  # conceptctl evaluate --compare
    "training.json": ("judge_heldout_accuracy",),  # conceptctl toy train
}
CHECKPOINT_RECORD = "state.json"  # checkpoint-N/state.json: a run killed before its artifact
# What marks a file as conceptctl's: the model-card tag and JSON key of an export's sidecars
# (conceptctl.export.sidecars), and the tEXt chunk of PNGs that 'conceptctl toy render' writes.
MARK = "conceptctl"
PNG_MARK = MARK
LOCK_SUFFIX = ".conceptctl-lock"


class OutputLockedError(ConceptctlError):
    """Another conceptctl process is writing the same output."""


def _has_key(data: object, path: tuple[str, ...]) -> bool:
    for key in path:
        if not isinstance(data, dict) or key not in data:
            return False
        data = data[key]
    return True


def _json_record(path: Path, key_path: tuple[str, ...]) -> bool:
    try:
        return path.is_file() and _has_key(json.loads(path.read_text(encoding="utf-8")),
                                           key_path)
    except (OSError, ValueError):
        return False


def _is_checkpoint(path: Path) -> bool:
    return (path.name.startswith("checkpoint-") and path.is_dir()
            and _json_record(path / CHECKPOINT_RECORD, ("step",)))


def _marked_file(path: Path) -> bool:
    """An exported ``.safetensors`` (header key ``conceptctl``) or a rendered PNG."""
    suffix = path.suffix.lower()
    try:
        if suffix == ".safetensors":
            from conceptctl.erasure.artifact import HEADER_KEY

            with open(path, "rb") as f:  # the JSON header only; no tensor is read
                length = int.from_bytes(f.read(8), "little")
                if not 0 < length <= 100 * 2**20:
                    return False
                head = json.loads(f.read(length))
            return HEADER_KEY in (head.get("__metadata__") or {})
        if suffix == ".png":
            from PIL import Image

            with Image.open(path) as image:
                return PNG_MARK in getattr(image, "text", {})
        if suffix in (".md", ".json") and path.stat().st_size <= 2**20:
            return _marked_sidecar(path, suffix)
    except (OSError, ValueError, AttributeError):
        return False
    return False


def _marked_sidecar(path: Path, suffix: str) -> bool:
    """An export's model card (front matter tagged ``conceptctl``) or its Automatic1111
    metadata (a ``conceptctl`` key): conceptctl.export.sidecars."""
    text = path.read_text(encoding="utf-8")
    if suffix == ".json":
        data = json.loads(text)
        return isinstance(data, dict) and isinstance(data.get(MARK), dict)
    import yaml

    head, sep, _ = text.removeprefix("---\n").partition("\n---\n")
    if not text.startswith("---\n") or not sep:
        return False
    try:
        data = yaml.safe_load(head)
    except yaml.YAMLError:
        return False
    return isinstance(data, dict) and isinstance(data.get("tags"), list) and MARK in data["tags"]


def written_by_conceptctl(path: Path) -> bool:
    """True when ``path`` is an output conceptctl wrote itself (see the module docstring)."""
    path = Path(path)
    if path.is_symlink():
        return False  # replacing would move the link, not what it points to: never guess
    if path.is_file():
        return _marked_file(path)
    if not path.is_dir():
        return False
    if any(_json_record(path / name, key) for name, key in RECORDS.items()):
        return True
    return any(_is_checkpoint(child) for child in path.iterdir())


def _refuse_working_dir(target: Path) -> None:
    here, resolved = Path.cwd().resolve(), Path(target).resolve()
    if here == resolved or here.is_relative_to(resolved):
        what = "the working directory" if here == resolved else "a parent of the working directory"
        raise OutputExistsError(
            f"the output {str(target) or '.'!r} is {what}; conceptctl writes its outputs into a "
            "folder of their own", hint="give a new folder, e.g. --output erased/my-run")


def check_output_free(target: Path, overwrite: bool, kind: str | None = None) -> None:
    """Refuse early (before any work) an output that may not be written.

    ``kind`` ('file' or 'folder') is what the command writes. Without ``overwrite`` an existing,
    non-empty target is refused; with it, only a target conceptctl wrote may be replaced.
    """
    target = Path(target)
    _refuse_working_dir(target)
    _refuse_if_locked(target)
    if target.is_symlink():  # dangling or not: writing through a link lands somewhere else
        raise OutputExistsError(f"{target} is a symbolic link (to {os.readlink(target)}); "
                                "conceptctl writes outputs as new files and folders, never "
                                "through a link", hint="give the path the link points to, or a "
                                "new name")
    if not target.exists():
        return
    if kind == "folder" and not target.is_dir():
        raise OutputExistsError(f"{target} is a file; this output is a folder",
                                hint="give a folder path that does not exist yet")
    if kind == "file" and target.is_dir():
        raise OutputExistsError(f"{target} is a folder; this output is a single file",
                                hint="give a file name, e.g. NAME.safetensors")
    if target.is_dir() and not any(target.iterdir()):
        return
    if not overwrite:
        raise OutputExistsError(f"{target} already exists",
                                hint="choose another output path, or pass --overwrite to "
                                "replace it")
    if not written_by_conceptctl(target):
        what = "holds files" if target.is_dir() else "is a file"
        raise OutputExistsError(
            f"{target} {what} conceptctl did not write; --overwrite replaces only conceptctl's "
            "own outputs", hint="choose another output path, or move it away yourself")


# --- one writer per output ------------------------------------------------------------------

_held: dict[Path, int] = {}  # lock file -> depth, for nested claims within this process
_held_guard = threading.Lock()


def lock_path(target: Path) -> Path:
    target = Path(target).absolute()
    return target.with_name(f".{target.name}{LOCK_SUFFIX}")


def _holder_alive(holder: dict) -> bool | None:
    """True/False for a process on this host; None when it cannot be told (another host)."""
    if holder.get("host") != socket.gethostname():
        return None
    try:
        os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, under another user
    except (KeyError, TypeError, ValueError, OverflowError):
        return False  # not a lock we can read: nothing holds it
    return True


def _read_holder(lock: Path) -> dict | None:
    try:
        data = json.loads(lock.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _create_lock(lock: Path, record: dict) -> bool:
    """Create ``lock`` holding ``record`` if it does not exist; complete from the first moment
    (written aside, then hard-linked into place, which fails if another writer got there)."""
    tmp = lock.with_name(f"{lock.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_text(json.dumps(record) + "\n", encoding="utf-8")
    try:
        os.link(tmp, lock)
        return True
    except FileExistsError:
        return False
    except OSError:  # a file system without hard links: exclusive create instead
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        return True
    finally:
        tmp.unlink(missing_ok=True)


def _take_over(lock: Path) -> bool:
    """Remove a stale lock; only one of several processes doing this at once succeeds."""
    aside = lock.with_name(f"{lock.name}.stale-{uuid.uuid4().hex}")
    try:
        os.rename(lock, aside)
    except FileNotFoundError:
        return False
    aside.unlink(missing_ok=True)
    return True


def _describe(holder: dict) -> str:
    started = holder.get("started")
    since = time.strftime(" since %Y-%m-%d %H:%M:%S", time.localtime(started)) if isinstance(
        started, int | float) else ""
    return f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}{since}"


def _note_on_stderr(text: str) -> None:
    print(f"note: {text}", file=sys.stderr)


def _refuse_if_locked(target: Path) -> None:
    """Another live run holds ``target``: say so now rather than after minutes of loading."""
    lock = lock_path(target)
    if lock in _held:
        return
    holder = _read_holder(lock)
    if not holder or holder.get("pid") == os.getpid():
        return
    alive = _holder_alive(holder)
    if alive is not False:  # a stale lock is taken over when the run starts
        raise _locked(target, lock, holder, alive)


def _locked(target: Path, lock: Path, holder: dict, alive: bool | None) -> OutputLockedError:
    hint = ("wait for it to finish, or choose another output path" if alive else
            f"if that run is over, delete {lock} and try again")
    return OutputLockedError(f"{target} is being written by another conceptctl run "
                             f"({_describe(holder)})", hint=hint)


def _acquire(target: Path, lock: Path, note: Callable[[str], None]) -> None:
    record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
              "command": " ".join(sys.argv)}
    for _ in range(5):
        if _create_lock(lock, record):
            return
        holder = _read_holder(lock)
        if holder is None:
            continue  # released meanwhile: try again
        alive = _holder_alive(holder) if holder else False
        if holder.get("pid") == os.getpid() and alive:
            alive = False  # names this process, which does not hold it: a reused pid
        if alive is False:
            if _take_over(lock):
                note(f"took over the stale lock of {_describe(holder)} on {target} (that process "
                     "is gone)")
            continue
        raise _locked(target, lock, holder, alive)
    raise OutputLockedError(f"could not take the lock on {target} ({lock})",
                            hint="another run keeps taking it; try again in a moment")


@contextmanager
def output_lock(target: Path, note: Callable[[str], None] | None = None) -> Iterator[None]:
    """Hold the advisory lock on ``target`` (re-entrant within one process)."""
    lock = lock_path(target)
    with _held_guard:
        if lock in _held:
            _held[lock] += 1
            nested = True
        else:
            nested = False
    if nested:
        try:
            yield
        finally:
            with _held_guard:
                _held[lock] -= 1
        return
    created = _make_parents(lock.parent)
    try:
        _acquire(target, lock, note or _note_on_stderr)
    except BaseException:
        _remove_empty(created)
        raise
    with _held_guard:
        _held[lock] = 1
    ok = False
    try:
        yield
        ok = True
    finally:
        with _held_guard:
            del _held[lock]
        lock.unlink(missing_ok=True)
        if not ok:
            _remove_empty(created)  # a failed run leaves no empty folders it made


@contextmanager
def claim_output(target: Path, overwrite: bool, kind: str | None = None,
                 note: Callable[[str], None] | None = None) -> Iterator[None]:
    """Check that ``target`` may be written, then hold its lock for the whole run."""
    check_output_free(target, overwrite, kind)
    with output_lock(target, note):
        check_output_free(target, overwrite, kind)  # another writer may have finished meanwhile
        yield


def _make_parents(folder: Path) -> list[Path]:
    """``mkdir -p folder``; returns the folders it created, deepest first."""
    missing = []
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    for path in reversed(missing):
        path.mkdir(exist_ok=True)
    return missing


def _remove_empty(folders: list[Path]) -> None:
    for path in folders:
        try:
            path.rmdir()  # only if empty: never anything else
        except OSError:
            return
