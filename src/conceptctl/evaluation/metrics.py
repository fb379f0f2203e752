"""Built-in evaluation metrics. Each reads an :class:`~conceptctl.evaluation.run.EvalRun` and
returns :class:`Score` rows; docs/evaluate.md defines every one and its direction.

    erasure       target and target-oos: share of the erased model's pictures where the detector
                  finds the concept absent (higher is better); the concept rates before and after
                  are kept in the details
    preservation  anchor, hard-negative (and each hard negative), general: share of pictures that
                  show what their prompt asked for, erased / original (1 = nothing lost)
    retention     target groups, same seed: share of the detector's other labels (e.g. object and
                  colour when a style is erased) on which original and erased pictures agree
    fd, kid       general prompts: Fréchet distance and kernel inception distance between the
                  original's and the erased model's pictures, on the detector's features
                  (torchmetrics; lower is closer)
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np

from conceptctl.evaluation.cases import TARGET_GROUPS


@dataclass
class Score:
    metric: str  # the metric's registered name
    group: str  # the prompt group (or "group:subgroup") it is about
    value: float | None  # None: could not be measured here, see note
    direction: str  # "higher" or "lower" is better
    images: int = 0
    details: dict = field(default_factory=dict)
    note: str = ""
    # How the value (and the floats in details) read: "share" is a fraction of 1, shown as a
    # percentage; "number" is anything else (a distance, a count, a CLIP score), shown as is.
    unit: str = "share"

    def as_dict(self) -> dict:
        return {"metric": self.metric, "group": self.group, "value": self.value,
                "direction": self.direction, "images": self.images, "details": self.details,
                "note": self.note, "unit": self.unit}


def format_value(value, unit: str = "share", missing: str = "-") -> str:
    """One way to print a metric's value everywhere (terminal, report page, comparison)."""
    if value is None:
        return missing
    return f"{value:.1%}" if unit == "share" else f"{value:.4g}"


def _skip(metric: str, group: str, direction: str, note: str) -> Score:
    return Score(metric, group, None, direction, note=note)


def _mean(values: list) -> float | None:
    known = [float(v) for v in values if v is not None]
    return float(np.mean(known)) if known else None


def _target_groups(run, metric: str, scores: list[Score]):
    """(group, picture indices) of the target groups that have pictures; without a detector a
    skip row is recorded instead."""
    for group in TARGET_GROUPS:
        idx = run.indices(group)
        if not idx:
            continue
        if run.detector is None:
            scores.append(_skip(metric, group, "higher", run.no_detector_note))
            continue
        yield group, idx


class ErasureSuccess:
    name = "erasure"

    def compute(self, run) -> list[Score]:
        scores = []
        for group, idx in _target_groups(run, self.name, scores):
            before = [run.detector.shows(run.original.labels[i], run.concept) for i in idx]
            after = [run.detector.shows(run.erased.labels[i], run.concept) for i in idx]
            if all(v is None for v in after):
                scores.append(_skip(self.name, group, "higher",
                                    f"{run.detector.name} cannot detect {run.concept!r}"))
                continue
            rate_before, rate_after = _mean(before), _mean(after)
            scores.append(Score(self.name, group, 1 - rate_after, "higher", len(idx), {
                "concept_rate_before": rate_before, "concept_rate_after": rate_after}))
        return scores


class Preservation:
    name = "preservation"

    def compute(self, run) -> list[Score]:
        scores = []
        for group, idx in self._groups(run):
            if run.detector is None:
                scores.append(_skip(self.name, group, "higher", run.no_detector_note))
                continue
            before = [run.detector.matches(run.original.labels[i], run.cases_of[i].expect)
                      for i in idx]
            after = [run.detector.matches(run.erased.labels[i], run.cases_of[i].expect)
                     for i in idx]
            acc_before, acc_after = _mean(before), _mean(after)
            if acc_before is None or acc_after is None:
                scores.append(_skip(self.name, group, "higher",
                                    "no prompt here says what it expects (expect_* columns)"))
                continue
            ratio = acc_after / acc_before if acc_before else None
            scores.append(Score(self.name, group, ratio, "higher", len(idx), {
                "accuracy_before": acc_before, "accuracy_after": acc_after},
                note="" if acc_before else "the original never showed it"))
        return scores

    @staticmethod
    def _groups(run):
        for group in ("anchor", "hard-negative", "general"):
            idx = run.indices(group)
            if not idx:
                continue
            yield group, idx
            subgroups = sorted({run.cases_of[i].extra.get("subgroup") for i in idx} - {None})
            for sub in subgroups:
                yield f"{group}:{sub}", [i for i in idx
                                         if run.cases_of[i].extra.get("subgroup") == sub]


class Retention:
    name = "retention"

    def compute(self, run) -> list[Score]:
        scores = []
        for group, idx in _target_groups(run, self.name, scores):
            skip = run.detector.concept_keys(run.concept)
            agree: dict[str, list[bool]] = {}
            for i in idx:
                a, b = run.original.labels[i], run.erased.labels[i]
                for key, value in a.items():
                    if key not in skip and isinstance(value, str | int | bool):
                        agree.setdefault(key, []).append(value == b.get(key))
            if not agree:
                scores.append(_skip(self.name, group, "higher",
                                    f"{run.detector.name} gives no labels besides the concept"))
                continue
            per_key = {k: float(np.mean(v)) for k, v in agree.items()}
            scores.append(Score(self.name, group, float(np.mean(list(per_key.values()))),
                                "higher", len(idx), {"agreement": per_key}))
        return scores


class _FeatureModule:
    """torchmetrics wants a module from uint8 (N, 3, H, W) pictures to features; this one asks
    the detector. ``num_features`` spares torchmetrics its dummy 299x299 probe."""

    def __new__(cls, detector, dim: int):
        import torch

        class Features(torch.nn.Module):
            num_features = dim

            def forward(self, images):
                pictures = images.permute(0, 2, 3, 1).cpu().numpy().astype(np.uint8)
                return detector.features(pictures).double()

        return Features()


class _Distribution:
    name = ""
    direction = "lower"

    def compute(self, run) -> list[Score]:
        idx = run.indices("general")
        if not idx:
            return [_skip(self.name, "general", "lower", "the suite has no general prompts")]
        if run.detector is None:
            return [_skip(self.name, "general", "lower", run.no_detector_note)]
        probe = run.detector.features(run.original.images[idx[:1]])
        if probe is None:
            return [_skip(self.name, "general", "lower",
                          f"{run.detector.name} gives no features")]
        if len(idx) < 2:
            return [_skip(self.name, "general", "lower", "needs at least 2 general pictures")]
        import torch

        module = _FeatureModule(run.detector, int(probe.shape[1]))
        with warnings.catch_warnings():  # "will save all extracted features": a few hundred here
            warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
            metric = self._metric(module, len(idx))
        for images, real in ((run.original.images[idx], True), (run.erased.images[idx], False)):
            metric.update(torch.from_numpy(images).permute(0, 3, 1, 2), real=real)
        with torch.random.fork_rng(devices=[]):  # KID draws random subsets: fix them
            torch.manual_seed(0)
            value = metric.compute()
        return [self._score(value, len(idx), int(probe.shape[1]))]


class FrechetDistance(_Distribution):
    name = "fd"

    def _metric(self, module, n):
        from torchmetrics.image.fid import FrechetInceptionDistance

        return FrechetInceptionDistance(feature=module, normalize=False)

    def _score(self, value, n, dim):
        return Score(self.name, "general", float(value), "lower", n, {
            "feature_dim": dim, "pictures_per_side": n},
            note="biased upwards at small counts: compare runs with the same suite",
            unit="number")


class KernelDistance(_Distribution):
    name = "kid"

    def _metric(self, module, n):
        from torchmetrics.image.kid import KernelInceptionDistance

        self._subset = min(n, 50)  # torchmetrics' default 1000 fails on small counts
        return KernelInceptionDistance(feature=module, subsets=20, subset_size=self._subset,
                                       normalize=False)

    def _score(self, value, n, dim):
        mean, std = value
        return Score(self.name, "general", float(mean), "lower", n, {
            "std": float(std), "subsets": 20, "subset_size": self._subset, "feature_dim": dim},
            unit="number")
