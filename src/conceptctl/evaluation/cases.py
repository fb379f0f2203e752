"""Evaluation prompt cases and suites, and the CSV prompt files peers publish: ``prompt`` and
a seed per row, in ESD's layout (``evaluation_seed``, optional ``case_number`` and
``evaluation_guidance``: coco_30k, unsafe-prompts, the art files; UnlearnDiffAtk's too) or I2P's
(``sd_seed``, ``sd_guidance_scale``, ``sd_image_width``/``sd_image_height``).

A case is one prompt drawn with fixed seeds by both the original and the erased model. Its group
says what the case tests:

    target         prompts asking for the erased concept the way the erasure saw them (in-set)
    target-oos     prompts asking for it in phrasings the erasure never saw (out-of-set)
    anchor         prompts asking for the anchor: must still work
    hard-negative  related concepts that must survive (other styles, other objects)
    general        everyday prompts: the distribution that must not shift
"""

from __future__ import annotations

import csv
import hashlib
import io
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from conceptctl.errors import UsageError

GROUPS = ("target", "target-oos", "anchor", "hard-negative", "general")
TARGET_GROUPS = ("target", "target-oos")
PASS_THRESHOLD = 0.9  # the verdict's bar for erasure success and preservation
# What a prompt file's columns give, each under the names the published files use (ESD's first,
# then I2P's). A file may use either name, not both.
SEED_COLUMNS = ("evaluation_seed", "sd_seed")
GUIDANCE_COLUMNS = ("evaluation_guidance", "sd_guidance_scale")
WIDTH_COLUMNS = ("sd_image_width",)
HEIGHT_COLUMNS = ("sd_image_height",)


@dataclass(frozen=True)
class Case:
    prompt: str
    seed: int  # image k of this case starts from the noise of seed + k
    case_number: int
    group: str
    # What the prompt asks for, as the detector's labels (e.g. {"style": "monet"}); empty when
    # unknown. Preservation compares the detector's reading with it.
    expect: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)  # other CSV columns, kept as given
    guidance: float | None = None  # the row's own guidance scale; None: the run's
    size: tuple[int, int] | None = None  # the (height, width) the row asks for; None: any


@dataclass(frozen=True)
class Suite:
    name: str
    cases: tuple[Case, ...]
    images_per_prompt: int
    source: dict = field(default_factory=dict)  # e.g. the prompt file's path and sha256
    # Rewordings this suite's vocabulary knows, for the paraphrase attack: (prompt, concept) ->
    # prompts that still ask for the concept (the toy: every synonym, every held-out template).
    # None: only the concept's own spellings (see conceptctl.evaluation.attacks.paraphrases).
    rephrase: Callable[[str, str], list[str]] | None = None

    def group(self, name: str) -> list[Case]:
        return [c for c in self.cases if c.group == name]

    def groups(self) -> list[str]:
        present = {c.group for c in self.cases}
        return [g for g in GROUPS if g in present] + sorted(present - set(GROUPS))


def read_prompt_csv(path: Path, images_per_prompt: int, group: str | None = None) -> Suite:
    """Cases from a peer's CSV prompt file, read as published. Columns (any order):

    ``prompt``                                  required
    ``evaluation_seed`` or ``sd_seed``          required: picture k starts from seed + k
    ``case_number``                             default: the row's place, 0 for the first
    ``evaluation_guidance`` or ``sd_guidance_scale``   the row's guidance scale
    ``sd_image_width`` and ``sd_image_height``  the picture size the row asks for
    ``group``                                   default ``group`` (argument), else ``target``
    ``expect_AXIS``                             what the picture should show (e.g. expect_style)

    Every other column is kept in the case's ``extra``. ``group`` labels every row of a file
    without a group column. Errors name the file and line."""
    path = Path(path)
    if group is not None and group not in GROUPS:
        raise UsageError(f"unknown group {group!r}", hint=f"use one of {', '.join(GROUPS)}")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read prompt file {path}: {exc.strerror}") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise UsageError(f"{path} is not UTF-8 text", hint="save the CSV as UTF-8") from None
    # csv reads the file itself, not its lines: a quoted prompt may hold a line break (coco_30k
    # has one), and line_num then still counts the file's lines.
    reader = csv.DictReader(io.StringIO(text, newline=""))
    header = reader.fieldnames or []
    twice = sorted({c for c in header if header.count(c) > 1})
    if twice:  # csv.DictReader would silently keep the last one
        raise UsageError(f"{path}:1: column(s) {', '.join(twice)} appear more than once",
                         hint="keep one column of each name")
    if "prompt" not in header:
        raise UsageError(f"{path}:1: missing column(s) prompt",
                         hint="the header must name prompt and evaluation_seed (or sd_seed)")
    seed_column = _column(path, header, SEED_COLUMNS)
    if seed_column is None:
        raise UsageError(f"{path}:1: missing column(s) evaluation_seed (or sd_seed)",
                         hint="the header must name prompt and evaluation_seed (or sd_seed)")
    guidance_column = _column(path, header, GUIDANCE_COLUMNS)
    width_column = _column(path, header, WIDTH_COLUMNS)
    height_column = _column(path, header, HEIGHT_COLUMNS)
    if (width_column is None) != (height_column is None):
        raise UsageError(f"{path}:1: give both sd_image_width and sd_image_height, or neither")
    if group is not None and "group" in header:
        raise UsageError(f"--group {group} given but {path} has a group column of its own",
                         hint="leave out --group, or the file's group column")
    used = {"prompt", seed_column, guidance_column, width_column, height_column,
            "case_number", "group"}
    cases: list[Case] = []
    numbered: dict[int, int] = {}  # case number -> the line that used it first
    for row in reader:
        line = reader.line_num
        if None in row or any(v is None for v in row.values()):
            raise UsageError(f"{path}:{line}: expected {len(header)} fields as in the header",
                             hint="quote prompts that contain commas")
        prompt = row["prompt"].strip()
        if not prompt:
            raise UsageError(f"{path}:{line}: empty prompt")
        seed = _int(path, line, seed_column, row[seed_column])
        if not 0 <= seed < 2**63:
            raise UsageError(f"{path}:{line}: {seed_column} must be between 0 and 2**63 - 1")
        number = (_int(path, line, "case_number", row["case_number"])
                  if "case_number" in header else len(cases))
        if number in numbered:  # its pictures would take the other case's file names
            raise UsageError(f"{path}:{line}: case_number {number} is already used on line "
                             f"{numbered[number]}", hint="give every row its own case_number")
        numbered[number] = line
        row_group = (row.get("group") or group or "target").strip()
        if row_group not in GROUPS:
            raise UsageError(f"{path}:{line}: unknown group {row_group!r}; use "
                             f"{', '.join(GROUPS)}")
        guidance = (_guidance(path, line, guidance_column, row[guidance_column])
                    if guidance_column else None)
        size = (_size(path, line, row[height_column], row[width_column])
                if width_column else None)
        expect = {k[len("expect_"):]: v.strip() for k, v in row.items()
                  if k.startswith("expect_") and v.strip()}
        extra = {k: v for k, v in row.items() if k not in used and not k.startswith("expect_")}
        cases.append(Case(prompt, seed, number, row_group, expect, extra, guidance, size))
    if not cases:
        raise UsageError(f"{path} has a header but no prompts")
    return Suite(name=f"file:{path.name}", cases=tuple(cases),
                 images_per_prompt=images_per_prompt,
                 source={"path": str(path), "sha256": hashlib.sha256(raw).hexdigest()})


def _column(path: Path, header: list[str], names: tuple[str, ...]) -> str | None:
    """The one column of ``header`` among ``names`` (the same value's aliases); None if none."""
    present = [n for n in names if n in header]
    if len(present) > 1:
        raise UsageError(f"{path}:1: columns {' and '.join(present)} give the same value",
                         hint=f"keep one of them ({present[0]})")
    return present[0] if present else None


def _guidance(path: Path, line: int, column: str, value: str) -> float | None:
    """A row's guidance scale; an empty cell: none of its own."""
    if not value.strip():
        return None
    try:
        guidance = float(value.strip())
    except ValueError:
        guidance = math.nan
    if not 0 <= guidance < math.inf:  # NaN and inf included
        raise UsageError(f"{path}:{line}: {column} must be a finite number, 0 or more, "
                         f"got {value!r}")
    return guidance


def _size(path: Path, line: int, height: str, width: str) -> tuple[int, int] | None:
    """A row's (height, width); both cells empty: no size of its own."""
    if not height.strip() and not width.strip():
        return None
    sides = (_int(path, line, "sd_image_height", height),
             _int(path, line, "sd_image_width", width))
    for column, side in zip(("sd_image_height", "sd_image_width"), sides, strict=True):
        # The pipeline's VAE and UNet halve the picture three times: SD needs multiples of 8.
        if side < 8 or side % 8:
            raise UsageError(f"{path}:{line}: {column} must be a positive multiple of 8, "
                             f"got {side}")
    return sides


def _int(path: Path, line: int, column: str, value: str) -> int:
    try:
        return int(value.strip())
    except ValueError:
        raise UsageError(f"{path}:{line}: {column} must be a whole number, got {value!r}"
                         ) from None
