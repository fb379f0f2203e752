"""``uce``: Unified Concept Editing (Gandikota et al., WACV 2024), a closed-form edit of the
cross-attention key and value projections. No training loop: one linear solve, seconds.

For every projection W of ``attn2.to_k`` / ``attn2.to_v`` (paper eq. 7; the authors'
``edit_model`` in rohitgandikota/unified-concept-editing, train-scripts/train_erase.py):

    W' = (λ W + s_e Σ_i v*_i c_iᵀ + s_p Σ_j W c_j c_jᵀ)
         (λ I + s_e Σ_i c_i c_iᵀ + s_p Σ_j c_j c_jᵀ)⁻¹

- c_i: the text-encoder states of an edited prompt (the concept's name), from its last word
  token to the end of the padded sequence; v*_i = W c*_i, with c*_i the states of the anchor's
  prompt at the same positions (the authors' ``technique='replace'``: the concept's tokens are
  given the anchor's projections). The two sequences are aligned at their last word tokens and
  cut to the same length, as the authors' code does. That is right for CLIP, whose token states
  read only the words before them (the last word piece of a name has read all of it). A text
  encoder that reads both ways (BERT-like, the toy's MiniLM) spreads a name over its word
  pieces, and editing from the last one leaves the concept in place (the toy's Monet, `Mon`
  `##et`, stayed in every picture: docs/erase.md). So the solve asks the encoder
  (:func:`reads_ahead`) and, when it reads ahead, aligns both prompts at their first word token
  instead; CLIP's alignment is the authors' exactly.
- c_j: every token state (padding included) of each retain prompt, whose projections stay W c_j.
- λ (``uce_lambda``) 0.5, s_e (``uce_erase_scale``) 1 and s_p (``uce_preserve_scale``) 0.1:
  the authors' script defaults (``lamb=0.5`` in its call, ``--erase_scale 1``,
  ``--preserve_scale 0.1``), with keys and values both edited (``with_to_k=True``).

Since v*_i = W c*_i and W c_j are linear in W, the numerator is W·A with
A = λ I + s_e Σ_i c*_i c_iᵀ + s_p Σ_j c_j c_jᵀ, and every projection reads the same text states:
W' = W · A · B⁻¹ with one d×d matrix A B⁻¹ for all layers (d: the text width), solved once in
float64. It equals the authors' per-layer solve up to float rounding (tests/test_uce.py
transcribes their loop and compares).

Retain prompts: the anchor selector's retain set (on the toy: a caption of every point of the
world without the erased concepts), else ``--retain-prompts``, else photos of the 80 COCO
objects (conceptctl.erasure.anchors.retain_prompts). The authors' script retains the names of
1,734 other artists for styles and only the empty prompt otherwise.
"""

from __future__ import annotations

import torch

from conceptctl.errors import UsageError

# The authors' script defaults (module docstring).
LAMBDA = 0.5
ERASE_SCALE = 1.0
PRESERVE_SCALE = 0.1
EDITED = (".attn2.to_k.", ".attn2.to_v.")


def aligned_states(states: torch.Tensor, mask: torch.Tensor, old: int, new: int,
                   from_first: bool = False):
    """The authors' alignment of an edited prompt (row ``old``) with its anchor prompt (row
    ``new``): each from its last word token (attention-mask length − 2) to the end, the longer
    one's tail cut so both have the same length; (c, c*), each (tokens, width).
    ``from_first``: both from their first word token (after the start token), for a text
    encoder that reads ahead (module docstring)."""
    last_old = 1 if from_first else int(mask[old].sum()) - 2
    last_new = 1 if from_first else int(mask[new].sum()) - 2
    farthest = max(last_old, last_new)
    length = states.shape[1]
    c = states[old, last_old: length - (farthest - last_old)]
    c_star = states[new, last_new: length - (farthest - last_new)]
    return c, c_star


def reads_ahead(backbone) -> bool:
    """Whether the text encoder's token states depend on the words after them (BERT-like)
    rather than only on those before (CLIP): the first word's state of two prompts that differ
    only in their last word."""
    from conceptctl.backbones.soft_prompt import PromptEncoder

    encoder = PromptEncoder(backbone, ["a photo of a house", "a photo of a boat"])
    with torch.no_grad():
        first = encoder()[:, 1].double()
    return not torch.allclose(first[0], first[1], rtol=0, atol=1e-5)


class UnifiedConceptEditing:
    """``uce``: edits the ``params`` (cross-attention keys and values) in place, in
    :meth:`edit`; the trainer runs no steps for it (``closed_form``)."""

    closed_form = True

    def __init__(self, ctx, lam: float = LAMBDA, erase_scale: float = ERASE_SCALE,
                 preserve_scale: float = PRESERVE_SCALE) -> None:
        odd = [name for name in ctx.params if not any(part in name for part in EDITED)
               or not name.endswith(".weight")]
        if odd:
            raise UsageError(f"uce edits the cross-attention key and value weights only, not "
                             f"{odd[0]}", hint="leave --params out (uce uses cross-attn-kv)")
        self.ctx, self.lam = ctx, lam
        self.erase_scale, self.preserve_scale = erase_scale, preserve_scale
        self.figures: dict = {}

    def edit_pairs(self, groups) -> list[tuple[str, str]]:
        """(edited prompt, anchor prompt) pairs: each concept's name towards its anchor's, as
        the authors' script does by default."""
        return [(erasure.concept, erasure.anchor) for erasure, _ in groups]

    def solve(self, pairs: list[tuple[str, str]], retain: tuple[str, ...],
              from_first: bool = False) -> torch.Tensor:
        """A B⁻¹ (module docstring), (width, width), float64; ``from_first``: the alignment
        for a text encoder that reads ahead (:func:`aligned_states`)."""
        from conceptctl.backbones.soft_prompt import PromptEncoder

        backbone = self.ctx.backbone
        width = backbone.text_width
        a = self.lam * torch.eye(width, dtype=torch.float64)
        b = self.lam * torch.eye(width, dtype=torch.float64)
        texts = [text for pair in pairs for text in pair]
        encoder = PromptEncoder(backbone, texts)
        # What cross-attention reads (SDXL: not the pooled row, which the edited projections
        # never see).
        states, mask = backbone.token_states(encoder()).double().cpu(), encoder.mask.cpu()
        for i in range(len(pairs)):
            c, c_star = aligned_states(states, mask, 2 * i, 2 * i + 1, from_first)
            a += self.erase_scale * c_star.T @ c
            b += self.erase_scale * c.T @ c
        if retain:
            kept = backbone.token_states(PromptEncoder(backbone, list(retain))()).double().cpu()
            gram = torch.einsum("ptd,pte->de", kept, kept)
            a += self.preserve_scale * gram
            b += self.preserve_scale * gram
        # A B⁻¹ = (B⁻ᵀ Aᵀ)ᵀ, and B is symmetric: a solve, not an inverse.
        return torch.linalg.solve(b, a.T).T

    def edit(self, groups, retain: tuple[str, ...]) -> dict:
        """Replace every edited projection W by W A B⁻¹; figures for the manifest."""
        pairs = self.edit_pairs(groups)
        from_first = reads_ahead(self.ctx.backbone)
        transform = self.solve(pairs, retain, from_first)
        for p in self.ctx.params.values():
            p.copy_((p.detach().double().cpu() @ transform).to(p))
        self.figures = {"edited_prompts": [list(pair) for pair in pairs],
                        "retain_prompts": len(retain), "tensors": len(self.ctx.params),
                        "aligned_from": "first word token" if from_first else "last word token"}
        return self.figures
