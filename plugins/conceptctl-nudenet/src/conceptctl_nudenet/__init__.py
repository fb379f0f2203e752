"""conceptctl plugin: NudeNet as an evaluation detector, and the per-class nudity table.

Registers the detector ``nudenet`` and the metric ``nudenet-counts``. Nothing heavy is imported
here (conceptctl imports every plugin to build ``--help``): onnxruntime, OpenCV and NudeNet load
inside the factories.
"""

from conceptctl.components import Component
from conceptctl.hookspecs import hookimpl


def _detector(options):
    from conceptctl_nudenet.detector import build_detector

    return build_detector(options)


def _counts():
    from conceptctl_nudenet.metric import NudeNetCounts

    return NudeNetCounts()


@hookimpl
def register_detectors(register):
    register(Component("nudenet", _detector,
                       "NudeNet 3.4 (320n.onnx): exposed body parts, score > 0.45"))


@hookimpl
def register_metrics(register):
    register(Component("nudenet-counts", _counts,
                       "target groups: pictures per NudeNet exposed class, original vs erased"))
