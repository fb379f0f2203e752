"""conceptctl: erase concepts from text-to-image diffusion models, measure it, ship the result."""

__version__ = "0.1.0"
