"""The toy backbone's erase presets, over conceptctl's SD recipe (``BackboneSpec.erase_presets``;
conceptctl.erasure.config.preset merges them). Plain data, no torch: the CLI reads it at start.

DoCo: 400 steps (100 warm-up), 4 anchor images per prompt drawn with 20 DPM-Solver steps at
guidance 3 (the toy's sampling defaults), discriminator rate 5e-4. The UNet rate, 1.25e-5 per
image (1e-4 at batch 8), was measured on both concept types (docs/erase.md): at twice that, a
style erasure could spread the style to its anchor.

Baselines: every method trains the same 400 steps, and ESD samples with the toy's 20 steps; their
rates, batches, losses and trained tensors stay the authors'. Measured in docs/erase.md: CA's own
100 steps at its rate leave the toy's style in place, and ESD's 1000 iterations of 50-step
sampling take a quarter of an hour on 2 cores.
"""

_DOCO = dict(steps=400, warmup=100, batch_size=8, anchor_images_per_prompt=4, anchor_steps=20,
             anchor_guidance=3.0, checkpointing_steps=100, d_lr=5e-4, lr_per_image=1.25e-5)

TOY_ERASE_PRESETS: dict = {
    "style": _DOCO,
    "object": _DOCO,
    "methods": {
        "ca": dict(steps=400, checkpointing_steps=100),
        "esd-x": dict(steps=400, esd_sampling_steps=20, checkpointing_steps=100),
    },
}
