"""The CLIP model behind the ``clip`` detector and the ``clip-score`` metric.

One way to name it: the environment variable ``CONCEPTCTL_CLIP_MODEL``, a local folder holding a
transformers ``CLIPModel`` with its tokenizer and image processor (what ``save_pretrained``
writes, e.g. openai/clip-vit-large-patch14 downloaded by the user). Detector and metric read the
same variable, so a run judged by another detector (NudeNet) still gets its CLIP score.

Only safetensors weights are loaded (a pickled ``pytorch_model.bin`` can run code when read, and
conceptctl refuses pickles elsewhere too). Embeddings are cached per picture and per text, so the
detector's labels, its FD / KID features and the CLIP score embed each picture once.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from conceptctl.errors import ConceptctlError

ENV_MODEL = "CONCEPTCTL_CLIP_MODEL"
NO_MODEL = (f"no CLIP model: set {ENV_MODEL}=/path/to/clip, a local transformers CLIPModel "
            "folder (e.g. openai/clip-vit-large-patch14)")
BATCH = 32  # pictures per forward pass: bounded memory on the CPU
_LOADED: dict[tuple[str, str], ClipModel] = {}


def model_path() -> Path | None:
    """The folder ``CONCEPTCTL_CLIP_MODEL`` names, checked; None when it is unset."""
    value = os.environ.get(ENV_MODEL, "").strip()
    if not value:
        return None
    path = Path(value).expanduser().resolve()
    if not (path / "config.json").is_file():
        raise ConceptctlError(f"{ENV_MODEL}={value} is not a transformers model folder "
                              "(no config.json)",
                              hint="save a CLIPModel, its tokenizer and image processor there "
                                   "with save_pretrained")
    return path


def load_clip(path: Path, device: str = "cpu") -> ClipModel:
    """One loaded model per (folder, device) and process."""
    key = (str(path), str(device))
    if key not in _LOADED:
        _LOADED[key] = ClipModel(path, device)
    return _LOADED[key]


def _sha256(path: Path) -> str:
    from conceptctl.fingerprint import file_sha256

    return file_sha256(path)


class ClipModel:
    def __init__(self, path: Path, device: str = "cpu") -> None:
        from conceptctl.runtime import quiet_libraries

        quiet_libraries()
        import torch
        import transformers
        from transformers import AutoTokenizer, CLIPModel

        try:
            # transformers 5 routes CLIPImageProcessor to torchvision when it can; the PIL one
            # gives the same pixels everywhere (torchvision may be missing or differ).
            from transformers import CLIPImageProcessorPil as ImageProcessor
        except ImportError:  # transformers 4: the PIL implementation is CLIPImageProcessor
            from transformers import CLIPImageProcessor as ImageProcessor
        self.path = Path(path)
        self.device = torch.device(device)
        try:
            self.model = CLIPModel.from_pretrained(path, use_safetensors=True,
                                                   local_files_only=True)
            self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
            self.processor = ImageProcessor.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise ConceptctlError(
                f"cannot load a CLIP model from {path}: {str(exc).splitlines()[0]}",
                hint="the folder needs config.json, model.safetensors, the tokenizer files and "
                     "preprocessor_config.json (CLIPModel / CLIPProcessor save_pretrained)",
            ) from None
        self.model.eval().to(self.device)
        self.max_length = int(self.model.config.text_config.max_position_embeddings)
        weights = sorted(p for p in self.path.glob("*.safetensors"))
        self.provenance = {
            "model": str(self.path),
            "weights_sha256": {p.name: _sha256(p) for p in weights},
            "image_processor": type(self.processor).__name__,
            "transformers_version": transformers.__version__,
        }
        self._images: dict[bytes, np.ndarray] = {}
        self._texts: dict[str, np.ndarray] = {}

    @property
    def logit_scale(self) -> float:
        return float(self.model.logit_scale.detach().exp())

    @staticmethod
    def _pooled(out):
        # transformers 4 returns the projected embeddings; 5 returns an output whose
        # pooler_output holds them.
        return out if hasattr(out, "ndim") else out.pooler_output

    def image_embeds(self, images: np.ndarray) -> np.ndarray:
        """uint8 (N, H, W, 3) -> projected image embeddings (N, D), float32, not normalised."""
        import torch
        from PIL import Image

        keys = [hashlib.blake2b(p.tobytes() + str(p.shape).encode(), digest_size=16).digest()
                for p in images]
        missing = [i for i, k in enumerate(keys) if k not in self._images]
        for start in range(0, len(missing), BATCH):
            chunk = missing[start:start + BATCH]
            # PIL pictures, as the papers' scripts read their PNGs: no channel-order guessing.
            pixels = self.processor(images=[Image.fromarray(images[i]) for i in chunk],
                                    return_tensors="pt")["pixel_values"]
            with torch.no_grad():
                out = self._pooled(self.model.get_image_features(
                    pixel_values=pixels.to(self.device)))
            for i, row in zip(chunk, out.float().cpu().numpy(), strict=True):
                self._images[keys[i]] = row
        return np.stack([self._images[k] for k in keys]) if keys else np.zeros((0, 0), "f4")

    def text_embeds(self, texts: list[str]) -> np.ndarray:
        """Texts -> projected text embeddings (N, D), float32, not normalised. Texts longer than
        the model's context (77 tokens for OpenAI CLIP) are truncated, as torchmetrics does."""
        import torch

        missing = list(dict.fromkeys(t for t in texts if t not in self._texts))
        for start in range(0, len(missing), BATCH):
            chunk = missing[start:start + BATCH]
            tokens = self.tokenizer(chunk, padding=True, truncation=True,
                                    max_length=self.max_length, return_tensors="pt")
            with torch.no_grad():
                out = self._pooled(self.model.get_text_features(
                    input_ids=tokens["input_ids"].to(self.device),
                    attention_mask=tokens["attention_mask"].to(self.device)))
            for text, row in zip(chunk, out.float().cpu().numpy(), strict=True):
                self._texts[text] = row
        return np.stack([self._texts[t] for t in texts])


def unit(rows: np.ndarray) -> np.ndarray:
    return rows / np.linalg.norm(rows, axis=-1, keepdims=True)
