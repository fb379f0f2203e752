"""Every hook a conceptctl plugin can implement. Declarations only; docs/plugins.md documents each.

Hooks are called once, when a registry is first built (or when the CLI is assembled), never per
training step. ``register_*`` hooks receive a ``register`` callable and hand it descriptions of
components (factories, not loaded models), so listing plugins never imports torch.
"""

from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("conceptctl")
hookimpl = pluggy.HookimplMarker("conceptctl")


@hookspec
def register_backbones(register):
    """Register text-to-image backbones.

    Call ``register(spec)`` once per backbone with a :class:`conceptctl.backbones.BackboneSpec`:
    its stable kebab-case ``name``, where the weights come from (``source``: a hub id or local
    folder), its known properties (resolution, prediction type, text-encoder width) and optionally a
    ``loader`` callable for backbones that are not plain diffusers folders.
    """


@hookspec
def register_commands(app):
    """Add commands to the ``conceptctl`` command line.

    ``app`` is the root :class:`typer.Typer`. Use ``@app.command()`` or ``app.add_typer(...)``.
    Import heavy libraries (torch, diffusers) inside the command function, not at module level:
    ``conceptctl --help`` assembles every plugin's commands.
    """
