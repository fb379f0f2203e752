"""``toy-judge``: the toy world's judge as an evaluation detector."""

from __future__ import annotations

import hashlib

import numpy as np

from conceptctl.errors import UsageError
from conceptctl.toy.judge import JUDGE_FILE, Judge
from conceptctl.toy.world import AXES, axis_of, normalise


class ToyJudgeDetector:
    name = "toy-judge"

    def __init__(self, judge: Judge | None = None) -> None:
        self.judge_net = judge or Judge.load()

    def info(self) -> dict:
        return {"name": self.name, "file": JUDGE_FILE.name,
                "sha256": hashlib.sha256(JUDGE_FILE.read_bytes()).hexdigest(),
                "decision": "argmax per axis", "classes": {k: list(v) for k, v in AXES.items()}}

    def judge(self, images: np.ndarray) -> list[dict]:
        out = []
        for verdict in self.judge_net.judge(images):
            labels = dict(verdict.labels)
            labels["confidence"] = {axis: verdict.probabilities[axis][value]
                                    for axis, value in verdict.labels.items()}
            out.append(labels)
        return out

    def shows(self, labels: dict, concept: str) -> bool | None:
        found = axis_of(concept, tuple(AXES))
        return None if found is None else labels[found[0]] == found[1]

    def matches(self, labels: dict, expect: dict) -> bool | None:
        checkable = {k: v for k, v in expect.items() if k in AXES}
        if not checkable:
            return None
        try:
            return all(labels[k] == normalise(k, v) for k, v in checkable.items())
        except ValueError as exc:  # a prompt file's expect_AXIS column names no toy value
            raise UsageError(f"prompt expectation: {exc}") from None

    def concept_keys(self, concept: str) -> set[str]:
        found = axis_of(concept, tuple(AXES))
        return {found[0]} if found else set()

    def features(self, images: np.ndarray):
        return self.judge_net.features(images)
