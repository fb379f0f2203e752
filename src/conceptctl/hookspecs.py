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


@hookspec
def register_methods(register):
    """Register erasure methods (``doco``, ``ca``, ``esd-x`` are built in).

    Call ``register(Component(name, factory, description))``. ``factory(context, config)``
    receives a :class:`conceptctl.erasure.methods.Context` (backbone, frozen UNet, trainable
    parameters, random generator) and the run's :class:`conceptctl.erasure.config.EraseConfig`,
    and returns an object whose ``training_step(batch, step)`` leaves gradients in the trainable
    parameters and returns a :class:`conceptctl.erasure.methods.StepStats`.
    """


@hookspec
def register_discriminators(register):
    """Register discriminators on predicted clean latents (``patchgan``, ``hinge-sn`` built in).

    ``factory(latent_channels, latent_size)`` returns a ``torch.nn.Module`` with
    ``d_loss(anchor, target)``, ``g_loss(target)`` and ``accuracy(anchor, target)``.
    """


@hookspec
def register_gradient_surgeries(register):
    """Register ways to combine DoCo's unlearning and preserving gradients (``doco``,
    ``doco-reference``, ``pcgrad``, ``none`` built in).

    ``factory(strength, prior_weight, max_grad_norm)`` (keywords, from the run's
    ``EraseConfig``: ``surgery_strength``, ``prior_weight``, ``max_grad_norm``) returns a callable
    ``(g_unlearn, g_preserve) -> (gradients, changed)`` that sees the whole trained set at once:
    both arguments are dicts, trained tensor name -> gradient (summed over processes, unscaled);
    it returns name -> the gradient the optimiser applies, and how many tensors its conflict rule
    changed. It also places the clip to ``max_grad_norm``: the trainer applies the result as
    is, with no further clip. It owns the tensors it is given and may change them in place.
    """


@hookspec
def register_anchor_selectors(register):
    """Register anchor-prompt selectors (``templates``, ``prompt-file``, ``toy`` built in).

    ``factory(config, backbone)`` receives the run's ``EraseConfig`` and the ``BackboneSpec`` and
    returns a :class:`conceptctl.erasure.anchors.AnchorSet` of paired anchor/target prompts.
    """


@hookspec
def register_detectors(register):
    """Register concept detectors for evaluation (``toy-judge`` built in).

    ``factory(options)`` receives a dict of user options (``conceptctl evaluate --detector-option
    KEY=VALUE``) and returns a :class:`conceptctl.evaluation.detectors.Detector`: ``judge(images)``
    labels each picture, ``shows(labels, concept)`` says whether one shows a concept,
    ``matches(labels, expect)`` whether it shows what its prompt asked, and optionally
    ``features(images)`` gives feature vectors for Fréchet distance and KID. ``info()`` returns
    what a report must record to reproduce its numbers (version, file hashes, thresholds).
    """


@hookspec
def register_suites(register):
    """Register built-in evaluation prompt suites (``toy`` and ``templates`` built in).

    ``factory(manifest, images_per_prompt, seed)`` receives the artifact's ``conceptctl.json``
    contents and returns a :class:`conceptctl.evaluation.cases.Suite`: prompt cases in the groups
    ``target``, ``target-oos``, ``anchor``, ``hard-negative`` and ``general``.
    """


@hookspec
def register_metrics(register):
    """Register evaluation metrics (``erasure``, ``preservation``, ``retention``, ``fd``,
    ``kid`` built in).

    ``factory()`` returns an object with ``compute(run)`` that receives a
    :class:`conceptctl.evaluation.run.EvalRun` (cases, judged labels and features of the original
    and erased images) and returns a list of :class:`conceptctl.evaluation.metrics.Score`.
    """


@hookspec
def register_attacks(register):
    """Register robustness attacks (``embedding`` and ``paraphrase`` built in).

    ``factory(options)`` (``{"cases": N}`` plus the user's ``--attack-option NAME.KEY=VALUE``
    strings; see :func:`conceptctl.evaluation.attacks.attack_options`) returns an object with
    ``settings()`` and ``attack(run)`` that receives the
    :class:`conceptctl.evaluation.run.EvalRun` and returns a list of
    :class:`conceptctl.evaluation.attacks.Attempt`: per attacked target case, the images the
    erased model drew under attack. conceptctl judges them and reports the attack success rate.
    """


@hookspec
def register_exporters(register):
    """Register export formats for ``conceptctl export`` (``diffusers``, ``lora``,
    ``single-file``, ``delta`` built in).

    Call ``register(Exporter(name, export, description, writes, options))`` with a
    :class:`conceptctl.export.Exporter`. ``export(job, out)`` receives a
    :class:`conceptctl.export.ExportJob` (the erased backbone, the base and erased values of the
    changed tensors, the header metadata every file must carry, the format's options) and a
    staging path — a file path when ``writes == "file"``, an empty folder when ``"folder"`` — that
    conceptctl renames to the user's target only when ``export`` returns, and returns a dict of
    figures to report.
    """
