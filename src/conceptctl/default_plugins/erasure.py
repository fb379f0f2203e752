"""Built-in erasure components: methods, discriminators, gradient surgeries, anchor selectors."""

from conceptctl.components import Component
from conceptctl.erasure.config import CA_RECIPE, ESD_X_RECIPE, UCE_RECIPE
from conceptctl.hookspecs import hookimpl


def _doco(context, config):
    import torch

    from conceptctl.erasure.methods import DoCo
    from conceptctl.registry import get_registry

    backbone = context.backbone
    disc = get_registry("discriminator").get(config.discriminator).build(
        latent_channels=backbone.latent_channels,
        latent_size=backbone.resolution // backbone.vae_scale_factor,
    ).to(backbone.device)
    surgery = get_registry("gradient-surgery").get(config.surgery).build(
        strength=config.surgery_strength, prior_weight=config.prior_weight,
        max_grad_norm=config.max_grad_norm)
    # The reference's discriminator optimiser: Adam, betas (0.5, 0.999).
    d_opt = torch.optim.Adam(disc.parameters(), lr=config.d_lr, betas=(0.5, 0.999))
    return DoCo(context, disc, d_opt, surgery, warmup=config.warmup,
                prior_batch=config.prior_batch, d_update=config.d_update)


def _ca(context, config):
    from conceptctl.erasure.methods import AblatingConcepts

    return AblatingConcepts(context, prior_weight=0.0, goal="student")


def _uce(context, config):
    from conceptctl.erasure.uce import UnifiedConceptEditing

    return UnifiedConceptEditing(context, lam=config.uce_lambda,
                                 erase_scale=config.uce_erase_scale,
                                 preserve_scale=config.uce_preserve_scale)


def _ca_doco_recipe(context, config):
    from conceptctl.erasure.methods import AblatingConcepts

    return AblatingConcepts(context, prior_weight=1.0, goal="frozen")


def _esd_x(context, config):
    from conceptctl.erasure.esd import EsdX

    return EsdX(context, [e.concept for e in config.erasures()], config.batch_size,
                eta=config.esd_eta,
                sampling_steps=config.esd_sampling_steps)


def _esd_x_doco_recipe(context, config):
    from conceptctl.erasure.methods import EsdXOnAnchors

    return EsdXOnAnchors(context, eta=config.esd_eta)


def _patchgan(latent_channels, latent_size):
    from conceptctl.erasure.discriminators import PatchGAN

    return PatchGAN(latent_channels, latent_size)


def _hinge_sn(latent_channels, latent_size):
    from conceptctl.erasure.discriminators import HingeSpectral

    return HingeSpectral(latent_channels, latent_size)


def _doco_projection(strength, prior_weight, max_grad_norm):
    from conceptctl.erasure.surgery import DocoProjection

    return DocoProjection(strength, max_grad_norm)


def _doco_reference(strength, prior_weight, max_grad_norm):
    from conceptctl.erasure.surgery import DocoReference

    return DocoReference(strength, max_grad_norm)


def _pcgrad(strength, prior_weight, max_grad_norm):
    from conceptctl.erasure.surgery import PCGrad

    return PCGrad(max_grad_norm)


def _weighted_sum(strength, prior_weight, max_grad_norm):
    from conceptctl.erasure.surgery import WeightedSum

    return WeightedSum(prior_weight, max_grad_norm)


def _templates(config, backbone):
    from conceptctl.erasure.anchors import template_anchor_set

    return template_anchor_set(config.concept, config.anchor, config.concept_type,
                               **_count(config))


def _count(config) -> dict:
    return {} if config.anchor_prompt_count is None else {"count": config.anchor_prompt_count}


def _prompt_file(config, backbone):
    from pathlib import Path

    from conceptctl.erasure.anchors import file_anchor_set
    from conceptctl.errors import UsageError

    if not config.anchor_prompts:
        raise UsageError("the prompt-file anchor selector needs --anchor-prompts FILE")
    return file_anchor_set(Path(config.anchor_prompts), config.concept, config.anchor,
                           config.concept_type)


@hookimpl
def register_methods(register):
    register(Component("doco", _doco, "DoCo: adversarial domain correction + gradient surgery"))
    register(Component("ca", _ca, "Ablating Concepts (model-based), the authors' recipe",
                       recipe=CA_RECIPE))
    register(Component("esd-x", _esd_x, "ESD on cross-attention, the authors' recipe",
                       uses_anchor_images=False, recipe=ESD_X_RECIPE))
    register(Component("uce", _uce, "Unified Concept Editing: closed-form edit of the "
                       "cross-attention keys/values, seconds", uses_anchor_images=False,
                       recipe=UCE_RECIPE, closed_form=True))
    register(Component("ca-doco-recipe", _ca_doco_recipe,
                       "CA's loss (frozen target + DoCo's prior) with DoCo's recipe"))
    register(Component("esd-x-doco-recipe", _esd_x_doco_recipe,
                       "ESD's target on anchor x_t with DoCo's recipe"))


@hookimpl
def register_discriminators(register):
    register(Component("patchgan", _patchgan, "reference PatchGAN, BCE (DoCo default)"))
    register(Component("hinge-sn", _hinge_sn, "PatchGAN layout, spectral norm, hinge loss"))


@hookimpl
def register_gradient_surgeries(register):
    register(Component("doco", _doco_projection,
                       "exact projection of conflicts, then a joint clip (default)"))
    register(Component("doco-reference", _doco_reference,
                       "the authors' code: clip g_p and g_u jointly, subtract cos * unit g_p"))
    register(Component("pcgrad", _pcgrad, "symmetric PCGrad, both applied, joint clip"))
    register(Component("none", _weighted_sum,
                       "no surgery: g_u + prior_weight * g_p, joint clip"))


@hookimpl
def register_anchor_selectors(register):
    register(Component("templates", _templates, "built-in offline templates per concept type"))
    register(Component("prompt-file", _prompt_file, "your anchor prompts, one per line"))
