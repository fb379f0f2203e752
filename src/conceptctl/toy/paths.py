"""Where the toy world's shipped weights live: torch-free, so listing backbones stays instant."""

from pathlib import Path

WEIGHTS_DIR = Path(__file__).parent / "weights"
MODEL_DIR = WEIGHTS_DIR / "toy-model"
