"""Soft prompts: learnable input embeddings placed in a prompt, encoded by the backbone's own text
encoder. The evaluation's attacks (``embedding``, ``unlearndiffatk``) and adversarial erasure's
inner attack (conceptctl.erasure.adversarial) share it.

SDXL has two text encoders reading the same prompt: a soft word there is a pair of input
embeddings, one per encoder, handled as one vector of both widths side by side (the first
encoder's part first), so an attack optimises and bounds it as it would one encoder's. Both
encoders must share one vocabulary (SDXL's two CLIP tokenizers do), so that a word's id means
the same word to both.
"""

from __future__ import annotations

import torch

from conceptctl.errors import UsageError


class PromptEncoder:
    """The backbone's own text encoder(s) on fixed prompts, tokenised once. Gradients reach the
    encoders' weights when they require them (``--params text-encoder``); otherwise it gives
    exactly what ``Backbone.encode_prompts`` gives (the pipeline's ``encode_prompt``: padded
    to the tokenizer's length, the attention mask only where the encoder's config asks; SDXL:
    both encoders' penultimate states and the pooled row, conceptctl.backbones.sdxl)."""

    tokens = 0  # soft tokens after the start token (SoftPromptEncoder's)

    def __init__(self, backbone, prompts: list[str]) -> None:
        self.encoders = backbone.text_encoders
        self.sdxl = backbone.is_sdxl
        self.ids, self.masks = [], []
        for tok in backbone.tokenizers:
            tokens = tok(prompts, padding="max_length", max_length=tok.model_max_length,
                         truncation=True, return_tensors="pt")
            ids, mask = self._layout(tokens.input_ids, tokens.attention_mask)
            self.ids.append(ids.to(backbone.device))
            self.masks.append(mask.to(backbone.device))
        # The first encoder's, which callers index rows and align tokens by (SDXL's two
        # tokenizers split a prompt into the same tokens; they differ in padding only).
        self.input_ids, self.mask = self.ids[0], self.masks[0]
        self.use_mask = bool(getattr(self.encoders[0].config, "use_attention_mask", False))

    @property
    def encoder(self) -> torch.nn.Module:
        """The (first) text encoder."""
        return self.encoders[0]

    def _layout(self, input_ids: torch.Tensor, mask: torch.Tensor):
        return input_ids, mask

    def __len__(self) -> int:
        return len(self.input_ids)

    def __call__(self, rows: list[int] | torch.Tensor | None = None) -> torch.Tensor:
        """Encoder states of the prompts (``rows`` of them), (rows, tokens, width)."""
        return self._encode(rows, None)

    def _encode(self, rows, embeds: torch.Tensor | None) -> torch.Tensor:
        outputs, start = [], 0
        for encoder, ids, mask in zip(self.encoders, self.ids, self.masks, strict=True):
            width = encoder.get_input_embeddings().weight.shape[1]
            own = None if embeds is None else embeds[..., start : start + width]
            start += width
            outputs.append(self._run(encoder, ids if rows is None else ids[rows],
                                     mask if rows is None else mask[rows], own))
        if self.sdxl:
            from conceptctl.backbones import sdxl

            return sdxl.encoder_outputs(outputs)
        return outputs[0][0]

    def _run(self, encoder, ids: torch.Tensor, mask: torch.Tensor, embeds: torch.Tensor | None):
        # SDXL conditions on the penultimate layer: ask for every layer's states.
        extra = {"output_hidden_states": True} if self.sdxl else {}
        if embeds is None:
            return encoder(ids, attention_mask=mask if self.use_mask else None, **extra)

        def replace(module, inputs, output):
            output = output.clone()
            output[:, 1 : 1 + self.tokens] = embeds.to(output.dtype)
            return output

        handle = encoder.get_input_embeddings().register_forward_hook(replace)
        try:
            return encoder(ids, attention_mask=mask if self.use_mask else None, **extra)
        finally:
            handle.remove()


class SoftPromptEncoder(PromptEncoder):
    """The backbone's own text encoder with ``tokens`` input embeddings of the caller's placed
    right after the first (start) token of every prompt. It hooks the input-embedding layer, so
    it works for CLIP (SD, SDXL) and BERT (toy) encoders alike, position embeddings included."""

    def __init__(self, backbone, prompts: list[str], tokens: int) -> None:
        self.tokens = tokens
        super().__init__(backbone, prompts)
        tables = [encoder.get_input_embeddings().weight for encoder in self.encoders]
        vocabularies = [tok.get_vocab() for tok in backbone.tokenizers]
        if len({table.shape[0] for table in tables}) > 1 or any(
                vocabulary != vocabularies[0] for vocabulary in vocabularies[1:]):
            raise UsageError(
                "soft-prompt attacks need the model's text encoders to share one vocabulary, "
                "and this model's tokenizers differ",
                hint="leave out --adversarial and the embedding / unlearndiffatk attacks for it")

    def _layout(self, input_ids: torch.Tensor, mask: torch.Tensor):
        # Make room: [start] + tokens placeholders + the rest, truncated to the same length.
        filler = torch.full((len(input_ids), self.tokens), int(input_ids[0, 1]))
        return (torch.cat([input_ids[:, :1], filler, input_ids[:, 1:]], 1)[:, : input_ids.shape[1]],
                torch.cat([mask[:, :1], torch.ones_like(filler), mask[:, 1:]], 1)[
                    :, : mask.shape[1]])

    def table(self) -> torch.Tensor:
        """The input embedding of every vocabulary word, (vocabulary, width): one soft word's
        space (SDXL: both encoders' embeddings of the word side by side)."""
        tables = [encoder.get_input_embeddings().weight for encoder in self.encoders]
        return tables[0] if len(tables) == 1 else torch.cat(
            [table.to(tables[0].device) for table in tables], dim=1)

    def random_words(self, generator: torch.Generator) -> torch.Tensor:
        """Embeddings of random vocabulary words, (prompts, tokens, width), float32."""
        table = self.table()
        start = torch.randint(0, table.shape[0], (len(self.input_ids), self.tokens),
                              generator=generator)
        return table[start.to(table.device)].detach().clone().float()

    def __call__(self, embeds: torch.Tensor, rows: list[int] | None = None) -> torch.Tensor:
        """Encoder states of the prompts (``rows`` of them) with ``embeds`` (one row each) in
        the placeholders' stead."""
        return self._encode(rows, embeds)
