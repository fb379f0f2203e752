"""``conceptctl erase --concepts FILE``: several concepts, each with its own anchor, in one run.

One concept a line: ``concept, anchor[, type]`` (CSV, so a concept holding a comma is quoted:
``"Smith, John", painting``). Blank lines and ``#`` comments are skipped, and so is a first line
``concept,anchor[,type]`` (a header).
"""

from __future__ import annotations

import csv
from pathlib import Path

from conceptctl.erasure.anchors import CONCEPT_TYPES, read_user_text
from conceptctl.erasure.config import Erasure
from conceptctl.errors import UsageError

_HINT = 'one concept a line: concept, anchor[, type], e.g. "Van Gogh, painting, style"'


def read_concept_file(path: Path) -> list[Erasure]:
    """The erasures listed in ``path``; one clear error naming the line of a bad one."""
    text = read_user_text(path, "concept", hint=_HINT)
    erasures: list[Erasure] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        fields = [f.strip() for f in next(csv.reader([line], skipinitialspace=True))]
        if not erasures and [f.lower() for f in fields[:2]] == ["concept", "anchor"]:
            continue  # a header
        if len(fields) not in (2, 3) or not all(fields[:2]):
            raise UsageError(f"{path} line {number}: expected 'concept, anchor[, type]', got "
                             f"{line.strip()!r}", hint=_HINT)
        kind = fields[2].lower() if len(fields) == 3 and fields[2] else None
        if kind is not None and kind not in CONCEPT_TYPES:
            raise UsageError(f"{path} line {number}: unknown concept type {fields[2]!r}; use "
                             f"{', '.join(CONCEPT_TYPES)}")
        erasures.append(Erasure(fields[0], fields[1], kind))
    if not erasures:
        raise UsageError(f"{path} lists no concepts", hint=_HINT)
    return erasures
