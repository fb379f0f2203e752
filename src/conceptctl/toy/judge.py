"""The toy world's judge: which object, style and colour an image shows, with probabilities.

A small CNN with one head per axis, trained on rendered pictures (and on their round trip through
the toy VAE, so that it judges generated images as well as rendered ones). It is the ground truth
of every toy measurement: prompt-following, erasure success, preservation. Its penultimate
features (``features``) also serve as the feature space for distribution metrics.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from conceptctl.errors import UsageError
from conceptctl.toy.world import AXES

JUDGE_FILE = Path(__file__).parent / "weights" / "judge.safetensors"
FEATURES = 128


class JudgeNet(nn.Module):
    """A full-resolution stem, three strided stages (64 -> 8 px), mean+max pooling, one linear
    head per axis."""

    def __init__(self) -> None:
        super().__init__()
        chans = (32, 64, 96, FEATURES)
        layers: list[nn.Module] = [nn.Conv2d(3, chans[0], 3, padding=1),
                                   nn.BatchNorm2d(chans[0]), nn.ReLU(inplace=True)]
        for c_in, c_out in zip(chans[:-1], chans[1:], strict=True):
            layers += [
                nn.Conv2d(c_in, c_out, 3, stride=2, padding=1),
                nn.BatchNorm2d(c_out),
                nn.ReLU(inplace=True),
                nn.Conv2d(c_out, c_out, 3, padding=1),
                nn.BatchNorm2d(c_out),
                nn.ReLU(inplace=True),
            ]
        self.body = nn.Sequential(*layers)
        self.neck = nn.Linear(2 * FEATURES, FEATURES)
        self.heads = nn.ModuleDict({axis: nn.Linear(FEATURES, len(v)) for axis, v in AXES.items()})

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1], (B, 3, 64, 64) -> (B, FEATURES) descriptors."""
        x = self.body(images)
        pooled = torch.cat([x.mean((2, 3)), x.amax((2, 3))], dim=1)
        return torch.relu(self.neck(pooled))

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        feats = self.features(images)
        return {axis: head(feats) for axis, head in self.heads.items()}


@dataclass(frozen=True)
class Verdict:
    """The judge's reading of one image: the most likely value and every probability per axis."""

    labels: dict[str, str]
    probabilities: dict[str, dict[str, float]]

    def as_dict(self) -> dict:
        return {**self.labels, "probabilities": self.probabilities}


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1)


class Judge:
    """A loaded judge. ``Judge.load()`` reads the one shipped with conceptctl."""

    def __init__(self, net: JudgeNet, meta: dict | None = None) -> None:
        self.net = net.eval()
        self.meta = meta or {}

    @classmethod
    def load(cls, path: Path = JUDGE_FILE) -> Judge:
        from safetensors import safe_open
        from safetensors.torch import load_file

        from conceptctl.errors import ConceptctlError

        if not path.is_file():
            raise ConceptctlError(f"no toy judge at {path}",
                                  hint="train one with 'conceptctl toy train'")
        net = JudgeNet()
        net.load_state_dict(load_file(path))
        with safe_open(path, "pt") as fh:
            meta = json.loads((fh.metadata() or {}).get("conceptctl", "{}"))
        return cls(net, meta)

    @torch.no_grad()
    def logits(self, images: np.ndarray, batch_size: int = 256) -> dict[str, torch.Tensor]:
        out: dict[str, list[torch.Tensor]] = {axis: [] for axis in AXES}
        for start in range(0, len(images), batch_size):
            batch = self.net(to_tensor(images[start : start + batch_size]))
            for axis in AXES:
                out[axis].append(batch[axis])
        return {axis: torch.cat(chunks) for axis, chunks in out.items()}

    @torch.no_grad()
    def features(self, images: np.ndarray, batch_size: int = 256) -> torch.Tensor:
        chunks = [self.net.features(to_tensor(images[s : s + batch_size]))
                  for s in range(0, len(images), batch_size)]
        return torch.cat(chunks)

    def judge(self, images: np.ndarray) -> list[Verdict]:
        """uint8 images (N, 64, 64, 3) -> one :class:`Verdict` each."""
        probs = {axis: logits.softmax(-1) for axis, logits in self.logits(images).items()}
        verdicts = []
        for i in range(len(images)):
            labels, table = {}, {}
            for axis, values in AXES.items():
                row = probs[axis][i]
                labels[axis] = values[int(row.argmax())]
                table[axis] = {v: round(float(p), 4) for v, p in zip(values, row, strict=True)}
            verdicts.append(Verdict(labels, table))
        return verdicts


def _open_image(path: Path):
    from PIL import Image

    img = Image.open(path)
    img.load()  # decode now, inside the caller's error handling
    return img


def load_images(paths: list[Path]) -> np.ndarray:
    """Read image files as the judge's input: RGB, resized to 64x64 if needed."""
    from PIL import Image

    from conceptctl.toy.render import SIZE

    arrays = []
    for path in paths:
        try:
            img = _open_image(path)
        except (OSError, Image.DecompressionBombError) as err:  # not an image, or a bomb
            raise UsageError(f"cannot read {path} as an image: {err}",
                             hint="give PNG or JPEG files (the toy judges 64x64 pictures)"
                             ) from None
        with img:
            img = img.convert("RGB")
            if img.size != (SIZE, SIZE):
                img = img.resize((SIZE, SIZE), Image.Resampling.BICUBIC)
            arrays.append(np.asarray(img))
    return np.stack(arrays)
