"""The embedded toy world: the `toy` backbone (the default) and the `conceptctl toy` commands."""

from pathlib import Path

from conceptctl.backbones.spec import BackboneSpec
from conceptctl.hookspecs import hookimpl
from conceptctl.toy.paths import MODEL_DIR


def load_toy(spec, options):
    from conceptctl.backbones.loading import wrap_pipeline
    from conceptctl.toy.model import load_toy_pipeline

    return wrap_pipeline(spec, load_toy_pipeline(Path(spec.source or MODEL_DIR)), options)


TOY = BackboneSpec(
    name="toy",
    source=str(MODEL_DIR),
    description="Embedded toy world: 6 objects x 4 styles x 5 colours at 64 px (offline)",
    family="toy",
    resolution=64,
    prediction_type="epsilon",
    text_width=384,
    loader=load_toy,
    sample_steps=20,
    sample_guidance=3.0,
    anchor_selector="toy",
    detector="toy-judge",
    eval_suite="toy",
)


@hookimpl
def register_backbones(register):
    register(TOY)


@hookimpl
def register_commands(app):
    from conceptctl.cli import toy

    app.add_typer(toy.app, name="toy")
