"""A template conceptctl plugin. Copy this package, rename it, and change what it registers.

It registers one backbone, ``example-tiny``: a Stable-Diffusion-1-shaped pipeline with about a
million random weights, built in a second from configs. It draws noise, not pictures, but every
code path (sampling, and later training and export) runs on it in seconds, which makes it a
handy sandbox for testing another plugin.

Keep module-level imports light: conceptctl imports every plugin to assemble ``--help``. Import
torch and diffusers inside the functions that need them.
"""

from conceptctl.backbones import BackboneSpec
from conceptctl.hookspecs import hookimpl


def load_example_tiny(spec, options):
    """Build the pipeline and hand it to conceptctl (``options``: device and dtype to use)."""
    from conceptctl.backbones.loading import wrap_pipeline
    from conceptctl.testing import build_tiny_pipeline

    return wrap_pipeline(spec, build_tiny_pipeline("sd1", seed=0), options)


@hookimpl
def register_backbones(register):
    register(
        BackboneSpec(
            name="example-tiny",
            description="Random-weight SD1-shaped pipeline for plugin tests (draws noise)",
            family="sd1",
            resolution=16,
            prediction_type="epsilon",
            text_width=32,
            loader=load_example_tiny,
        )
    )
