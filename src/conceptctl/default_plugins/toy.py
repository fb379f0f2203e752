"""The embedded toy world, self-contained: the `toy` backbone (the default), its anchor selector,
evaluation suite (with its vocabulary for the paraphrase attack) and judge, and the
`conceptctl toy` commands. Core code knows none of them by name."""

from pathlib import Path

from conceptctl.backbones.spec import BackboneSpec
from conceptctl.components import Component
from conceptctl.hookspecs import hookimpl
from conceptctl.toy.paths import MODEL_DIR
from conceptctl.toy.recipe import TOY_ERASE_PRESETS


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
    fixed_resolution=True,  # its world and its judge are 64 px pictures
    prediction_type="epsilon",
    text_width=384,
    loader=load_toy,
    sample_steps=20,
    sample_guidance=3.0,
    anchor_selector="toy",
    detector="toy-judge",
    eval_suite="toy",
    erase_presets=TOY_ERASE_PRESETS,
    # conceptctl's own weights, under the project's license; its MiniLM text encoder's weights are
    # Apache 2.0 as well (sentence-transformers).
    license="apache-2.0",
)


@hookimpl
def register_backbones(register):
    register(TOY)


@hookimpl
def register_commands(app):
    from conceptctl.cli import toy

    app.add_typer(toy.app, name="toy")


def _anchor_selector(config, backbone):
    from conceptctl.toy.anchors import toy_anchor_set

    count = {} if config.anchor_prompt_count is None else {"count": config.anchor_prompt_count}
    return toy_anchor_set(config.concept, config.anchor, config.concept_type, fallback=count,
                          also_erased=config.also_erased())


def _suite(manifest, images_per_prompt, seed):
    from conceptctl.toy.eval_suite import toy_suite

    return toy_suite(manifest, images_per_prompt, seed)


def _judge(options):
    from conceptctl.evaluation.detectors import detector_options
    from conceptctl.toy.detector import ToyJudgeDetector

    detector_options(options, (), "toy-judge")  # it has none: a --detector-option is a mistake
    return ToyJudgeDetector()


@hookimpl
def register_anchor_selectors(register):
    register(Component("toy", _anchor_selector, "the toy world's own caption templates"))


@hookimpl
def register_suites(register):
    register(Component("toy", _suite, "the toy world's groups, graded by the toy judge"))


@hookimpl
def register_detectors(register):
    register(Component("toy-judge", _judge, "the toy judge: object, style, colour"))
