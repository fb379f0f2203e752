"""Built-in export formats: diffusers folder, LoRA, original single file, delta, UI diff."""

from conceptctl.export import Exporter
from conceptctl.hookspecs import hookimpl

# The exporters import torch and diffusers when they run, never when they are listed.


def _diffusers(job, out):
    from conceptctl.export.diffusers_folder import export_diffusers

    return export_diffusers(job, out)


def _lora(job, out):
    from conceptctl.export.lora import export_lora

    return export_lora(job, out)


def _check_lora(options):
    from conceptctl.export.lora import check_options

    check_options(options)


def _single_file(job, out):
    from conceptctl.export.single_file import export_single_file

    return export_single_file(job, out)


def _delta(job, out):
    from conceptctl.export.delta import export_delta

    return export_delta(job, out)


def _diff(job, out):
    from conceptctl.export.diff import export_diff

    return export_diff(job, out)


# What each one-file format's model card says about loading it (conceptctl.export.sidecars).


def _lora_loading(job, report, name):
    from conceptctl.export.sidecars import lora_how_to_load

    return lora_how_to_load(job, report, name)


def _single_file_loading(job, report, name):
    from conceptctl.export.sidecars import single_file_how_to_load

    return single_file_how_to_load(job, report, name)


def _delta_loading(job, report, name):
    from conceptctl.export.sidecars import delta_how_to_load

    return delta_how_to_load(job, report, name)


@hookimpl
def register_exporters(register):
    register(Exporter("diffusers", _diffusers, "full pipeline folder for from_pretrained, with "
                      "a model card", writes="folder"))
    register(Exporter("lora", _lora, "the weight change as a LoRA (truncated SVD), kohya "
                      "(default) or diffusers naming", options=("rank", "max_error", "lora_format"),
                      check=_check_lora, how_to_load=_lora_loading))
    register(Exporter("single-file", _single_file, "one original-layout SD checkpoint "
                      "(Automatic1111, ComfyUI, from_single_file)",
                      how_to_load=_single_file_loading))
    register(Exporter("delta", _delta, "only the changed tensors, erased minus base",
                      how_to_load=_delta_loading))
    register(Exporter("diff", _diff, "the exact weight change as Automatic1111 and ComfyUI "
                      "load it (lora_unet_*.diff / .diff_b)"))
