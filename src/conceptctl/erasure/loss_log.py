"""The artifact's per-step training log, ``losses.jsonl``, and its optional TensorBoard copy.

One JSON object a line per training step, appended and flushed as the run goes so that a tracker
or ``tail -f`` can follow it. Each line is that step's entry of the run's history
(:class:`conceptctl.erasure.trainer.LoopState`: step, time, seconds, lr and the method's
:class:`~conceptctl.erasure.methods.StepStats`) with its non-finite values left out: JSON has no
NaN, and a warm-up step's generator loss is NaN by design. The history is the one record: the
checkpoints keep it and the manifest's training summary is computed from it.

A resumed run first rewrites the log from its checkpoint's history (atomically), then appends:
the steps after that checkpoint, which it trains again, are never in the log twice, and a line
cut short by a killed process is gone. ``--report-to tensorboard`` writes the same numbers as
TensorBoard scalars into ``tensorboard/``, purged from the resumed step on in the same way.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

from conceptctl.errors import UsageError
from conceptctl.fileio import staged_file

LOSS_LOG = "losses.jsonl"
TENSORBOARD_DIR = "tensorboard"
TRACKERS = ("tensorboard",)
# Not plotted: the step is the x axis, the wall time is the event's own; generator_step is a flag.
_NOT_SCALARS = frozenset({"step", "time", "generator_step"})


def check_report_to(report_to: str | None) -> None:
    """Refuse an unknown tracker, or one whose library is not installed, before any work."""
    if report_to is None:
        return
    if report_to not in TRACKERS:
        raise UsageError(f"unknown tracker {report_to!r}; conceptctl reports to "
                         f"{', '.join(TRACKERS)} (and always writes {LOSS_LOG})",
                         hint="use --report-to tensorboard, or leave it out")
    if importlib.util.find_spec("tensorboard") is None:
        raise UsageError("--report-to tensorboard needs the tensorboard package, which is not "
                         "installed", hint="pip install 'conceptctl[tensorboard]', or leave "
                         f"--report-to out ({LOSS_LOG} is written anyway)")


def log_line(entry: dict) -> dict:
    """A history entry as the log writes it: without NaN or infinite values."""
    return {key: value for key, value in entry.items()
            if not (isinstance(value, float) and not math.isfinite(value))}


def read_log(path: Path) -> list[dict]:
    """The entries of a ``losses.jsonl``."""
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()]


class LossLog:
    """``folder/losses.jsonl`` (and ``folder/tensorboard/``) of a run that continues from
    ``history`` (empty for a fresh run); :meth:`write` adds one step's history entry."""

    def __init__(self, folder: Path, history: list[dict], report_to: str | None = None) -> None:
        self.path = Path(folder) / LOSS_LOG
        with staged_file(self.path) as tmp:
            tmp.write_text("".join(json.dumps(log_line(e)) + "\n" for e in history),
                           encoding="utf-8")
        self._file = self.path.open("a", encoding="utf-8")
        self._board = None
        if report_to == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            # Events of the steps this run trains (again) are dropped from what TensorBoard shows.
            first = history[-1]["step"] + 1 if history else 1
            self._board = SummaryWriter(str(Path(folder) / TENSORBOARD_DIR), purge_step=first)

    def write(self, entry: dict) -> None:
        line = log_line(entry)
        self._file.write(json.dumps(line) + "\n")
        self._file.flush()
        if self._board is not None:
            for key, value in line.items():
                if key not in _NOT_SCALARS and isinstance(value, int | float):
                    self._board.add_scalar(f"train/{key}", value, line["step"],
                                           walltime=line.get("time"))
            self._board.flush()

    def close(self) -> None:
        self._file.close()
        if self._board is not None:
            self._board.close()

    def __enter__(self) -> LossLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
