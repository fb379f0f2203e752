"""Hidden spellings of options: the underscore names of diffusers' training scripts.

Commands copied from diffusers' examples (``train_dreambooth.py``, ``train_text_to_image.py``)
and the ``accelerate launch`` lines written for them spell options with underscores. Every
option of every command also answers to its underscore spelling (``--mixed_precision``,
``--checkpointing_steps``), and the diffusers names that differ from ours map to the option that
means the same (``--output_dir`` is ``--output``, ``--learning_rate`` is ``--lr``). None of them
shows in ``--help``: one spelling is documented per option, these are listed once in
docs/cli.md.

They work through click's token normalisation: the parser rewrites every option name it reads
(and every declared one, which have no underscores) before looking it up, so nothing is added
to the commands themselves.
"""

from __future__ import annotations

from collections.abc import Callable

# For every command (set on the root, which every command's context inherits).
SHARED = {"output_dir": "output"}

# Per command: diffusers' name -> ours (without the leading dashes).
RENAMES: dict[str, dict[str, str]] = {
    "erase": {
        "pretrained_model_name_or_path": "backbone",
        "train_batch_size": "batch-size",
        "learning_rate": "lr",
        "max_train_steps": "steps",
        "resume_from_checkpoint": "resume",
        "allow_tf32": "tf32",
    },
    "sample": {
        "pretrained_model_name_or_path": "backbone",
        "num_inference_steps": "steps",
        "guidance_scale": "guidance",
        "num_images_per_prompt": "num-images",
    },
    "evaluate": {
        "pretrained_model_name_or_path": "backbone",
        "num_inference_steps": "steps",
        "guidance_scale": "guidance",
        "num_images_per_prompt": "images-per-prompt",
    },
    "export": {"pretrained_model_name_or_path": "backbone"},
}


def normalizer(renames: dict[str, str]) -> Callable[[str], str]:
    """The token normaliser of a command: its renames (and the shared ones), then every
    underscore as a dash."""
    table = {**SHARED, **renames}

    def normalize(token: str) -> str:
        return table.get(token, token).replace("_", "-")

    return normalize


def context_settings(command: str | None = None) -> dict:
    """``context_settings`` that give ``command`` (None: the root) its hidden spellings."""
    return {"token_normalize_func": normalizer(RENAMES.get(command, {}))}
