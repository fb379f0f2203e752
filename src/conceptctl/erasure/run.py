"""``erase()``: one erasure run from settings to artifact, as a library function.

The order: check the settings and resolve every component (fail before any work), load the
backbone, make anchor/target prompts, draw (or reuse) anchor latents, encode the fixed prompts
once, build the method, resume if asked, train, write the artifact.
"""

from __future__ import annotations

import copy
import math
import os
import resource
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import torch

from conceptctl.cards import artifact_card
from conceptctl.erasure.adversarial import ADVERSARIAL_ROWS
from conceptctl.erasure.anchors import (
    CONCEPT_TYPES,
    merge_anchor_sets,
    read_prompt_lines,
    retain_prompts,
)
from conceptctl.erasure.artifact import (
    apply_artifact,
    base_record,
    build_manifest,
    chain_links,
    read_stack_base,
    write_artifact,
)
from conceptctl.erasure.augment import AUGMENTS
from conceptctl.erasure.checkpoints import load_checkpoint, save_checkpoint
from conceptctl.erasure.config import EraseConfig, complete
from conceptctl.erasure.loss_log import LOSS_LOG, LossLog, check_report_to
from conceptctl.erasure.methods import D_UPDATES, PRIOR_BATCHES, Context, StepStats
from conceptctl.erasure.params import PARAM_GROUPS, select_parameters, trains_text_encoder
from conceptctl.erasure.precision import MODES as PRECISION_MODES
from conceptctl.erasure.precision import Precision
from conceptctl.erasure.refine import refine, refined_names
from conceptctl.erasure.resume import (
    check_resume,
    data_record,
    on_main,
    resume_point,
    settings_record,
)
from conceptctl.erasure.trainer import LoopState, StudentPrompts, TrainingData, run_loop
from conceptctl.errors import OutputExistsError, UsageError
from conceptctl.fileio import atomic_directory
from conceptctl.outputs import claim_output, output_lock, written_by_conceptctl
from conceptctl.registry import get_registry
from conceptctl.sampling import MAX_BATCH_AT_NATIVE, MAX_PICTURE_BYTES


@dataclass
class EraseReporter:
    """Callbacks the CLI uses to draw progress; all optional."""

    message: Callable[[str], None] = lambda text: None
    anchor_progress: Callable[[int, int], None] = lambda done, total: None
    step: Callable[[int, int, StepStats], None] = lambda step, total, stats: None


@dataclass
class EraseResult:
    out_dir: Path
    steps: int
    seconds: dict[str, float]
    peak_memory_mb: float
    anchors_cached: bool
    warnings: list[str] = field(default_factory=list)
    processes: int = 1  # data-parallel processes that trained it
    main_process: bool = True  # False in the other processes of a data-parallel run
    closed_form: bool = False  # the method edited the weights in one solve (no steps)


def check_config(cfg: EraseConfig) -> None:
    """Reject settings that cannot work, before anything is loaded (the preset fills what
    ``cfg`` leaves None)."""
    for erasure in cfg.erasures():
        _check_erasure(erasure)
    _check_concept_list(cfg)
    if cfg.base_artifact is not None:
        read_stack_base(cfg.base_artifact)  # a missing base or broken chain: before any work
    if cfg.adversarial and _closed_form(cfg.method):
        raise UsageError(f"--adversarial attacks the model while it trains, and {cfg.method} "
                         "edits it in closed form, without training",
                         hint="leave --adversarial out, or use --method doco, ca or esd-x")
    if cfg.retain_refine and _closed_form(cfg.method):
        raise UsageError(f"--retain-refine refines a trained edit, and {cfg.method} keeps its "
                         "retain prompts in its own closed-form solve",
                         hint="leave --retain-refine out (uce: --uce-preserve-scale), or use "
                         "--method doco, ca or esd-x")
    if cfg.retain_refine and cfg.params is not None and trains_text_encoder(cfg.params):
        raise UsageError("--retain-refine refines the cross-attention key/value projections, "
                         "and --params text-encoder leaves them as they are",
                         hint="leave --retain-refine out, or train --params cross-attn-kv")
    if cfg.retain_prompts is not None:
        if not (cfg.adversarial or cfg.retain_refine or _closed_form(cfg.method)):
            raise UsageError("--retain-prompts is only used by adversarial erasure, "
                             "--retain-refine and closed-form methods (uce)",
                             hint="add --adversarial or --retain-refine, or leave "
                             "--retain-prompts out")
        read_prompt_lines(Path(cfg.retain_prompts), "retain prompt")  # fails before any work
    cfg = complete(cfg)
    _check_numbers(cfg)
    for name, minimum in (("steps", 1), ("batch_size", 1), ("anchor_images_per_prompt", 1),
                          ("anchor_steps", 1), ("anchor_prompt_count", 1),
                          ("esd_sampling_steps", 2), ("adversarial_tokens", 1),
                          ("adversarial_steps", 1), ("adversarial_every", 1)):
        if getattr(cfg, name) is not None and getattr(cfg, name) < minimum:
            raise UsageError(f"{name.replace('_', '-')} must be at least {minimum}")
    if cfg.batch_size > MAX_BATCH_AT_NATIVE:  # training runs at the backbone's native side
        raise UsageError(f"batch size {cfg.batch_size} is above the limit of "
                         f"{MAX_BATCH_AT_NATIVE} images per step",
                         hint="the reference recipe trains with --batch-size 8")
    if not 0 <= cfg.warmup < cfg.steps:
        raise UsageError(f"warm-up ({cfg.warmup}) must be at least 0 and below steps "
                         f"({cfg.steps})")
    for what, value, choices in (("prior batch", cfg.prior_batch, PRIOR_BATCHES),
                                 ("augmentation", cfg.augment, AUGMENTS),
                                 ("discriminator update", cfg.d_update, D_UPDATES),
                                 ("mixed precision", cfg.mixed_precision, PRECISION_MODES),
                                 ("adversarial rows", cfg.adversarial_rows, ADVERSARIAL_ROWS)):
        if value not in choices:
            raise UsageError(f"unknown {what} {value!r}; use {', '.join(choices)}")
    if cfg.params not in PARAM_GROUPS:
        raise UsageError(f"unknown parameter group {cfg.params!r}; available: "
                         f"{', '.join(PARAM_GROUPS)}")
    if trains_text_encoder(cfg.params) and cfg.augment != "none":
        # The augmentation's prefixed captions are encoded once, by the original encoder.
        raise UsageError(f"--augment {cfg.augment} cannot be combined with --params "
                         "text-encoder", hint="leave --augment out (the default is none)")
    for kind, name in (("method", cfg.method), ("discriminator", cfg.discriminator),
                       ("gradient-surgery", cfg.surgery)):
        get_registry(kind).entry(name)  # UnknownComponentError lists the available ones
    if cfg.anchor_selector is not None:
        get_registry("anchor-selector").entry(cfg.anchor_selector)


def _check_erasure(erasure) -> None:
    concept, anchor, kind = erasure
    if not concept.strip():
        raise UsageError("the concept to erase is empty", hint='conceptctl erase "Van Gogh" '
                         "--anchor painting")
    if not anchor.strip():
        raise UsageError(f"the anchor concept of {concept!r} is empty", hint="--anchor names "
                         "what the concept should become, e.g. --anchor painting")
    if _same_words(concept, anchor):
        raise UsageError(f"the anchor equals the concept ({concept!r})",
                         hint="choose an anchor the concept should turn into, e.g. church -> "
                         "house")
    if kind is not None and kind not in CONCEPT_TYPES:
        raise UsageError(f"unknown concept type {kind!r}; use {', '.join(CONCEPT_TYPES)}")


def _same_words(a: str, b: str) -> bool:
    return " ".join(a.lower().split()) == " ".join(b.lower().split())


def _check_concept_list(cfg: EraseConfig) -> None:
    """Several concepts: each once, and none the anchor of another (it would be erased and
    taught at once)."""
    erasures = cfg.erasures()
    for i, erasure in enumerate(erasures):
        for other in erasures[:i]:
            if _same_words(erasure.concept, other.concept):
                raise UsageError(f"{erasure.concept!r} is listed twice",
                                 hint="name each concept once")
        for other in erasures:
            if _same_words(erasure.concept, other.anchor):
                raise UsageError(f"{erasure.concept!r} is erased and is also the anchor of "
                                 f"{other.concept!r}", hint="choose an anchor that stays, e.g. "
                                 "church -> house and airplane -> house")


def _closed_form(method: str) -> bool:
    """Whether ``method`` edits the weights in closed form (no training loop), e.g. ``uce``."""
    methods = get_registry("method")
    return method in methods and getattr(methods.entry(method).value, "closed_form", False)


# The least value of each float setting, and whether it may equal it. Every float must also be
# finite: Typer reads 'nan' and 'inf' as numbers, and either one trains NaN weights.
_FLOAT_MINIMA = {"lr": (0, False), "d_lr": (0, False), "max_grad_norm": (0, False),
                 "weight_decay": (0, True), "surgery_strength": (0, True),
                 "prior_weight": (0, True), "esd_eta": (0, True), "anchor_guidance": (0, True),
                 "adversarial_lr": (0, False), "adversarial_retain": (0, True),
                 "uce_lambda": (0, False), "uce_erase_scale": (0, True),
                 "uce_preserve_scale": (0, True), "retain_refine": (0, True)}


def _check_numbers(cfg: EraseConfig) -> None:
    """Floats (every one, including any added later) and counts that can never be right."""
    for f in fields(cfg):
        if f.type not in ("float", "float | None"):  # annotations are strings here
            continue
        value = getattr(cfg, f.name)
        least, inclusive = _FLOAT_MINIMA.get(f.name, (-math.inf, True))
        if not math.isfinite(value) or value < least or (value == least and not inclusive):
            bound = "" if least == -math.inf else (
                f", {least} or more" if inclusive else f" above {least}")
            raise UsageError(f"{f.name.replace('_', '-')} must be a finite number{bound}, "
                             f"not {value}", hint="leave it out to use the preset's value")
    for name in ("checkpointing_steps", "checkpoints_total_limit"):  # 0: never / keep all
        if getattr(cfg, name) < 0:
            raise UsageError(f"{name.replace('_', '-')} must be 0 or more")
    if not 0 <= cfg.seed < 2**63:
        raise UsageError("seed must be between 0 and 2**63 - 1")


@contextmanager
def _output_dir(out_dir: Path, resume: str | None, overwrite: bool,
                note: Callable[[str], None]) -> Iterator[Path]:
    """Hold ``out_dir`` for the run and yield where to write: ``out_dir`` itself (new, empty, or
    the run being resumed), or, when replacing an earlier conceptctl output, a staging folder
    that takes its place once the artifact is complete (so a failed run leaves the old one)."""
    if resume is not None:
        with output_lock(out_dir, note):
            if out_dir.is_dir() and any(out_dir.iterdir()) and not written_by_conceptctl(out_dir):
                raise OutputExistsError(f"{out_dir} holds files conceptctl did not write; there "
                                        "is no run to resume there",
                                        hint="give the --output of the run to continue")
            yield out_dir
        return
    with claim_output(out_dir, overwrite, "folder", note):
        if out_dir.is_dir() and any(out_dir.iterdir()):  # allowed: --overwrite of our own output
            with atomic_directory(out_dir, overwrite=True) as staging:
                yield staging
        else:
            yield out_dir


def peak_memory_mb(device: torch.device) -> float:
    """The process's peak memory so far in MB: on CUDA the allocator's peak on ``device``
    (since its last reset), else the peak resident set size (also read by bench/)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024


@dataclass
class Training:
    """Everything a run trains with, built by :func:`prepare_training` (also for benchmarks)."""

    params: dict[str, torch.nn.Parameter]
    frozen: torch.nn.Module
    method: object
    optimizer: torch.optim.Optimizer
    optimizers: dict[str, torch.optim.Optimizer]
    modules: dict[str, torch.nn.Module]
    precision: Precision
    state: LoopState
    context: Context


def frozen_copy(unet: torch.nn.Module, trained: dict[str, torch.nn.Parameter]) -> torch.nn.Module:
    """The frozen original for the methods' targets. It shares every tensor that does not train
    with the student (they never change), so only the trained ones are copied: with the default
    cross-attention k/v that saves a whole UNet of memory (3.4 GB for SD 1.x in fp32)."""
    trained_ids = {id(p) for p in trained.values()}
    memo = {id(t): t for t in (*unet.parameters(), *unet.buffers()) if id(t) not in trained_ids}
    frozen = copy.deepcopy(unet, memo)
    for p in frozen.parameters():
        if id(p) not in memo:
            p.requires_grad_(False)
    return frozen.eval()


def apply_speed_settings(cfg: EraseConfig, device: torch.device) -> None:
    """Process-wide switches for the matrix units (CUDA only)."""
    if device.type == "cuda":
        # TF32 tensor cores for fp32 matmuls; cuDNN convolutions already use TF32 by default.
        torch.backends.cuda.matmul.allow_tf32 = cfg.tf32
        torch.backends.cudnn.allow_tf32 = cfg.tf32
        # Same shapes every step: let cuDNN pick its fastest convolution algorithms.
        torch.backends.cudnn.benchmark = True


def _adamw(params: list[torch.nn.Parameter], cfg: EraseConfig) -> torch.optim.Optimizer:
    """AdamW, fused into one kernel where torch has it for these tensors (CPU and CUDA): a
    quarter of the time of the default multi-tensor version (bench: 19 M values of SD 1.x)."""
    try:
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    except RuntimeError:  # e.g. a device or dtype without the fused kernel
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def prepare_training(backbone, cfg: EraseConfig, *, dist=None, timer=None,
                     prompts: list[str] | None = None,
                     retain: tuple[str, ...] = ()) -> Training:
    """Select the trained tensors, make the frozen copy, build the method and optimisers.
    ``prompts``: the target prompts the batches index (with ``--adversarial``, what the inner
    attack attacks; None: the concept alone, for a method that makes its own latents);
    ``retain``: the prompts whose predictions it keeps (conceptctl.erasure.anchors)."""
    from conceptctl.erasure.adversarial import build_adversary
    from conceptctl.erasure.distributed import SingleProcess

    cfg = complete(cfg, backbone.spec)  # a caller's bare config: this backbone's preset
    unet = backbone.unet
    unet.requires_grad_(False)
    for encoder in backbone.text_encoders:
        encoder.requires_grad_(False)
    params = select_parameters(backbone, cfg.params)
    frozen = frozen_copy(unet, params)
    for p in params.values():
        p.requires_grad_(True)
    if cfg.gradient_checkpointing:
        # Student only: the frozen copy never keeps activations (no-grad forwards).
        unet.enable_gradient_checkpointing()
    if cfg.compile:
        unet.compile()
        frozen.compile()
    state = LoopState(generator=torch.Generator().manual_seed(cfg.seed))
    precision = Precision(cfg.mixed_precision, backbone.device.type)
    extra = {"timer": timer} if timer is not None else {}
    dist = dist or SingleProcess()
    adversary = build_adversary(backbone, frozen, cfg,
                                prompts or [e.concept for e in cfg.erasures()], dist.world,
                                retain)
    context = Context(backbone=backbone, frozen_unet=frozen, params=params,
                      generator=state.generator, precision=precision, dist=dist,
                      adversary=adversary, **extra)
    # Components initialise their weights from torch's global generator: seed it for them
    # (without disturbing the caller's) so that two runs with one seed start identically.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        method = get_registry("method").get(cfg.method).build(context=context, config=cfg)
    optimizer = _adamw(list(params.values()), cfg)
    optimizers = {"generator": optimizer, **getattr(method, "state_optimizers", {})}
    modules = dict(getattr(method, "state_modules", {}))
    if adversary is not None:  # its attacked prompts carry on from a checkpoint
        modules["adversary"] = adversary
    return Training(params, frozen, method, optimizer, optimizers, modules, precision, state,
                    context)


def erase(
    cfg: EraseConfig,
    out_dir: Path,
    *,
    resume: str | None = None,
    overwrite: bool = False,
    device: str | None = None,
    dtype: str | None = None,
    reporter: EraseReporter | None = None,
    report_to: str | None = None,
) -> EraseResult:
    """Run one erasure and write its artifact to ``out_dir``.

    Started by ``accelerate launch`` with several processes, it trains data-parallel
    (conceptctl.erasure.distributed); only the main process writes to ``out_dir``. Every
    training step goes to ``losses.jsonl`` as it is taken; ``report_to="tensorboard"`` also
    writes TensorBoard scalars (conceptctl.erasure.loss_log).
    """
    from conceptctl.erasure import distributed
    from conceptctl.settings import load_settings, resolve_device

    started = time.time()
    cfg = complete(cfg)  # the preset fills what the caller left None
    check_config(cfg)
    check_report_to(report_to)
    settings = load_settings()
    dist, device = distributed.setup(resolve_device(device or settings.device))
    report = (reporter or EraseReporter()) if dist.is_main else EraseReporter()
    out_dir = Path(out_dir)
    _check_not_in_chain(out_dir, cfg)
    # Only the main process writes, so only it holds the output (other processes never read it).
    with (_output_dir(out_dir, resume, overwrite, report.message) if dist.is_main
          else nullcontext(out_dir)) as work_dir:
        result = _erase_into(work_dir, cfg, resume=resume, dtype=dtype, settings=settings,
                             dist=dist, device=device, report=report, started=started,
                             final_dir=out_dir, report_to=report_to)
    return replace(result, out_dir=out_dir)


def _check_not_in_chain(out_dir: Path, cfg: EraseConfig) -> None:
    """A stacked run must not write over (or around) an artifact its chain reads."""
    if cfg.base_artifact is None:
        return
    base = read_stack_base(cfg.base_artifact)
    out = Path(os.path.abspath(out_dir))
    for link in (*base.chain, base):
        held = Path(os.path.abspath(link.path))
        if out == held or out in held.parents:
            raise UsageError(f"--output {out_dir} would replace {link.path}, which the new "
                             "artifact is stacked on",
                             hint="give the stacked artifact a folder of its own")


def _erase_into(out_dir: Path, cfg: EraseConfig, *, resume, dtype, settings, dist, device, report,
                started: float, final_dir: Path, report_to: str | None) -> EraseResult:
    """The run itself, writing checkpoints and the artifact into ``out_dir`` (the output, or the
    staging folder that replaces an earlier output once complete; ``final_dir``: the output,
    from which a stacked artifact's chain paths count), in named phases."""
    from conceptctl.backbones.loading import open_backbone
    from conceptctl.erasure.anchor_data import backbone_digest, cache_key
    from conceptctl.sampling import library_versions

    # A resumed run must be the checkpoint's own run (conceptctl.erasure.resume): the settings
    # are compared before anything loads, the rest before the anchor images are drawn.
    resume_from = resume_point(out_dir, resume, dist)
    record = settings_record(cfg)
    check_resume(resume_from, record, dist)

    # Trained tensors and optimiser states stay fp32: 'auto' (fp16 on GPUs, right for
    # sampling) would make AdamW lose most updates. --mixed-precision brings the speed instead.
    dtype = dtype or (settings.dtype if settings.dtype != "auto" else "float32")
    backbone = open_backbone(cfg.backbone, device=device, dtype=dtype)
    stack = None
    if cfg.base_artifact is not None:
        # Stacking: the run starts from the base artifact's model, every link applied and
        # checked (never forced: training on another model would record a false chain).
        stack = read_stack_base(cfg.base_artifact)
        apply_artifact(backbone, stack)
    apply_speed_settings(cfg, backbone.device)
    notes: list[str] = []
    selector, groups = _anchor_prompts(cfg, backbone, report, notes)
    anchors = merge_anchor_sets([group for _, group in groups])
    closed_form = _closed_form(cfg.method)
    forgotten = [*(e.concept for e in cfg.erasures()), *cfg.erased_before]
    retain = retain_prompts(anchors, forgotten, cfg.retain_prompts) \
        if cfg.adversarial or closed_form or cfg.retain_refine else ()
    # One sampling per erasure, each as its own one-concept run draws it (so its cache serves
    # both); erasures sharing an anchor and its prompts share the images.
    per_prompt = anchor_images_per_prompt(cfg, groups)
    samplings = [_anchor_sampling(cfg, group, backbone, per_prompt) for _, group in groups]
    # A method that makes its own training latents (esd-x), or edits in closed form (uce),
    # needs no anchor images.
    uses_images = getattr(get_registry("method").get(cfg.method), "uses_anchor_images", True)
    count = len(anchors.anchor) * per_prompt if uses_images else 0
    _check_anchor_count(count, backbone)

    # The trained tensors' base values (for the manifest), and the anchor cache files' names.
    base = base_record(select_parameters(backbone, cfg.params))
    digest = backbone_digest(backbone) if dist.is_main and uses_images else None
    if dist.is_main:
        names = ",".join(f"{cache_key(digest, s)}.safetensors" for s in samplings)
        record |= data_record(backbone.dtype, base, count, names if uses_images else "")
    check_resume(resume_from, record, dist)

    t0 = time.time()
    data, cached, cache_files = (_anchor_data(cfg, backbone, anchors, samplings,
                                              settings.cache_dir, digest, dist, report, notes)
                                 if uses_images else (None, False, []))
    anchor_seconds = time.time() - t0

    training = prepare_training(
        backbone, cfg, dist=dist, prompts=list(anchors.target) if uses_images else None,
        retain=retain)
    if data is not None and trains_text_encoder(cfg.params):
        data.student = StudentPrompts(backbone, list(anchors.anchor), list(anchors.target))
    # --retain-refine's W₀: the trained tensors as the run found them (the base's, when
    # stacking), taken before a resumed run loads its checkpoint.
    before = ({name: training.params[name].detach().clone()
               for name in refined_names(training.params)} if cfg.retain_refine else None)
    _resume(training, resume_from, resume, dist, report)
    if dist.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    edit_figures = None
    if closed_form:
        with torch.no_grad():
            edit_figures = training.method.edit(groups, retain)
        # write_artifact refuses non-finite values, as after training.
    else:
        _train(out_dir, cfg, backbone, data, training, record, dist, report, report_to)
    refine_figures = None
    if before is not None:
        # Every process refines its own copy (the same numbers): no weights to broadcast.
        started_refine = time.time()
        refine_figures = refine(training.params, before, backbone, retain, cfg.retain_refine)
        refine_figures["seconds"] = round(time.time() - started_refine, 2)
    train_seconds = time.time() - t0

    seconds = {"anchors": round(anchor_seconds, 2), "training": round(train_seconds, 2),
               "total": round(time.time() - started, 2)}
    peak = dist.max(peak_memory_mb(backbone.device))  # the largest process's
    state, params = training.state, training.params
    if dist.is_main:
        manifest = build_manifest(cfg, backbone, base, params, groups, samplings,
                                  cache_files, selector, seconds, peak, state.history,
                                  library_versions(),
                                  chain=chain_links(stack, final_dir) if stack else None)
        manifest["training"]["precision"] = training.precision.state_dict()
        if not closed_form:  # a closed-form edit takes no steps to log
            manifest["training"]["loss_log"] = LOSS_LOG
        manifest["machine"]["processes"] = dist.world
        if edit_figures is not None:
            manifest["edit"] = edit_figures
        if refine_figures is not None:
            manifest["refine"] = refine_figures
        write_artifact(out_dir, {name: p for name, p in params.items()}, manifest,
                       artifact_card(manifest))
    dist.barrier()  # no process ends before the artifact is written
    return EraseResult(out_dir, state.step, seconds, peak, cached, notes, dist.world,
                       dist.is_main, closed_form)


def _anchor_prompts(cfg: EraseConfig, backbone, report, notes: list[str]):
    """Phase 1: the anchor and target prompts of each erasure, from the chosen (or the
    backbone's) selector; (selector, [(erasure, its AnchorSet), …])."""
    selector_name = cfg.anchor_selector or backbone.spec.anchor_selector or "templates"
    selector = get_registry("anchor-selector").entry(selector_name)
    groups = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for erasure in cfg.erasures():
            groups.append((erasure, selector.value.build(config=cfg.for_erasure(erasure),
                                                         backbone=backbone.spec)))
    for note in dict.fromkeys(str(w.message) for w in caught):  # each once
        notes.append(note)
        report.message(f"warning: {note}")
    return selector, groups


def anchor_images_per_prompt(cfg: EraseConfig, groups) -> int:
    """Anchor images per prompt of each erasure. Several concepts share one budget: with m
    distinct anchor-prompt sets (erasures sharing their anchor prompts draw them once), each
    draws ``anchor_images_per_prompt / m`` per prompt, rounded up — about as many images in all
    as one concept's run, never fewer — so erasing three concepts does not cost three drawings.
    One concept: the setting itself."""
    distinct = len({group.anchor for _, group in groups})
    return math.ceil(cfg.anchor_images_per_prompt / distinct)


def _anchor_sampling(cfg: EraseConfig, anchors, backbone, per_prompt: int):
    """How one erasure's anchor images are drawn from the ORIGINAL model. As the reference:
    DPM-Solver whatever the backbone's own sampler, and every image from its own noise (prompt
    p's image k is seeded seed + p x images per prompt + k). Batches of 32: measured fastest per
    image (docs/performance.md), the same images as one by one since each has its own seed."""
    from conceptctl.sampling import SampleSettings

    return SampleSettings(
        prompts=anchors.anchor, images_per_prompt=per_prompt, seed=cfg.seed,
        steps=cfg.anchor_steps, guidance=cfg.anchor_guidance, batch_size=32,
        sampler="dpm-solver", prompt_seeds=tuple(
            cfg.seed + p * per_prompt for p in range(len(anchors.anchor))),
    ).for_backbone(backbone)


def _anchor_data(cfg: EraseConfig, backbone, anchors, samplings, cache_dir, digest, dist,
                 report, notes: list[str]):
    """Phase 2: the anchor latents (drawn, or reused from the cache, one sampling per erasure)
    with every prompt encoded once (training never runs the text encoder); (data, all came
    from the cache, cache files)."""
    from conceptctl.erasure.anchor_data import AnchorCacheWarning, anchor_latents

    def share(sampling) -> int:  # this process's image-steps of one sampling
        rows = dist.shard(len(sampling.prompts) * sampling.images_per_prompt)
        return (rows.stop - rows.start) * sampling.steps

    total, done = sum(share(s) for s in dict.fromkeys(samplings)), 0

    def advance(n: int) -> None:
        nonlocal done
        done += n
        report.anchor_progress(done, total)

    drawn: dict = {}  # sampling -> (latents, cached, file): a shared anchor is drawn once
    # Mixed precision speeds up drawing the anchors as much as training.
    with Precision(cfg.mixed_precision, backbone.device.type).autocast(), \
            warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", AnchorCacheWarning)
        for sampling in samplings:
            if sampling not in drawn:
                drawn[sampling] = anchor_latents(backbone, sampling, cache_dir, digest=digest,
                                                 on_step=advance, dist=dist)
    for note in [str(w.message) for w in caught  # a damaged or unwritable cache
                 if issubclass(w.category, AnchorCacheWarning)]:
        notes.append(note)
        report.message(f"warning: {note}")
    parts = [drawn[sampling] for sampling in samplings]
    latents = torch.cat([part[0] for part in parts])
    cached = all(part[1] for part in parts)
    cache_files = [part[2] for part in parts]
    for latent_part, was_cached, cache_file in drawn.values():  # each drawing once
        report.message(("reused" if was_cached else "generated") +
                       f" {len(latent_part)} anchor images ({cache_file.name})")
    data = TrainingData(
        latents=latents,
        prompt_index=torch.arange(len(anchors.anchor)).repeat_interleave(
            samplings[0].images_per_prompt),  # every erasure's (anchor_images_per_prompt)
        anchor_text=backbone.encode_prompts(list(anchors.anchor)).cpu(),
        target_text=backbone.encode_prompts(list(anchors.target)).cpu(),
        empty_text=backbone.encode_prompts([""]).cpu(),
        weights=None if len(parts) == 1 else torch.cat(
            [torch.full((len(part[0]),), 1 / len(part[0]), dtype=torch.float64)
             for part in parts]),
    )
    if cfg.augment == "rescale":
        from conceptctl.erasure.augment import PREFIXES, Rescale, to_pixels

        data.augment = Rescale(backbone, to_pixels(backbone, latents), torch.stack([
            backbone.encode_prompts([prefix + p for p in anchors.target]).cpu()
            for prefix in PREFIXES]))
    return data, cached, cache_files


def _resume(training: Training, resume_from, resume, dist, report) -> None:
    """Phase 3: continue from the checkpoint (read by the main process); every process then
    starts from the main one's state."""
    if resume_from is not None:
        on_main(dist, lambda: _restore(resume_from, training))  # the others: _sync_from_main
        report.message(f"resumed from {resume_from.name}")
    elif resume is not None:
        report.message("no checkpoint to resume from; starting at step 0")
    _sync_from_main(dist, training)


def _train(out_dir: Path, cfg: EraseConfig, backbone, data, training: Training, record: dict,
           dist, report, report_to: str | None) -> None:
    """Phase 4: the training loop, checkpointing and logging each step into ``out_dir`` from
    the main process."""
    params, state, precision = training.params, training.state, training.precision

    def checkpoint(step: int) -> None:
        save_checkpoint(out_dir, step, trainable=params, optimizers=training.optimizers,
                        modules=training.modules, generator=state.generator,
                        history=state.history, keep=cfg.checkpoints_total_limit,
                        extra={"precision": precision.state_dict()}, run=record)

    unet = backbone.unet
    # The text encoder stays in eval mode even when it trains: BERT-style encoders (the toy's)
    # drop out in train mode, and its embeddings must be the ones sampling will see.
    unet.train()
    # Continues from the restored history: a resumed run's log never holds a step twice.
    with LossLog(out_dir, state.history, report_to) if dist.is_main else nullcontext() as log:

        def on_step(step: int, stats) -> None:
            if log is not None:
                log.write(state.history[-1])  # the entry run_loop just recorded
            report.step(step, cfg.steps, stats)

        run_loop(training.method, training.optimizer, params, data, state, steps=cfg.steps,
                 batch_size=cfg.batch_size, max_grad_norm=cfg.max_grad_norm,
                 device=backbone.device, dtype=backbone.dtype, on_step=on_step,
                 checkpoint=checkpoint if dist.is_main else None,
                 checkpoint_every=cfg.checkpointing_steps, precision=precision,
                 num_timesteps=backbone.num_train_timesteps, dist=dist, modules=training.modules)
    unet.eval()


def _check_anchor_count(count: int, backbone) -> None:
    """The anchor latents stay in memory for the whole run: bound them before drawing any."""
    side = backbone.resolution // backbone.vae_scale_factor
    held = count * backbone.latent_channels * side * side * 4
    if held > MAX_PICTURE_BYTES:
        raise UsageError(f"{count} anchor images would take {held / 2**30:.0f} GiB of memory; "
                         f"the limit is {MAX_PICTURE_BYTES // 2**30} GiB",
                         hint="lower --anchor-images (the reference draws about 5 per prompt)")


def _restore(checkpoint: Path, training: Training) -> None:
    """Load ``checkpoint`` into the run: trained tensors, optimisers, modules, generator, step,
    history and the fp16 loss scale."""
    state = training.state
    state.step, state.history, extra = load_checkpoint(
        checkpoint, trainable=training.params, optimizers=training.optimizers,
        modules=training.modules, generator=state.generator)
    if "precision" in extra:
        training.precision.load_state_dict(extra["precision"])


def _sync_from_main(dist, training: Training) -> None:
    """Copy the main process's trained tensors, discriminator, optimiser states, generator and
    loop state to the others (a no-op for one process)."""
    if dist.world == 1:
        return
    dist.broadcast_(training.params.values())
    for module in training.modules.values():
        dist.broadcast_(module.state_dict().values())
    state = training.state
    blob = dist.broadcast_object({
        "step": state.step, "history": state.history,
        "generator": state.generator.get_state(),
        "precision": training.precision.state_dict(),
        "optimizers": {name: _cpu(opt.state_dict()) for name, opt in training.optimizers.items()},
    } if dist.is_main else None)
    if not dist.is_main:
        state.step, state.history = blob["step"], blob["history"]
        state.generator.set_state(blob["generator"])
        training.precision.load_state_dict(blob["precision"])
        for name, opt in training.optimizers.items():
            opt.load_state_dict(blob["optimizers"][name])


def _cpu(value):
    if torch.is_tensor(value):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: _cpu(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_cpu(v) for v in value)
    return value
