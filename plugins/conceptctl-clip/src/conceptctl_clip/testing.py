"""A tiny random-weight CLIP model folder, built offline, for tests (no CLIP weights can be
downloaded in every environment conceptctl must support). Same files and code paths as a real
one: ``CLIPModel`` safetensors weights, a genuine ``CLIPTokenizer`` (conceptctl's tiny byte-level
vocabulary) and a CLIP image processor config."""

from __future__ import annotations

from pathlib import Path


def save_tiny_clip(path: str | Path, seed: int = 0, image_size: int = 32) -> Path:
    import torch
    from transformers import CLIPConfig, CLIPModel

    from conceptctl.testing import build_tiny_tokenizer

    try:
        from transformers import CLIPImageProcessorPil as ImageProcessor
    except ImportError:
        from transformers import CLIPImageProcessor as ImageProcessor

    path = Path(path)
    tokenizer = build_tiny_tokenizer()
    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
                         bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, image_size=image_size, patch_size=8),
        projection_dim=16,
    )
    CLIPModel(config).save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    ImageProcessor(size={"shortest_edge": image_size},
                   crop_size={"height": image_size, "width": image_size}).save_pretrained(path)
    return path
