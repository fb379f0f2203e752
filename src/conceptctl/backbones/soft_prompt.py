"""Soft prompts: learnable input embeddings placed in a prompt, encoded by the backbone's own text
encoder. The evaluation's attacks (``embedding``, ``unlearndiffatk``) and adversarial erasure's
inner attack (conceptctl.erasure.adversarial) share it."""

from __future__ import annotations

import torch


class PromptEncoder:
    """The backbone's own text encoder on fixed prompts, tokenised once. Gradients reach the
    encoder's weights when they require them (``--params text-encoder``); otherwise it gives
    exactly what ``Backbone.encode_prompts`` gives (the pipeline's ``encode_prompt``: padded
    to the tokenizer's length, the attention mask only where the encoder's config asks)."""

    tokens = 0  # soft tokens after the start token (SoftPromptEncoder's)

    def __init__(self, backbone, prompts: list[str]) -> None:
        tok, enc = backbone.tokenizer, backbone.text_encoder
        self.encoder = enc
        ids = tok(prompts, padding="max_length", max_length=tok.model_max_length,
                  truncation=True, return_tensors="pt")
        self.input_ids, self.mask = self._layout(ids.input_ids, ids.attention_mask)
        self.input_ids = self.input_ids.to(backbone.device)
        self.mask = self.mask.to(backbone.device)
        self.use_mask = bool(getattr(enc.config, "use_attention_mask", False))

    def _layout(self, input_ids: torch.Tensor, mask: torch.Tensor):
        return input_ids, mask

    def __len__(self) -> int:
        return len(self.input_ids)

    def __call__(self, rows: list[int] | torch.Tensor | None = None) -> torch.Tensor:
        """Encoder states of the prompts (``rows`` of them), (rows, tokens, width)."""
        return self._encode(rows, None)

    def _encode(self, rows, embeds: torch.Tensor | None) -> torch.Tensor:
        ids = self.input_ids if rows is None else self.input_ids[rows]
        mask = self.mask if rows is None else self.mask[rows]
        if embeds is None:
            return self.encoder(ids, attention_mask=mask if self.use_mask else None)[0]
        layer = self.encoder.get_input_embeddings()

        def replace(module, inputs, output):
            output = output.clone()
            output[:, 1 : 1 + self.tokens] = embeds.to(output.dtype)
            return output

        handle = layer.register_forward_hook(replace)
        try:
            out = self.encoder(ids, attention_mask=mask if self.use_mask else None)
        finally:
            handle.remove()
        return out[0]


class SoftPromptEncoder(PromptEncoder):
    """The backbone's own text encoder with ``tokens`` input embeddings of the caller's placed
    right after the first (start) token of every prompt. It hooks the input-embedding layer, so
    it works for CLIP (SD) and BERT (toy) encoders alike, position embeddings included."""

    def __init__(self, backbone, prompts: list[str], tokens: int) -> None:
        self.tokens = tokens
        super().__init__(backbone, prompts)

    def _layout(self, input_ids: torch.Tensor, mask: torch.Tensor):
        # Make room: [start] + tokens placeholders + the rest, truncated to the same length.
        filler = torch.full((len(input_ids), self.tokens), int(input_ids[0, 1]))
        return (torch.cat([input_ids[:, :1], filler, input_ids[:, 1:]], 1)[:, : input_ids.shape[1]],
                torch.cat([mask[:, :1], torch.ones_like(filler), mask[:, 1:]], 1)[
                    :, : mask.shape[1]])

    def random_words(self, generator: torch.Generator) -> torch.Tensor:
        """Embeddings of random vocabulary words, (prompts, tokens, width), float32."""
        table = self.encoder.get_input_embeddings().weight
        start = torch.randint(0, table.shape[0], (len(self.input_ids), self.tokens),
                              generator=generator)
        return table[start.to(table.device)].detach().clone().float()

    def __call__(self, embeds: torch.Tensor, rows: list[int] | None = None) -> torch.Tensor:
        """Encoder states of the prompts (``rows`` of them) with ``embeds`` (one row each) in
        the placeholders' stead."""
        return self._encode(rows, embeds)
