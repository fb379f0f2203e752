"""The Stable Diffusion backbones conceptctl knows by name."""

from conceptctl.backbones.architecture import SDXL_DEFAULTS
from conceptctl.backbones.spec import BackboneSpec
from conceptctl.hookspecs import hookimpl

# Hub ids as published; properties from each model's own configuration files; licenses as each
# model's Hub page declares them (SD 1.x: CreativeML Open RAIL-M; SD 2.x and SDXL 1.0: Open
# RAIL++-M). SDXL's text width is its two encoders' side by side (768 + 1280).
STABLE_DIFFUSION = (
    BackboneSpec(
        name="sd-1.4",
        source="CompVis/stable-diffusion-v1-4",
        description="Stable Diffusion 1.4 (the DoCo paper's model)",
        family="sd1",
        resolution=512,
        prediction_type="epsilon",
        text_width=768,
        license="creativeml-openrail-m",
    ),
    BackboneSpec(
        name="sd-1.5",
        source="stable-diffusion-v1-5/stable-diffusion-v1-5",
        description="Stable Diffusion 1.5",
        family="sd1",
        resolution=512,
        prediction_type="epsilon",
        text_width=768,
        license="creativeml-openrail-m",
    ),
    BackboneSpec(
        name="sd-2.1",
        source="stabilityai/stable-diffusion-2-1",
        description="Stable Diffusion 2.1, 768 px, v-prediction",
        family="sd2",
        resolution=768,
        prediction_type="v_prediction",
        text_width=1024,
        license="openrail++",
    ),
    BackboneSpec(
        name="sd-2.1-base",
        source="stabilityai/stable-diffusion-2-1-base",
        description="Stable Diffusion 2.1 base, 512 px, epsilon prediction",
        family="sd2",
        resolution=512,
        prediction_type="epsilon",
        text_width=1024,
        license="openrail++",
    ),
    BackboneSpec(
        name="sdxl-1.0",
        source="stabilityai/stable-diffusion-xl-base-1.0",
        description="Stable Diffusion XL 1.0 base, 1024 px, two text encoders",
        resolution=1024,
        prediction_type="epsilon",
        text_width=2048,
        license="openrail++",
        **SDXL_DEFAULTS,  # family "sdxl", sampling guidance 5, the SDXL erase presets
    ),
)


@hookimpl
def register_backbones(register):
    for spec in STABLE_DIFFUSION:
        register(spec)
