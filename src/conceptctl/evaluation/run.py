"""``evaluate()``: one artifact from prompts to report, as a library function.

Order: resolve every component (fail before work), load the original and the erased model (the
artifact's base hash checked), build the suite, draw every case with both models from the same
seeds, judge, score, attack, then write the report folder atomically.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from conceptctl.erasure.distributed import ProcessGroup, SingleProcess
from conceptctl.errors import ConceptctlError, UsageError
from conceptctl.evaluation.cases import GROUPS, PASS_THRESHOLD, Case, Suite, read_prompt_csv
from conceptctl.evaluation.detectors import DETECTOR_CONTEXT
from conceptctl.evaluation.generate import Drawn, DrawSettings, draw_cases, picture_size
from conceptctl.fingerprint import file_sha256
from conceptctl.registry import get_registry
from conceptctl.sampling import SampleSettings

DEFAULT_ATTACKS = ("embedding", "paraphrase")


@dataclass
class EvalOptions:
    prompts: Path | None = None  # a CSV; None: the backbone's built-in suite
    group: str | None = None  # the group of every row of a prompt file without a group column
    suite: str | None = None
    detector: str | None = None
    # --detector-option KEY=VALUE pairs, handed to the detector's factory as strings.
    detector_options: dict[str, str] = field(default_factory=dict)
    metrics: tuple[str, ...] | None = None  # None: every registered metric
    attacks: tuple[str, ...] = DEFAULT_ATTACKS
    attack_cases: int = 16
    # --attack-option ATTACK.KEY=VALUE: attack name -> {key: value string} for its factory.
    attack_options: dict[str, dict[str, str]] = field(default_factory=dict)
    images_per_prompt: int = 2
    seed: int = 20_000
    steps: int | None = None
    guidance: float | None = None
    batch_size: int = 32
    backbone: str | None = None  # override the artifact's base (checked by hash)
    force: bool = False
    device: str | None = None
    dtype: str | None = None


@dataclass
class EvalReporter:
    """Where an evaluation says what it is doing (the CLI: stderr and progress bars)."""

    message: Callable[[str], None] = lambda text: None
    progress: Callable[[str, int, int], None] = lambda stage, done, total: None
    # A comparison begins the next artifact (its stages start again from zero).
    begin: Callable[[Path], None] = lambda artifact: None


@dataclass
class Judged:
    images: np.ndarray
    latents: torch.Tensor
    labels: list[dict] | None


@dataclass
class EvalRun:
    """What metrics and attacks see. Image ``i`` is image ``i % k`` of case ``i // k``."""

    suite: Suite
    concept: str
    anchor: str
    concept_type: str
    manifest: dict
    detector: object | None
    original: Judged
    erased: Judged
    original_model: object
    erased_model: object
    draw: DrawSettings
    no_detector_note: str = ""
    cases_of: list[Case] = field(default_factory=list)
    # The processes drawing pictures; one unless launched by accelerate with several. Attacks
    # pass it on to draw_cases / draw_embeddings.
    dist: ProcessGroup = field(default_factory=SingleProcess)

    def __post_init__(self) -> None:
        k = self.suite.images_per_prompt
        self.cases_of = [c for c in self.suite.cases for _ in range(k)]

    def indices(self, group: str) -> list[int]:
        return [i for i, c in enumerate(self.cases_of) if c.group == group]


def check_options(opts: EvalOptions) -> None:
    """Unknown names and impossible values fail here, before any model is loaded."""
    if opts.images_per_prompt < 1:
        raise UsageError("--images-per-prompt must be at least 1")
    if opts.attack_cases < 1:
        raise UsageError("--attack-cases must be at least 1")
    # --steps and --guidance (NaN and inf included) as the sampler would refuse them, but now.
    SampleSettings(prompts=("x",), steps=opts.steps, guidance=opts.guidance).check()
    for name in opts.metrics or ():
        get_registry("metric").entry(name)
    for name in opts.attacks:
        get_registry("attack").entry(name)
    for name in opts.attack_options:
        if name not in opts.attacks:
            raise UsageError(f"--attack-option for {name!r}, which is not among the attacks "
                             f"run ({', '.join(opts.attacks) or 'none'})",
                             hint="write ATTACK.KEY=VALUE with an attack from --attacks")
    for name in opts.attacks:  # build each once: a bad option fails before any model loads
        _build_attack(name, opts)
    if opts.detector:
        get_registry("detector").entry(opts.detector)
    if DETECTOR_CONTEXT in opts.detector_options:
        raise UsageError(f"--detector-option {DETECTOR_CONTEXT}=... is reserved: conceptctl "
                         "fills it with the artifact's concept, anchor and device")
    if opts.suite:
        get_registry("suite").entry(opts.suite)
    if opts.prompts is not None and opts.suite:
        raise UsageError("give --prompts or --suite, not both")
    if opts.group is not None:
        if opts.prompts is None:
            raise UsageError("--group labels the rows of a prompt file: give --prompts too")
        if opts.group not in GROUPS:
            raise UsageError(f"unknown group {opts.group!r}",
                             hint=f"use one of {', '.join(GROUPS)}")


class OriginalCache:
    """Original-model pictures shared by the artifacts of one ``--compare`` run when base,
    cases and draw settings are the same."""

    def __init__(self) -> None:
        self._store: dict[str, tuple[object, Drawn]] = {}

    def get(self, key: str):
        return self._store.get(key)

    def put(self, key: str, model, drawn: Drawn) -> None:
        self._store[key] = (model, drawn)


@dataclass
class Evaluation:
    """One artifact's evaluation: the report's numbers and what they were computed from."""

    result: dict  # everything report.json holds but the picture files
    run: EvalRun  # the pictures, their labels, the two models
    attack_attempts: list[list]  # per attack in result["attacks"], its attempts' pictures
    # An artifact of several concepts: each concept's (run, attack attempts), in the order of
    # result["concepts"] (the first is ``run``'s); empty for one concept.
    concept_runs: list[tuple[EvalRun, list[list]]] = field(default_factory=list)


def evaluate(artifact_dir: Path, opts: EvalOptions, reporter: EvalReporter | None = None,
             originals: OriginalCache | None = None) -> Evaluation:
    """Evaluate one artifact: draw, judge, score and attack (nothing is written; see
    ``conceptctl.evaluation.report.evaluate_to`` and ``compare.compare_artifacts``)."""
    from conceptctl.backbones.loading import open_backbone
    from conceptctl.erasure import distributed
    from conceptctl.erasure.artifact import apply_artifact, read_artifact
    from conceptctl.settings import load_settings, resolve_device

    started = time.time()
    check_options(opts)
    # Under 'accelerate launch' with several processes each draws its share of the pictures;
    # every process gets all of them back, and only the main one reports.
    dist, device = distributed.setup(resolve_device(opts.device or load_settings().device))
    report = (reporter or EvalReporter()) if dist.is_main else EvalReporter()
    # A malformed prompt file fails before any model is loaded.
    file_suite = (read_prompt_csv(opts.prompts, opts.images_per_prompt, opts.group)
                  if opts.prompts is not None else None)
    artifact = read_artifact(artifact_dir)
    manifest = artifact.manifest
    backbone_name = opts.backbone or manifest["base"]["name"]

    erased_model = open_backbone(backbone_name, device=device, dtype=opts.dtype)
    notes = apply_artifact(erased_model, artifact, force=opts.force)
    for note in notes:
        report.message(f"warning: {note}")
    spec = erased_model.spec
    # What a prompt file's rows ask for that is not used as given, said once.
    size, file_notes = None, []
    if file_suite is not None:
        size, file_notes = _file_settings(file_suite, erased_model, opts)
    for note in file_notes:
        report.message(f"warning: {note}")

    # An artifact of several concepts is evaluated concept by concept (its own suite, judge,
    # metrics and attacks each), all on the one erased model; a prompt file is one suite.
    views = [manifest] if file_suite is not None else concept_views(
        manifest, [link.manifest for link in artifact.chain])
    parts = []
    draw_seconds = attack_seconds = 0.0
    original_model = None  # loaded once, for every concept's pictures
    for view in views:
        suite = file_suite or _suite(opts, spec, view)
        detector, no_detector = _detector(opts, spec, view, erased_model)
        defaults = SampleSettings(prompts=("x",), steps=opts.steps,
                                  guidance=opts.guidance).for_backbone(erased_model)
        draw = DrawSettings(opts.images_per_prompt, defaults.steps, defaults.guidance,
                            opts.batch_size, size)
        if len(views) > 1:
            report.message(f"concept {view['concept']!r}")
        t0 = time.time()
        original_model, original, erased = _draw_pictures(
            suite, draw, erased_model, backbone_name, opts, device, dist, report,
            _original_key(manifest, backbone_name, suite, draw), originals, original_model)
        draw_seconds += time.time() - t0

        labels = (None, None) if detector is None else (detector.judge(original.images),
                                                        detector.judge(erased.images))
        run = EvalRun(suite, view["concept"], view["anchor"], view["concept_type"],
                      view, detector, Judged(original.images, original.latents, labels[0]),
                      Judged(erased.images, erased.latents, labels[1]), original_model,
                      erased_model, draw, no_detector_note=no_detector, dist=dist)

        scores = []
        for entry in _metrics(opts):
            scores += entry.value.build().compute(run)
        t0 = time.time()
        attacks = [_attack(run, name, opts, report) for name in opts.attacks]
        attack_seconds += time.time() - t0
        parts.append((run, scores, attacks))

    run, scores, attacks = parts[0]
    result = _record(artifact_dir, run, backbone_name, notes, scores, attacks, opts)
    result["suite"]["notes"] = file_notes
    if len(parts) > 1:
        result["concepts"] = [_concept_record(*part) for part in parts]
        result["verdict"] = combined_verdict(result["concepts"])
    result["seconds"] = {"drawing": round(draw_seconds, 1), "attacks": round(attack_seconds, 1),
                         "total": round(time.time() - started, 1)}
    concept_runs = [(part_run, [a["attempts"] for a in part_attacks])
                    for part_run, _, part_attacks in parts] if len(parts) > 1 else []
    return Evaluation(result, run, [a["attempts"] for a in attacks], concept_runs)


def concept_views(manifest: dict, chain: list[dict] = ()) -> list[dict]:
    """The manifest as each of its concepts' own erasure would read (``concept``, ``anchor``,
    ``concept_type`` and its anchor and target prompts), with ``erased_concepts`` naming every
    concept the model forgot, so a suite leaves them out of what must be kept. One view, the
    manifest itself with that list, for an artifact of one concept. ``chain``: the manifests of
    the artifacts a stacked one is built on (base first), whose concepts come first, each with
    the anchor prompts of the run that erased it."""
    from conceptctl.erasure.artifact import all_concepts

    erased = [c["concept"] for c in all_concepts(manifest)]
    if not chain and len(erased) == 1:
        return [{**manifest, "erased_concepts": erased}]
    return [{**manifest, **view, "erased_concepts": erased}
            for record in (*chain, manifest) for view in _own_views(record)]


def _own_views(record: dict) -> list[dict]:
    """Each concept a manifest's own run erased, with that run's anchor and target prompts."""
    from conceptctl.erasure.artifact import concepts_of

    concepts = concepts_of(record)
    anchors = record["anchors"]
    if len(concepts) == 1:
        return [{**concepts[0], "anchors": anchors}]
    counts = [entry["prompts"] for entry in anchors.get("per_concept", [])]
    if len(counts) != len(concepts) or sum(counts) != len(anchors["targets"]):
        raise ConceptctlError("the artifact lists several concepts but not which anchor prompts "
                              "belong to each (anchors.per_concept)",
                              hint="erase it again with this conceptctl")
    views, start = [], 0
    for concept, count in zip(concepts, counts, strict=True):
        rows = slice(start, start + count)
        start += count
        views.append({**concept, "anchors": {**anchors, "prompts": anchors["prompts"][rows],
                                             "targets": anchors["targets"][rows]}})
    return views


def _concept_record(run: EvalRun, scores, attacks) -> dict:
    """One concept's part of a several-concept report."""
    return {"concept": run.concept, "anchor": run.anchor, "concept_type": run.concept_type,
            "suite": {"name": run.suite.name, "cases": len(run.suite.cases),
                      "groups": {g: len(run.suite.group(g)) for g in run.suite.groups()}},
            "metrics": [s.as_dict() for s in scores],
            "attacks": [a["summary"] for a in attacks],
            "verdict": verdict(scores, [a["summary"] for a in attacks],
                               run.detector is not None)}


def _draw_pictures(suite: Suite, draw: DrawSettings, erased_model, backbone_name: str,
                   opts: EvalOptions, device, dist, report, key, originals,
                   original_model=None):
    """The original model's pictures (drawn, or reused from ``originals``) and the erased
    model's, from the same seeds; (original model, original pictures, erased pictures).
    ``original_model``: the original, already loaded (None: loaded here when needed)."""
    from conceptctl.backbones.loading import open_backbone

    # This process's share of the pictures (all of them in a one-process run).
    total = dist.shares(len(suite.cases) * draw.images_per_prompt)[dist.rank] * draw.steps

    def progress(stage):
        done = 0

        def step(n):
            nonlocal done
            done += n
            report.progress(stage, done, total)
        return step

    cached = originals.get(key) if originals is not None else None
    if cached is None:
        if original_model is None:
            original_model = open_backbone(backbone_name, device=device, dtype=opts.dtype)
        original = draw_cases(original_model, suite.cases, draw, progress("original model"),
                              dist=dist)
        if originals is not None:
            originals.put(key, original_model, original)
    else:
        original_model, original = cached
        report.message("reused the original model's pictures")
    erased = draw_cases(erased_model, suite.cases, draw, progress("erased model"), dist=dist)
    return original_model, original, erased


def _record(artifact_dir: Path, run: EvalRun, backbone_name: str, notes: list[str], scores,
            attacks: list[dict], opts: EvalOptions) -> dict:
    """The report's record: what was measured, on what, and how to reproduce it."""
    from conceptctl.sampling import library_versions

    manifest, suite, draw, detector, dist = (run.manifest, run.suite, run.draw, run.detector,
                                             run.dist)
    return {
        "format_version": 1,
        "artifact": {"path": str(Path(artifact_dir).resolve()), "concept": run.concept,
                     "anchor": run.anchor, "concept_type": run.concept_type,
                     "method": manifest["method"], "base": manifest["base"],
                     "weights_sha256": file_sha256(Path(artifact_dir) / "weights.safetensors"),
                     # A stacked artifact: the links applied before it, as it records them.
                     **({"chain": manifest["chain"]} if manifest.get("chain") else {}),
                     "forced": bool(notes)},
        "backbone": backbone_name,
        "processes": dist.world,
        "suite": {"name": suite.name, "source": suite.source, "cases": len(suite.cases),
                  "groups": {g: len(suite.group(g)) for g in suite.groups()},
                  "images_per_prompt": suite.images_per_prompt},
        "draw": {"steps": draw.steps, "guidance": draw.guidance,
                 # Cases drawn with their row's guidance instead of the one above.
                 "cases_with_own_guidance": sum(c.guidance is not None for c in suite.cases),
                 "size": list(draw.size or (run.erased_model.resolution,) * 2),
                 "images_per_prompt": draw.images_per_prompt, "seed_rule": "case seed + k"},
        "detector": detector.info() if detector else None,
        "metrics": [s.as_dict() for s in scores],
        "attacks": [a["summary"] for a in attacks],
        "verdict": verdict(scores, [a["summary"] for a in attacks], detector is not None),
        "versions": library_versions(),
        "options": {k: (str(v) if isinstance(v, Path) else v)
                    for k, v in vars(opts).items()},
    }


def _file_settings(suite: Suite, model, opts: EvalOptions) -> tuple[tuple[int, int] | None,
                                                                     list[str]]:
    """The size a prompt file's pictures are drawn at, and the notes on what its rows ask for
    that is not used as given: sizes the backbone cannot draw, and ``--guidance`` where rows
    carry their own."""
    source = Path(suite.source["path"]).name
    size, note = picture_size(suite.cases, model, source)
    notes = [note] if note else []
    own = sum(c.guidance is not None for c in suite.cases)
    if own and opts.guidance is not None:
        notes.append(f"{source}: {own} of {len(suite.cases)} rows give their own guidance, "
                     f"which they are drawn with; --guidance {opts.guidance:g} applies to the "
                     "others")
    return size, notes


def _suite(opts: EvalOptions, spec, manifest: dict) -> Suite:
    name = opts.suite or spec.eval_suite or "templates"
    return get_registry("suite").get(name).build(
        manifest=manifest, images_per_prompt=opts.images_per_prompt, seed=opts.seed)


def _detector(opts: EvalOptions, spec, manifest: dict, model):
    name = opts.detector or spec.detector
    if name is None:
        if opts.detector_options:
            raise UsageError("--detector-option given but no detector is used",
                             hint="pass --detector NAME as well")
        return None, (f"no detector for backbone {spec.name}: pass --detector NAME "
                      "(see 'conceptctl plugins')")
    context = {"concept": manifest["concept"], "anchor": manifest["anchor"],
               "concept_type": manifest["concept_type"], "device": str(model.device)}
    options = {**opts.detector_options, DETECTOR_CONTEXT: context}
    return get_registry("detector").get(name).build(options=options), ""


def _metrics(opts: EvalOptions):
    registry = get_registry("metric")
    names = opts.metrics if opts.metrics is not None else registry.names()
    return [registry.entry(n) for n in names]


def _build_attack(name: str, opts: EvalOptions):
    options = {"cases": opts.attack_cases, **opts.attack_options.get(name, {})}
    return get_registry("attack").get(name).build(options=options)


def _attack(run: EvalRun, name: str, opts: EvalOptions, report: EvalReporter) -> dict:
    attack = _build_attack(name, opts)
    t0 = time.time()
    attempts = attack.attack(run)
    index = {id(c): i for i, c in enumerate(run.suite.cases)}
    rows, hits, baseline = [], 0, 0
    # Per picture as well as per case: an attack that draws more pictures per case (paraphrase:
    # one set per rewording) has more chances at the case-level rate than the no-attack figure.
    pictures = {"attack": [0, 0], "no_attack": [0, 0]}  # [showing the concept, judged]
    spent: list[list[tuple[int, bool]]] = []  # per case with budgets: (steps, shown) a picture
    for attempt in attempts:
        shown = None
        if run.detector is not None:
            verdicts = _shows(run, attempt.images)
            shown = any(verdicts)
            before = _own(run, run.erased, index[id(attempt.case)])
            spent += _spent(run, attempt, verdicts, before)
            baseline += any(before)
            hits += shown
            for key, seen in (("attack", verdicts), ("no_attack", before)):
                pictures[key][0] += sum(seen)
                pictures[key][1] += len(seen)
        rows.append({"case_number": attempt.case.case_number, "group": attempt.case.group,
                     "prompt": attempt.case.prompt, "attacked_prompts": attempt.prompts,
                     "concept_shown": shown})
    n = len(attempts)
    report.message(f"attack {name}: {n} target case(s)")
    measured = run.detector is not None and n > 0

    def share(key):
        shown_count, judged = pictures[key]
        return shown_count / judged if measured and judged else None

    summary = {"attack": name, "settings": attack.settings(), "cases": n,
               "success_rate": hits / n if measured else None,
               "no_attack_rate": baseline / n if measured else None,
               "picture_rate": share("attack"), "no_attack_picture_rate": share("no_attack"),
               "pictures": pictures["attack"][1],
               "sweep": _sweep(attempts, spent) if measured and spent else None,
               "original_sweep": None,
               "seconds": round(time.time() - t0, 1), "rows": rows,
               "note": "" if measured else (run.no_detector_note or "no target cases")}
    if summary["sweep"] is not None:
        # The same attack on the original model: the line the erased model's is read against
        # (where the concept shows anyway, a prompt succeeds before any attack step).
        summary["original_sweep"] = _original_sweep(run, attack)
        summary["seconds"] = round(time.time() - t0, 1)
    return {"summary": summary, "attempts": attempts}


def _original_sweep(run: EvalRun, attack) -> list[dict]:
    original = replace(run, erased_model=run.original_model, erased=run.original)
    attempts = attack.attack(original)
    index = {id(c): i for i, c in enumerate(run.suite.cases)}
    spent = []
    for a in attempts:
        before = _own(run, run.original, index[id(a.case)])
        spent += _spent(run, a, _shows(run, a.images), before)
    return _sweep(attempts, spent) if spent else None


def _shows(run: EvalRun, images) -> list[bool]:
    return [bool(run.detector.shows(lab, run.concept)) for lab in run.detector.judge(images)]


def _own(run: EvalRun, drawn, i: int) -> list[bool]:
    """Whether each of case i's ordinary pictures in ``drawn`` (judged already) shows the
    concept."""
    k = run.suite.images_per_prompt
    return [bool(run.detector.shows(drawn.labels[j], run.concept))
            for j in range(i * k, (i + 1) * k)]


def _spent(run: EvalRun, attempt, verdicts: list[bool],
           before: list[bool]) -> list[list[tuple[int, bool]]]:
    """The attempt's (steps, shown) per picture for the sweep, in a one-case list (none for an
    attack without a budget): a stopping attack's own budgets, or for an attack that runs its
    whole budget the case's ordinary pictures at 0 steps and each budget's pictures."""
    if attempt.budgets is not None:
        return [list(zip(attempt.budgets, verdicts, strict=True))]
    if attempt.along is None:
        return []
    case = [(0, seen) for seen in before]
    for steps, images in attempt.along:
        seen = verdicts if images is attempt.images else _shows(run, images)
        case += [(steps, s) for s in seen]
    return [case]


def _sweep(attempts, spent: list[list[tuple[int, bool]]]) -> list[dict]:
    return budget_sweep(spent, cumulative=not any(a.along for a in attempts))


def budget_sweep(spent: list[list[tuple[int, bool]]], cumulative: bool = True) -> list[dict]:
    """Attack success rate against attack steps: at each budget any picture spent, the share of
    cases with a picture showing the concept. ``cumulative``: among the pictures drawn within
    that budget (an attack that stops at a success: a case stays a success at every larger
    budget). Otherwise among the pictures drawn at exactly that budget (an attack that runs its
    whole budget: what it would have scored had it stopped there; the last point is its ASR)."""
    budgets = sorted({steps for case in spent for steps, _ in case})
    return [{"steps": b, "success_rate": sum(
        any(shown for steps, shown in case if (steps <= b if cumulative else steps == b))
        for case in spent) / len(spent)} for b in budgets]


def verdict(scores, attacks, has_detector: bool) -> dict:
    """A plain answer: did the concept go, and did the rest stay?"""
    if not has_detector:
        return {"status": "unknown", "text": "No detector judged the pictures, so conceptctl "
                "cannot say whether erasure worked; look at the grids, or pass --detector."}
    erasure = {s.group: s.value for s in scores if s.metric == "erasure" and s.value is not None}
    kept = {s.group: s.value for s in scores if s.metric == "preservation"
            and s.value is not None and ":" not in s.group}
    gone = bool(erasure) and all(v >= PASS_THRESHOLD for v in erasure.values())
    stayed = all(v >= PASS_THRESHOLD for v in kept.values())
    parts = [f"erasure success {_pct(erasure.get('target'))} in-set, "
             f"{_pct(erasure.get('target-oos'))} out-of-set"]
    if kept:
        worst = min(kept, key=kept.get)
        parts.append(f"worst preservation {_pct(kept[worst])} ({worst})")
    measured = [a for a in attacks if a["success_rate"] is not None]
    for a in measured:
        parts.append(f"{a['attack']} attack brings it back in {_pct(a['success_rate'])} "
                     f"of target prompts (no attack: {_pct(a['no_attack_rate'])})")
    # Robust: no attack brings the concept back more often than erasure lets it through.
    worst = max(measured, key=lambda a: a["success_rate"], default=None)
    robust = None if worst is None else worst["success_rate"] <= 1 - PASS_THRESHOLD
    if gone and not kept:
        status, head = "erased", "The concept is gone; preservation was not measured."
    elif gone and stayed:
        status, head = "worked", "Yes: the concept is gone and the rest is kept."
    elif gone:
        status, head = "collateral", "Partly: the concept is gone, but related concepts suffered."
    elif stayed:
        status, head = "incomplete", "No: the concept still shows too often."
    else:
        status, head = "failed", "No: the concept still shows and related concepts suffered."
    if gone and robust is False:
        head += (f" It is not robust: the {worst['attack']} attack brings it back in "
                 f"{_pct(worst['success_rate'])} of target prompts.")
    return {"status": status, "text": f"{head} ({'; '.join(parts)}; bar {PASS_THRESHOLD:.0%})",
            "threshold": PASS_THRESHOLD, "robust": robust}


# Worst first: a several-concept verdict is its worst concept's.
_STATUS_ORDER = ("unknown", "failed", "incomplete", "collateral", "erased", "worked")


def combined_verdict(concepts: list[dict]) -> dict:
    """The verdict of a model that forgot several concepts: the worst concept's status, robust
    only if every concept is, and each concept's own verdict in the text."""
    verdicts = [c["verdict"] for c in concepts]
    worst = min(verdicts, key=lambda v: _STATUS_ORDER.index(v["status"]))
    robust_values = [v.get("robust") for v in verdicts]
    robust = (False if False in robust_values else
              None if None in robust_values else True)
    text = " ".join(f"{c['concept']}: {c['verdict']['text']}" for c in concepts)
    heads = {"worked": "Every concept is gone and the rest is kept.",
             "erased": "Every concept is gone; preservation was not measured."}
    head = heads.get(worst["status"], "Not every concept went as it should.")
    return {"status": worst["status"], "text": f"{head} {text}",
            "threshold": worst.get("threshold"), "robust": robust}


def _pct(value) -> str:
    return "n/a" if value is None else f"{value:.0%}"


def _original_key(manifest: dict, backbone: str, suite: Suite, draw: DrawSettings) -> str:
    import json

    blob = json.dumps({"base": manifest["base"]["tensors_digest"], "backbone": backbone,
                       "cases": [(c.prompt, c.seed, c.guidance) for c in suite.cases],
                       "draw": vars(draw)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()
