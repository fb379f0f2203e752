"""``--retain-refine``: after training, a closed-form step that takes the trained cross-attention
key/value edit back where the retain prompts live.

Why: a trained erasure of the key and value projections changes them for every token, not only
the concept's. DoCo's preservation loss covers the anchor's captions only, so prompts it never
sees drift (on the toy, "a red boat, painted by Claude Monet" turned yellow in 10 of 12 pictures
after Van Gogh -> painting, and a second erasure stacked on top compounds it: docs/erase.md).
UCE's solve keeps a retain set by construction; this step gives a trained edit the same
guarantee, with the trained weights in the place of UCE's concept term.

For every key/value projection (the weights UCE edits), with W₀ the projection before the run
(the base's, when stacking), W the trained one and c_j every token state of every retain prompt
(padding included, as UCE), the step solves

    W' = argmin ‖W' − W‖² + s Σ_j ‖W' ĉ_j − W₀ ĉ_j‖²
       = (W + s W₀ Ĝ)(I + s Ĝ)⁻¹,     Ĝ = G · d / tr G,   G = Σ_j c_j c_jᵀ

(d: the text width). Ĝ is G scaled to mean eigenvalue 1, so that ``s`` (``retain_refine``)
means the same whatever the encoder's scale and the number of retain prompts: s = 0 leaves W,
s → ∞ gives W₀ on every direction the retain prompts span. Directions they do not span — the
concept's own token states, as far as they differ from every retained caption's — keep the
trained edit. That is UCE's preservation term (conceptctl.erasure.uce, paper eq. 7) with the
trained weights as the prior instead of the original ones; MACE (Lu et al., CVPR 2024) refines
the same projections in closed form. One d×d solve for every projection, in float64: seconds.

Retain prompts: the same set as UCE's and adversarial erasure's (the anchor selector's retain
set, else ``--retain-prompts``, else photos of the 80 COCO objects; never a prompt that names an
erased concept): conceptctl.erasure.anchors.retain_prompts.
"""

from __future__ import annotations

import torch

# The projections that read the text's token states (UCE's, conceptctl.erasure.uce.EDITED).
REFINED = (".attn2.to_k.", ".attn2.to_v.")
# Retain prompts encoded per batch (a large --retain-prompts file stays within memory).
_BATCH = 64


def refined_names(names) -> list[str]:
    """The trained tensors the step refines: cross-attention key and value weights."""
    return [name for name in names
            if any(part in name for part in REFINED) and name.endswith(".weight")]


def retain_gram(backbone, retain: tuple[str, ...]) -> torch.Tensor:
    """Σ_j c_j c_jᵀ over every token state cross-attention reads of every retain prompt,
    (width, width), float64 on the CPU. (``uce`` computes the same sum from one batch of all
    its prompts; batches of another size round the float32 states differently, so it keeps its
    own, which its measured figures stand on.)"""
    from conceptctl.backbones.soft_prompt import PromptEncoder

    width = backbone.text_width
    gram = torch.zeros(width, width, dtype=torch.float64)
    with torch.no_grad():
        for start in range(0, len(retain), _BATCH):
            batch = list(retain[start:start + _BATCH])
            states = backbone.token_states(PromptEncoder(backbone, batch)()).double().cpu()
            gram += torch.einsum("ptd,pte->de", states, states)
    return gram


def refine(params: dict, before: dict[str, torch.Tensor], backbone,
           retain: tuple[str, ...], scale: float) -> dict:
    """Replace every trained key/value projection W in ``params`` (in place) by the module
    docstring's W', ``before`` holding each one's W₀; figures for the manifest."""
    names = refined_names(params)
    gram = retain_gram(backbone, retain)
    width = gram.shape[0]
    normalised = gram * (width / gram.trace())
    eye = torch.eye(width, dtype=torch.float64)
    solve_with = eye + scale * normalised  # symmetric: W' = N S⁻¹ is a solve, S N'ᵀ = Nᵀ
    edit_before = edit_after = base_norm = 0.0
    for name in names:
        p = params[name]
        w0 = before[name].double().cpu()
        w = p.detach().double().cpu()
        numerator = w + scale * w0 @ normalised
        refined = torch.linalg.solve(solve_with, numerator.T).T
        edit_before += float((w - w0).square().sum())
        edit_after += float((refined - w0).square().sum())
        base_norm += float(w0.square().sum())
        with torch.no_grad():
            p.copy_(refined.to(p))
    return {"scale": scale, "retain_prompts": len(retain), "tensors": len(names),
            # How large the edit is, relative to the projections, before and after the step.
            "relative_edit_trained": round((edit_before / base_norm) ** 0.5, 6),
            "relative_edit_refined": round((edit_after / base_norm) ** 0.5, 6)}
