"""conceptctl plugin: CLIP accuracy and CLIP score with a CLIP model the user provides.

Registers the detector ``clip`` (zero-shot: concept text vs anchor text, CLIP image features for
FD / KID) and the metric ``clip-score``. The model is a local transformers ``CLIPModel`` folder
named by the environment variable ``CONCEPTCTL_CLIP_MODEL``; none ships with the plugin.
Nothing heavy is imported here (conceptctl imports every plugin to build ``--help``).
"""

from conceptctl.components import Component
from conceptctl.hookspecs import hookimpl


def _detector(options):
    from conceptctl_clip.detector import build_detector

    return build_detector(options)


def _clip_score():
    from conceptctl_clip.metric import ClipScore

    return ClipScore()


@hookimpl
def register_detectors(register):
    register(Component("clip", _detector,
                       "CLIP zero-shot: concept text vs anchor text (CONCEPTCTL_CLIP_MODEL)"))


@hookimpl
def register_metrics(register):
    register(Component("clip-score", _clip_score,
                       "every group: mean CLIP score of pictures with their prompts"))
