"""Every setting of an erasure run, and the presets they start from.

SD presets are the DoCo paper's recipes (reference code, SD 1.4; see docs/erase.md):
generator AdamW, weight decay 1e-2, lr 6e-6 per image of the batch (4.8e-5 at batch 8, rescaled
with --batch-size),
grad-norm clip 1, batch 8 (+8 prior), 2000 steps of which the first 1000 train only the
discriminator; discriminator Adam(betas 0.5, 0.999) at 5e-4 for styles and 1e-4 for objects and
nudity; anchor images by DPM-Solver, 25 steps, guidance 6. Toy presets scale steps and anchor
counts to the toy model and were chosen by measurement (docs/erase.md).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import NamedTuple


class Erasure(NamedTuple):
    """One concept of a run and what it should become (``concept_type`` None: guessed)."""

    concept: str
    anchor: str
    concept_type: str | None = None


@dataclass(frozen=True)
class EraseConfig:
    """What to erase and how. A field left None takes its value from :func:`complete`: the
    backbone from the ``default-backbone`` setting, the concept type guessed from the concept
    and anchor, every recipe value from the preset of the backbone family, concept type and
    method. Build one with :func:`plan`, or complete it with ``erase()``, which does both."""

    concept: str
    anchor: str
    concept_type: str | None = None  # None: guessed from concept and anchor
    # Several concepts in one run: every (concept, anchor, type) of it, the first being the
    # fields above; empty for a run of one concept. Methods and anchor selectors see one
    # erasure at a time through :meth:`for_erasure`, with this list telling them the rest.
    concepts: tuple[tuple[str, str, str | None], ...] = ()
    backbone: str | None = None  # None: --base's backbone, else the default-backbone setting
    # Stacking: the artifact folder this run erases on top of (its whole chain applied first);
    # the new artifact records the chain. An absolute path, so a resumed run compares equal.
    base_artifact: str | None = None
    # Stacking: every concept the base's model has forgotten already (its chain's, then its
    # own), read from ``base_artifact`` by :func:`complete`, never given. Anchor selectors and
    # retain sets treat them as the run's other concepts (:meth:`also_erased`): a pair naming one
    # would train toward pictures the model no longer draws.
    erased_before: tuple[str, ...] = ()
    method: str = "doco"
    discriminator: str = "patchgan"
    surgery: str = "doco"
    anchor_selector: str | None = None  # None: the backbone's preferred one, else templates
    anchor_prompts: str | None = None  # file for the prompt-file selector
    # How many of the built-in templates' anchor prompts to use (None: all 200, the reference's
    # count); fewer make a quick run, as in tests on tiny pipelines.
    anchor_prompt_count: int | None = None
    # no | fp16 | bf16: autocast of the UNet passes. None: accelerate's choice (the
    # ACCELERATE_MIXED_PRECISION that 'accelerate launch' sets), else no; :func:`complete`
    # decides, and records in ``mixed_precision_source`` which one it was (never given).
    mixed_precision: str | None = None
    mixed_precision_source: str | None = None  # option | accelerate | default
    # Speed and memory switches that leave the result unchanged (gradient checkpointing: the
    # same numbers; compile and TF32: within float tolerance). See docs/performance.md.
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory
    compile: bool = False  # torch.compile the UNets (first steps pay the compilation)
    tf32: bool = True  # CUDA: TF32 tensor cores for fp32 matmuls and convolutions
    surgery_strength: float = 1.0
    prior_weight: float = 0.1
    # The preservation loss's images: "separate" (the reference's own prior batch) or "shared"
    # (the adversarial batch's own x_t, t and ε, as conceptctl did before; kept to measure both).
    prior_batch: str = "separate"
    # D's update: "own" (its loss only) or "reference" (plus the generator's adversarial loss's
    # gradient, which the authors' code leaves in D's .grad; kept to measure both).
    d_update: str = "own"
    # Anchor pictures: "none" (as drawn) or "rescale" (the reference's random zoom-out/zoom-in
    # with "far away"/"close up" caption words, conceptctl.erasure.augment; kept to measure).
    augment: str = "none"
    # Adversarial erasure (conceptctl.erasure.adversarial): every ``adversarial_every`` generator
    # steps an inner attack of ``adversarial_steps`` Adam steps (rate ``adversarial_lr``) on
    # ``adversarial_tokens`` soft tokens per target prompt; the outer step erases on the attacked
    # prompts too, and keeps the original's predictions on the retain prompts (weight
    # ``adversarial_retain``; ``retain_prompts``: a file, else the anchor selector's retain set).
    # ``adversarial_rows``: where the outer step puts the attacked prompts (ADVERSARIAL_ROWS).
    adversarial: bool = False
    adversarial_rows: str = "added"
    adversarial_tokens: int = 3
    adversarial_steps: int = 4
    adversarial_every: int = 1
    adversarial_lr: float = 0.01
    adversarial_retain: float = 1.0
    retain_prompts: str | None = None
    # After training, pull the key/value edit back on the retain prompts' token states, with this
    # weight (conceptctl.erasure.refine; 0: off).
    retain_refine: float = 0.0
    # uce (conceptctl.erasure.uce): λ, the erase and the preserve scale of the closed-form
    # solve; the authors' script defaults.
    uce_lambda: float = 0.5
    uce_erase_scale: float = 1.0
    uce_preserve_scale: float = 0.1
    seed: int = 0
    checkpoints_total_limit: int = 2
    # The recipe: None takes the preset's value (RECIPE and the presets below).
    params: str | None = None
    steps: int | None = None
    warmup: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    d_lr: float | None = None
    weight_decay: float | None = None
    max_grad_norm: float | None = None
    esd_eta: float | None = None
    # esd-x: DDIM steps of the sampler whose first k steps make each training latent.
    esd_sampling_steps: int | None = None
    anchor_images_per_prompt: int | None = None
    anchor_steps: int | None = None
    anchor_guidance: float | None = None
    checkpointing_steps: int | None = None

    def as_dict(self) -> dict:
        """The settings as JSON holds them (``concepts`` as lists), so that a record read back
        from a checkpoint or manifest compares equal to the run's own."""
        return {**asdict(self), "concepts": [list(entry) for entry in self.concepts],
                "erased_before": list(self.erased_before)}

    def with_overrides(self, **overrides) -> EraseConfig:
        """A copy with every non-None override applied (CLI flags the user gave)."""
        known = {f.name for f in fields(self)}
        unknown = set(overrides) - known
        if unknown:
            raise TypeError(f"unknown erase settings: {', '.join(sorted(unknown))}")
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})

    def is_complete(self) -> bool:
        return all(getattr(self, name) is not None
                   for name in (*RECIPE, "concept_type", "backbone", "mixed_precision",
                                "mixed_precision_source")) and all(
            kind is not None for _, _, kind in self.concepts) and (
            self.base_artifact is None or bool(self.erased_before))

    def erasures(self) -> tuple[Erasure, ...]:
        """Every concept the run erases, the first being ``concept``/``anchor``."""
        if self.concepts:
            return tuple(Erasure(*entry) for entry in self.concepts)
        return (Erasure(self.concept, self.anchor, self.concept_type),)

    def for_erasure(self, erasure: Erasure) -> EraseConfig:
        """These settings with ``concept``/``anchor``/``concept_type`` set to one erasure's (what
        an anchor selector or a one-concept helper reads); ``concepts`` still lists them all."""
        return replace(self, concept=erasure.concept, anchor=erasure.anchor,
                       concept_type=erasure.concept_type)

    def also_erased(self) -> tuple[str, ...]:
        """What the model is to be without besides ``concept``: the run's other concepts, then
        (stacked) those its base has forgotten already. What an anchor selector names in no
        pair, and no retain prompt names."""
        others = (e.concept for e in self.erasures() if e.concept != self.concept)
        return tuple(dict.fromkeys((*others, *self.erased_before)))


# DoCo's SD recipe (the reference code's values): what every preset starts from.
RECIPE: dict = dict(params="cross-attn-kv", steps=2000, warmup=1000, batch_size=8, d_lr=1e-4,
                    weight_decay=1e-2, max_grad_norm=1.0, esd_eta=1.0, esd_sampling_steps=50,
                    anchor_images_per_prompt=5, anchor_steps=25, anchor_guidance=6.0,
                    checkpointing_steps=500, lr=None)

# The reference's generator learning rate is 6e-6 per image of the batch (--scale_lr): the UNet
# rate is lr_per_image x batch size, whatever --batch-size is, unless --lr gives it outright.
LR_PER_IMAGE = 6e-6

# Concept type -> DoCo's SD settings that differ from RECIPE (the reference's discriminator rates).
TYPE_PRESETS: dict[str, dict] = {
    "style": dict(d_lr=5e-4),
    "object": dict(d_lr=1e-4),
    "nudity": dict(d_lr=1e-4),
}

# The baselines' own recipes, carried by their method registrations (Component.recipe) and laid
# over the preset above on every backbone and concept type (they keep its anchor-image
# settings). Sources, quoted in docs/erase.md:
# - ca: nupurkmr9/concept-ablation diffusers/README.md + diffusers/train.py: model-based loss,
#   --parameter_group cross-attn (attn2.to_k/to_v), --learning_rate 2e-6 --scale_lr with
#   batch 4 on the 2 GPUs the README recommends (8 images a step), --max_train_steps 100,
#   AdamW (weight decay 1e-2), grad-norm clip 1, no prior preservation for styles and objects.
# - esd-x: rohitgandikota/erasing train-scripts/train-esd.py (the paper's code): every attn2
#   parameter ('xattn'), Adam at lr 1e-5, batch 1, 1000 iterations, negative guidance 1, x_t
#   from DDIM (50 steps, guidance 3) partly sampling the concept with the model being trained,
#   no gradient clip.
CA_RECIPE: dict = dict(steps=100, warmup=0, batch_size=8, lr_per_image=2e-6,
                       params="cross-attn-kv", weight_decay=1e-2, max_grad_norm=1.0,
                       checkpointing_steps=50)
# uce edits in closed form: no steps, batches or rates; the values below only fill the recipe
# (the card says "closed form" instead of steps). Its trained tensors are attn2.to_k/to_v.
UCE_RECIPE: dict = dict(steps=1, warmup=0, batch_size=1, params="cross-attn-kv",
                        checkpointing_steps=1)
ESD_X_RECIPE: dict = dict(steps=1000, warmup=0, batch_size=1, lr_per_image=1e-5,
                          params="cross-attn", weight_decay=0.0, esd_eta=1.0,
                          esd_sampling_steps=50, checkpointing_steps=250)


def method_recipe(method: str) -> dict:
    """The recipe a method's registration carries (``Component.recipe``); {} for a method
    without one (DoCo's preset applies) or a name nothing registers (refused later, with the
    names that exist)."""
    from conceptctl.registry import get_registry

    methods = get_registry("method")
    if method not in methods:
        return {}
    return dict(getattr(methods.entry(method).value, "recipe", None) or {})


def preset(concept_type: str, batch_size: int | None = None, method: str = "doco",
           backbone: dict | None = None) -> dict:
    """Every recipe value (:data:`RECIPE`'s keys) for a concept type and method, with the UNet
    learning rate scaled to ``batch_size`` (default: the preset's batch). ``backbone``: the
    backbone's own presets over conceptctl's SD ones (``BackboneSpec.erase_presets``: per
    concept type, and per method under "methods"; the toy's: 400 steps, its anchor sampling).
    Methods without a recipe of their own (DoCo, the ``*-doco-recipe`` variants, a plugin's
    method that registers none) get DoCo's."""
    own = backbone or {}
    values = (RECIPE | TYPE_PRESETS.get(concept_type, {}) | own.get(concept_type, {})
              | method_recipe(method) | own.get("methods", {}).get(method, {}))
    per_image = values.pop("lr_per_image", LR_PER_IMAGE)
    values["lr"] = per_image * (batch_size or values["batch_size"])
    return values


def complete(cfg: EraseConfig, spec=None) -> EraseConfig:
    """``cfg`` with every None filled: the backbone from the settings, the concept type guessed,
    the recipe from :func:`preset` with the backbone's own presets (the learning rate scaled to
    the batch size given). A complete config comes back unchanged. ``spec``: the backbone's
    ``BackboneSpec`` when the caller has it (else it is resolved here, without loading
    weights)."""
    if cfg.is_complete():
        return cfg
    from conceptctl.backbones.resolve import resolve_backbone
    from conceptctl.erasure.anchors import guess_type
    from conceptctl.erasure.precision import resolve_mode
    from conceptctl.settings import load_settings

    stacked_on, erased_before = _stacked(cfg)
    backbone = cfg.backbone or stacked_on or load_settings().default_backbone
    spec = spec or resolve_backbone(backbone)  # reads the settings itself
    kind = cfg.concept_type or guess_type(cfg.concept, cfg.anchor)
    concepts = tuple((c, a, t or guess_type(c, a)) for c, a, t in cfg.concepts)
    # Several concepts of several types: the first one's preset (the run has one recipe).
    recipe = preset(kind, cfg.batch_size, cfg.method, spec.erase_presets)
    # A given mode keeps the source it was decided with (a completed config stays complete).
    decided = cfg.mixed_precision is not None and cfg.mixed_precision_source is not None
    mixed_precision, source = ((cfg.mixed_precision, cfg.mixed_precision_source) if decided
                               else resolve_mode(cfg.mixed_precision))
    return replace(cfg, backbone=backbone, concept_type=kind, concepts=concepts,
                   erased_before=erased_before, mixed_precision=mixed_precision,
                   mixed_precision_source=source,
                   **{k: v for k, v in recipe.items() if getattr(cfg, k) is None})


def _stacked(cfg: EraseConfig) -> tuple[str | None, tuple[str, ...]]:
    """The backbone the --base artifact's chain starts from and every concept its model has
    forgotten (None and none without --base)."""
    if cfg.base_artifact is None:
        return None, ()
    from conceptctl.erasure.artifact import all_concepts, read_stack_base

    base = read_stack_base(cfg.base_artifact)
    return (base.original_base["name"],
            tuple(dict.fromkeys(c["concept"] for c in all_concepts(base.manifest))))


def plan(concept: str | list[Erasure], anchor: str | None = None, backbone: str | None = None,
         **overrides) -> EraseConfig:
    """The complete settings of an erasure, as ``conceptctl erase`` runs it: the preset of the
    backbone, concept type (guessed unless ``concept_type`` is given) and method, then every
    non-None override (any :class:`EraseConfig` field). E.g.
    ``plan("church", "house", steps=200)`` on the toy: the toy preset with 200 steps.
    ``concept`` may be a list of :class:`Erasure` (several concepts in one run; ``anchor``
    and ``concept_type`` then come from the list)."""
    if isinstance(concept, str):
        cfg = EraseConfig(concept=concept.strip(), anchor=(anchor or "").strip(),
                          backbone=backbone)
    else:
        entries = [Erasure(c.strip(), a.strip(), t) for c, a, t in concept]
        if not entries:
            raise ValueError("plan() needs at least one concept")
        first = entries[0]
        cfg = EraseConfig(concept=first.concept, anchor=first.anchor,
                          concept_type=first.concept_type, backbone=backbone,
                          concepts=tuple(tuple(e) for e in entries) if len(entries) > 1 else ())
    return complete(cfg.with_overrides(**overrides))
