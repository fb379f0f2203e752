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


@dataclass(frozen=True)
class EraseConfig:
    concept: str
    anchor: str
    concept_type: str = "object"
    backbone: str = "toy"
    method: str = "doco"
    discriminator: str = "patchgan"
    surgery: str = "doco"
    anchor_selector: str | None = None  # None: the backbone's preferred one, else templates
    anchor_prompts: str | None = None  # file for the prompt-file selector
    # How many of the built-in templates' anchor prompts to use (None: all 200, the reference's
    # count); fewer make a quick run, as in tests on tiny pipelines.
    anchor_prompt_count: int | None = None
    params: str = "cross-attn-kv"
    mixed_precision: str = "no"  # no | fp16 | bf16: autocast of the UNet passes
    # Speed and memory switches that leave the result unchanged (gradient checkpointing: the
    # same numbers; compile and TF32: within float tolerance). See docs/performance.md.
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory
    compile: bool = False  # torch.compile the UNets (first steps pay the compilation)
    tf32: bool = True  # CUDA: TF32 tensor cores for fp32 matmuls and convolutions
    steps: int = 2000
    warmup: int = 1000
    batch_size: int = 8
    lr: float = 4.8e-5
    d_lr: float = 1e-4
    weight_decay: float = 1e-2
    max_grad_norm: float = 1.0
    surgery_strength: float = 1.0
    prior_weight: float = 0.1
    # The preservation loss's images: "separate" (the reference's own prior batch) or "shared"
    # (the adversarial batch's own x_t, t and ε, as conceptctl did before; kept to measure both).
    prior_batch: str = "separate"
    esd_eta: float = 1.0
    # esd-x: DDIM steps of the sampler whose first k steps make each training latent.
    esd_sampling_steps: int = 50
    anchor_images_per_prompt: int = 5
    anchor_steps: int = 25
    anchor_guidance: float = 6.0
    seed: int = 0
    checkpointing_steps: int = 500
    checkpoints_total_limit: int = 2

    def as_dict(self) -> dict:
        return asdict(self)

    def with_overrides(self, **overrides) -> EraseConfig:
        """A copy with every non-None override applied (CLI flags the user gave)."""
        known = {f.name for f in fields(self)}
        unknown = set(overrides) - known
        if unknown:
            raise TypeError(f"unknown erase settings: {', '.join(sorted(unknown))}")
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})


# The reference's generator learning rate is 6e-6 per image of the batch (--scale_lr): the UNet
# rate is lr_per_image x batch size, whatever --batch-size is, unless --lr gives it outright.
LR_PER_IMAGE = 6e-6

# (backbone family, concept type) -> DoCo's settings that differ from the dataclass defaults.
# The toy's UNet rate, 1.25e-5 per image (1e-4 at batch 8), was measured on both concept types
# (docs/erase.md): at twice that, a style erasure could spread the style to its anchor.
_TOY = dict(steps=400, warmup=100, batch_size=8, anchor_images_per_prompt=4,
            anchor_steps=20, anchor_guidance=3.0, checkpointing_steps=100, d_lr=5e-4,
            lr_per_image=1.25e-5)
PRESETS: dict[tuple[str, str], dict] = {
    ("sd", "style"): dict(d_lr=5e-4),
    ("sd", "object"): dict(d_lr=1e-4),
    ("sd", "nudity"): dict(d_lr=1e-4),
    ("toy", "style"): _TOY,
    ("toy", "object"): _TOY,
}

# The baselines' own recipes, on every backbone and concept type, over the preset above (whose
# anchor-image settings they keep). Sources, quoted in docs/erase.md:
# - ca: nupurkmr9/concept-ablation diffusers/README.md + diffusers/train.py: model-based loss,
#   --parameter_group cross-attn (attn2.to_k/to_v), --learning_rate 2e-6 --scale_lr with
#   batch 4 on the 2 GPUs the README recommends (8 images a step), --max_train_steps 100,
#   AdamW (weight decay 1e-2), grad-norm clip 1, no prior preservation for styles and objects.
# - esd-x: rohitgandikota/erasing train-scripts/train-esd.py (the paper's code): every attn2
#   parameter ('xattn'), Adam at lr 1e-5, batch 1, 1000 iterations, negative guidance 1, x_t
#   from DDIM (50 steps, guidance 3) partly sampling the concept with the model being trained,
#   no gradient clip.
METHOD_PRESETS: dict[str, dict] = {
    "ca": dict(steps=100, warmup=0, batch_size=8, lr_per_image=2e-6, params="cross-attn-kv",
               weight_decay=1e-2, max_grad_norm=1.0, checkpointing_steps=50),
    "esd-x": dict(steps=1000, warmup=0, batch_size=1, lr_per_image=1e-5, params="cross-attn",
                  weight_decay=0.0, esd_eta=1.0, esd_sampling_steps=50, checkpointing_steps=250),
}
# On the toy every method trains the toy preset's 400 steps and samples with the toy's 20
# sampler steps; rates, batches, losses and trained tensors stay the authors'. Measured in
# docs/erase.md: CA's 100 steps at its rate leave the toy's style in place, and ESD's 1000
# iterations of 50-step sampling take a quarter of an hour on 2 cores.
TOY_METHOD_PRESETS: dict[str, dict] = {
    "ca": dict(steps=400, checkpointing_steps=100),
    "esd-x": dict(steps=400, esd_sampling_steps=20, checkpointing_steps=100),
}


def preset(family: str, concept_type: str, batch_size: int | None = None,
           method: str = "doco") -> dict:
    """The preset for a backbone family ('toy' or any SD family), concept type and method, with
    the UNet learning rate scaled to ``batch_size`` (default: the preset's batch). Methods
    without a recipe of their own (DoCo, plugins' methods, the ``*-doco-recipe`` variants) get
    DoCo's."""
    key = ("toy" if family == "toy" else "sd", concept_type)
    values = dict(PRESETS.get(key, {})) | METHOD_PRESETS.get(method, {})
    if family == "toy":
        values |= TOY_METHOD_PRESETS.get(method, {})
    per_image = values.pop("lr_per_image", LR_PER_IMAGE)
    values["lr"] = per_image * (batch_size or values.get("batch_size", EraseConfig.batch_size))
    return values
