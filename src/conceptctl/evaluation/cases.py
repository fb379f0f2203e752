"""Evaluation prompt cases and suites, and the common CSV layout ``prompt,evaluation_seed,
case_number`` (ESD, UnlearnDiffAtk and most peers ship their prompt files in it).

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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from conceptctl.errors import UsageError

GROUPS = ("target", "target-oos", "anchor", "hard-negative", "general")
TARGET_GROUPS = ("target", "target-oos")
PASS_THRESHOLD = 0.9  # the verdict's bar for erasure success and preservation
REQUIRED_COLUMNS = ("prompt", "evaluation_seed", "case_number")


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


def read_prompt_csv(path: Path, images_per_prompt: int) -> Suite:
    """Cases from a CSV with at least ``prompt,evaluation_seed,case_number``. Optional columns:
    ``group`` (default ``target``) and ``expect_AXIS`` (e.g. ``expect_style``); every other
    column is kept in the case's ``extra``. Errors name the file and line."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read prompt file {path}: {exc.strerror}") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise UsageError(f"{path} is not UTF-8 text", hint="save the CSV as UTF-8") from None
    reader = csv.DictReader(text.splitlines())
    header = reader.fieldnames or []
    twice = sorted({c for c in header if header.count(c) > 1})
    if twice:  # csv.DictReader would silently keep the last one
        raise UsageError(f"{path}:1: column(s) {', '.join(twice)} appear more than once",
                         hint="keep one column of each name")
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    if missing:
        raise UsageError(f"{path}:1: missing column(s) {', '.join(missing)}",
                         hint="the header must name prompt,evaluation_seed,case_number")
    cases = []
    for row in reader:
        line = reader.line_num
        if None in row or any(v is None for v in row.values()):
            raise UsageError(f"{path}:{line}: expected {len(header)} fields as in the header",
                             hint="quote prompts that contain commas")
        prompt = row["prompt"].strip()
        if not prompt:
            raise UsageError(f"{path}:{line}: empty prompt")
        seed = _int(path, line, "evaluation_seed", row["evaluation_seed"])
        if not 0 <= seed < 2**63:
            raise UsageError(f"{path}:{line}: evaluation_seed must be between 0 and 2**63 - 1")
        number = _int(path, line, "case_number", row["case_number"])
        group = (row.get("group") or "target").strip()
        if group not in GROUPS:
            raise UsageError(f"{path}:{line}: unknown group {group!r}; use {', '.join(GROUPS)}")
        expect = {k[len("expect_"):]: v.strip() for k, v in row.items()
                  if k.startswith("expect_") and v.strip()}
        extra = {k: v for k, v in row.items()
                 if k not in (*REQUIRED_COLUMNS, "group") and not k.startswith("expect_")}
        cases.append(Case(prompt, seed, number, group, expect, extra))
    if not cases:
        raise UsageError(f"{path} has a header but no prompts")
    return Suite(name=f"file:{path.name}", cases=tuple(cases),
                 images_per_prompt=images_per_prompt,
                 source={"path": str(path), "sha256": hashlib.sha256(raw).hexdigest()})


def _int(path: Path, line: int, column: str, value: str) -> int:
    try:
        return int(value.strip())
    except ValueError:
        raise UsageError(f"{path}:{line}: {column} must be a whole number, got {value!r}"
                         ) from None
